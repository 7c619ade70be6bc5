"""C-RBP: train a recurrent cell at its fixed point with O(1) memory in the number of steps.

    Linsley, Ashok, Govindarajan, Liu, Serre. "Stable and expressive recurrent vision models." NeurIPS 2020.
    Liao et al. "Reviving and improving recurrent back-propagation." ICML 2018 (Neumann-RBP).

A cell F is iterated from h_0 towards a fixed point of the static drive x,

    h_{t+1} = F(h_t, x),    h* = F(h*, x),

and trained one of these ways (`algo`):

    bptt      all T steps on the autograd tape; the exact gradient of the unroll      memory O(T)
    tbptt     T - truncate steps without grad, the last `truncate` steps on the tape   O(truncate)
    rbp       T - 1 steps without grad, one step on the tape; the gradient is the     O(1)
              implicit one at the fixed point, (I - J)^-1, as a truncated Neumann series
    c-bptt, c-tbptt, c-rbp: the same, plus the Lipschitz Coefficient Penalty (LCP) that keeps F
              contractive near h*, which is what makes the RBP gradient valid ("contractor" RBP).

    import crbp
    state, penalty, stats = crbp.run(cell, x, h0, steps=20, algo="c-rbp")  # cell(h, x) -> h_next
    loss = task_loss(readout(state)) + 10 * penalty    # the paper weighted the LCP by 10
    loss.backward()                                     # the Neumann series runs in here
    print(stats)                                        # residual, Neumann terms used, why they stopped

h may be a Tensor or a tuple of Tensors (ConvLSTM's (h, c)); the Neumann series and the LCP then cover
every tensor of the state. This file imports only torch and the standard library: copy it as it is.
"""
import difflib
import warnings
from typing import Callable, NamedTuple, Optional

import torch

ALGOS = ("bptt", "tbptt", "rbp", "c-bptt", "c-tbptt", "c-rbp")
STOPS = ("max_terms", "tolerance", "diverging", "nonfinite", "grad_cap")  # why the Neumann series stopped
OPTIONS = ("neumann_steps", "mu", "truncate", "tol", "grad_cap", "nonfinite", "warn", "on_step", "fast_cell")


class Stats:
    """What one `run` did. Values stay on the device until read, so recording them costs no host sync.

    steps          the T steps run
    residual       forward convergence ||h_T - h_{T-1}|| / ||h_T|| (< ~0.05 is a good fixed point)
    nonfinite_step the first step whose state was not finite, or None (set with nonfinite="record")
    neumann_terms  Neumann terms (J^T)^k g, k >= 1, kept in the gradient; None until backward has run
    neumann_stop   one of STOPS; "diverging" and "nonfinite" mean F was not contractive at h_{T-1}
    neumann_norms  ||(J^T)^k g|| for every term computed, k = 0, 1, ...
    """

    def __init__(self, steps: int):
        self.steps = steps
        self._residual = self._bad_step = self._neumann = None

    @property
    def residual(self) -> Optional[float]:
        return None if self._residual is None else self._residual.item()

    @property
    def nonfinite_step(self) -> Optional[int]:
        return None if self._bad_step is None else (int(self._bad_step) or None)

    @property
    def neumann_terms(self) -> Optional[int]:
        return None if self._neumann is None else int(self._neumann[0])

    @property
    def neumann_stop(self) -> Optional[str]:
        return None if self._neumann is None else STOPS[int(self._neumann[1])]

    @property
    def neumann_norms(self) -> Optional[list]:
        return None if self._neumann is None else self._neumann[2].tolist()

    def as_dict(self) -> dict:
        keys = ("steps", "residual", "nonfinite_step", "neumann_terms", "neumann_stop")
        return {k: getattr(self, k) for k in keys}

    def __repr__(self):
        return "Stats(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"


class Result(NamedTuple):
    state: object  # h_T: a Tensor, or a tuple of Tensors like h0
    penalty: torch.Tensor  # the LCP at the last transition (0-d); zero for algos without "c-"
    stats: Stats


