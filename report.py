"""What a trained model does: the papers' losses and metrics, held-out evaluation after every step, the
state-space analysis with its KS test, and the figures and tables of a run directory.

    import models, report
    model = models.load("runs/pathfinder-14")                   # eval mode, the trained weights
    cfg = report.load_config("runs/pathfinder-14")              # the run's config.json as attributes
    curve = report.evaluate(model, cfg, "cpu", steps=40, n_images=256, per_step=True)  # [{metric: value}] per t
    report.full(model, cfg, "cpu")                               # every table and figure, as train.py's end

`cfg` is any object with the attributes of train.py's config.json (task, seed, length, size, grid,
canvas, steps, eval_steps, eval_images, eval_batch_size, eval_lengths, amp, model, algo, out).
Evaluation images come from data.py's test seed stream only, which training never draws from. Under
torchrun, `evaluate` splits the batches over the ranks and every rank gets the one-process metrics.
"""
import argparse
import functools
import json
import math
import os
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import figures

# ----------------------------------------------------------------------------------------------------
# Losses and the papers' metrics


def focal_loss(logits, target, gamma=2.0):
    """Focal loss (Lin et al. 2017) with gamma = 2 and no alpha, as the C-RBP Pathfinder code.

    FL = -(1 - p_t)^gamma log p_t per pixel, averaged over all pixels; p_t is detached where it forms the
    modulating factor, as in the paper code. logits (B, 2, H, W), target (B, H, W) long. Computed in the
    logits' dtype, or float32 where that is narrower (bf16 under autocast), so float64 checks stay float64.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp_t = F.log_softmax(logits, 1).gather(1, target[:, None])[:, 0]  # (B, H, W)
    return (-(1 - logp_t.detach().exp()) ** gamma * logp_t).mean()


def maze_loss(logits, target, free):
    """Per-pixel cross-entropy on free pixels only (walls and padding are excluded, as the LocRNN code)."""
    loss = F.cross_entropy(logits.float(), target, reduction="none")  # (B, H, W)
    return (loss * free).sum() / free.sum().clamp_min(1)


def seg_counts(logits, target):
    """Pixel counts (TP, FP, FN, TN) of argmax predictions, per image: (B, 4) float64."""
    pred, target = logits.argmax(1).bool().flatten(1), target.bool().flatten(1)  # (B, H*W)
    return torch.stack([(pred & target).sum(1), (pred & ~target).sum(1), (~pred & target).sum(1),
                        (~pred & ~target).sum(1)], 1).double()


def seg_metrics(counts):
    """Balanced accuracy, precision, recall, F1 and IoU = F1 / (2 - F1) from (TP, FP, FN, TN) counts."""
    tp, fp, fn, tn = counts.unbind(-1)
    recall, tnr = tp / (tp + fn).clamp_min(1), tn / (tn + fp).clamp_min(1)
    precision = tp / (tp + fp).clamp_min(1)
    f1 = 2 * tp / (2 * tp + fp + fn).clamp_min(1)
    return {"bal_acc": (recall + tnr) / 2, "precision": precision, "recall": recall, "f1": f1,
            "iou": f1 / (2 - f1)}


def summarize_seg(batch_counts):
    """The paper averages per-batch metrics unweighted; pooled metrics sum the counts over all images.

    batch_counts: a list of (4,) count tensors, one per evaluation batch.
    """
    per_batch = seg_metrics(torch.stack(batch_counts))
    pooled = seg_metrics(torch.stack(batch_counts).sum(0))
    out = {k: v.mean().item() for k, v in per_batch.items()}
    out.update({f"pooled_{k}": v.item() for k, v in pooled.items()})
    return out


def maze_solved(logits, target, free):
    """A maze counts only if the prediction, masked to free pixels, equals the target at every pixel."""
    pred = logits.argmax(1) * free.long()
    return (pred == target).flatten(1).all(1)  # (B,) bool


def _accuracy(scores):
    return {"acc": torch.stack(scores).mean().item()}


class Task(NamedTuple):
    """What train.py and the report need to know about a task, so that nothing else branches on its name."""
    name: str  # the task of models.py and data.py
    knob: str  # the difficulty option: "length" (Pathfinder contour) or "grid" (maze side)
    loss: Callable  # loss(logits, target, free) -> 0-d tensor
    score: Callable  # score(logits, target, free) -> one evaluation batch's record
    summarize: Callable  # summarize([record per batch]) -> {metric: value}
    metric: str  # the headline metric at the trained T
    curve: str  # the metric of the per-step (extrapolation) curves
    chance: str  # what a guess scores on the headline metric, said in words
    eval_steps: Callable  # default T of the per-step curve, from the trained T


TASKS = {
    # C-RBP: segment the contour that touches the dot. The per-step curve is F1, as the paper's Fig. S8:
    # balanced accuracy is lenient there (marking every bright contour still scores high).
    "pathfinder": Task("pathfinder-seg", "length", lambda z, y, free: focal_loss(z, y),
                       lambda z, y, free: seg_counts(z, y).sum(0), summarize_seg, "bal_acc", "f1",
                       "0.5 for any constant or random mask", lambda T: 40),
    # LocRNN: do the two markers sit on one contour (about half of the images do)
    "pathfinder-cls": Task("pathfinder-cls", "length", lambda z, y, free: F.cross_entropy(z.float(), y),
                           lambda z, y, free: (z.argmax(1) == y).double().mean(), _accuracy, "acc", "acc",
                           "0.5", lambda T: 40),
    # LocRNN: the path from green to red; a maze counts only when every free pixel is right
    "mazes": Task("mazes", "grid", lambda z, y, free: maze_loss(z, y, free.float()),
                  lambda z, y, free: maze_solved(z, y, free).double().mean(), _accuracy, "acc", "acc",
                  "about 0: every free pixel must be right", lambda T: 3 * T),
}


# ----------------------------------------------------------------------------------------------------
# Evaluation: held-out metrics at one T or after every step t = 1..T


def autocast(cfg, device):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bool(cfg.amp))


def forward(model, images, steps, per_step=False, **opts):
    """The model's Output; feedforward controls take no steps, algo or crbp options."""
    if not model.recurrent:
        return model(images)
    return model(images, steps=steps, per_step=per_step, **opts)


