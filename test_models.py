"""Tests of models.py on CPU at tiny sizes: shapes, gradients under every crbp algo, parameter counts against
the original code's, the Gabor banks, each cell's step against a hand-written float64 reference of its
equations, per-step readouts, bad input, and a tiny hGRU that overfits a few Pathfinder-seg images."""
import math

import pytest
import torch
import torch.nn.functional as F

import crbp
import models

SHAPES = {"pathfinder-seg": (2, 1, 16, 16), "pathfinder-cls": (2, 1, 32, 32), "mazes": (2, 3, 12, 12)}
TINY = {  # small options so that every model runs in milliseconds
    "hgru": dict(kernel=3), "hgru_gn": dict(kernel=3), "convlstm": dict(channels=4, kernel=3),
    "locrnn": dict(channels=4, long_kernel=5, short_kernel=3), "convgru": dict(channels=4, kernel=3),
    "ff": dict(channels=4, kernel=3, layers=2), "resnet": dict(depth=8, width=4), "rresnet": dict(width=4),
}
OUT = {"pathfinder-seg": (2, 2, 16, 16), "pathfinder-cls": (2, 2), "mazes": (2, 2, 12, 12)}


def images(task, seed=0):
    return torch.rand(SHAPES[task], generator=torch.Generator().manual_seed(seed))


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def assert_grads(named_params, skip=()):
    for name, p in named_params:
        if name.startswith(skip):
            assert p.grad is None, name
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


# ----------------------------------------------------------------------------------------------------------
# Shapes and gradients


@pytest.mark.parametrize("task", list(models.TASKS))
@pytest.mark.parametrize("name", list(models.MODELS))
def test_shapes_and_grads(name, task):
    torch.manual_seed(0)
    model = models.build(name, task, **TINY[name])
    x = images(task)
    out = model(x, steps=3) if model.recurrent else model(x)
    assert out.logits.shape == OUT[task] and out.penalty.shape == ()
    assert out.per_step is None and (isinstance(out.stats, crbp.Stats) if model.recurrent else out.stats is None)
    # Every parameter of the whole model (front end, cell, readout) gets a gradient under the task's default
    # algo (c-rbp on pathfinder-seg, bptt otherwise).
    w = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(1))
    ((out.logits * w).sum() + 10 * out.penalty).backward()
    assert_grads(model.named_parameters())
    with torch.no_grad():
        assert model(x).logits.shape == OUT[task]


# The cells alone under every crbp algo, as crbp.run sees them: (cell, drive, h0) at tiny sizes.
CELLS = {
    "hgru": lambda: (models.HGRUCell(4, 3), 4),
    "hgru_supplement": lambda: (models.HGRUCell(4, 3, form="supplement", bias_init="log"), 4),
    "hgru_gn": lambda: (models.HGRUGNCell(8, 3, groups=2, timesteps=4), 8),
    "convlstm": lambda: (models.ConvLSTMCell(3, 4, 3), 3),
    "locrnn": lambda: (models.LocRNNCell(3, 4, 5, 3), 3),
    "convgru": lambda: (models.ConvGRUCell(3, 4, 3), 3),
    "convgru_relu": lambda: (models.ConvGRUCell(3, 4, 3, act="relu"), 3),
    "rresnet": lambda: (models.RResNetCell(4), 4),
}


@pytest.mark.parametrize("algo", crbp.ALGOS)
@pytest.mark.parametrize("cell_name", list(CELLS))
def test_cell_every_algo(cell_name, algo):
    torch.manual_seed(0)
    cell, c_in = CELLS[cell_name]()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, c_in, 8, 8, generator=g).requires_grad_()
    h0 = cell.init_state(x.detach()) if cell_name != "rresnet" else torch.rand(2, 4, 8, 8, generator=g)
    extra = dict(truncate=2) if algo.endswith("tbptt") else {}
    state, penalty, stats = crbp.run(cell, x, h0, steps=4, algo=algo, **extra)
    h = state[0] if isinstance(state, tuple) else state
    ((h * torch.randn(h.shape, generator=g)).sum() + 10 * penalty).backward()
    assert_grads(cell.named_parameters())
    assert stats.steps == 4 and math.isfinite(stats.residual)
    if cell_name != "rresnet":  # the drive (and so the front end) gets a gradient too
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    if algo.endswith("rbp"):
        assert stats.neumann_terms is not None