def run(cell: Callable, x, h0, *, steps: int, algo: str = "c-rbp", neumann_steps: int = 15,
        mu: float = 0.9, truncate: Optional[int] = None, tol: float = 1e-6,
        grad_cap: Optional[float] = None, nonfinite: str = "raise", warn: bool = False,
        on_step: Optional[Callable] = None, fast_cell: Optional[Callable] = None, **unknown) -> Result:
    """Run `h_{t+1} = cell(h_t, x)` for t = 0..steps-1 from h0 and return (state, penalty, stats).

    algo           one of ALGOS (see the module docstring)
    neumann_steps  K, the most Neumann terms (J^T)^k g in the rbp backward (paper: 15; 0 = one-step gradient)
    mu             the LCP's bound on the column sums of J, in [0, 1) (paper: 0.9)
    truncate       tbptt only: how many of the last steps are on the tape, 1..steps
    tol            stop the Neumann series once a term's norm is <= tol * ||g||
    grad_cap       the paper code's extra rule: stop once ||sum of terms|| > grad_cap (it used 1).
                   A heuristic that depends on the loss scale, so off by default.
    nonfinite      "raise": a non-finite state raises FloatingPointError naming the step (one host sync
                   per run); "record": it is only recorded in stats.nonfinite_step (no sync)
    warn           warn when the Neumann series stops because a term grew or was not finite (one sync)
    on_step        called as on_step(t, h_t) after every step t = 1..T, e.g. for per-step readouts.
                   Under torch.no_grad() it keeps no graph: use that for evaluation.
    fast_cell      the same function as cell, e.g. torch.compile(cell), run for every step instead of cell,
                   so that the Neumann terms are VJPs through its (fused) backward too. Compiled code has no
                   double backward, which the LCP needs, so c- algos then take the penalty on one extra step
                   of cell from the same h_(T-1): the same value, at the cost of one more step.

    Under torch.no_grad() every algo runs T plain steps and the penalty is zero. Under rbp h0 gets no
    gradient: at a fixed point h* does not depend on h0.
    """
    h, is_tuple = _as_tuple(h0, "h0")
    _check_run_args(cell, steps, algo, neumann_steps, mu, truncate, tol, grad_cap, nonfinite, on_step, unknown)
    if fast_cell is not None and not callable(fast_cell):
        raise ValueError(f"fast_cell must be None or a callable like cell, got {type(fast_cell).__name__}")
    base, constrained = algo.removeprefix("c-"), algo.startswith("c-")
    tape = 0 if not torch.is_grad_enabled() else {"bptt": steps, "tbptt": truncate, "rbp": 1}[base]
    stats = Stats(steps)
    bad_step = torch.zeros((), dtype=torch.long, device=h[0].device)

    h_prev = h
    for t in range(1, steps + 1):
        if t == steps and tape and base == "rbp":
            # The last step starts from a detached leaf: the tape holds this one step only (that is the
            # O(1) memory), and J = dh_T/dh_{T-1} is taken with respect to this leaf.
            h = tuple(z.detach().requires_grad_() for z in h)
        elif t == steps and tape and constrained:
            # The LCP needs h_{T-1} on the tape as separate inputs of the last step: a leaf where h0 or a
            # no-grad step produced it, else a view, so that dh_T/dc_{T-1} does not also count the path
            # through h_{T-1} = o * tanh(c_{T-1}) (tuple states whose tensors depend on each other).
            h = tuple(z.view_as(z) if z.requires_grad else z.detach().requires_grad_() for z in h)
        f = cell if fast_cell is None else fast_cell
        with torch.set_grad_enabled(t > steps - tape):
            h_prev, h = h, _as_tuple(f(_pack(h, is_tuple), x), "the cell's output")[0]
        if t == 1:
            _check_like(h, h_prev, is_tuple)
        # Where was the state first not finite? Kept on the device: no host sync per step.
        finite = torch.stack([torch.isfinite(z).all() for z in h]).all()
        bad_step = torch.where((bad_step == 0) & ~finite, t, bad_step)
        if on_step is not None:
            on_step(t, _pack(h, is_tuple))

    with torch.no_grad():
        stats._residual = _norm([a - b for a, b in zip(h, h_prev)]) / _norm(h).clamp_min(1e-30)
    stats._bad_step = bad_step
    if nonfinite == "raise" and int(bad_step):
        raise FloatingPointError(f"the state became non-finite at step {int(bad_step)} of {steps}: lower the "
                                 "learning rate, add the LCP (a c- algo) or use nonfinite='record' to inspect")

    penalty = torch.zeros((), device=h[0].device)
    if tape and constrained:
        h_next = h if fast_cell is None else cell(_pack(h_prev, is_tuple), x)  # no double backward: see fast_cell
        penalty = lcp(h_next, h_prev, mu)
    if tape and base == "rbp":
        h = _NeumannRBP.apply((neumann_steps, tol, grad_cap, warn, stats), len(h), *h_prev, *h)
    return Result(_pack(h, is_tuple), penalty, stats)


