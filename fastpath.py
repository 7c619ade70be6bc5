"""The hGRU's fast path: FFT convolutions, the explicit VJP of one step, and compilation (models.py --fast).

Nothing here changes the function: every piece computes what the plain path computes (F.conv2d, autograd),
and test_fastpath.py checks each against it in float64.

    spectra = hgru_spectra(cell, z)                   # W_inh, W_exc in the frequency domain, once per run
    h_next  = cell(h, z, spectra=spectra)             # a step through fft_conv
    v_J     = vjp_h(cell, h, z, v, spectra)           # v^T dF(h, z)/dh, an ordinary forward computation
    vjp     = StepVJP(cell.linearize, cell.adjoint)   # the same, with the step's Jacobian factors reused

Why an explicit VJP: crbp's Neumann series needs v^T J (J = dF/dh at h_{T-1}) K times, and the LCP needs
1^T J once, trained through. Autograd gets v^T J by running the step's whole backward (every parameter
gradient included, thrown away), and the LCP by a double backward. Written out, v^T J is a few
elementwise products, two BatchNorm adjoints and two adjoint convolutions: cheap, compilable, and its
first-order backward trains the LCP. This module imports only torch.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs


def at_least_fp32(z):
    return z.to(torch.promote_types(z.dtype, torch.float32))  # cuFFT has no bf16; float64 stays float64


# ----------------------------------------------------------------------------------------------------------
# FFT convolution. A 15 x 15 kernel on 25 channels does 225 multiply-adds per channel pair and pixel; in the
# frequency domain it is one complex C x O matrix per frequency. The kernel spectra are computed once per
# run and shared by all T steps, all Neumann terms and the LCP.


def fft_size(n: int, pad: int) -> int:
    """The smallest length >= n + pad with no prime factor above 7 (cuFFT is fastest on those).
    n + pad is enough for a 'same' convolution: the circular wrap-around then reads only zero padding."""
    m = n + pad
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def kernel_spectrum(w: torch.Tensor, size) -> torch.Tensor:
    """Spectrum of the 'same' cross-correlation with w (O x C x E x E, E odd) on the FFT grid size = (n, m),
    laid out for fft_conv's matrix products: n x (m // 2 + 1) x C x O, complex."""
    P = w.shape[-1] // 2
    k = F.pad(at_least_fp32(w), (0, size[1] - w.shape[-1], 0, size[0] - w.shape[-2]))  # O x C x n x m
    # Cross-correlation is convolution with the flipped kernel. Roll the kernel's centre to (0, 0), then flip
    # by conjugating: for real k, FFT(k(-i, -j)) = conj(FFT(k)).
    K = torch.fft.rfft2(torch.roll(k, (-P, -P), (-2, -1))).conj()  # O x C x n x m'
    return K.permute(2, 3, 1, 0).contiguous()  # n x m' x C x O


def adjoint_spectrum(w_hat: torch.Tensor) -> torch.Tensor:
    """The spectrum of the adjoint correlation (w flipped and transposed): W^H, n x m' x O x C, contiguous."""
    return w_hat.conj().transpose(-1, -2).resolve_conj().contiguous()


def fft_conv(x: torch.Tensor, w_hat: torch.Tensor, size) -> torch.Tensor:
    """F.conv2d(x, w, padding=E // 2) as rfft2 -> a C x O matrix product per frequency -> irfft2, where
    w_hat = kernel_spectrum(w, size) and size >= (H + E // 2, W + E // 2). x: B x C x H x W; out float32+.
    With w_hat = adjoint_spectrum(kernel_spectrum(w, size)) it is the adjoint, F.conv_transpose2d(x, w)."""
    return _FFTConv.apply(x, w_hat, tuple(size))