def test_rbp_model_gradients():
    # Under c-rbp everything trains except the Mazes LocRNN's h_0 embedding (h* does not depend on h_0).
    torch.manual_seed(0)
    model = models.build("locrnn", "mazes", **TINY["locrnn"])
    out = model(images("mazes"), steps=3, algo="c-rbp")
    (out.logits.square().mean() + 10 * out.penalty).backward()
    assert_grads(model.named_parameters(), skip=("embed.",))
    # The R-ResNet has no input drive: rbp would leave its stem untrained, so it refuses.
    rres = models.build("rresnet", "mazes", **TINY["rresnet"])
    for kw in (dict(algo="rbp"), dict(algo="c-rbp"), dict(algo="tbptt", truncate=2)):
        with pytest.raises(ValueError, match="no input drive"):
            rres(images("mazes"), steps=3, **kw)
    with torch.no_grad():  # evaluation does not care
        rres(images("mazes"), steps=3, algo="rbp")


# ----------------------------------------------------------------------------------------------------------
# Parameter counts (the originals' counts from the specs; ours drop parameters the originals never used)


def test_parameter_counts():
    # hGRU, C-RBP paper code: 284,227 at E = 15 including two unused BatchNorm2d(25) (100 parameters).
    for E, paper in ((15, 284_227), (9, 104_227), (5, 34_227), (3, 14_227)):
        assert n_params(models.build("hgru", kernel=E)) == paper - 100
    assert n_params(models.build("hgru", form="supplement")) == 284_127 - 25  # one nu for kappa and gamma
    assert n_params(models.HGRUGNCell(256, 3)) == 1_576_256  # the panoptic mask head's hGRU
    assert n_params(models.build("ff")) == 845_527  # FF6 of the C-RBP paper
    assert n_params(models.build("convlstm")) == 1_126_452  # "about 1.13M"
    assert n_params(models.build("rresnet", "mazes")) == 170_064
    for depth, count in ((12, 317_520), (20, 612_432), (36, 1_202_256)):
        assert n_params(models.build("resnet", "mazes", depth=depth)) == count
    # LocRNN layer, Mazes: 312,832 including the embedding (8,320) and one unused GroupNorm (128).
    m = models.build("locrnn", "mazes")
    assert n_params(m.cell) + n_params(m.embed) == 312_832 - 128 and n_params(m.embed) == 8_320
    # LocRNN layer, Pathfinder: 225,984 including its unused embedding (2,112).
    assert n_params(models.build("locrnn", "pathfinder-cls").cell) == 225_984 - 2_112


# ----------------------------------------------------------------------------------------------------------
# Gabor banks


