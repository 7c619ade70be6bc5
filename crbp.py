"""C-RBP: train a recurrent cell at its fixed point, in memory that does not grow with the number of steps.

    Linsley, Ashok, Govindarajan, Liu, Serre. "Stable and expressive recurrent vision models." NeurIPS 2020.
    Liao et al. "Reviving and improving recurrent back-propagation." ICML 2018 (Neumann-RBP).

    import crbp
    state, penalty, stats = crbp.run(cell, x, h0, steps=20, algo="c-rbp")  # cell(h, x) -> h_next
    loss = task_loss(readout(state)) + 10 * penalty    # the paper weighted the LCP by 10
    loss.backward()                                     # the Neumann series runs in here
    print(stats)                                        # residual, Neumann terms used, why they stopped

    algo    forward                                          gradient                      memory in T
    bptt    all T steps on the autograd tape                 exact, through the unroll     O(T)
    tbptt   T - truncate steps without grad, then truncate   through the last steps        O(truncate)
    rbp     T - 1 steps without grad, then one on the tape   implicit, at the fixed point  O(1)
    c-bptt, c-tbptt, c-rbp: the same, plus the Lipschitz Coefficient Penalty (LCP), which keeps F contractive
    near the fixed point: that is what makes the rbp gradient valid ("contractor" RBP).

h may be a Tensor or a tuple of Tensors (ConvLSTM's (h, c)); the Neumann series and the LCP then cover
every tensor of the state. This file imports only torch and the standard library: copy it as it is.
"""
import dataclasses
import math
import sys
import warnings
from typing import Callable, NamedTuple, Optional

import torch

ALGOS = ("bptt", "tbptt", "rbp", "c-bptt", "c-tbptt", "c-rbp")
STOPS = ("max_terms", "tolerance", "diverging", "nonfinite", "grad_cap")  # why a Neumann series stopped
GROWTH = 1e4  # a Neumann term this many times ||g|| is divergence, not the transient of a non-normal J
_WARNED = {}  # the warnings registry of each line that calls run: a NeumannWarning shows once per line
WRAPPERS = set()  # modules that call run for their users (models.py: `crbp.WRAPPERS.add(__name__)`)


class Result(NamedTuple):
    state: object  # h_T: a Tensor, or a tuple of Tensors like h0
    penalty: torch.Tensor  # the LCP of the last transition (0-d); zero without "c-" and under no_grad
    stats: "Stats"