class _FFTConv(torch.autograd.Function):
    """fft_conv with its own backward. Autograd through rfft2 and irfft2 is correct but slow: its backward of
    each real FFT is a full complex FFT plus copies. Here the backward is itself one FFT convolution, because
    the adjoint of a 'same' cross-correlation with w is the one with w flipped and transposed, whose spectrum
    is the conjugate transpose W^H. The backward is differentiable (the LCP's double backward needs it)."""

    @staticmethod
    def forward(x, w_hat, size):
        return _fft_correlate(x, w_hat, size)

    @staticmethod
    def setup_context(ctx, inputs, output):  # the setup_context style, so that torch.func can run it too
        x, w_hat, ctx.size = inputs
        ctx.save_for_backward(x, w_hat)

    @staticmethod
    def backward(ctx, g):
        x, w_hat = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            #   dL/dx = W^T * g: the same correlation with the adjoint spectrum W^H (a conjugate-transposed view)
            gx = _FFTConv.apply(g, w_hat.conj().transpose(-1, -2), ctx.size).to(x.dtype)
        if ctx.needs_input_grad[1]:
            # dL/dW^ in autograd's convention for y = irfft2(X W^): X^H (the irfft2 adjoint of g), where that
            # adjoint is rfft2(g) / N with the columns that stand for two conjugate frequencies counted twice.
            n, m = ctx.size
            g = at_least_fp32(g)
            v = torch.arange(m // 2 + 1, device=g.device)
            twice = ((v > 0) & (2 * v < m)).to(g.dtype) + 1  # 1 for column 0 (and m/2 when m is even)
            G = torch.fft.rfft2(g, s=ctx.size).permute(2, 3, 0, 1) * (twice[:, None, None] / (n * m))
            X = torch.fft.rfft2(at_least_fp32(x), s=ctx.size).permute(2, 3, 0, 1)  # n x m' x B x C
            gw = X.conj().transpose(-1, -2) @ G  # n x m' x C x O, summed over the batch
        return gx, gw, None


def _fft_correlate(x, w_hat, size):
    H, W = x.shape[-2:]
    X = torch.fft.rfft2(at_least_fp32(x), s=size)  # B x C x n x m', x zero-padded
    #   Y(f) = X(f) W^(f): a C x O complex matrix product at every frequency f
    Y = (X.permute(2, 3, 0, 1) @ w_hat).permute(2, 3, 0, 1)  # a view: irfft2 copies it once, as c2r must
    return torch.fft.irfft2(Y, s=size)[..., :H, :W]


class Spectra(NamedTuple):
    """The hGRU's two horizontal kernels on the FFT grid, and their adjoints (for the VJP)."""
    inh: torch.Tensor  # n x m' x C x C, W_inh
    exc: torch.Tensor  # W_exc
    inh_adj: torch.Tensor  # W_inh^H
    exc_adj: torch.Tensor  # W_exc^H
    size: tuple  # (n, m), the FFT grid


def hgru_spectra(cell, z) -> Spectra:
    """Spectra of cell.w_inh and cell.w_exc for drives shaped like z (differentiable in the kernels)."""
    size = tuple(fft_size(n, cell.pad) for n in z.shape[-2:])
    inh, exc = kernel_spectrum(cell.w_inh, size), kernel_spectrum(cell.w_exc, size)
    return Spectra(inh, exc, adjoint_spectrum(inh), adjoint_spectrum(exc), size)


def horizontal(cell, a, i, spectra=None, adjoint=False):
    """W * a for the i-th horizontal kernel (0: W_inh, 1: W_exc), or its adjoint W^T * a: by F.conv2d when
    spectra is None, else by fft_conv."""
    if spectra is None:
        w = (cell.w_inh, cell.w_exc)[i]
        conv = F.conv_transpose2d if adjoint else F.conv2d
        return conv(a, w, padding=cell.pad)
    return fft_conv(a, spectra[i + 2 * adjoint], spectra.size)


# ----------------------------------------------------------------------------------------------------------
# The VJP of one hGRU step with respect to the state: v -> v^T dF(h, z)/dh (models.HGRUCell's equations).
# linearize() runs the step and keeps the factors of its Jacobian; adjoint() applies the transposed
# Jacobian to v through them. Both are differentiable in h, z and the parameters.


def _bn(bn, q):
    """BatchNorm with batch statistics: (BN(q), q_hat, w / sd), statistics per channel over B, H, W. The
    hGRU's BatchNorm keeps no running statistics (as the paper code's), so this is all it does: a step by
    linearize (StepVJP.step) is the cell's step in every way."""
    if bn.track_running_stats:
        raise ValueError("fastpath.linearize follows BatchNorm with batch statistics only "
                         "(track_running_stats=False, as HGRUCell builds it)")
    m = q.mean((0, 2, 3), keepdim=True)
    sd = (q - m).square().mean((0, 2, 3), keepdim=True).add(bn.eps).sqrt()  # biased variance, as BN uses
    q_hat = (q - m) / sd
    w = bn.weight[:, None, None]
    return w * q_hat + bn.bias[:, None, None], q_hat, w / sd


def _bn_adjoint(g, q_hat, k):
    #   dL/dq = (w / sd) (g - mean(g) - q_hat mean(g q_hat)): the batch statistics couple every image
    return k * (g - g.mean((0, 2, 3), keepdim=True) - q_hat * (g * q_hat).mean((0, 2, 3), keepdim=True))


def _gate_adjoint(conv, g):
    return F.conv2d(g, conv.weight.transpose(0, 1))  # the adjoint of a 1 x 1 conv (its bias drops out)


def linearize(cell, h, z, spectra=None):
    """One step h_next = F(h, z) of an HGRUCell, and the factors of its Jacobian dF/dh for adjoint()."""
    sp, sig = F.softplus, torch.sigmoid  # sp' = sigmoid
    #   G1 = sigmoid(U1 * H + b1);   C1 = BN(W_inh * (H . G1));   S = sp(Z - sp(C1 . (alpha H + mu)))
    g1 = sig(cell.u1(h))
    c1, q1_hat, k1 = _bn(cell.bn_inh, horizontal(cell, h * g1, 0, spectra))
    e = cell.alpha * h + cell.mu
    p = c1 * e
    r = z - sp(p)
    s = sp(r)
    #   G2 = sigmoid(U2 * S + b2);   C2 = BN(W_exc * S)
    g2 = sig(cell.u2(s))
    c2, q2_hat, k2 = _bn(cell.bn_exc, horizontal(cell, s, 1, spectra))
    if cell.form == "code":
        #   H~ = sp(kappa S + gamma C2 + omega S . C2);   H_t = sp((1 - G2) . H + G2 . H~)
        t = cell.kappa * s + cell.gamma * c2 + cell.omega * s * c2
        dt_ds, dt_dc2 = cell.kappa + cell.omega * c2, cell.gamma + cell.omega * s
    else:
        #   H~ = sp(nu (C2 + S) + omega C2 . S);   H_t = (1 - G2) . H + G2 . H~
        t = cell.nu * (c2 + s) + cell.omega * c2 * s
        dt_ds, dt_dc2 = cell.nu + cell.omega * c2, cell.nu + cell.omega * s
    h_hat = sp(t)
    o = (1 - g2) * h + g2 * h_hat
    h_next, dh_do = (sp(o), sig(o)) if cell.form == "code" else (o, torch.ones_like(o))
    dt = dh_do * g2 * sig(t)  # dH_t/dt
    ds_dp = -sig(r) * sig(p)  # dS/dp through both softplus stages
    factors = (dh_do * (1 - g2),  # dH_t/dH, the direct path
               dh_do * (h_hat - h) * g2 * (1 - g2),  # dH_t/d(U2 * S), through the update gate
               dt * dt_ds, dt * dt_dc2, q2_hat, k2,  # dH_t/dS, dH_t/dC2 and BN_exc
               ds_dp * e, ds_dp * c1 * cell.alpha, q1_hat, k1,  # dS/dC1, dS/dH (through alpha H) and BN_inh
               g1, h * g1 * (1 - g1))  # d(H . G1)/dH, directly and through the gate
    return h_next, factors


def adjoint(cell, factors, v, spectra=None):
    """v^T dF/dh from linearize()'s factors: the chain rule of the step, run backwards from H_t to H."""
    a_h, a_g2, a_s, a_c2, q2_hat, k2, s_c1, s_h, q1_hat, k1, g1, m_g1 = factors
    #   dS = direct (dH~/dS) + U2^T (through G2) + W_exc^T BN_exc^T (through C2)
    ds = v * a_s + _gate_adjoint(cell.u2, v * a_g2) + horizontal(cell, _bn_adjoint(v * a_c2, q2_hat, k2), 1,
                                                                 spectra, adjoint=True)
    #   dM = W_inh^T BN_inh^T(dC1),   M = H . G1
    dm = horizontal(cell, _bn_adjoint(ds * s_c1, q1_hat, k1), 0, spectra, adjoint=True)
    #   dH = direct + through alpha H + through M = H . sigmoid(U1 * H + b1)
    return v * a_h + ds * s_h + dm * g1 + _gate_adjoint(cell.u1, dm * m_g1)


def vjp_h(cell, h, z, v, spectra=None):
    """v^T dF(h, z)/dh for one step of an HGRUCell (spectra: hgru_spectra(cell, z), or None for F.conv2d).
    Differentiable in h, z and the parameters: LCP = mean((vjp_h(cell, h, z, 1) - mu)_+^2) trains by an
    ordinary backward."""
    return adjoint(cell, linearize(cell, h, z, spectra)[1], v, spectra)


class StepVJP:
    """vjp(h, x, v) for crbp.run: v^T dF/dh, reusing the Jacobian factors of the last (h, x) it saw.

    The Neumann series asks for K VJPs at the same h_{T-1}: the step's forward (two of its four
    convolutions) runs once per run, not once per term. And step(h, x), as crbp's taped last step (models.py
    makes it so for rbp and the c- algos), runs that step by linearize: the LCP's vjp at the same (h, x) then
    trains through those factors, so the step's forward and backward run once, not once for the cell and
    again for the LCP. Make one per run (it holds that run's factors). linearize(h, x) -> (h_next, factors)
    and adjoint(factors, v) -> v^T J, e.g. compiled."""

    def __init__(self, linearize, adjoint):
        self.linearize, self.adjoint = linearize, adjoint
        self._key = self._held = self._factors = self._taped = None

    @staticmethod
    def _key_of(h, x):
        # The same (h, x) data: same memory, shape and strides, not changed in place (their versions), and
        # held here, so that their memory cannot be reused by another tensor meanwhile.
        return [(z.data_ptr(), z.shape, z.stride(), z._version) for z in (h, x)]

    def _keep(self, h, x, factors, taped):
        self._key, self._held = self._key_of(h, x), (h, x)
        self._factors, self._taped = [f.detach() for f in factors], (factors if taped else None)

    def step(self, h, x):
        """h_next = F(h, x), with its factors kept on the tape for the vjp calls at this (h, x) that follow."""
        h_next, factors = self.linearize(h, x)
        self._keep(h, x, factors, taped=torch.is_grad_enabled())
        return h_next

    def __call__(self, h, x, v):
        same = self._key_of(h, x) == self._key
        if torch.is_grad_enabled():  # the LCP: it trains through the factors
            if same and self._taped is not None:
                factors, self._taped = self._taped, None  # step()'s, once: a backward frees their graph
            else:
                factors = self.linearize(h, x)[1]
                self._keep(h, x, factors, taped=False)
        else:  # a Neumann term
            if not same:
                self._keep(h, x, self.linearize(h, x)[1], taped=False)
            factors = self._factors
        return self.adjoint(factors, v)


def compile(fn, **options):
    """torch.compile(fn) with one graph per shape (train and eval batches: no slower dynamic kernels)."""
    # crbp's Neumann series may run a compiled backward again and again (retain_graph=True), which compiled
    # code refuses when it may reuse ("donate") its saved buffers; that optimisation is off (torch >= 2.5).
    import torch._functorch.config as aot_config
    if hasattr(aot_config, "donated_buffer"):
        aot_config.donated_buffer = False
    compiled = torch.compile(fn, **{"dynamic": False, **options})
    if options.get("mode") not in GRAPH_MODES:
        return compiled

    # Under CUDA graphs a call's outputs live in the graph's memory and the next replay overwrites them, but
    # crbp.run keeps h_{t-1} beside h_t and StepVJP keeps the Jacobian factors: each call's outputs are
    # copied out (one pass over each output, small beside a step's two FFT convolutions).
    def graphed(*args, **kwargs):
        return torch.utils._pytree.tree_map(_clone, compiled(*args, **kwargs))  # a tensor, or a tuple of them
    return graphed


def _clone(t):
    return t.clone() if isinstance(t, torch.Tensor) else t
