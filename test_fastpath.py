"""Tests of fastpath.py on CPU in float64: the FFT convolution and its adjoint against F.conv2d, the hGRU step's
explicit VJP against autograd, the LCP through it against crbp.lcp's double backward, and the whole fast
model against the plain one. The CUDA test compares the compiled fast path with the plain float32 path."""
import json

import pytest
import torch
import torch.nn.functional as F

import crbp
import fastpath
import models


def randomize(module, seed=3, scale=0.1):
    with torch.no_grad():  # move every parameter off its (often symmetric) init
        g = torch.Generator().manual_seed(seed)
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def close(a, b, tol=1e-10):
    return all(torch.allclose(x, y, rtol=tol, atol=tol) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------------------
# FFT convolution: the same function as F.conv2d, with the same first and second derivatives


@pytest.mark.parametrize("H, W, E", [(13, 9, 3), (20, 31, 5), (9, 10, 7), (16, 16, 15)])
def test_fft_conv_equals_conv2d_to_second_order(H, W, E):
    g = torch.Generator().manual_seed(0)
    x, x2 = (torch.randn(2, 4, H, W, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.randn(3, 4, E, E, generator=g, dtype=torch.float64)
    r = torch.randn(2, 3, H, W, generator=g, dtype=torch.float64)
    size = tuple(fastpath.fft_size(n, E // 2) for n in (H, W))
    assert all(m >= n + E // 2 for m, n in zip(size, (H, W)))  # even and odd grid lengths among the cases
    results = []
    for fft in (True, False):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fastpath.fft_conv(xg, fastpath.kernel_spectrum(wg, size), size) if fft else F.conv2d(xg, wg, padding=E // 2)
        gx, gw = torch.autograd.grad((y * r).sum(), (xg, wg), create_graph=True)  # the custom backward
        second = torch.autograd.grad((gx * x2).sum() + gw.square().sum(), (xg, wg))  # and its own backward
        results.append((y, gx, gw) + second)
    assert close(*results)


@pytest.mark.parametrize("H, W, E", [(13, 9, 3), (16, 16, 15)])
def test_adjoint_spectrum_is_conv_transpose2d_with_its_gradients(H, W, E):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(3, 4, E, E, generator=g, dtype=torch.float64)  # out 3, in 4: the adjoint maps 3 -> 4
    r = torch.randn(2, 4, H, W, generator=g, dtype=torch.float64)
    size = tuple(fastpath.fft_size(n, E // 2) for n in (H, W))
    results = []
    for fft in (True, False):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        if fft:
            y = fastpath.fft_conv(xg, fastpath.adjoint_spectrum(fastpath.kernel_spectrum(wg, size)), size)
        else:
            y = F.conv_transpose2d(xg, wg, padding=E // 2)
        results.append((y,) + torch.autograd.grad((y * r).sum(), (xg, wg)))
    assert close(*results)


# ----------------------------------------------------------------------------------------------------------
# The explicit VJP of one hGRU step


def cell_and_state(form="code", conv="fft", C=5, E=5, seed=0):
    cell = randomize(models.HGRUCell(C, E, form=form, conv=conv).double(), scale=0.3)
    h = rand(3, C, 11, 9, seed=seed).requires_grad_()
    z = rand(3, C, 11, 9, seed=seed + 1).square().requires_grad_()
    return cell, h, z


@pytest.mark.parametrize("form", ["code", "supplement"])
@pytest.mark.parametrize("conv", ["direct", "fft"])
def test_vjp_h_equals_autograd(form, conv):
    cell, h, z = cell_and_state(form, conv)
    v = torch.randn(h.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    h_next = cell(h, z)
    assert torch.allclose(cell.linearize(h, z)[0], h_next, rtol=1e-12, atol=1e-12)  # the same step
    # the whole chain rule, BatchNorm's batch coupling included: v in one image moves every image's vjp
    assert close([cell.vjp(h, z, v)], torch.autograd.grad(h_next, h, v, retain_graph=True))
    # and it is differentiable: its own gradients equal autograd's second derivatives
    params = [h, z] + list(cell.parameters())
    r = torch.randn(h.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ref = torch.autograd.grad((torch.autograd.grad(h_next, h, v, create_graph=True)[0] * r).sum(), params)
    assert close(torch.autograd.grad((cell.vjp(h, z, v) * r).sum(), params), ref)


@pytest.mark.parametrize("form", ["code", "supplement"])
def test_lcp_through_vjp_h_equals_crbp_lcp_double_backward(form):
    # The LCP of the whole model at its last transition, front end included: x = (conv0 * I)^2 depends on
    # conv0, so its gradient reaches conv0 only through x. mu = 0.5: a non-zero penalty.
    torch.manual_seed(0)
    model = randomize(models.build("hgru", kernel=5, form=form, conv="fft").double(), scale=0.3)
    x = model.front(0.1 * rand(2, 1, 12, 10))  # a drive of moderate size: float64 rounding stays near 1e-16
    spectra = model.cell.prepare(x)["spectra"]
    with torch.no_grad():
        h = model.cell(model.cell(torch.zeros_like(x), x), x)  # h_{T-1} after two steps
    h.requires_grad_()
    params = list(model.cell.parameters()) + list(model.front.parameters())
    ref = crbp.lcp(model.cell(h, x), h, mu=0.5)  # autograd: a VJP with create_graph, then a double backward
    u = fastpath.vjp_h(model.cell, h, x, torch.ones_like(h), spectra)
    penalty = (u - 0.5).clamp(min=0).square().mean()  # the LCP on u = 1^T J, by a first-order backward
    assert ref > 1e-3 and torch.allclose(penalty, ref, rtol=1e-12)
    assert close(torch.autograd.grad(penalty, params, retain_graph=True), torch.autograd.grad(ref, params))


def counted_step_vjp(cell):
    """A StepVJP of cell, and the list that grows by one at each linearize it runs."""
    calls = []
    return fastpath.StepVJP(lambda h, z: calls.append(1) or cell.linearize(h, z), cell.adjoint), calls


def test_step_vjp_reuses_the_factors_while_h_and_x_stay():
    cell, h, z = cell_and_state()
    (vjp, calls), v = counted_step_vjp(cell), torch.ones_like(h)
    with torch.no_grad():
        for k in range(3):
            assert torch.allclose(vjp(h.detach(), z.detach(), v * k), cell.vjp(h, z, v * k))  # detached: same data
        assert len(calls) == 1
        h2 = h.detach() + 1
        assert torch.allclose(vjp(h2, z, v), cell.vjp(h2, z, v)) and len(calls) == 2  # new data: new factors
        h2.add_(1)  # changed in place: its version moves on
        assert torch.allclose(vjp(h2, z, v), cell.vjp(h2, z, v)) and len(calls) == 3
    assert vjp(h, z, v).requires_grad  # with grad: always recomputed, and differentiable


def test_step_vjp_step_keeps_its_factors_on_the_tape_for_the_lcp():
    """StepVJP.step runs the taped step by linearize; the LCP's vjp at the same (h, z) then trains through
    those factors (no second linearize), and the Neumann terms' vjp under no_grad reuses them detached."""
    cell, h, z = cell_and_state()
    (vjp, calls), ones = counted_step_vjp(cell), torch.ones_like(h)
    leaf = h.detach().requires_grad_()
    h_next = vjp.step(leaf, z)
    penalty = crbp._lcp([vjp(leaf, z, ones)], 0.5, "mean")
    loss = h_next.square().sum() + penalty
    assert len(calls) == 1 and penalty > 0
    with torch.no_grad():
        term = vjp(leaf.detach(), z, ones * 2)
    assert len(calls) == 1 and torch.allclose(term, cell.vjp(h, z, ones * 2))
    assert vjp(leaf, z, ones).requires_grad and len(calls) == 2  # step's taped factors serve one grad call only
    ref_leaf = h.detach().requires_grad_()  # the reference: the cell on autograd's tape, and its double backward
    h_next = cell(ref_leaf, z)
    u = torch.autograd.grad(h_next, ref_leaf, ones, create_graph=True)[0]
    ref = h_next.square().sum() + crbp._lcp([u], 0.5, "mean")
    params = [p for p in cell.parameters() if p.requires_grad]
    assert close(torch.autograd.grad(loss, [leaf] + params), torch.autograd.grad(ref, [ref_leaf] + params))


# ----------------------------------------------------------------------------------------------------------
# The whole model: FFT cell + explicit VJP (the fast path) against the plain path


@pytest.mark.parametrize("algo", ["c-rbp", "c-bptt"])
def test_hgru_fft_equals_direct_with_the_lcp(algo):
    grads = []
    for conv in ("direct", "fft"):
        torch.manual_seed(0)
        model = randomize(models.build("hgru", conv=conv, kernel=5).double())
        x = rand(2, 1, 16, 16).double()
        out = model(x, steps=4, algo=algo, mu=0.0)  # mu = 0: a non-zero penalty, whose gradient is checked too
        assert out.penalty > 0
        grads.append(torch.autograd.grad(out.logits.square().mean() + 10 * out.penalty, list(model.parameters())))
    assert close(*grads, tol=1e-9)


@pytest.mark.parametrize("algo", ["c-rbp", "rbp", "c-bptt"])
def test_fast_model_equals_plain_model(algo):
    # compile_cell with the "aot_eager" backend: the fast path's wiring (fast_cell, StepVJP as crbp's vjp for
    # the Neumann terms and the LCP) without a C++ compiler; the CUDA test below runs the real compiler.
    results = []
    for fast in (False, True):
        torch.manual_seed(0)
        model = randomize(models.build("hgru", conv="fft" if fast else "direct", kernel=5).double(), scale=0.2)
        calls = []
        if fast:
            model.compile_cell(backend="aot_eager")
            linearize, cell = model.compiled["linearize"], model.compiled["cell"]
            model.compiled["linearize"] = lambda *a, **k: calls.append("linearize") or linearize(*a, **k)
            model.compiled["cell"] = lambda *a, **k: calls.append("cell") or cell(*a, **k)
        out = model(rand(2, 1, 16, 16), steps=6, algo=algo, mu=0.5, neumann_steps=5, tol=0)
        loss = out.logits.square().mean() + 10 * out.penalty
        assert algo == "rbp" or out.penalty > 0
        results.append((out.logits, out.penalty) + torch.autograd.grad(loss, list(model.parameters())))
        if fast:  # the last step by linearize, once: for h_T, the LCP and the Neumann terms
            assert calls == ["cell"] * 5 + ["linearize"]
        if algo.endswith("rbp"):
            results[-1] += (torch.tensor(float(out.stats.neumann_terms)),)
    assert close(*results)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("algo,mode", [("c-rbp", None), ("bptt", None), ("c-rbp", "reduce-overhead")])
def test_cuda_compiled_fast_path_matches_the_plain_path(algo, mode):
    """The fast path's gradient against the plain path's; with mode="reduce-overhead" under CUDA graphs."""
    dev, grads, tf32 = torch.device("cuda"), [], torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the reference in true float32
    for fast in (False, True):
        torch.manual_seed(0)
        model = models.build("hgru", conv="fft" if fast else "direct").to(dev)
        if fast:
            model.compile_cell(**({"mode": mode} if mode else {}))
        x = torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(0)).to(dev)
        out = model(x, steps=8, algo=algo, mu=0.0)
        loss = out.logits.square().mean() + 10 * out.penalty
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))]))
    torch.backends.cudnn.allow_tf32 = tf32
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_compiled_vjp_equals_autograd():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    cell = randomize(models.HGRUCell(25, 15, conv="fft")).to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    h, z = (torch.rand(4, 25, 40, 40, device=dev, generator=g) for _ in range(2))
    v = torch.randn(4, 25, 40, 40, device=dev, generator=g)
    spectra = fastpath.hgru_spectra(cell, z)
    vjp = fastpath.StepVJP(fastpath.compile(lambda h, z: cell.linearize(h, z, spectra)),
                           fastpath.compile(lambda f, v: cell.adjoint(f, v, spectra)))
    h.requires_grad_()
    ref = torch.autograd.grad(cell(h, z), h, v)[0]
    with torch.no_grad():
        got = vjp(h.detach(), z, v)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5



def test_bench_markdown_table_is_made_from_the_json(tmp_path, capsys):
    import bench
    records = [dict(algo="c-rbp", T=20, batch=32, path="plain", img_s=100.0, peak_gib=3.5, neumann_terms=15.0,
                    grad_err=3e-7),
               dict(algo="c-rbp", T=20, batch=32, path="fast", img_s=250.0, peak_gib=4.0, neumann_terms=15.0,
                    grad_err=2e-6),
               dict(algo="bptt", T=6, batch=32, path="fast", img_s=800.0, peak_gib=5.0, neumann_terms=None,
                    grad_err=None)]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(dict(gpu="GPU X", torch="2.x", repeats=5, warmup=2, records=records)))
    bench.markdown(str(path))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| C-RBP", "| BPTT"))]
    assert rows[0] == "| C-RBP T=20 | 32 | 100.0 (3.50) | 250.0 (4.00) | 2.50 | 15 | 2.0e-06 | 135.7 (3.76) |"
    assert rows[1] == "| BPTT T=6 | 32 | – | 800.0 (5.00) | – | – | – | 343.3 (7.58) |"


def test_bench_mazes_row_trains_on_the_cpu_and_has_no_paper_column(monkeypatch, capsys):
    import bench
    monkeypatch.setattr(bench, "MODEL", "locrnn")
    model = bench.build("cpu", fast=False)
    sample = bench.batch_of(4, "cpu", 0)
    assert sample[0].shape == (4, 3, 32, 32) and sample[2].dtype == torch.bool
    stats = []
    before = [p.detach().clone() for p in model.parameters()]
    bench.trainer(model, sample, "c-bptt", 3, 0, stats)()
    assert len(stats) == 1 and any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    rec = [dict(model="locrnn", algo="bptt", T=15, batch=256, path=p, img_s=v, peak_gib=1.0, neumann_terms=None,
                grad_err=None) for p, v in (("plain", 1000.0), ("fast", 3000.0))]
    lines = bench.table(rec).splitlines()
    assert lines[2].split()[:4] == ["locrnn", "bptt", "T=15", "256"] and "3.00" in lines[2] and lines[2].endswith("-")