def run(cell: Callable, x, h0, *, steps: int, algo: str = "c-rbp", neumann_steps: int = 15, mu: float = 0.9,
        truncate: Optional[int] = None, tol: float = 1e-6, faithful: bool = False, grad_cap: Optional[float] = None,
        nonfinite: str = "raise", on_step: Optional[Callable] = None, fast_cell: Optional[Callable] = None,
        vjp: Optional[Callable] = None, halt: Optional[float] = None) -> Result:
    """Run h_t = cell(h_{t-1}, x) for t = 1..steps from h0 and return (state, penalty, stats).

    algo           one of ALGOS (see the module docstring)
    neumann_steps  K, the most Neumann terms (J^T)^k g in the rbp gradient (paper: 15; 0 = one-step gradient)
    mu             the LCP's bound on the Jacobian's column sums, in [0, 1) (paper: 0.9)
    truncate       tbptt only: how many of the last steps are on the tape, 1..steps
    tol            the Neumann series is done once a term's norm is <= tol * ||g||
    faithful       the paper code's stop rule: any term larger than the one before ends the series
    grad_cap       the paper code's second rule: stop before the sum's norm exceeds grad_cap (it used 1)
    nonfinite      "raise" a FloatingPointError when h_T is not finite, or "record" it (stats.residual is nan)
    on_step        on_step(t, h_t) after every step; under torch.no_grad() it keeps no graph (per-step readouts)
    fast_cell      the same function as cell (e.g. compiled), run for every step in its place
    vjp            vjp(h, x, v) = v^T dcell(h, x)/dh, differentiable: then every Neumann term and the LCP use it
                   instead of autograd through the taped step (no double backward for the LCP)
    halt           evaluation only: each sample stops once a step changes it by <= halt (relative), its state
                   then frozen while the rest of the batch runs on (up to `steps`); stats.halted has its steps

    Under torch.no_grad() every algo runs T plain steps and the penalty is zero. Under rbp h0 gets no
    gradient: at a fixed point h* does not depend on h0.
    """
    _check_args(steps, algo, neumann_steps, mu, truncate, tol, grad_cap, nonfinite, halt)
    h, is_tuple = _as_tuple(h0, "h0")
    pack = (lambda z: tuple(z)) if is_tuple else (lambda z: z[0])
    base, constrained = algo.removeprefix("c-"), algo.startswith("c-")
    taped = {"bptt": steps, "tbptt": truncate, "rbp": 1}[base] if torch.is_grad_enabled() else 0
    step = cell if fast_cell is None else fast_cell
    halted = None if halt is None else torch.full(h[0].shape[:1], steps, device=h[0].device)  # steps per sample
    # The fixed-point iteration:  h_t = F(h_{t-1}, x),  t = 1..T,  towards h* = F(h*, x).
    for t in range(1, steps + 1):
        if t == steps and taped and (base == "rbp" or constrained):
            # h_{T-1} enters the last step as its own input(s), so that J = dh_T/dh_{T-1} is that step's alone:
            # a leaf where nothing taped made it (rbp: the tape holds this one step, the O(1) memory), else a
            # view, so that dh_T/dc_{T-1} does not also count the path through h_{T-1} = o tanh(c_{T-1}).
            h = tuple(z.view_as(z) if z.requires_grad and base != "rbp" else z.detach().requires_grad_() for z in h)
        with torch.set_grad_enabled(t > steps - taped):
            h_prev, h = h, _as_tuple(step(pack(h), x), "the cell's output")[0]
        if t == 1:
            _check_like(h, h_prev, pack)
        if halt is not None:  # samples that halted before this step keep their state; the batch runs on
            frozen = halted < t
            h = tuple(torch.where(frozen.view(-1, *[1] * (z.dim() - 1)), a, z) for a, z in zip(h_prev, h))
            halted = torch.where(~frozen & (_norm(h, h_prev, 1) <= halt * _norm(h, None, 1)), t, halted)
        if on_step is not None:
            on_step(t, pack(h))
        if halt is not None and bool((halted <= t).all()):  # one host sync per step, in evaluation only
            break

    with torch.no_grad():  # one host sync per run: the residual, and whether h_T is finite
        finite = torch.stack([torch.isfinite(z).all() for z in h]).all()
        residual = float(torch.where(finite, _norm(h, h_prev) / _norm(h).clamp_min(1e-30), float("nan")))
    stats = Stats(steps, residual, halted=halted)
    if nonfinite == "raise" and not math.isfinite(residual):
        raise FloatingPointError(f"the state is not finite after {steps} steps: lower the learning rate, add the "
                                 "LCP (a c- algo), or pass nonfinite='record' to inspect")

    penalty = torch.zeros((), device=h[0].device)
    ones = lambda: [torch.ones_like(z) for z in h]
    if taped and constrained and vjp is not None:
        penalty = _lcp(_as_tuple(vjp(pack(h_prev), x, pack(ones())), "vjp's output")[0], mu, "mean")
    elif taped and constrained:  # compiled code has no double backward: then take the LCP on one more plain step
        h_next = h if fast_cell is None else _as_tuple(cell(pack(h_prev), x), "the cell's output")[0]
        penalty = _lcp(_vjp(h_next, h_prev, ones(), create_graph=True), mu, "mean")
    if taped and base == "rbp":
        h_fixed, caller = tuple(z.detach() for z in h_prev), _call_site(sys._getframe(1))
        JT = ((lambda v: _as_tuple(vjp(pack(h_fixed), x, pack(v)), "vjp's output")[0]) if vjp is not None else
              (lambda v, h_T=h, h_prev=h_prev: _vjp(h_T, h_prev, v)))  # v -> J^T v at h_{T-1}
        options = dict(K=neumann_steps, tol=tol, faithful=faithful, grad_cap=grad_cap)  # for neumann()
        h = _ImplicitGradient.apply(JT, options, stats, caller, *h)
    return Result(pack(h), penalty, stats)


