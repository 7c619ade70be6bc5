"""Tests of crbp.py against independent references, in float64 on small contractive cells.

The references never call crbp's internals: explicit Jacobians (torch.autograd.functional.jacobian),
torch.linalg.solve for the implicit-function-theorem gradient, and hand-written unrolls.
"""
import ast
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import crbp
import report

B, D, X = 3, 6, 4  # batch, state size, drive size


@pytest.fixture(autouse=True)
def float64():
    """Every test here runs in float64 (and leaves the default dtype as it found it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class Dense(nn.Module):
    """h' = tanh(W h + U x + b) with ||W||_2 = rho: a rho-contraction (tanh is 1-Lipschitz)."""

    def __init__(self, rho=0.45, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(D, D, generator=g)
        self.W = nn.Parameter(rho * W / torch.linalg.matrix_norm(W, 2))
        self.U = nn.Parameter(torch.randn(D, X, generator=g))
        self.b = nn.Parameter(0.1 * torch.randn(D, generator=g))

    def forward(self, h, x):
        return torch.tanh(h @ self.W.T + x @ self.U.T + self.b)


class Conv(nn.Module):
    """h' = tanh(k * h + u * x + b); sum|k| < 0.5 bounds the conv's 2-norm below 0.5."""

    def __init__(self, C=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        k = torch.randn(C, C, 3, 3, generator=g)
        self.k = nn.Parameter(0.45 * k / k.abs().sum())
        self.u = nn.Parameter(torch.randn(C, 1, 3, 3, generator=g) / 3)
        self.b = nn.Parameter(0.1 * torch.randn(C, generator=g))

    def forward(self, h, x):
        return torch.tanh(F.conv2d(h, self.k, padding=1) + F.conv2d(x, self.u, self.b, padding=1))


class TupleCell(nn.Module):
    """An LSTM-like cell with state (h, c); contractive jointly because all weights are small."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(0.1 * torch.randn(3 * D, D, generator=g))
        self.U = nn.Parameter(torch.randn(3 * D, X, generator=g) / 2)

    def forward(self, state, x):
        h, c = state
        i, f, o = (h @ self.W.T + x @ self.U.T).chunk(3, dim=-1)
        c = 0.5 * torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(o)
        return torch.tanh(c) * 0.9, c


def dense_setup(seed=0, rho=0.45):
    g = torch.Generator().manual_seed(seed + 100)
    cell = Dense(rho, seed)
    x = torch.randn(B, X, generator=g, requires_grad=True)
    r = torch.randn(B, D, generator=g)  # loss L = <r, h_T>, so g = dL/dh_T = r
    return cell, x, torch.zeros(B, D), r


def conv_setup(seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    cell = Conv(seed=seed)
    x = torch.randn(2, 1, 5, 5, generator=g, requires_grad=True)
    r = torch.randn(2, 2, 5, 5, generator=g)
    return cell, x, torch.zeros(2, 2, 5, 5), r


def grads(loss, cell, x):
    return torch.autograd.grad(loss, list(cell.parameters()) + [x])


def unroll(cell, x, h, steps, no_grad_steps=0):
    """The hand-written reference unroll (the first no_grad_steps steps off the tape)."""
    grad = torch.is_grad_enabled()
    for t in range(steps):
        with torch.set_grad_enabled(grad and t >= no_grad_steps):
            h = cell(h, x)
    return h


def jacobian(cell, h, x, create_graph=False):
    """The explicit Jacobian dF(h, x)/dh flattened to (n, n)."""
    J = torch.autograd.functional.jacobian(lambda z: cell(z, x), h, create_graph=create_graph)
    return J.reshape(h.numel(), h.numel())


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---- RBP against the implicit function theorem -------------------------------------------------

@pytest.mark.parametrize("setup", [dense_setup, conv_setup])
def test_rbp_matches_implicit_function_theorem(setup):
    cell, x, h0, r = setup()
    state, _, stats = crbp.run(cell, x, h0, steps=80, algo="rbp", neumann_steps=80, tol=0)
    got = grads((state * r).sum(), cell, x)
    # Reference: h* by iteration, then v = (I - J^T)^-1 g by a linear solve, then v^T dF/d(theta, x).
    with torch.no_grad():
        h_star = unroll(cell, x, h0, 200)
    J = jacobian(cell, h_star, x)
    v = torch.linalg.solve(torch.eye(J.shape[0]) - J.T, r.reshape(-1)).reshape(h_star.shape)
    want = torch.autograd.grad(cell(h_star, x), list(cell.parameters()) + [x], grad_outputs=v)
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-6
    assert stats.neumann_stop in ("max_terms", "tolerance") and stats.residual < 1e-12


def test_rbp_tuple_state_matches_implicit_function_theorem():
    cell, (_, x, _, _) = TupleCell(), dense_setup()
    g = torch.Generator().manual_seed(7)
    rh, rc = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    h0 = (torch.zeros(B, D), torch.zeros(B, D))
    (h, c), _, stats = crbp.run(cell, x, h0, steps=60, algo="rbp", neumann_steps=60, tol=0)
    got = grads((h * rh).sum() + (c * rc).sum(), cell, x)
    # Reference on the joint state z = [h, c] (the series covers every tensor of the state).
    with torch.no_grad():
        hs = unroll(cell, x, h0, 200)
    z = torch.cat(hs, -1)
    J = jacobian(lambda z, x: torch.cat(cell(z.split(D, -1), x), -1), z, x)
    v = torch.linalg.solve(torch.eye(J.shape[0]) - J.T, torch.cat([rh, rc], -1).reshape(-1)).reshape(z.shape)
    want = torch.autograd.grad(cell(hs, x), list(cell.parameters()) + [x], grad_outputs=v.split(D, -1))
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-6
    assert stats.neumann_terms > 5


def test_neumann_partial_sum_equals_explicit_series():
    # F(h, x) = tanh(W h + b) + x, so dF/dx = I and x.grad is exactly the Neumann sum G.
    cell = Dense()
    x = torch.zeros(B, D, requires_grad=True)
    r = torch.randn(B, D, generator=torch.Generator().manual_seed(3))
    f = lambda h, x: torch.tanh(h @ cell.W.T + cell.b) + x
    T, K = 7, 3
    state, _, stats = crbp.run(f, x, torch.zeros(B, D), steps=T, algo="rbp", neumann_steps=K, tol=0)
    (G,) = torch.autograd.grad((state * r).sum(), x)
    with torch.no_grad():
        h_prev = unroll(f, x, torch.zeros(B, D), T - 1)
    J = jacobian(f, h_prev, x)  # the Jacobian of the last transition, at h_{T-1}
    g, want, term = r.reshape(-1), torch.zeros(B * D), r.reshape(-1)
    for _ in range(K + 1):  # sum_{k=0..K} (J^T)^k g
        want, term = want + term, J.T @ term
    assert rel(G.reshape(-1), want) < 1e-12
    assert (stats.neumann_terms, stats.neumann_stop) == (K, "max_terms")
    assert abs(stats.neumann_sum - want.norm().item()) < 1e-12 * want.norm().item()
    assert len(stats.neumann_norms) == K + 1 and abs(stats.neumann_norms[0] - g.norm().item()) < 1e-12


# ---- BPTT and truncated BPTT against hand-written unrolls --------------------------------------

@pytest.mark.parametrize("setup", [dense_setup, conv_setup])
def test_bptt_equals_hand_unroll(setup):
    cell, x, h0, r = setup()
    state, penalty, _ = crbp.run(cell, x, h0, steps=6, algo="bptt")
    for a, b in zip(grads((state * r).sum(), cell, x), grads((unroll(cell, x, h0, 6) * r).sum(), cell, x)):
        assert rel(a, b) < 1e-12
    assert penalty.item() == 0


def test_tbptt_equals_unroll_with_early_steps_without_grad():
    cell, x, h0, r = dense_setup()
    state, _, _ = crbp.run(cell, x, h0, steps=8, algo="tbptt", truncate=3)
    want = grads((unroll(cell, x, h0, 8, no_grad_steps=5) * r).sum(), cell, x)
    full = grads((unroll(cell, x, h0, 8) * r).sum(), cell, x)
    for a, b, c in zip(grads((state * r).sum(), cell, x), want, full):
        assert rel(a, b) < 1e-12
    assert any(rel(a, c) > 1e-6 for a, c in zip(want, full))  # truncation does change the gradient


# ---- LCP against the column sums of the explicit Jacobian ---------------------------------------

def test_lcp_equals_column_sum_formula_and_its_gradient():
    cell, x, h0, _ = dense_setup(rho=0.95)
    mu = 0.3  # low, so that some column sums exceed it and the penalty is not zero
    with torch.no_grad():
        h_prev = unroll(cell, x, h0, 4)
    h_prev.requires_grad_()
    got = crbp.lcp(cell(h_prev, x), h_prev, mu)
    # Reference: u = 1^T J from the explicit (differentiable) Jacobian; LCP = mean((u - mu)_+^2).
    u = jacobian(cell, h_prev.detach(), x, create_graph=True).sum(0)
    want = (u - mu).clamp(min=0).square().mean()
    assert want.item() > 0 and abs(got.item() - want.item()) < 1e-12 * want.item()
    for a, b in zip(grads(got, cell, x), grads(want, cell, x)):
        assert rel(a, b) < 1e-10
    h_prev.grad = None
    s = crbp.lcp(cell(h_prev, x), h_prev, mu, reduction="sum")
    assert abs(s.item() - want.item() * h_prev.numel()) < 1e-10


@pytest.mark.parametrize("algo", ["c-rbp", "c-bptt"])
def test_constrained_algos_return_the_lcp_of_the_last_transition(algo):
    cell, x, h0, r = dense_setup(rho=0.95)
    T, mu = 6, 0.3
    state, penalty, _ = crbp.run(cell, x, h0, steps=T, algo=algo, mu=mu, neumann_steps=40)
    with torch.no_grad():
        h_prev = unroll(cell, x, h0, T - 1)
    u = jacobian(cell, h_prev, x, create_graph=True).sum(0)
    want = (u - mu).clamp(min=0).square().mean()
    assert abs(penalty.item() - want.item()) < 1e-12 * want.item()
    # Under c-rbp the penalty's gradient reaches theta through the one taped step only, which is exactly
    # the gradient of the explicit formula at the (fixed) h_{T-1}.
    if algo == "c-rbp":
        plain, _, _ = crbp.run(cell, x, h0, steps=T, algo="rbp", neumann_steps=40)
        got = grads((state * r).sum() + 10 * penalty, cell, x)
        ref = [a + 10 * b for a, b in zip(grads((plain * r).sum(), cell, x), grads(want, cell, x))]
        for a, b in zip(got, ref):
            assert rel(a, b) < 1e-10


def test_lcp_on_tuple_state_is_column_sum_of_block_jacobian():
    cell, (_, x, _, _) = TupleCell(), dense_setup()
    T, mu = 4, 0.05
    with torch.no_grad():
        hs = unroll(cell, x, (torch.zeros(B, D),) * 2, T - 1)
    z = torch.cat(hs, -1)
    u = jacobian(lambda z, x: torch.cat(cell(z.split(D, -1), x), -1), z, x).sum(0)
    want = (u - mu).clamp(min=0).square().mean().item()
    leaves = tuple(h.clone().requires_grad_() for h in hs)
    assert abs(crbp.lcp(cell(leaves, x), leaves, mu=mu).item() - want) < 1e-12
    # On the tape (c-bptt) h_{T-1} = 0.9 tanh(c_{T-1}) depends on c_{T-1}; the LCP must still take the
    # partial derivatives of the last step only.
    for algo in ("c-bptt", "c-rbp"):
        _, penalty, _ = crbp.run(cell, x, (torch.zeros(B, D),) * 2, steps=T, algo=algo, mu=mu)
        assert abs(penalty.item() - want) < 1e-12


# ---- jacobian_probe against the eigenvalues of the explicit Jacobian -------------------------------

@pytest.mark.parametrize("setup", [dense_setup, conv_setup])
def test_jacobian_probe_finds_the_spectral_radius_and_the_column_sums(setup):
    cell, x, h0, _ = setup()
    with torch.no_grad():
        h = unroll(cell, x, h0, 5)
    J = jacobian(cell, h, x)
    u = J.sum(0)  # 1^T J
    probe = report.jacobian_probe(cell, x, h, mu=0.1, iters=200)
    assert abs(probe.rho - torch.linalg.eigvals(J).abs().max().item()) < 2e-3 * probe.rho
    assert abs(probe.colsum_mean - u.mean().item()) < 1e-12 and abs(probe.colsum_max - u.max().item()) < 1e-12
    assert probe.above_mu == (u > 0.1).double().mean().item()


def test_jacobian_probe_sees_expansion_that_the_column_sums_hide():
    # A rotation scaled by 1.2 (a complex pair, |lambda| = 1.2) whose column sums are small: the LCP at mu = 0.9
    # is satisfied, and F still expands; and a non-normal contraction whose terms grow before they shrink.
    c, s = 1.2 * math.cos(2.0), 1.2 * math.sin(2.0)
    for A, rho, tol in ((torch.tensor([[c, -s], [s, c]]), 1.2, 1e-12), (torch.tensor([[0.5, 4.0], [0.0, 0.5]]), 0.5, 0.05)):
        probe = report.jacobian_probe(lambda h, x: h @ A.T + x, torch.zeros(2), torch.ones(2), iters=60)
        assert abs(probe.rho - rho) < tol * rho
        assert torch.allclose(torch.tensor([probe.colsum_mean, probe.colsum_max]),
                              torch.tensor([A.sum(0).mean().item(), A.sum(0).max().item()]), atol=1e-12)
    assert report.jacobian_probe(lambda h, x: h @ A.T + x, torch.zeros(2), torch.ones(2)).above_mu == 0.5


def test_jacobian_probe_on_a_tuple_state_uses_the_block_jacobian():
    cell, (_, x, _, _) = TupleCell(), dense_setup()
    with torch.no_grad():
        hs = unroll(cell, x, (torch.zeros(B, D),) * 2, 3)
    J = jacobian(lambda z, x: torch.cat(cell(z.split(D, -1), x), -1), torch.cat(hs, -1), x)
    probe = report.jacobian_probe(cell, x, hs, iters=300)
    assert abs(probe.rho - torch.linalg.eigvals(J).abs().max().item()) < 2e-3 * probe.rho
    assert abs(probe.colsum_max - J.sum(0).max().item()) < 1e-12
    with pytest.raises(ValueError, match="iters"):
        report.jacobian_probe(cell, x, hs, iters=1)


# ---- Memory: the tape holds one step under rbp ---------------------------------------------------

def saved_bytes(algo, T):
    cell, x, h0, r = conv_setup()
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        state, penalty, _ = crbp.run(cell, x, h0, steps=T, algo=algo, truncate=2 if "tbptt" in algo else None)
    ((state * r).sum() + penalty).backward()
    return total[0]


def test_rbp_memory_is_constant_in_steps_and_bptt_grows():
    for algo in ("rbp", "c-rbp", "tbptt"):
        assert saved_bytes(algo, 5) == saved_bytes(algo, 50) > 0
    ratio = saved_bytes("bptt", 50) / saved_bytes("bptt", 5)
    assert 8 < ratio <= 10


# ---- Stop rules: honest about when the math does not hold ----------------------------------------

def test_non_contractive_cell_stops_diverging_warns_and_keeps_a_finite_gradient():
    A = 1.5  # F(h, x) = A h + x: J = A I, the Neumann terms grow by 1.5 each
    x = torch.ones(B, D, requires_grad=True)
    with pytest.warns(crbp.NeumannWarning, match="diverged"):
        state, _, stats = crbp.run(lambda h, x: A * h + x, x, torch.zeros(B, D), steps=3, algo="rbp")
        (G,) = torch.autograd.grad(state.sum(), x)
    assert (stats.neumann_terms, stats.neumann_stop) == (0, "diverging")
    assert torch.equal(G, torch.ones(B, D))  # the sum up to its smallest term: g itself
    # Faster growth stops at GROWTH * ||g||, before the K terms run out.
    with pytest.warns(crbp.NeumannWarning):
        state, _, stats = crbp.run(lambda h, x: 4 * h + x, x, torch.zeros(B, D), steps=3, algo="rbp", neumann_steps=50)
        torch.autograd.grad(state.sum(), x)
    assert stats.neumann_stop == "diverging" and len(stats.neumann_norms) == 8  # 4^7 > GROWTH > 4^6


def nonnormal_run(**options):
    """The contractive but non-normal J = [[.5, 4], [0, .5]]: its Neumann terms grow before they shrink."""
    J = torch.tensor([[0.5, 4.0], [0.0, 0.5]])
    x = torch.ones(1, 2, requires_grad=True)
    state, _, stats = crbp.run(lambda h, x: h @ J.T + x, x, torch.zeros(1, 2), steps=100, algo="rbp", tol=0, **options)
    (G,) = torch.autograd.grad(state[0, 0], x)
    return G[0], stats


def test_non_normal_contraction_gets_the_exact_gradient():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning: the series converges
        G, stats = nonnormal_run(neumann_steps=60)
    # dL/dx = e_0^T (I - J)^-1 = the first row of [[2, 16], [0, 2]]
    assert torch.allclose(G, torch.tensor([2.0, 16.0]), rtol=1e-12, atol=0)
    assert stats.neumann_stop == "max_terms" and stats.neumann_terms == 60
    assert max(stats.neumann_norms) > stats.neumann_norms[0]  # the terms did grow on the way


def test_faithful_stop_rule_is_the_paper_codes():
    # The paper code stops at the first term larger than the one before: on the non-normal J after 0 terms.
    with pytest.warns(crbp.NeumannWarning):
        G, stats = nonnormal_run(neumann_steps=60, faithful=True)
    assert torch.equal(G, torch.tensor([1.0, 0.0])) and (stats.neumann_terms, stats.neumann_stop) == (0, "diverging")
    # Too few terms for the transient to pass: flagged, and the sum ends at its smallest term (here g).
    with pytest.warns(crbp.NeumannWarning):
        G, stats = nonnormal_run(neumann_steps=3)
    assert stats.neumann_stop == "diverging" and torch.equal(G, torch.tensor([1.0, 0.0]))


def test_divergence_warning_names_the_callers_line_once():
    x = torch.ones(B, D, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            line = sys._getframe().f_lineno + 1  # the next line calls crbp.run
            state, _, _ = crbp.run(lambda h, x: 1.5 * h + x, x, torch.zeros(B, D), steps=3, algo="rbp")
            state.sum().backward()
    mine = [w for w in caught if issubclass(w.category, crbp.NeumannWarning)]
    assert len(mine) == 1 and mine[0].filename == __file__ and mine[0].lineno == line


def test_divergence_warning_through_a_model_names_the_users_line():
    """models.py (and nn.Module's call) are skipped: the warning points at the line that called the model."""
    import models
    torch.manual_seed(0)
    model = models.build("convgru", task="mazes", channels=4, kernel=3)
    for p in model.cell.parameters():  # blow the cell up until its Jacobian is far from contractive
        p.data.mul_(30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        line = sys._getframe().f_lineno + 1
        out = model(torch.rand(2, 3, 28, 28), steps=4, algo="rbp", neumann_steps=30)
        out.logits.sum().backward()
    mine = [w for w in caught if issubclass(w.category, crbp.NeumannWarning)]
    assert len(mine) == 1 and mine[0].filename == __file__ and mine[0].lineno == line


def test_tolerance_stop_and_paper_grad_cap():
    cell, x, h0, r = dense_setup()
    state, _, stats = crbp.run(cell, x, h0, steps=30, algo="rbp", neumann_steps=100, tol=1e-8)
    grads((state * r).sum(), cell, x)
    assert stats.neumann_stop == "tolerance" and stats.neumann_terms < 100
    norms = stats.neumann_norms
    assert norms[stats.neumann_terms] <= 1e-8 * norms[0] < norms[stats.neumann_terms - 1]
    # F(h, x) = h / 2 + x: the partial sums are g (1 + 1/2 + ... + 2^-k); a cap of 1.6 ||g|| keeps 1 term.
    x = torch.ones(B, D, requires_grad=True)
    state, _, stats = crbp.run(lambda h, x: h / 2 + x, x, torch.zeros(B, D), steps=3, algo="rbp",
                               grad_cap=1.6 * B ** 0.5 * D ** 0.5)
    (G,) = torch.autograd.grad(state.sum(), x)
    assert (stats.neumann_stop, stats.neumann_terms) == ("grad_cap", 1) and torch.allclose(G, 1.5 * x)
    assert stats.as_dict()["neumann_ratio"] == 0.5  # each term is half the last


class NaNBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        return 0.5 * h

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def test_nonfinite_neumann_term_is_dropped_not_returned():
    x = torch.ones(B, D, requires_grad=True)
    with pytest.warns(crbp.NeumannWarning, match="non-finite"):
        state, _, stats = crbp.run(lambda h, x: NaNBackward.apply(h) + x, x, torch.zeros(B, D), steps=4, algo="rbp")
        (G,) = torch.autograd.grad(state.sum(), x)
    assert stats.neumann_stop == "nonfinite" and torch.equal(G, torch.ones(B, D))


def test_nonfinite_state_raises_or_is_recorded():
    blow = lambda h, x: h * 1e300 + x  # overflows to inf at step 3 in float64
    x = torch.ones(B, D)
    with pytest.raises(FloatingPointError, match="not finite after 5 steps"):
        crbp.run(blow, x, torch.zeros(B, D), steps=5, algo="bptt")
    _, _, stats = crbp.run(blow, x, torch.zeros(B, D), steps=5, algo="bptt", nonfinite="record")
    assert math.isnan(stats.residual)


def test_double_backward_through_neumann_refuses():
    cell, x, h0, r = dense_setup()
    state, _, _ = crbp.run(cell, x, h0, steps=5, algo="rbp")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((state * r).sum(), cell.W, create_graph=True)


# ---- Evaluation, per-step callback, autocast -------------------------------------------------------

def test_no_grad_runs_plain_steps_and_on_step_sees_every_state():
    cell, x, h0, _ = dense_setup()
    seen = []
    with torch.no_grad():
        state, penalty, stats = crbp.run(cell, x, h0, steps=5, algo="c-rbp", on_step=lambda t, h: seen.append((t, h)))
    assert [t for t, _ in seen] == [1, 2, 3, 4, 5] and penalty.item() == 0 and stats.neumann_terms is None
    for t, h in seen:
        assert torch.allclose(h, unroll(cell, x, h0, t).detach(), atol=0, rtol=0)
    assert not state.requires_grad and torch.equal(state, seen[-1][1])
    with torch.no_grad():  # an evaluation sweep over t = 1..T may ask rbp for one step
        assert torch.equal(crbp.run(cell, x, h0, steps=1, algo="rbp").state, seen[0][1])


class DenseByHand(torch.autograd.Function):
    """Dense's step with a hand-written backward: the same function implemented differently, as a fused or
    compiled cell would be. It counts its backward calls."""
    backward_calls = 0

    @staticmethod
    def forward(ctx, h, x, W, U, b):
        y = torch.tanh(torch.addmm(b, torch.cat([h, x], 1), torch.cat([W, U], 1).T))
        ctx.save_for_backward(h, x, W, U, y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        DenseByHand.backward_calls += 1
        h, x, W, U, y = ctx.saved_tensors
        ga = gy * (1 - y * y)  # through tanh
        return ga @ W, ga @ U, ga.T @ h, ga.T @ x, ga.sum(0)


@pytest.mark.parametrize("algo", ["rbp", "c-rbp", "bptt", "c-bptt"])
def test_fast_cell_runs_every_step_and_its_backward_serves_the_neumann_terms(algo):
    cell, x, h0, r = dense_setup(rho=0.95)
    calls = []
    fast = lambda h, x: (calls.append(torch.is_grad_enabled()), DenseByHand.apply(h, x, cell.W, cell.U, cell.b))[1]
    state, penalty, stats = crbp.run(cell, x, h0, steps=6, algo=algo, mu=0.3, fast_cell=fast)
    ref, ref_penalty, _ = crbp.run(cell, x, h0, steps=6, algo=algo, mu=0.3)
    taped = {"rbp": 1, "bptt": 6}[algo.removeprefix("c-")]
    assert calls == [False] * (6 - taped) + [True] * taped and torch.allclose(state, ref, rtol=1e-14, atol=0)
    assert torch.allclose(penalty, ref_penalty, rtol=1e-12, atol=0) and (penalty > 0) == algo.startswith("c-")
    DenseByHand.backward_calls = 0
    loss, ref_loss = (state * r).sum() + 10 * penalty, (ref * r).sum() + 10 * ref_penalty
    for a, b in zip(grads(loss, cell, x), grads(ref_loss, cell, x)):
        assert rel(a, b) < 1e-12
    # every Neumann term went through the fast cell's backward, then one more for the parameters
    assert DenseByHand.backward_calls == (len(stats.neumann_norms) if taped == 1 else 6)


def dense_vjp(cell):
    """v^T dF/dh by hand for Dense: F = tanh(W h + U x + b), so v^T dF/dh = (v . (1 - F^2)) W."""
    return lambda h, x, v: (v * (1 - cell(h, x) ** 2)) @ cell.W


@pytest.mark.parametrize("algo", ["rbp", "c-rbp", "bptt", "c-bptt"])
def test_vjp_option_gives_the_same_penalty_and_gradients(algo):
    cell, x, h0, r = dense_setup(rho=0.95)
    ref, ref_penalty, ref_stats = crbp.run(cell, x, h0, steps=8, algo=algo, mu=0.3)
    state, penalty, stats = crbp.run(cell, x, h0, steps=8, algo=algo, mu=0.3, vjp=dense_vjp(cell))
    assert torch.equal(state, ref) and torch.allclose(penalty, ref_penalty, rtol=1e-12, atol=0)
    assert (penalty > 0) == algo.startswith("c-")
    loss, ref_loss = (state * r).sum() + 10 * penalty, (ref * r).sum() + 10 * ref_penalty
    for a, b in zip(grads(loss, cell, x), grads(ref_loss, cell, x)):
        assert rel(a, b) < 1e-10
    assert (stats.neumann_terms, stats.neumann_stop) == (ref_stats.neumann_terms, ref_stats.neumann_stop)


def test_vjp_option_on_a_tuple_state_through_torch_func():
    cell, (_, x, _, r) = TupleCell(), dense_setup()
    h0 = (torch.zeros(B, D), torch.zeros(B, D))
    vjp = lambda h, x, v: torch.func.vjp(lambda h: cell(h, x), h)[1](v)[0]
    for algo in ("c-rbp", "c-bptt"):
        (h, c), penalty, _ = crbp.run(cell, x, h0, steps=6, algo=algo, mu=0.05, vjp=vjp)
        (hr, cr), ref_penalty, _ = crbp.run(cell, x, h0, steps=6, algo=algo, mu=0.05)
        assert ref_penalty > 0 and torch.allclose(penalty, ref_penalty, rtol=1e-12, atol=0)
        got = grads((h * r).sum() + c.sum() + penalty, cell, x)
        for a, b in zip(got, grads((hr * r).sum() + cr.sum() + ref_penalty, cell, x)):
            assert rel(a, b) < 1e-10


def test_halt_stops_each_sample_at_its_own_fixed_point():
    # h_t = a h_{t-1} + x from 0, a per sample: the step changes h by a^(t-1) x, i.e. by
    # a^(t-1) (1 - a) / (1 - a^t) relative to h_t. Fast contractions halt first; the batch runs on.
    a = torch.tensor([0.1, 0.5, 0.9])[:, None]
    x, tol = torch.ones(3, D), 1e-3
    want = [next(t for t in range(1, 200) if ai ** (t - 1) * (1 - ai) / (1 - ai ** t) <= tol)
            for ai in a[:, 0].tolist()]
    seen = []
    with torch.no_grad():
        state, _, stats = crbp.run(lambda h, x: a * h + x, x, torch.zeros(3, D), steps=200, algo="c-rbp", halt=tol,
                                   on_step=lambda t, h: seen.append(t))
    assert stats.halted.tolist() == want and want[0] < want[1] < want[2] and seen[-1] == want[2]
    for i, n in enumerate(want):  # each sample keeps the state of the step it halted at
        assert torch.allclose(state[i], x[i] * (1 - a[i] ** n) / (1 - a[i]), rtol=1e-12, atol=0)
    with torch.no_grad():  # a sample that never halts takes every step
        _, _, stats = crbp.run(lambda h, x: a * h + x, x, torch.zeros(3, D), steps=want[0] + 1, algo="bptt", halt=tol)
    assert stats.halted.tolist() == [want[0], want[0] + 1, want[0] + 1]
    with pytest.raises(ValueError, match="halt is for evaluation"):
        crbp.run(lambda h, x: a * h + x, x, torch.zeros(3, D), steps=10, algo="bptt", halt=tol)


def test_bf16_autocast_accumulates_in_float32_and_stays_close():
    cell, x, h0, r = (z.float() if isinstance(z, torch.Tensor) else z.float() for z in conv_setup())
    x = x.detach().requires_grad_()
    ref = grads((crbp.run(cell, x, h0, steps=10, algo="c-rbp")[0] * r).sum(), cell, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state, penalty, stats = crbp.run(cell, x, h0, steps=10, algo="c-rbp")
        loss = (state.float() * r).sum() + penalty
    assert penalty.dtype == torch.float32
    for a, b in zip(grads(loss, cell, x), ref):
        assert torch.isfinite(a).all() and rel(a, b) < 5e-2
    assert stats.neumann_terms > 0


# ---- Bad input says what to pass ------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(algo="rpb"), "algo must be one of"),
    (dict(steps=0), "steps must be an int >= 1"),
    (dict(steps=2.0), "steps must be an int"),
    (dict(steps=1, algo="rbp"), "needs steps >= 2"),
    (dict(algo="tbptt"), "needs truncate"),
    (dict(algo="tbptt", truncate=9), "needs truncate"),
    (dict(algo="bptt", truncate=2), "truncate is for tbptt"),
    (dict(mu=1.0), r"mu must be a number in \[0, 1\)"),
    (dict(mu=-0.1), r"mu must be"),
    (dict(neumann_steps=-1), "neumann_steps"),
    (dict(tol=-1), "tol"),
    (dict(grad_cap=0), "grad_cap"),
    (dict(nonfinite="ignore"), "nonfinite"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    cell, x, h0, _ = dense_setup()
    kwargs = {"steps": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        crbp.run(cell, x, h0, **kwargs)


def test_bad_cells_and_states_raise_value_error():
    cell, x, h0, _ = dense_setup()
    with pytest.raises(TypeError, match="neuman_steps"):  # a misspelled option: Python says which
        crbp.run(cell, x, h0, steps=3, neuman_steps=5)
    with pytest.raises(ValueError, match="h0 must be"):
        crbp.run(cell, x, [1.0], steps=3)
    with pytest.raises(ValueError, match="h0 must be"):
        crbp.run(cell, x, torch.zeros(B, D, dtype=torch.long), steps=3)
    with pytest.raises(ValueError, match="must return a state like h"):
        crbp.run(lambda h, x: h[:, :2], x, h0, steps=3)
    with pytest.raises(ValueError, match="must return a state like h"):
        crbp.run(lambda h, x: h.float(), x, h0, steps=3)
    with pytest.raises(ValueError, match="must return a state like h"):
        crbp.run(lambda s, x: s[0], x, (h0, h0), steps=3)
    with pytest.raises(ValueError, match="the cell's output must be"):
        crbp.run(lambda h, x: None, x, h0, steps=3)
    with pytest.raises(ValueError, match="requires grad"):
        crbp.lcp(h0 * 2, h0)
    with pytest.raises(ValueError, match="reduction"):
        crbp.lcp(h0, h0, reduction="max")


# ---- crbp.py stands alone --------------------------------------------------------------------------

def test_crbp_imports_only_torch_and_stdlib_and_works_copied_alone(tmp_path):
    src = open(os.path.join(os.path.dirname(__file__), "crbp.py")).read()
    roots = {a.name.split(".")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)}
    assert roots <= {"torch"} | set(sys.stdlib_module_names)
    (tmp_path / "crbp.py").write_text(src)
    code = ("import torch, crbp; h, p, s = crbp.run(lambda h, x: torch.tanh(0.5 * h + x), torch.ones(2, 3, "
            "requires_grad=True), torch.zeros(2, 3), steps=5); h.sum().backward(); print(s.neumann_stop)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in crbp.STOPS


# ---- on a GPU ---------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rbp_peak_memory_is_flat_in_steps_and_bf16_autocast_runs():
    dev = torch.device("cuda")
    cell = Conv(C=8).to(dev, torch.float32)
    x = torch.randn(8, 1, 64, 64, device=dev, dtype=torch.float32, requires_grad=True)
    h0 = lambda: torch.zeros(8, 8, 64, 64, device=dev, dtype=torch.float32)

    def peak(algo, T):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        state, penalty, _ = crbp.run(cell, x, h0(), steps=T, algo=algo)
        (state.sum() + penalty).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    assert peak("c-rbp", 50) <= 1.02 * peak("c-rbp", 5)
    assert peak("bptt", 50) > 5 * peak("bptt", 5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        state, penalty, stats = crbp.run(cell, x, h0(), steps=10, algo="c-rbp")
    (state.float().sum() + penalty).backward()
    assert torch.isfinite(x.grad).all() and stats.neumann_terms > 0 and penalty.dtype == torch.float32
