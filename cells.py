"""The recurrent cells of the two papers, as crbp cells: forward(h, x) -> h_next, init_state(x) -> h_0.

    [CRBP] Linsley, Ashok, Govindarajan, Liu, Serre. "Stable and expressive recurrent vision models."
           NeurIPS 2020 (supplement §3): the Pathfinder hGRU and its ConvLSTM control; the GroupNorm hGRU of
           the panoptic mask head.
    [LOC]  "Cortically motivated recurrence enables task extrapolation" (ICLR 2023 submission, §4.1):
           LocRNN, ConvGRU, and the weight-tied blocks of Schwarzschild et al.'s R-ResNet (NeurIPS 2021).

Each cell's equations sit above the lines that compute them. Where the authors' code and their paper
disagree we follow the code that produced the numbers, say so in a comment marked "code vs paper", and
offer the paper's form as an option where it is cheap. models.py puts a front end and a readout around
each cell; fastpath.py holds the hGRU's FFT convolutions and its explicit VJP.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastpath


def _per_channel(channels, value):
    return nn.Parameter(torch.full((channels, 1, 1), float(value)))  # C x 1 x 1, broadcasts over space


class HGRUCell(nn.Module):
    """The Pathfinder hGRU of [CRBP] as in the code that produced the paper's numbers (hgrucleanSEG.py).

    State H (B x C x H x W, H_0 = 0), drive Z >= 0 with the same shape. C channels, E x E horizontal kernels.
    Parameters with the paper code's 15 x 15 kernels and its front end and readout: 284,127, i.e. the code's
    284,227 minus the 100 parameters of its two BatchNorms that are allocated but never used (we drop them:
    their gradient would be None). Kernel sweep: 104,127 / 34,127 / 14,127 for E = 9 / 5 / 3.

    bias_init: "trained" = the gate biases b1 ~ U(1, 7), b2 = -b1, as trained (the code's .log() was not in
               place, so it never applied); "log" = the intended chronos init b1 = log U(1, 7).
    form:      "code" (default) or "supplement": SI §3.1's stage 2, one nu on (C2 + S) instead of kappa and
               gamma, and no softplus on the new state. Its nu starts at 1.0 (gamma's init; the SI gives none).
    conv:      "direct" (default, F.conv2d) or "fft": the same function through fastpath.fft_conv, with the
               kernel spectra computed once per run by prepare(z) (float32 or wider; faster for large E).
    """

    def __init__(self, channels: int = 25, kernel: int = 15, *, bias_init: str = "trained", form: str = "code",
                 conv: str = "direct"):
        super().__init__()
        _check_int("channels", channels, 1)
        _check_kernel("kernel", kernel)
        _check_choice("bias_init", bias_init, ("trained", "log"))
        _check_choice("form", form, ("code", "supplement"))
        _check_choice("conv", conv, ("direct", "fft"))
        C, self.form, self.pad, self.conv = channels, form, kernel // 2, conv
        self.u1 = nn.Conv2d(C, C, 1)  # U^S, b1: stage-1 (suppression) gate
        self.u2 = nn.Conv2d(C, C, 1)  # U^F, b2: stage-2 (update) gate
        self.w_inh = nn.Parameter(torch.empty(C, C, kernel, kernel))  # W^S, suppressive horizontal kernel
        self.w_exc = nn.Parameter(torch.empty(C, C, kernel, kernel))  # W^F, facilitative horizontal kernel
        self.alpha, self.mu = _per_channel(C, 0.1), _per_channel(C, 1.0)  # multiplicative / additive suppression
        if form == "code":  # code vs paper: separate kappa (on S) and gamma (on C2) where the SI has one nu
            self.kappa, self.gamma = _per_channel(C, 0.5), _per_channel(C, 1.0)
        else:
            self.nu = _per_channel(C, 1.0)
        self.omega = _per_channel(C, 0.5)  # multiplicative facilitation
        # code vs paper: BN eps 1e-3, weight 0.1, and no running statistics, so batch statistics are used in
        # train AND eval (the paper's test numbers were made that way, per GPU batch of 32). Shared over steps.
        self.bn_inh = nn.BatchNorm2d(C, eps=1e-3, track_running_stats=False)
        self.bn_exc = nn.BatchNorm2d(C, eps=1e-3, track_running_stats=False)
        with torch.no_grad():
            for w in (self.w_inh, self.w_exc, self.u1.weight, self.u2.weight):
                nn.init.orthogonal_(w)  # flattened to C x (C E E): orthonormal rows
            for bn in (self.bn_inh, self.bn_exc):
                bn.weight.fill_(0.1)
            self.u1.bias.uniform_(1, 7)  # the gates start mostly open for stage 1, mostly closed for stage 2
            if bias_init == "log":
                self.u1.bias.log_()
            self.u2.bias.copy_(-self.u1.bias)

    def init_state(self, z):
        return torch.zeros_like(z)

    def prepare(self, z) -> dict:
        """Keyword arguments for every step of a run on drive z (Recurrent calls this once per forward):
        with conv="fft", the spectra of W_inh and W_exc, so that no step or Neumann term recomputes them."""
        return {} if self.conv == "direct" else {"spectra": fastpath.hgru_spectra(self, z)}

    def vjp(self, h, z, v, spectra=None):
        """v^T dF(h, z)/dh, written out (fastpath.vjp_h): crbp.run's vjp= for the Neumann terms and the LCP."""
        return fastpath.vjp_h(self, h, z, v, self._spectra(z, spectra))

    def linearize(self, h, z, spectra=None):
        """(F(h, z), the factors of dF/dh), for adjoint(); the two halves of vjp (fastpath.StepVJP)."""
        return fastpath.linearize(self, h, z, self._spectra(z, spectra))

    def adjoint(self, factors, v, spectra=None):
        """v^T dF/dh from linearize()'s factors (spectra=None: the adjoint convolutions by F.conv_transpose2d)."""
        return fastpath.adjoint(self, factors, v, spectra)

    def _spectra(self, z, spectra):
        return spectra if spectra is not None or self.conv == "direct" else fastpath.hgru_spectra(self, z)

    def _horizontal(self, a, i, spectra):
        """W * a for W = (W_inh, W_exc)[i], E x E: F.conv2d, or fft_conv through the run's kernel spectra."""
        if spectra is None:
            return F.conv2d(a, (self.w_inh, self.w_exc)[i], padding=self.pad)
        return fastpath.fft_conv(a, spectra[i], spectra.size)

    def forward(self, h, z, spectra=None):
        sp = F.softplus  # the rectifier [.]_+ of the paper is softplus (beta 1)
        spectra = self._spectra(z, spectra)
        # Stage 1, suppression:
        #   G1 = sigmoid(U1 * H + b1);   C1 = BN(W_inh * (H . G1))
        #   S  = sp(Z - sp(C1 . (alpha H + mu)))
        g1 = torch.sigmoid(self.u1(h))
        c1 = self.bn_inh(self._horizontal(h * g1, 0, spectra))
        s = sp(z - sp(c1 * (self.alpha * h + self.mu)))
        # Stage 2, facilitation:
        #   G2 = sigmoid(U2 * S + b2);   C2 = BN(W_exc * S)
        g2 = torch.sigmoid(self.u2(s))
        c2 = self.bn_exc(self._horizontal(s, 1, spectra))
        if self.form == "code":
            #   H~  = sp(kappa S + gamma C2 + omega S . C2)
            #   H_t = sp((1 - G2) . H + G2 . H~)       code vs paper: the SI has no softplus here
            h_hat = sp(self.kappa * s + self.gamma * c2 + self.omega * s * c2)
            return sp((1 - g2) * h + g2 * h_hat)
        #   H~ = sp(nu (C2 + S) + omega C2 . S);   H_t = (1 - G2) . H + G2 . H~     (supplement §3.1)
        h_hat = sp(self.nu * (c2 + s) + self.omega * c2 * s)
        return (1 - g2) * h + g2 * h_hat


class HGRUGNCell(nn.Module):
    """The hGRU of [CRBP]'s panoptic mask head (rnns.py hConvGRUCell, GALA=True, less softplus, NORM=GN).

    Differs from HGRUCell: GroupNorm, a GALA-style stage-1 gate (a per-pixel channel bottleneck times a
    spatial map; no global pooling in that code), no inner softplus in the suppression, H~ = sp(GN(W_exc * S))
    without kappa/gamma/omega, no softplus on the new state, Kaiming-normal init, gate bias U(1, T - 1).
    With 256 channels and 3x3 kernels it has 1,576,256 parameters, as in the paper's mask head.
    """

    def __init__(self, channels: int = 256, kernel: int = 3, *, groups: int = 32, timesteps: int = 20):
        super().__init__()
        _check_int("channels", channels, 4)
        _check_kernel("kernel", kernel)
        _check_int("timesteps", timesteps, 1)
        if not (isinstance(groups, int) and groups >= 1 and channels % groups == 0):
            raise ValueError(f"groups must be an int that divides channels={channels}, got {groups!r}")
        C, self.pad = channels, kernel // 2
        self.glob0 = nn.Conv2d(C, C // 4, 1)  # U_c0 (+ b_c0): global (channel) path, reduction 4
        self.glob1 = nn.Conv2d(C // 4, C, 1, bias=False)  # U_c1
        self.loc0 = nn.Conv2d(C, C // 2, 3, padding=1)  # W_s0 (+ b_s): local (spatial) path
        self.loc1 = nn.Conv2d(C // 2, 1, 3, padding=1, bias=False)  # W_s1, one map
        self.b1 = _per_channel(C, 0.0)  # b_comb, bias of the stage-1 gate
        self.u2 = nn.Conv2d(C, C, 1)  # update gate
        self.w_inh = nn.Parameter(torch.empty(C, C, kernel, kernel))
        self.w_exc = nn.Parameter(torch.empty(C, C, kernel, kernel))
        self.alpha, self.mu = _per_channel(C, 0.1), _per_channel(C, 1.0)
        self.gn_inh, self.gn_exc = nn.GroupNorm(groups, C), nn.GroupNorm(groups, C)
        with torch.no_grad():
            for w in (self.glob0.weight, self.glob1.weight, self.loc0.weight, self.loc1.weight,
                      self.u2.weight, self.w_inh, self.w_exc):
                nn.init.kaiming_normal_(w)
            self.loc0.bias.zero_()
            for gn in (self.gn_inh, self.gn_exc):
                gn.weight.fill_(0.1)
            # U(1, T - 1) with T = max(timesteps, 2), as trained (again the .log() was not in place).
            self.b1.uniform_(1, max(timesteps, 2) - 1)
            self.u2.bias.copy_(-self.b1.flatten())

    def init_state(self, x):
        return torch.zeros_like(x)

    def forward(self, h, x):
        sp = F.softplus
        #   G1 = sigmoid( U_c1 * sp(U_c0 * H + b_c0)  .  W_s1 * sp(W_s0 * H + b_s)  +  b1 )
        g_glob = self.glob1(sp(self.glob0(h)))  # (B, C, H, W)
        g_loc = self.loc1(sp(self.loc0(h)))  # (B, 1, H, W), broadcast over channels
        g1 = torch.sigmoid(g_glob * g_loc + self.b1)
        #   C1 = GN(W_inh * (H . G1));   S = sp(X - C1 . (alpha H + mu))   (no inner softplus)
        c1 = self.gn_inh(F.conv2d(h * g1, self.w_inh, padding=self.pad))
        s = sp(x - c1 * (self.alpha * h + self.mu))
        #   G2 = sigmoid(U2 * S + b2);   H~ = sp(GN(W_exc * S));   H_t = (1 - G2) . H + G2 . H~
        g2 = torch.sigmoid(self.u2(s))
        h_hat = sp(self.gn_exc(F.conv2d(s, self.w_exc, padding=self.pad)))
        return (1 - g2) * h + g2 * h_hat


class ConvLSTMCell(nn.Module):
    """ConvLSTM control of [CRBP] (convlstm.py): E x E kernels on both paths, no peepholes, default init.

    The x-path convs have a bias, the h-path convs none. The four gates share one conv per path (same init
    distribution as four convs: the fan-in is the same). State (h, c), both zero at t = 0.
    code vs crbp: the paper code's RBP and LCP used only the diagonal blocks (dh/dh, dc/dc); crbp.run
    treats (h, c) as one state (see crbp.lcp).
    """

    def __init__(self, in_channels: int, channels: int, kernel: int):
        super().__init__()
        _check_int("channels", channels, 1)
        _check_kernel("kernel", kernel)
        self.wx = nn.Conv2d(in_channels, 4 * channels, kernel, padding=kernel // 2)
        self.wh = nn.Conv2d(channels, 4 * channels, kernel, padding=kernel // 2, bias=False)

    def init_state(self, x):
        z = x.new_zeros(x.shape[0], self.wh.in_channels, *x.shape[2:])
        return z, z.clone()

    def forward(self, state, x):
        h, c = state
        # [i, f, o, g] = W_x * x + b + W_h * h
        i, f, o, g = (self.wx(x) + self.wh(h)).chunk(4, dim=1)  # 4 x (B, C, H, W)
        # c' = sigmoid(f) . c + sigmoid(i) . tanh(g);   h' = sigmoid(o) . tanh(c')
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class LocRNNCell(nn.Module):
    """LocRNN of [LOC] §4.1 (the code's DaleRNN): two populations, L (long-range) and S (short-range).

    W_ll, W_ls (into L) are long_kernel x long_kernel and W_sl, W_ss (into S) short x short, each pair one
    conv over [L; S] with one bias; the drive terms W_lx, W_sx and the gates U are 1x1 convs. "LN" is
    GroupNorm(1, C): per sample over (C, H, W), per-channel affine. No sign (Dale) constraint. Only L is
    read out. code vs paper: the paper lists a divisive normalisation ("divnorm 3x3 / 5x5") that the code
    does not have (we follow the code); the Mazes code starts from learned embeddings (LocRNNEmbedding),
    the paper and the Pathfinder code from zeros.
    """

    def __init__(self, in_channels: int, channels: int, long_kernel: int, short_kernel: int):
        super().__init__()
        _check_int("channels", channels, 1)
        _check_kernel("long_kernel", long_kernel)
        _check_kernel("short_kernel", short_kernel)
        C = channels
        self.u_lx, self.u_ll = nn.Conv2d(in_channels, C, 1), nn.Conv2d(C, C, 1)
        self.u_sx, self.u_ss = nn.Conv2d(in_channels, C, 1), nn.Conv2d(C, C, 1)
        self.w_lx, self.w_sx = nn.Conv2d(in_channels, C, 1), nn.Conv2d(in_channels, C, 1)
        self.w_l = nn.Conv2d(2 * C, C, long_kernel, padding=long_kernel // 2)  # [W_ll | W_ls]
        self.w_s = nn.Conv2d(2 * C, C, short_kernel, padding=short_kernel // 2)  # [W_sl | W_ss]
        self.ln_lx, self.ln_ll, self.ln_sx, self.ln_ss, self.ln_l, self.ln_s = (nn.GroupNorm(1, C) for _ in range(6))

    def init_state(self, x):
        z = x.new_zeros(x.shape[0], self.u_ll.in_channels, *x.shape[2:])
        return z, z.clone()

    def forward(self, state, x):
        L, S = state
        LS = torch.cat([L, S], dim=1)  # (B, 2C, H, W)
        # G^L = sigmoid(LN(U_lx * X) + LN(U_ll * L));   G^S = sigmoid(LN(U_sx * X) + LN(U_ss * S))     (1, 2)
        gl = torch.sigmoid(self.ln_lx(self.u_lx(x)) + self.ln_ll(self.u_ll(L)))
        gs = torch.sigmoid(self.ln_sx(self.u_sx(x)) + self.ln_ss(self.u_ss(S)))
        # L~ = relu(W_lx * X + W_ll * L + W_ls * S);    S~ = relu(W_sx * X + W_sl * L + W_ss * S)    (3, 4)
        l_new = F.relu(self.w_lx(x) + self.w_l(LS))
        s_new = F.relu(self.w_sx(x) + self.w_s(LS))
        # L = relu(LN(G^L . L~ + (1 - G^L) . L));       S = relu(LN(G^S . S~ + (1 - G^S) . S))       (5, 6)
        return F.relu(self.ln_l(gl * l_new + (1 - gl) * L)), F.relu(self.ln_s(gs * s_new + (1 - gs) * S))


class LocRNNEmbedding(nn.Module):
    """The Mazes LocRNN's initial state: L_0 = E_L * X, S_0 = E_S * X (1x1 convs with bias).

    It sits outside the cell because crbp.run gives h_0 a gradient only when the tape reaches step 1
    (bptt, c-bptt, tbptt with truncate = T): under rbp these 8,320 parameters stay at their init.
    """

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.e_l, self.e_s = nn.Conv2d(in_channels, channels, 1), nn.Conv2d(in_channels, channels, 1)

    def forward(self, x):
        return self.e_l(x), self.e_s(x)


class ConvGRUCell(nn.Module):
    """ConvGRU of the LocRNN code (convgru_layer.py): k x k convs over [X; h], orthogonal init, zero bias.

    act="tanh" is the code; act="relu" is the variant the LocRNN paper reports as better on Pathfinder.
    code vs ours: the code's h_0 copies X's shape, which breaks when hidden != input channels (its Pathfinder
    config); h_0 here is zeros with `channels` channels.
    """

    def __init__(self, in_channels: int, channels: int, kernel: int, *, act: str = "tanh"):
        super().__init__()
        _check_int("channels", channels, 1)
        _check_kernel("kernel", kernel)
        _check_choice("act", act, ("tanh", "relu"))
        C, self.act = channels, torch.tanh if act == "tanh" else F.relu
        self.w_zr = nn.Conv2d(in_channels + C, 2 * C, kernel, padding=kernel // 2)  # [W_z; W_r]
        self.w_h = nn.Conv2d(in_channels + C, C, kernel, padding=kernel // 2)
        with torch.no_grad():  # orthogonal per gate, as three separate convs would be
            for w in (self.w_zr.weight[:C], self.w_zr.weight[C:], self.w_h.weight):
                w.copy_(nn.init.orthogonal_(torch.empty_like(w)))
            self.w_zr.bias.zero_()
            self.w_h.bias.zero_()

    def init_state(self, x):
        return x.new_zeros(x.shape[0], self.w_h.out_channels, *x.shape[2:])

    def forward(self, h, x):
        # z = sigmoid(W_z * [X; h] + b_z);   r = sigmoid(W_r * [X; h] + b_r)
        z, r = torch.sigmoid(self.w_zr(torch.cat([x, h], dim=1))).chunk(2, dim=1)
        # h~ = tanh(W_h * [X; r . h] + b_h);   h' = (1 - z) . h + z . h~
        h_hat = self.act(self.w_h(torch.cat([x, r * h], dim=1)))
        return (1 - z) * h + z * h_hat


class BasicBlock(nn.Module):
    """Mazes ResNet block (no BN, no bias): h' = relu(h + conv(relu(conv(h))))."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)

    def forward(self, h):
        return F.relu(h + self.conv2(F.relu(self.conv1(h))))


class RResNetCell(nn.Module):
    """R-ResNet (Schwarzschild et al. 2021): one group of 2 BasicBlocks applied T times, h_0 = stem(images).

    There is no input injection: the cell ignores x, so only bptt-type training reaches the stem.
    """

    def __init__(self, width: int):
        super().__init__()
        self.blocks = nn.Sequential(BasicBlock(width), BasicBlock(width))

    def init_state(self, x):
        return x

    def forward(self, h, x):
        return self.blocks(h)


def _check_int(name, value, low):
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_kernel(name, k):
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1 and k % 2 == 1):
        raise ValueError(f"{name} must be an odd int >= 1 (for 'same' padding k // 2), got {k!r}")


def _check_choice(name, value, choices):
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