@dataclasses.dataclass
class Stats:
    """What one `run` did. The neumann_* fields are filled in when the rbp backward has run."""
    steps: int
    residual: float  # forward convergence ||h_T - h_{T-1}|| / ||h_T||: small (< ~0.05) at a fixed point
    neumann_terms: Optional[int] = None  # terms (J^T)^k g, k >= 1, in the gradient
    neumann_stop: Optional[str] = None  # one of STOPS; "diverging" / "nonfinite": F not contractive at h_{T-1}
    neumann_norms: list = dataclasses.field(default_factory=list, repr=False)  # ||(J^T)^k g||, k = 0, 1, ...
    neumann_sum: Optional[float] = None  # ||sum of the kept terms||: the paper code's grad_cap compared it with 1
    halted: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)  # run(halt=): steps per sample

    def as_dict(self) -> dict:
        n = self.neumann_norms  # neumann_ratio: the last two terms' norms, the series' rate where it stopped
        return {**{k: getattr(self, k) for k in ("steps", "residual", "neumann_terms", "neumann_stop", "neumann_sum")},
                "neumann_ratio": n[-1] / n[-2] if len(n) > 1 and n[-2] > 0 else None}


def neumann(JT: Callable, g, K: int = 15, tol: float = 1e-6, faithful: bool = False,
            grad_cap: Optional[float] = None):
    """(I - J^T)^-1 g by its truncated Neumann series; JT(v) = J^T v, g a list of tensors.

    Returns (the sum, the terms k >= 1 kept in it, the stop reason, the term norms k = 0, 1, ...). A series
    of a contractive but non-normal J may grow for a while before it shrinks, so growth alone is not
    divergence. It is when a term is not finite, exceeds GROWTH * ||g||, or is still >= ||g|| after K terms;
    the sum then ends at its smallest term (the best truncation of a divergent series), never at NaN.
    faithful=True uses the paper code's rule instead: stop before the first term larger than the one before.
    """
    G, v, norms = g, g, [_norm(g).item()]
    terms, stop, best = 0, "max_terms", (g, 0, norms[0])  # best: the partial sum that ends at the smallest term
    # Implicit function theorem at h* = F(h*):  dL/dtheta = g^T (I - J)^-1 dF/dtheta,  J = dF/dh,  g = dL/dh*.
    # With J contractive:  (I - J^T)^-1 g = sum_k (J^T)^k g:  K terms, each one VJP.
    for k in range(1, K + 1):
        v = JT(v)
        norms.append(_norm(v).item())  # one host sync per term, which costs a small part of the VJP
        if not math.isfinite(norms[-1]) or (faithful and norms[-1] > norms[-2]):
            stop = "nonfinite" if not math.isfinite(norms[-1]) else "diverging"
            break
        G_next = [a + b for a, b in zip(G, v)]
        if grad_cap is not None and _norm(G_next) > grad_cap:
            stop = "grad_cap"
            break
        G, terms = G_next, k
        if norms[-1] < best[2]:
            best = (G, k, norms[-1])
        if norms[-1] <= tol * norms[0] or norms[-1] > GROWTH * norms[0]:
            stop = "tolerance" if norms[-1] <= tol * norms[0] else "diverging"
            break
    else:  # K terms and still as large as g: the series is not converging within K
        stop = "diverging" if K and norms[-1] >= norms[0] else stop
    if stop in ("diverging", "nonfinite") and not faithful:
        G, terms, _ = best
    return G, terms, stop, norms