def data_options(cfg, **override):
    """The data.task_batch options of a run, with e.g. length=25 for an extrapolation test set."""
    return {"seed": cfg.seed, "length": cfg.length, "size": cfg.size, "grid": cfg.grid, "canvas": cfg.canvas,
            "distractors": getattr(cfg, "distractors", None), **override}  # (runs saved before --distractors)


def ranks():
    """(rank, world size) under torch.distributed (torchrun), else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate(model, cfg, device, steps, n_images, per_step=False, halt=None, **knob):
    """Held-out metrics at `steps`, or (per_step=True) at every t = 1..steps: a dict, or a list of dicts
    indexed by t - 1. knob: length=N (Pathfinder) or grid=N (mazes) for another test set. halt=tol: each
    image stops once a step changes its state by <= tol (relative; crbp.run's halt), at most `steps`; the
    metrics then also hold the steps the images took ("steps_mean", "steps_median", "steps_max").

    Under torch.distributed every rank must call it: rank r scores the batches b = r, r + world, ..., the
    per-batch records are gathered, and every rank returns exactly the metrics of one process."""
    task, device = TASKS[cfg.task], torch.device(device)
    rank, world = ranks()
    if world > 1:  # BatchNorm's running statistics drift apart per rank in training: use rank 0's (the checkpoint's)
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    was_training = model.training
    model.eval()
    bs = min(cfg.eval_batch_size, n_images)
    records = {}  # batch index -> ([its record after each step], the steps its images took under halt)
    for b in range(rank, math.ceil(n_images / bs), world):
        images, target, free = data.task_batch(task.name, b, bs, split="test", device=device,
                                               **data_options(cfg, **knob))
        with autocast(cfg, device):
            out = forward(model, images, steps, algo="bptt", per_step=per_step, **({"halt": halt} if halt else {}))
        logits_t = out.per_step if out.per_step is not None else [out.logits]  # T x (B, classes, ...)
        records[b] = ([task.score(logits, target, free).cpu() for logits in logits_t],
                      out.stats.halted.cpu() if halt else None)
    model.train(was_training)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, records)
        records = {b: r for part in parts for b, r in part.items()}
    batches = [records[b] for b in sorted(records)]
    summary = [task.summarize(list(r)) for r in zip(*(rec for rec, _ in batches))]  # for each t, every batch
    if halt:
        took = torch.cat([n for _, n in batches]).double()
        summary = [{**m, "steps_mean": took.mean().item(), "steps_median": took.median().item(),
                    "steps_max": took.max().item()} for m in summary]
    return summary if per_step else summary[0]


# ----------------------------------------------------------------------------------------------------
# State-space analysis (C-RBP supplement): do the dynamics stay near a fixed point after the trained steps?


def pca(X, k=2):
    """Principal axes of the rows of X: (mean (D,), components (k, D)), by SVD of the centred data."""
    mean = X.mean(0)
    _, _, Vh = torch.linalg.svd(X - mean, full_matrices=False)
    return mean, Vh[:k]


def state_space(pooled, N, k=2):
    """pooled: (images, T, C) spatially averaged states h_1..h_T. PCA fit on t <= N, projection of all t.

    Returns the projections (images, T, k) and the per-image distance between t = N and t = T: the mean
    over components of the squared difference (the paper's script; it has no square root).
    """
    n, T, C = pooled.shape
    mean, comps = pca(pooled[:, :N].reshape(-1, C).double(), k)
    proj = (pooled.double() - mean) @ comps.T  # (images, T, k)
    return proj, (proj[:, N - 1] - proj[:, T - 1]).square().mean(1)


def ks_2samp(a, b):
    """Two-sample Kolmogorov-Smirnov test: (D, p). p from the asymptotic Kolmogorov distribution with
    Stephens' small-sample correction (Numerical Recipes' probks), good for n*m/(n+m) >= ~4."""
    if not (len(a) and len(b)):
        raise ValueError(f"ks_2samp needs two non-empty samples, got {len(a)} and {len(b)} values")
    a, b = (torch.as_tensor(s, dtype=torch.float64).sort().values for s in (a, b))
    x = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, x, right=True) / len(a)
    cdf_b = torch.searchsorted(b, x, right=True) / len(b)
    D = (cdf_a - cdf_b).abs().max().item()
    en = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    return D, kolmogorov_q((en + 0.12 + 0.11 / en) * D)


def kolmogorov_q(lam):
    """P(K > lam) of the Kolmogorov distribution: Q(lam) = 2 sum_{j>=1} (-1)^(j-1) exp(-2 j^2 lam^2)."""
    if lam < 0.2:  # the series converges slowly here, and Q is 1 to 1e-10
        return 1.0
    return min(1.0, max(0.0, 2 * sum((-1) ** (j - 1) * math.exp(-2 * j * j * lam * lam) for j in range(1, 101))))


DRIFT = ("each image's squared distance between its pooled state at t={N} and t={T}, in the PC1-PC2 plane "
         "fitted on t <= {N}; near 0: it stays at its fixed point")


@torch.no_grad()
def analyse_states(model, cfg, device, n_images=None):
    """Spatially pooled states h_1..h_T on held-out images; PCA on t <= N = the trained steps. Returns the
    per-image N -> T distances and draws PC1/PC2 and, for per-pixel tasks, a segmentation time course."""
    task, device = TASKS[cfg.task], torch.device(device)
    was_training = model.training
    model.eval()
    n_images = n_images or min(cfg.eval_images, 256)
    images, target, _ = data.task_batch(task.name, 0, n_images, split="test", device=device, **data_options(cfg))
    pooled, probs = [], []
    for i in range(0, n_images, cfg.eval_batch_size):
        chunk = images[i:i + cfg.eval_batch_size]
        with autocast(cfg, device):
            states = forward(model, chunk, cfg.eval_steps, algo="bptt", per_step="state").per_step
            if i == 0:
                logits = forward(model, chunk, cfg.eval_steps, algo="bptt", per_step=True).per_step
                probs = torch.stack([z.float().softmax(1)[:, 1] for z in logits], 1)  # (B, T, ...)
        # the first tensor of the state (h of ConvLSTM's (h, c), L of LocRNN's (L, S)), pooled over space
        pooled.append(torch.stack([(h[0] if isinstance(h, tuple) else h).float().mean((-2, -1)) for h in states], 1))
    model.train(was_training)
    proj, dist = state_space(torch.cat(pooled).cpu(), cfg.steps)
    T, N, shown = cfg.eval_steps, cfg.steps, proj[:32]  # 32 images' trajectories keep the SVG small
    figures.svg_plot(os.path.join(cfg.out, "state_space.svg"),
                     {f"t <= {N}": (shown[:, :N, 0].flatten().tolist(), shown[:, :N, 1].flatten().tolist()),
                      f"t > {N}": (shown[:, N:, 0].flatten().tolist(), shown[:, N:, 1].flatten().tolist())},
                     "PC1", "PC2", f"pooled hidden states of {len(shown)} images, PCA fit on t <= {N}", points=True)
    if probs.dim() == 4:  # per-pixel tasks: the segmentation over steps, as the project page shows
        show = sorted({t for t in (1, 2, 4, 8, N, T) if t <= T})
        figures.timecourse_png(os.path.join(cfg.out, "timecourse.png"), images[:4].cpu(), target[:4].cpu(),
                               probs[:4, [t - 1 for t in show]].cpu(), show)
    return dist


class Probe(NamedTuple):
    """jacobian_probe's answer: is F contractive at h?"""
    rho: float  # spectral radius of J = dF/dh at h, by power iteration: > 1 means F expands a direction there
    colsum_mean: float  # the column sums 1^T J that the LCP bounds: their mean,
    colsum_max: float  # their largest,
    above_mu: float  # and the fraction of them above mu


@torch.no_grad()
def jacobian_probe(cell: Callable, x, h, *, mu: float = 0.9, iters: int = 40, seed: int = 0) -> Probe:
    """The Jacobian J = dcell(h, x)/dh at one state h (every tensor of a tuple state as one vector).

    The LCP bounds J's column sums, which keeps F contractive only where they bound its spectral radius rho;
    the rbp gradient and the fixed point need rho < 1. This measures both: rho as the growth per iteration of
    (J^T)^k v from a random v (seeded), averaged over the last half of `iters` iterations so that the
    transient of a non-normal J and a complex pair's rotation average out. An estimate: it converges more slowly
    the closer J's second-largest |eigenvalue| is to rho; raise iters to see it settle.
    """
    if not (isinstance(iters, int) and iters >= 2) or not 0 <= mu < 1:
        raise ValueError(f"jacobian_probe takes iters, an int >= 2, and mu in [0, 1); got iters={iters!r}, mu={mu!r}")
    is_tuple = isinstance(h, (tuple, list))
    hs = tuple(h) if is_tuple else (h,)
    with torch.enable_grad():  # one taped step, its VJP taken again and again
        h_in = tuple(z.detach().requires_grad_() for z in hs)
        out = cell(h_in if is_tuple else h_in[0], x)
        h_out = tuple(out) if is_tuple else (out,)
        JT = lambda v: [torch.zeros_like(z) if d is None else d for d, z in
                        zip(torch.autograd.grad(h_out, h_in, v, retain_graph=True, allow_unused=True), h_in)]
        u = torch.cat([ui.flatten() for ui in JT([torch.ones_like(z) for z in h_out])]).double()  # 1^T J
        gen = torch.Generator(hs[0].device).manual_seed(seed)
        v = [torch.randn(z.shape, generator=gen, device=z.device).to(z.dtype) for z in hs]
        norm = lambda v: torch.stack([z.double().square().sum() for z in v]).sum().sqrt()
        logs = []
        for _ in range(iters):  # v <- J^T v / ||J^T v||; the log of each growth
            n = norm(v)
            v = JT([z / n.to(z.dtype) for z in v])
            logs.append(math.log(max(norm(v).item(), 1e-300)))
    rho = math.exp(sum(logs[iters // 2:]) / (iters - iters // 2))
    return Probe(rho, u.mean().item(), u.max().item(), (u > mu).double().mean().item())


@torch.no_grad()
def dynamics(model, cfg, device, steps=None, n_images=None, **knob):
    """Does the trained cell settle at a fixed point? On one batch of held-out images (BatchNorm as in
    evaluation; knob: another test set): the median over images of the residual ||h_t - h_{t-1}|| / ||h_t||
    after each step t = 1..steps (default cfg.eval_steps), and jacobian_probe at h_{T-1}, where the LCP
    and the Neumann series act, and at h_{steps - 1}: J's spectral radius (> 1: the step expands some
    direction) and the column sums that the LCP bounds."""
    task, device = TASKS[cfg.task], torch.device(device)
    was_training = model.training
    model.eval()
    n_images, steps = n_images or min(cfg.eval_batch_size, cfg.eval_images), steps or cfg.eval_steps
    images, _, _ = data.task_batch(task.name, 0, n_images, split="test", device=device, **data_options(cfg, **knob))
    x, h, extra = model.drive(images)
    cell = functools.partial(model.cell, **extra)
    flat = lambda h: torch.cat([z.float().flatten(1) for z in (h if isinstance(h, tuple) else (h,))], 1)
    residual, probes = [], {}
    for t in range(1, steps + 1):
        if t in (cfg.steps, steps):  # J of step t, at its input h_{t-1}
            probes[str(t - 1)] = jacobian_probe(cell, x, h, mu=getattr(cfg, "mu", 0.9))._asdict()
        h_prev, h = h, cell(h, x)
        residual.append(((flat(h) - flat(h_prev)).norm(dim=1) / flat(h).norm(dim=1).clamp_min(1e-30)).median().item())
    model.train(was_training)
    return {"images": n_images, "residual": residual, "probe": probes}


def dynamics_text(dyn, cfg):
    """One line of dynamics()'s findings."""
    res, T = dyn["residual"], min(cfg.steps, len(dyn["residual"]))  # an --eval may stop before the trained T
    probes = "; ".join(f"J at h_{t}: spectral radius {p['rho']:.3f}, column sums mean {p['colsum_mean']:.3f}, "
                       f"{100 * p['above_mu']:.2g}% above mu {getattr(cfg, 'mu', 0.9)}" for t, p in dyn["probe"].items())
    return (f"dynamics on {dyn['images']} images: residual ||h_t - h_(t-1)|| / ||h_t|| (median) at t={T}: "
            f"{res[T - 1]:.3g}, at t={len(res)}: {res[-1]:.3g}; {probes}")


def compare_runs(run_a, run_b):
    """Two-sample KS test between two runs' per-image state-space drift distances."""
    dist = []
    for run in (run_a, run_b):
        path = os.path.join(run, "state_space.json")
        if not os.path.isfile(path):
            raise SystemExit(f"{path} is missing: train the run to the end, or draw its report with "
                             f"`python train.py --report {run}` (it writes state_space.json)")
        dist.append(json.load(open(path))["distance"])
    D, p = ks_2samp(*dist)
    med = [torch.tensor(d).median().item() for d in dist]
    print(f"state-space drift: {run_a} median {med[0]:.3g} (n={len(dist[0])}), {run_b} median {med[1]:.3g} "
          f"(n={len(dist[1])}); two-sample KS D = {D:.3f}, p = {p:.3g} (small p: the two distributions differ)")
    return D, p


# ----------------------------------------------------------------------------------------------------
# A run directory's tables and figures


def load_config(run_dir):
    """A run's config.json as attributes (ValueError if it is missing or not train.py's JSON)."""
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{run_dir}: no config.json there; pass a run directory that train.py wrote") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it or train a new run") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds {type(cfg).__name__}, not train.py's dict of options")
    return argparse.Namespace(**cfg)


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def neumann_summary(rows):
    """One line on the logged training steps: why the Neumann series stopped, and the forward residual."""
    rows = [r for r in rows if "loss" in r]
    stops = [r["neumann_stop"] for r in rows if r.get("neumann_stop")]
    res = sorted(r["residual"] for r in rows if r.get("residual") is not None)
    if not stops and not res:
        return None
    parts = []
    if stops:
        counts = {s: stops.count(s) for s in dict.fromkeys(sorted(stops))}
        bad = counts.get("diverging", 0) + counts.get("nonfinite", 0)
        parts.append("Neumann series stopped by " + ", ".join(f"{s} {n}x" for s, n in counts.items())
                     + (" (diverging or nonfinite: F was not contractive at those steps; raise --penalty-weight "
                        "or lower --mu)" if bad else ""))
    if res:
        parts.append(f"forward residual ||h_T - h_T-1|| / ||h_T|| median {res[len(res) // 2]:.2g}, max {res[-1]:.2g}")
    return f"over {len(rows)} logged training steps: " + "; ".join(parts)


def plot_run(cfg, rows, per_step):
    """learning_curve.svg from metrics.jsonl's rows, per_step.svg from the per-step curves {knob value: [..]}."""
    metric = TASKS[cfg.task].curve
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    figures.svg_plot(os.path.join(cfg.out, "learning_curve.svg"),
                     {"train loss (x10)": ([r["images"] for r in train], [10 * r["loss"] for r in train]),
                      f"held-out {metric}": ([r["images"] for r in evals], [r["eval"][metric] for r in evals])},
                     "training images", f"loss x10 / {metric}", f"{cfg.model} {cfg.algo}")
    figures.svg_plot(os.path.join(cfg.out, "per_step.svg"),
                     {f"{'grid' if cfg.task == 'mazes' else 'PF'}-{n}": (list(range(1, len(c) + 1)), c)
                      for n, c in per_step.items()},
                     "step t", metric, f"{cfg.model} {cfg.algo}, trained with T={cfg.steps}")


def full(model, cfg, device):
    """Held-out metrics at the trained T, per-step curves (also on --eval-lengths), the state-space analysis
    and every figure; printed as a short table and saved in cfg.out (report.json, state_space.json). Under
    torchrun every rank calls it and shares the evaluations; rank 0 alone analyses, draws and writes."""
    task, device = TASKS[cfg.task], torch.device(device)
    metric, knob = task.curve, getattr(cfg, task.knob)
    curves = {knob: evaluate(model, cfg, device, cfg.eval_steps, cfg.eval_images, per_step=True)}
    curve = curves[knob]  # the metrics after each step t = 1..eval_steps
    if not model.recurrent:
        final = curve[0]  # one readout
    elif cfg.eval_steps >= cfg.steps:
        final = curve[cfg.steps - 1]  # the per-step pass already evaluated t = T
    else:
        final = evaluate(model, cfg, device, cfg.steps, cfg.eval_images)
    for n in cfg.eval_lengths or []:
        curves[n] = evaluate(model, cfg, device, cfg.eval_steps, cfg.eval_images, per_step=True, **{task.knob: n})
    if ranks()[0] != 0:  # under torchrun the evaluations above are collective; the rest is rank 0's alone
        return final
    drift = analyse_states(model, cfg, device) if model.recurrent else torch.zeros(0)
    dyn = dynamics(model, cfg, device) if model.recurrent else None
    per_step = {str(n): [c[metric] for c in crv] for n, crv in curves.items()}
    with open(os.path.join(cfg.out, "state_space.json"), "w") as f:
        json.dump({"N": cfg.steps, "T": cfg.eval_steps, "distance": drift.tolist()}, f)
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump({"final": final, "steps": cfg.steps, "eval_images": cfg.eval_images, "per_step": per_step,
                   "drift_median": drift.median().item() if len(drift) else None, "dynamics": dyn}, f, indent=1)
    rows = read_metrics(cfg.out)
    plot_run(cfg, rows, per_step)
    print(f"held-out ({cfg.eval_images} images) at T={cfg.steps}: "
          + ", ".join(f"{k} {v:.4f}" for k, v in final.items() if not k.startswith("pooled_"))
          + f" (chance {task.metric}: {task.chance})")
    for n, crv in curves.items():
        best = max(range(len(crv)), key=lambda t: crv[t][metric])
        shown = sorted({1, cfg.steps, cfg.eval_steps, min(cfg.eval_steps, 2 * cfg.steps)})
        print(f"per-step {metric} on {task.knob} {n}: "
              + "  ".join(f"t={t}: {crv[t - 1][metric]:.3f}" for t in shown if t <= len(crv))
              + f"  (best {crv[best][metric]:.3f} at t={best + 1})")
    if cfg.task == "pathfinder":
        print(f"F1 at T={cfg.steps}: {final['f1']:.4f}, at t={cfg.eval_steps}: {curve[-1]['f1']:.4f}")
    if model.recurrent:
        print(f"state-space drift t={cfg.steps} -> t={cfg.eval_steps}: median {drift.median().item():.3g} over "
              f"{len(drift)} images: " + DRIFT.format(N=cfg.steps, T=cfg.eval_steps))
        print(dynamics_text(dyn, cfg))
    summary = neumann_summary(rows)
    if summary:
        print(summary)
    if device.type == "cuda":
        print(f"peak GPU memory of the evaluation: {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")
    print(f"figures and tables in {cfg.out}: report.json, learning_curve.svg, per_step.svg"
          + (", state_space.svg, state_space.json" if model.recurrent else "")
          + (", timecourse.png" if model.recurrent and cfg.task != "pathfinder-cls" else ""))
    return final


def other_test_set(model, cfg, device, steps, **knob):
    """A saved model on another test set (knob: length=N or grid=N) up to `steps`: printed, and written to
    cfg.out/eval_<knob><N>_T<steps>.json. Returns the metrics after each step."""
    task = TASKS[cfg.task]
    (name, n), metric = next(iter(knob.items())), task.curve
    curve = evaluate(model, cfg, device, steps, cfg.eval_images, per_step=True, **knob)
    best, k = max(range(len(curve)), key=lambda t: curve[t][metric]), getattr(cfg, "distractors", None)
    trained = getattr(model, "trained_images", None)  # a checkpoint of a run still training
    print(f"{cfg.out} ({cfg.model} {cfg.algo}, trained at T={cfg.steps}"
          + (f", its checkpoint at {trained:,} images" if trained else "") + f") on {name} {n}"
          + (f" with {k} distractors" if k is not None else "") + f", {cfg.eval_images} "
          f"held-out images:\n  at t={len(curve)}: "
          + ", ".join(f"{k} {v:.4f}" for k, v in curve[-1].items() if not k.startswith("pooled_"))
          + f" (chance {task.metric}: {task.chance})\n  per-step {metric}: "
          + "  ".join(f"t={t}: {curve[t - 1][metric]:.3f}" for t in sorted({1, min(cfg.steps, len(curve)), len(curve)}))
          + f"  (best {curve[best][metric]:.3f} at t={best + 1})")
    record = {name: n, "steps": steps, "eval_images": cfg.eval_images, "trained_images": trained, "per_step": curve}
    if model.recurrent:
        record["dynamics"] = dyn = dynamics(model, cfg, device, steps, **knob)
        print("  " + dynamics_text(dyn, cfg))
    if getattr(cfg, "halt", None):  # steps chosen per image: each stops at its own fixed point
        record["halt"] = adaptive = evaluate(model, cfg, device, steps, cfg.eval_images, halt=cfg.halt, **knob)
        print(f"  each image halted at residual <= {cfg.halt} (at most {steps} steps): {metric} "
              f"{adaptive[metric]:.3f} after {adaptive['steps_mean']:.1f} steps on average (median "
              f"{adaptive['steps_median']:.0f}, most {adaptive['steps_max']:.0f}); fixed T={cfg.steps}: "
              f"{curve[min(cfg.steps, len(curve)) - 1][metric]:.3f}, best fixed t: {curve[best][metric]:.3f}")
    path = os.path.join(cfg.out, f"eval_{name}{n}" + (f"_K{k}" if k is not None else "") + f"_T{steps}"
                        + (f"_halt{cfg.halt:g}" if record.get("halt") else "") + ".json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"  every metric after every step: {path}")
    return curve