def lcp(h_next, h_prev, mu: float = 0.9, reduction: str = "mean") -> torch.Tensor:
    """Lipschitz Coefficient Penalty of the transition h_next = F(h_prev) (Linsley et al. 2020, SI §1.2).

    h_prev must require grad and h_next must have been computed from it with autograd on; the tensors of
    a tuple h_prev must be separate inputs (leaves or views), not one computed from another. Tuple states:
    u is the column sum over the whole block Jacobian of (h, c, ...) (the paper's ConvLSTM summed only the
    diagonal blocks), and "mean" averages over every element of every tensor. "sum" is what the panoptic
    code used (it differs from "mean" by the number of elements, so its weight must be rescaled).
    """
    hn, _ = _as_tuple(h_next, "h_next")
    hp, _ = _as_tuple(h_prev, "h_prev")
    if not 0 <= mu < 1:
        raise ValueError(f"mu must be in [0, 1) (the paper used 0.9), got {mu!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not any(z.requires_grad for z in hp) or not any(z.requires_grad for z in hn):
        raise ValueError("lcp needs h_next computed from an h_prev that requires grad, with autograd enabled: "
                         "h_prev = h_prev.detach().requires_grad_(); h_next = cell(h_prev, x)")
    # u = 1^T J, J = dh_next/dh_prev: the column sums of the Jacobian, in one VJP with a ones vector.
    # create_graph=True: u is itself a function of the parameters, and the penalty must train them.
    u = _vjp(hn, hp, [torch.ones_like(z) for z in hn], create_graph=True)
    # LCP = sum_i ((1^T J)_i - mu)_+^2: one-sided, so negative column sums are never penalised.
    # Summed in float32 or wider: under bf16 autocast a sum over millions of elements loses digits.
    total = sum((ui - mu).clamp(min=0).square().sum(dtype=_acc_dtype(ui)) for ui in u)
    return total / sum(ui.numel() for ui in u) if reduction == "mean" else total


class _NeumannRBP(torch.autograd.Function):
    """The identity on h_T going forward; going backward it replaces the gradient g arriving at h_T by
    the truncated Neumann series of (I - J^T)^-1 g, which then flows through the one taped step to the
    parameters and to x. It is an autograd.Function (not a tensor hook) and saves h_{T-1}, h_T with
    save_for_backward (not on ctx), and refuses a double backward rather than get it wrong."""

    @staticmethod
    def forward(ctx, options, n, *h):  # h = h_{T-1} (n tensors), then h_T (n tensors)
        ctx.options, ctx.n = options, n
        ctx.save_for_backward(*h)
        return tuple(z.view_as(z) for z in h[n:])

    @staticmethod
    def backward(ctx, *g):
        if torch.is_grad_enabled():
            # create_graph=True through here would treat the Neumann sum as a constant: refuse, not be wrong.
            raise RuntimeError("double backward through the RBP Neumann series is not supported; use bptt "
                               "for higher-order gradients")
        K, tol, grad_cap, warn, stats = ctx.options
        saved = ctx.saved_tensors
        h_prev, h_last = saved[:ctx.n], saved[ctx.n:]
        acc = _acc_dtype(g[0])
        # Implicit gradient at the fixed point (implicit function theorem, SI §2):
        #   dL/dtheta = g^T (I - J)^-1 dF/dtheta,   J = dF/dh at h*,   g = dL/dh*.
        # With J contractive, (I - J^T)^-1 g = g + J^T g + (J^T)^2 g + ...; keep K terms, each a VJP.
        # Accumulated in float32 or wider: under autocast the terms arrive in bf16.
        v = [gi.to(acc) for gi in g]
        G = list(v)
        norm_g = norm_prev = _norm(v)
        norms = [norm_g]
        active = torch.ones((), dtype=torch.bool, device=norm_g.device)
        terms = torch.zeros((), dtype=torch.long, device=norm_g.device)
        stop = torch.zeros_like(terms)  # STOPS[0] = "max_terms"
        for k in range(1, K + 1):
            v = [vi.to(acc) for vi in _vjp(h_last, h_prev, [vi.to(z.dtype) for vi, z in zip(v, h_last)])]
            norm_v = _norm(v)
            norms.append(norm_v)
            # Stop rules. A term that is not finite, or larger than the one before, means J is not
            # contractive here: the series diverges, so keep the partial sum before it (never a NaN or
            # zero gradient) and say so in stats. A term below tol * ||g|| is kept, and the sum is done.
            # The stop is decided on the device, with no host sync per term.
            reason = torch.where(~torch.isfinite(norm_v), 3, torch.where(norm_v > norm_prev, 2, 0))
            if grad_cap is not None:  # the paper code's rule: stop once ||G|| would exceed grad_cap
                reason = torch.where((reason == 0) & (_norm([a + b for a, b in zip(G, v)]) > grad_cap), 4, reason)
            take = active & (reason == 0)
            G = [torch.where(take, a + b, a) for a, b in zip(G, v)]
            terms = terms + take.long()
            small = norm_v <= tol * norm_g
            stop = torch.where(active & ~take, reason, torch.where(take & small, 1, stop))
            active, norm_prev = take & ~small, norm_v
            if k % 4 == 0 and not active:  # one host sync every 4 terms, to skip work once stopped
                break
        stats._neumann = (terms, stop, torch.stack(norms))
        if warn and int(stop) in (2, 3):
            warnings.warn(f"Neumann series stopped after {int(terms)} terms: a term was {STOPS[int(stop)]}, so F "
                          "is not contractive at h_(T-1). Raise the LCP weight or lower mu.", stacklevel=2)
        return (None, None) + (None,) * ctx.n + tuple(Gi.to(z.dtype) for Gi, z in zip(G, h_last))


def _vjp(outputs, inputs, v, create_graph=False):
    """v^T d(outputs)/d(inputs) for tuples of tensors; zeros where an output does not depend on an input."""
    pairs = [(o, vi) for o, vi in zip(outputs, v) if o.requires_grad]
    wrt = [z for z in inputs if z.requires_grad]
    grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [vi for _, vi in pairs], retain_graph=True,
                                     create_graph=create_graph, allow_unused=True) if pairs and wrt else ())
    out = [next(grads) if z.requires_grad else None for z in inputs]
    return [torch.zeros_like(z) if d is None else d for d, z in zip(out, inputs)]