class _ImplicitGradient(torch.autograd.Function):
    """The identity on h_T going forward. Going backward it replaces the gradient g arriving at h_T by
    (I - J^T)^-1 g, which then flows through the one taped step to the parameters and to x."""

    @staticmethod
    def forward(ctx, JT, options, stats, caller, *h):
        ctx.JT, ctx.options, ctx.stats, ctx.caller = JT, options, stats, caller
        return tuple(z.view_as(z) for z in h)

    @staticmethod
    def backward(ctx, *g):
        if torch.is_grad_enabled():  # create_graph=True would treat the Neumann sum as a constant: refuse
            raise RuntimeError("double backward through the RBP Neumann series is not supported: use bptt")
        dtypes = [z.dtype for z in g]  # under autocast the terms arrive in bf16: sum them in float32 or wider
        JT = lambda v: [u.to(_acc(u)) for u in ctx.JT([vi.to(d) for vi, d in zip(v, dtypes)])]
        G, terms, stop, norms = neumann(JT, [z.to(_acc(z)) for z in g], **ctx.options)
        vars(ctx.stats).update(neumann_terms=terms, neumann_stop=stop, neumann_norms=norms, neumann_sum=_norm(G).item())
        if stop in ("diverging", "nonfinite"):  # shown once per call site of crbp.run, not once per step
            what = "diverged" if stop == "diverging" else "met a non-finite term"
            warnings.warn_explicit(f"the Neumann series {what}: F is not contractive at h_(T-1), so the gradient "
                                   "is its best partial sum. Raise the LCP weight or lower mu (stats.neumann_norms "
                                   "has the terms' norms)", NeumannWarning, *ctx.caller,
                                   registry=_WARNED.setdefault(ctx.caller, {}))
        return (None,) * 4 + tuple(Gi.to(d) for Gi, d in zip(G, dtypes))


def _call_site(frame):
    """(file, line) of the first caller outside torch and WRAPPERS: a warning names the user's line, not nn.Module's."""
    while frame.f_back and frame.f_globals.get("__name__", "").partition(".")[0] in WRAPPERS | {"torch"}:
        frame = frame.f_back
    return frame.f_code.co_filename, frame.f_lineno


class NeumannWarning(UserWarning):
    """The rbp gradient's Neumann series diverged or met a non-finite term."""


def lcp(h_next, h_prev, mu: float = 0.9, reduction: str = "mean") -> torch.Tensor:
    """Lipschitz Coefficient Penalty of the transition h_next = F(h_prev) (Linsley et al. 2020, SI §1.2).

    h_next must come from h_prev with autograd on; the tensors of a tuple h_prev must be separate inputs (leaves
    or views). Tuple states: u sums the columns of the whole block Jacobian of (h, c, ...) (the paper's ConvLSTM
    summed only its diagonal blocks). reduction "sum" is the panoptic code's; "mean" divides by the element count.
    """
    hn, hp = _as_tuple(h_next, "h_next")[0], _as_tuple(h_prev, "h_prev")[0]
    if reduction not in ("mean", "sum") or not 0 <= mu < 1:
        raise ValueError(f"lcp takes mu in [0, 1) (the paper used 0.9) and reduction 'mean' or 'sum', got mu={mu!r}, "
                         f"reduction={reduction!r}")
    if not any(z.requires_grad for z in hp) or not any(z.requires_grad for z in hn):
        raise ValueError("lcp needs h_next computed from an h_prev that requires grad, with autograd enabled: "
                         "h_prev = h_prev.detach().requires_grad_(); h_next = cell(h_prev, x)")
    # u = 1^T J, J = dh_next/dh_prev: the Jacobian's column sums in one VJP with a vector of ones, kept on the
    # tape (create_graph) because the penalty must train the parameters that u depends on.
    return _lcp(_vjp(hn, hp, [torch.ones_like(z) for z in hn], create_graph=True), mu, reduction)


def _lcp(u, mu, reduction):
    # LCP = sum_i ((1^T J)_i - mu)_+^2: one-sided, so column sums below mu are never penalised.
    # Summed in float32 or wider: under bf16 autocast a sum over millions of elements loses digits.
    total = sum((ui - mu).clamp(min=0).square().sum(dtype=_acc(ui)) for ui in u)
    return total / sum(ui.numel() for ui in u) if reduction == "mean" else total