def test_gabor_bank():
    bank = models.gabor_bank().double()
    assert bank.shape == (25, 1, 7, 7)
    g = bank[:24, 0]  # (24, 7, 7): phase 0 then phase 116.6 deg, 12 orientations each
    assert g.sum((1, 2)).abs().max() < 1e-6 and (g.flatten(1).norm(dim=1) - 1).abs().max() < 1e-6
    # Filter 0 from the recipe by hand: theta = 90 deg, so u = y (the column offset) and v = -x.
    r = torch.arange(-3, 4, dtype=torch.float64)
    x, y = r[:, None].expand(7, 7), r[None, :].expand(7, 7)
    f0 = torch.exp(-(y ** 2 + 0.09 * x ** 2) / (2 * 2.8 ** 2)) * torch.cos(2 * torch.pi * y / 3.5)
    f0 = torch.where(x ** 2 + y ** 2 <= 9, f0, torch.zeros(()))
    f0 = (f0 - f0.mean()) / (f0 - f0.mean()).norm()
    assert torch.allclose(g[0], f0, atol=1e-7)
    # Outside the disc only the mean is left: every corner pixel of a filter has one value.
    corners = g[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert torch.allclose(corners, corners[:, :1].expand(-1, 4), atol=1e-7)
    # theta_j = 90 - 15 j deg: turning filter j by 90 deg gives filter j + 6, in both phases.
    for k in list(range(6)) + list(range(12, 18)):
        assert any(torch.allclose(torch.rot90(g[k], s, (0, 1)), g[k + 6], atol=1e-6) for s in (1, -1))
    blob = bank[24, 0]
    assert (blob > 0).sum() == 29 and abs(blob.sum() - 49) < 1e-5


def test_gabor_stem_bank():
    bank = models.gabor_stem_bank(32, 11)
    assert bank.shape == (32, 1, 11, 11)
    assert abs(bank.abs().max().item() - 0.5) < 1e-6  # peak amplitude 0.5 at the centre (phase 0)
    assert torch.allclose(bank[0], -bank[1])  # phases 0 and pi
    assert torch.allclose(bank[0], bank[30], atol=1e-6)  # theta = 0 and pi both present, as in the code
    stem = models.GaborStem()
    assert not any(p is stem.weight for p in stem.parameters())  # frozen
    assert stem(torch.rand(2, 1, 32, 32)).shape == (2, 32, 8, 8)


# ----------------------------------------------------------------------------------------------------------
# Each cell's step against the equations written out by hand in float64


def sp(v):
    return torch.log1p(torch.exp(v))


def batch_norm(v, weight, bias, eps):  # batch statistics over (B, H, W), biased variance
    m, var = v.mean((0, 2, 3), keepdim=True), v.var((0, 2, 3), unbiased=False, keepdim=True)
    return (v - m) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def group_norm(v, groups, weight, bias, eps=1e-5):
    B, C, H, W = v.shape
    g = v.reshape(B, groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps)
    return g.reshape(B, C, H, W) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def conv(v, w, b=None):
    return F.conv2d(v, w, b, padding=w.shape[-1] // 2)


def randomize(cell, seed=3):
    with torch.no_grad():  # move every parameter off its (often symmetric) init
        g = torch.Generator().manual_seed(seed)
        for p in cell.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return cell


@pytest.mark.parametrize("form", ["code", "supplement"])
def test_hgru_step_reference(form):
    c = randomize(models.HGRUCell(4, 3, form=form).double())
    g = torch.Generator().manual_seed(0)
    h, z = torch.rand(3, 4, 6, 6, generator=g, dtype=torch.float64), torch.rand(3, 4, 6, 6, generator=g,
                                                                               dtype=torch.float64)
    g1 = torch.sigmoid(conv(h, c.u1.weight, c.u1.bias))
    c1 = batch_norm(conv(h * g1, c.w_inh), c.bn_inh.weight, c.bn_inh.bias, 1e-3)
    s = sp(z - sp(c1 * (c.alpha * h + c.mu)))
    g2 = torch.sigmoid(conv(s, c.u2.weight, c.u2.bias))
    c2 = batch_norm(conv(s, c.w_exc), c.bn_exc.weight, c.bn_exc.bias, 1e-3)
    if form == "code":
        ref = sp((1 - g2) * h + g2 * sp(c.kappa * s + c.gamma * c2 + c.omega * s * c2))
    else:
        ref = (1 - g2) * h + g2 * sp(c.nu * (c2 + s) + c.omega * c2 * s)
    assert torch.allclose(c(h, z), ref, atol=1e-12)
    c.eval()  # no running statistics: eval uses batch statistics too, as in the paper code
    assert torch.allclose(c(h, z), ref, atol=1e-12)


def test_hgru_gn_step_reference():
    c = randomize(models.HGRUGNCell(8, 3, groups=2, timesteps=6).double())
    g = torch.Generator().manual_seed(0)
    h, x = (torch.randn(2, 8, 5, 5, generator=g, dtype=torch.float64) for _ in range(2))
    g_glob = conv(sp(conv(h, c.glob0.weight, c.glob0.bias)), c.glob1.weight)
    g_loc = conv(sp(conv(h, c.loc0.weight, c.loc0.bias)), c.loc1.weight)
    g1 = torch.sigmoid(g_glob * g_loc + c.b1)
    s = sp(x - group_norm(conv(h * g1, c.w_inh), 2, c.gn_inh.weight, c.gn_inh.bias) * (c.alpha * h + c.mu))
    g2 = torch.sigmoid(conv(s, c.u2.weight, c.u2.bias))
    ref = (1 - g2) * h + g2 * sp(group_norm(conv(s, c.w_exc), 2, c.gn_exc.weight, c.gn_exc.bias))
    assert torch.allclose(c(h, x), ref, atol=1e-12)


def test_locrnn_step_reference():
    c = randomize(models.LocRNNCell(3, 4, 5, 3).double())
    g = torch.Generator().manual_seed(0)
    L, S, x = (torch.randn(2, k, 6, 6, generator=g, dtype=torch.float64) for k in (4, 4, 3))

    def ln(v, m):  # "LN" = GroupNorm(1, C): per sample over (C, H, W)
        return group_norm(v, 1, m.weight, m.bias)

    def c1(v, m):
        return conv(v, m.weight, m.bias)

    C = 4  # the long and short convs split into their four kernels W_ll, W_ls, W_sl, W_ss
    W_ll, W_ls, W_sl, W_ss = c.w_l.weight[:, :C], c.w_l.weight[:, C:], c.w_s.weight[:, :C], c.w_s.weight[:, C:]
    gl = torch.sigmoid(ln(c1(x, c.u_lx), c.ln_lx) + ln(c1(L, c.u_ll), c.ln_ll))
    gs = torch.sigmoid(ln(c1(x, c.u_sx), c.ln_sx) + ln(c1(S, c.u_ss), c.ln_ss))
    lt = torch.relu(c1(x, c.w_lx) + conv(L, W_ll) + conv(S, W_ls) + c.w_l.bias.view(1, -1, 1, 1))
    st = torch.relu(c1(x, c.w_sx) + conv(L, W_sl) + conv(S, W_ss) + c.w_s.bias.view(1, -1, 1, 1))
    L_ref = torch.relu(ln(gl * lt + (1 - gl) * L, c.ln_l))
    S_ref = torch.relu(ln(gs * st + (1 - gs) * S, c.ln_s))
    L_new, S_new = c((L, S), x)
    assert torch.allclose(L_new, L_ref, atol=1e-12) and torch.allclose(S_new, S_ref, atol=1e-12)


def test_convlstm_and_convgru_step_reference():
    g = torch.Generator().manual_seed(0)
    x, h, cs = (torch.randn(2, k, 5, 5, generator=g, dtype=torch.float64) for k in (3, 4, 4))
    lstm = randomize(models.ConvLSTMCell(3, 4, 3).double())
    wx, wh = lstm.wx.weight.chunk(4), lstm.wh.weight.chunk(4)
    bx = lstm.wx.bias.chunk(4)
    i, f, o, gg = (conv(x, wx[k], bx[k]) + conv(h, wh[k]) for k in range(4))  # gate pre-activations
    c_ref = torch.sigmoid(f) * cs + torch.sigmoid(i) * torch.tanh(gg)
    h_new, c_new = lstm((h, cs), x)
    assert torch.allclose(c_new, c_ref, atol=1e-12)
    assert torch.allclose(h_new, torch.sigmoid(o) * torch.tanh(c_ref), atol=1e-12)
    gru = randomize(models.ConvGRUCell(3, 4, 3).double())
    wz, wr = gru.w_zr.weight.chunk(2)
    bz, br = gru.w_zr.bias.chunk(2)
    z = torch.sigmoid(conv(torch.cat([x, h], 1), wz, bz))
    r = torch.sigmoid(conv(torch.cat([x, h], 1), wr, br))
    ref = (1 - z) * h + z * torch.tanh(conv(torch.cat([x, r * h], 1), gru.w_h.weight, gru.w_h.bias))
    assert torch.allclose(gru(h, x), ref, atol=1e-12)


def test_hgru_init_table():
    torch.manual_seed(0)
    m = models.build("hgru")
    c = m.cell
    for name, value in (("alpha", 0.1), ("mu", 1.0), ("kappa", 0.5), ("gamma", 1.0), ("omega", 0.5)):
        p = getattr(c, name)
        assert p.shape == (25, 1, 1) and (p == value).all(), name
    for w in (c.w_inh, c.w_exc, c.u1.weight, c.u2.weight):
        w2 = w.flatten(1).double()
        assert torch.allclose(w2 @ w2.T, torch.eye(25, dtype=torch.float64), atol=1e-5)  # orthonormal rows
    b1 = c.u1.bias
    assert ((b1 >= 1) & (b1 <= 7)).all() and b1.std() > 0.5 and torch.equal(c.u2.bias, -b1)
    assert (c.bn_inh.weight == 0.1).all() and (c.bn_exc.weight == 0.1).all() and c.bn_inh.running_mean is None
    bn, conv6 = m.readout
    assert bn.running_mean is None and bn.eps == 1e-3
    assert torch.allclose(conv6.bias, torch.full((2,), math.log(99.0)))
    b_log = models.HGRUCell(25, 3, bias_init="log").u1.bias
    assert ((b_log >= 0) & (b_log <= math.log(7) + 1e-6)).all()
    gn = models.HGRUGNCell(16, 3, groups=4, timesteps=8)
    assert ((gn.b1 >= 1) & (gn.b1 <= 7)).all() and torch.equal(gn.u2.bias, -gn.b1.flatten())


# ----------------------------------------------------------------------------------------------------------
# Per-step readouts


@pytest.mark.parametrize("name,task", [("hgru", "pathfinder-seg"), ("hgru_gn", "mazes"), ("convlstm", "mazes"),
                                       ("locrnn", "mazes"), ("convgru", "pathfinder-cls"),
                                       ("rresnet", "pathfinder-seg")])
def test_per_step_matches_t_steps(name, task):
    torch.manual_seed(0)
    model = models.build(name, task, **TINY[name])
    x = images(task)
    with pytest.raises(ValueError, match="eval"):
        model(x, steps=2, per_step=True)
    model.eval()
    seen = []
    with torch.no_grad():
        out = model(x, steps=4, per_step=True, on_step=lambda t, h: seen.append(t))
        states = model(x, steps=4, per_step="state").per_step
        assert seen == [1, 2, 3, 4] and len(out.per_step) == 4 and len(states) == 4
        assert torch.equal(out.per_step[-1], out.logits)
        for t in range(1, 5):
            assert torch.allclose(out.per_step[t - 1], model(x, steps=t).logits, atol=1e-6), t
            ref = models._first(states[t - 1])
            assert torch.allclose(model.readout(ref), out.per_step[t - 1], atol=1e-6)
    # With grad on (bptt in eval mode) the per-step readouts still keep no graph.
    out = model(x, steps=3, algo="bptt", per_step=True)
    assert out.logits.requires_grad and not any(r.requires_grad for r in out.per_step)


# ----------------------------------------------------------------------------------------------------------
# Saved models


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_save_and_load_give_the_same_model_with_cpu_weights(tmp_path, device):
    """models.save writes the build() call (algo included: model.algo is what it trained with) and the
    weights on the CPU, so that a file made on a GPU loads anywhere; load gives the same model in eval mode."""
    torch.manual_seed(0)
    model = models.build("convgru", "mazes", channels=4, kernel=3, steps=2, algo="c-bptt").to(device)
    models.save(model, tmp_path / "m.pt")
    saved = torch.load(tmp_path / "m.pt", weights_only=True)  # no map_location: CPU tensors
    assert all(v.device.type == "cpu" for v in saved["model"].values())
    loaded = models.load(str(tmp_path / "m.pt"))
    assert not loaded.training and (loaded.algo, loaded.steps) == ("c-bptt", 2)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


# ----------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input():
    m = models.build("hgru", kernel=3)
    for bad in (torch.rand(2, 3, 16, 16), torch.rand(2, 1, 4, 16), torch.rand(1, 16, 16),
                torch.zeros(2, 1, 16, 16, dtype=torch.long), [[0.0]]):
        with pytest.raises(ValueError, match="images"):
            m(bad)
    with pytest.raises(ValueError, match="3 x H x W"):
        models.build("locrnn", "mazes", **TINY["locrnn"])(torch.rand(2, 1, 12, 12))
    for kw in (dict(kernel=4), dict(kernel=0), dict(kernel=3.0)):
        with pytest.raises(ValueError, match="odd"):
            models.build("hgru", **kw)
    with pytest.raises(ValueError, match="odd"):
        models.build("locrnn", short_kernel=2)
    with pytest.raises(ValueError, match="unknown model"):
        models.build("hgru2")
    with pytest.raises(ValueError, match="unknown option"):
        models.build("hgru", channels=25)  # the hGRU's channels are the drive's
    with pytest.raises(ValueError, match="task"):
        models.build("hgru", task="pathfinder")
    for kw in (dict(bias_init="chronos"), dict(form="paper"), dict(steps=0), dict(algo="rpb")):
        with pytest.raises(ValueError):
            models.build("hgru", **kw)
    for kw in (dict(groups=3), dict(init_state="ones")):
        with pytest.raises(ValueError):
            models.build("hgru_gn" if "groups" in kw else "locrnn", **kw)
    with pytest.raises(ValueError, match="depth"):
        models.build("resnet", depth=10)
    with pytest.raises(ValueError, match="per_step"):
        m.eval()(torch.rand(2, 1, 16, 16), steps=2, per_step="states")
    with pytest.raises(TypeError, match="neuman_steps"):  # crbp.run's keywords: Python names the misspelled one
        m(torch.rand(2, 1, 16, 16), steps=2, neuman_steps=3)
    f = models.build("ff", **TINY["ff"])
    for kw in (dict(steps=3), dict(algo="c-rbp"), dict(per_step=True), dict(mu=0.5)):
        with pytest.raises(ValueError, match="feedforward"):
            f(torch.rand(2, 1, 16, 16), **kw)


# ----------------------------------------------------------------------------------------------------------
# A tiny hGRU overfits a tiny fixed batch of Pathfinder-seg images


@pytest.fixture(scope="module")
def pathfinder_batch():
    """4 Pathfinder-seg images of 32 x 32 px (6-paddle snakes drawn on a 128 px canvas) and their masks."""
    import data
    images, masks = data.pathfinder(4, length=6, task="seg", size=32, canvas=128, seed=0)
    return images, masks.long()


@pytest.mark.slow
@pytest.mark.parametrize("algo,steps", [("bptt", 6), ("c-rbp", 10)])
def test_hgru_overfits_pathfinder(pathfinder_batch, algo, steps):
    x, y = pathfinder_batch
    torch.manual_seed(0)
    model = models.build("hgru", "pathfinder-seg", kernel=5)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(50):
        out = model(x, steps=steps, algo=algo)
        loss = F.cross_entropy(out.logits, y)
        losses.append(loss.item())
        opt.zero_grad()
        (loss + 10 * out.penalty).backward()
        opt.step()
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    # Stricter: also half the loss of the best constant prediction (the class prior), which the readout's
    # bias alone could reach; below it the hGRU must have found the marked snake's pixels.
    p = y.double().mean()
    prior = -(p * p.log() + (1 - p) * (1 - p).log()).item()
    assert losses[-1] < 0.5 * prior, (losses[::10], prior)