def _norm(tensors) -> torch.Tensor:
    """The 2-norm of a tuple of tensors taken as one vector, in float32 or wider."""
    return torch.stack([z.to(_acc_dtype(z)).square().sum() for z in tensors]).sum().sqrt()


def _acc_dtype(z):
    return torch.promote_types(z.dtype, torch.float32)


def _as_tuple(h, what):
    """(tuple of tensors, whether h was a tuple), checking that h is a state."""
    is_tuple = isinstance(h, (tuple, list))
    hs = tuple(h) if is_tuple else (h,)
    if not hs or not all(isinstance(z, torch.Tensor) and z.is_floating_point() for z in hs):
        raise ValueError(f"{what} must be a floating-point Tensor or a non-empty tuple of them, got {_describe(h)}")
    return hs, is_tuple


def _pack(h, is_tuple):
    return h if is_tuple else h[0]


def _describe(h):
    if isinstance(h, torch.Tensor):
        return f"Tensor{tuple(h.shape)} {h.dtype}"
    if isinstance(h, (tuple, list)):
        return "(" + ", ".join(_describe(z) for z in h) + ")"
    return type(h).__name__


def _check_like(h_new, h, is_tuple):
    """The cell must return a state of h's structure, shapes and dtypes (dtypes may change under autocast)."""
    same = len(h_new) == len(h) and all(
        a.shape == b.shape and (a.dtype == b.dtype or _autocast_on()) for a, b in zip(h_new, h))
    if not same:
        raise ValueError(f"cell(h, x) must return a state like h: got {_describe(_pack(h_new, is_tuple))} "
                         f"for h = {_describe(_pack(h, is_tuple))}")