def _vjp(outputs, inputs, v, create_graph=False):
    """v^T d(outputs)/d(inputs) for tuples of tensors; zeros where an output does not depend on an input."""
    pairs = [(o, vi) for o, vi in zip(outputs, v) if o.requires_grad]
    wrt = [z for z in inputs if z.requires_grad]
    grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [vi for _, vi in pairs], retain_graph=True,
                                     create_graph=create_graph, allow_unused=True) if pairs and wrt else ())
    out = [next(grads) if z.requires_grad else None for z in inputs]
    return [torch.zeros_like(z) if d is None else d for d, z in zip(out, inputs)]


def _norm(tensors, minus=None, start_dim=0) -> torch.Tensor:
    """||tensors - minus|| of lists of tensors taken as one vector (per sample from start_dim=1), in float32+."""
    diffs = tensors if minus is None else [a - b for a, b in zip(tensors, minus)]
    return torch.stack([z.to(_acc(z)).square().flatten(start_dim).sum(-1) for z in diffs]).sum(0).sqrt()


def _acc(z):
    return torch.promote_types(z.dtype, torch.float32)


def _as_tuple(h, what):
    """(tuple of tensors, whether h was a tuple), checking that h is a state."""
    is_tuple = isinstance(h, (tuple, list))
    hs = tuple(h) if is_tuple else (h,)
    if not hs or not all(isinstance(z, torch.Tensor) and z.is_floating_point() for z in hs):
        raise ValueError(f"{what} must be a floating-point Tensor or a non-empty tuple of them, got {_describe(h)}")
    return hs, is_tuple


def _describe(h):
    if isinstance(h, (tuple, list)):
        return "(" + ", ".join(map(_describe, h)) + ")"
    return f"Tensor{tuple(h.shape)} {h.dtype}" if isinstance(h, torch.Tensor) else type(h).__name__


def _check_like(h_new, h, pack):
    """The cell must return a state of h's structure, shapes and dtypes (autocast may swap float32 and bf16/fp16)."""
    autocast = {torch.float32, torch.bfloat16, torch.float16}
    if len(h_new) != len(h) or any(a.shape != b.shape or (a.dtype != b.dtype and not {a.dtype, b.dtype} <= autocast)
                                   for a, b in zip(h_new, h)):
        raise ValueError(f"cell(h, x) must return a state like h: got {_describe(pack(h_new))} for h = "
                         f"{_describe(pack(h))}")


def _check_args(steps, algo, K, mu, truncate, tol, grad_cap, nonfinite, halt):
    """The checks that stand between a wrong argument and a silently wrong gradient."""
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    problems = [  # each condition short-circuits before any comparison that could raise
        (not is_int(steps) or steps < 1, f"steps must be an int >= 1, got {steps!r}"),
        (algo.endswith("rbp") and steps == 1 and torch.is_grad_enabled(),
         f"{algo} needs steps >= 2 (T-1 steps without grad, then one on the tape), got 1"),
        (algo.endswith("tbptt") and not (is_int(truncate) and 1 <= truncate <= steps),
         f"{algo} needs truncate, the number of last steps to backpropagate through, in 1..{steps}; got {truncate!r}"),
        (not algo.endswith("tbptt") and truncate is not None, f"truncate is for tbptt and c-tbptt, not {algo!r}"),
        (not is_int(K) or K < 0, f"neumann_steps must be an int >= 0 (the paper used 15), got {K!r}"),
        (not isinstance(mu, (int, float)) or not 0 <= mu < 1, f"mu must be a number in [0, 1) (paper 0.9), got {mu!r}"),
        (not isinstance(tol, (int, float)) or not tol >= 0, f"tol must be a number >= 0, got {tol!r}"),
        (grad_cap is not None and not (isinstance(grad_cap, (int, float)) and grad_cap > 0),
         f"grad_cap must be None or a number > 0 (the paper code used 1), got {grad_cap!r}"),
        (nonfinite not in ("raise", "record"), f"nonfinite must be 'raise' or 'record', got {nonfinite!r}"),
        (halt is not None and not (isinstance(halt, (int, float)) and halt >= 0 and not torch.is_grad_enabled()),
         f"halt is for evaluation: a number >= 0, under torch.no_grad(); got {halt!r}"),
    ]
    for message in (message for bad, message in problems if bad):
        raise ValueError(message)