def _autocast_on():
    try:  # torch >= 2.4
        return torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")
    except TypeError:  # torch 2.1-2.3
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def _check_run_args(cell, steps, algo, K, mu, truncate, tol, grad_cap, nonfinite, on_step, unknown):
    def fail(msg):
        raise ValueError(msg)

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    for key in unknown:
        close = difflib.get_close_matches(key, OPTIONS, n=1)
        fail(f"unknown option {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
             + f"; run takes: steps, algo, {', '.join(OPTIONS)}")
    if not callable(cell):
        fail(f"cell must be a callable cell(h, x) -> h_next, got {type(cell).__name__}")
    if algo not in ALGOS:
        fail(f"algo must be one of {ALGOS}, got {algo!r}")
    if not is_int(steps) or steps < 1:
        fail(f"steps must be an int >= 1, got {steps!r}")
    if algo.endswith("rbp") and steps < 2 and torch.is_grad_enabled():  # under no_grad any T runs plain steps
        fail(f"{algo} needs steps >= 2 (T-1 steps without grad, then one on the tape), got {steps}")
    if algo.endswith("tbptt") and not (is_int(truncate) and 1 <= truncate <= steps):
        fail(f"{algo} needs truncate, the number of last steps to backpropagate through, in 1..{steps}; "
             f"got {truncate!r}")
    if not algo.endswith("tbptt") and truncate is not None:
        fail(f"truncate is only used by tbptt and c-tbptt, not {algo}: leave it None")
    if not is_int(K) or K < 0:
        fail(f"neumann_steps must be an int >= 0 (the paper used 15), got {K!r}")
    if not isinstance(mu, (int, float)) or not 0 <= mu < 1:
        fail(f"mu must be a number in [0, 1) (the paper used 0.9), got {mu!r}")
    if not isinstance(tol, (int, float)) or not tol >= 0:
        fail(f"tol must be a number >= 0, got {tol!r}")
    if grad_cap is not None and not (isinstance(grad_cap, (int, float)) and grad_cap > 0):
        fail(f"grad_cap must be None or a number > 0 (the paper code used 1), got {grad_cap!r}")
    if nonfinite not in ("raise", "record"):
        fail(f"nonfinite must be 'raise' or 'record', got {nonfinite!r}")
    if on_step is not None and not callable(on_step):
        fail(f"on_step must be None or a callable on_step(t, h), got {type(on_step).__name__}")
