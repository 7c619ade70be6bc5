"""Train, evaluate and analyse recurrent vision models on Pathfinder and Mazes, on one GPU or a CPU.

    Linsley et al. "Stable and expressive recurrent vision models." NeurIPS 2020 (C-RBP, Pathfinder-seg).
    "Cortically motivated recurrence enables task extrapolation" (LocRNN, Pathfinder-cls and Mazes).

The paper's C-RBP hGRU on Pathfinder-14 (what `make pathfinder` runs):
    python train.py --task pathfinder --length 14 --model hgru --algo c-rbp --steps 20
A tiny CPU smoke run of any model:
    python train.py --task mazes --model locrnn --dry-run
Split a long run into pieces (exactly the same result as one run):
    python train.py ... --images 400000 --until 200000 --out runs/a;  python train.py --resume runs/a
Compare the state-space drift of two trained runs (two-sample KS test):
    python train.py --ks runs/bptt runs/crbp

Data are rendered on the training device every iteration (data.py): no dataset on disk. The held-out
test set comes from data.py's test seed stream, which training never draws from. A run directory holds
config.json, metrics.jsonl, checkpoint.pt (written atomically) and the figures (SVG and PNG).
"""
import argparse
import inspect
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import crbp
import data
import figures
import models

# ----------------------------------------------------------------------------------------------------
# Losses and the papers' metrics


def focal_loss(logits, target, gamma=2.0):
    """Focal loss (Lin et al. 2017) with gamma = 2 and no alpha, as the C-RBP Pathfinder code.

    FL = -(1 - p_t)^gamma log p_t per pixel, averaged over all pixels; p_t is detached where it forms the
    modulating factor, as in the paper code. logits (B, 2, H, W), target (B, H, W) long.
    """
    logp_t = F.log_softmax(logits.float(), 1).gather(1, target[:, None])[:, 0]  # (B, H, W)
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


# ----------------------------------------------------------------------------------------------------
# State-space analysis (C-RBP SI §3.2): do the dynamics stay near a fixed point after the trained steps?


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


# ----------------------------------------------------------------------------------------------------
# Data, model and one training step

TASKS = {"pathfinder": "pathfinder-seg", "pathfinder-cls": "pathfinder-cls", "mazes": "mazes"}


RENDER_CHUNK = 1024  # images per renderer call on a GPU: each call has a fixed cost of ~30-60 ms
_chunk = {}


def batch_of(args, split, index, batch, device, length=None, grid=None):
    """Batch number `index` of a split, rendered on the device. Batches are cut from chunks of RENDER_CHUNK
    images, each rendered from its own seed, so any batch of the stream can be made again (that is how
    resume replays the data stream exactly). Returns images, targets (long) and, for mazes, free pixels."""
    per = max(1, RENDER_CHUNK // batch) if device.type == "cuda" else 1  # batches per chunk
    chunk, i = divmod(index, per)
    length, grid = length or args.length, grid or args.grid
    key = (args.task, args.seed, args.size, args.canvas, length, grid, split, chunk, per * batch, str(device))
    if _chunk.get("key") != key:
        seed = args.seed * 1_000_003 + chunk
        if args.task == "mazes":
            images, targets = data.mazes(per * batch, grid=grid, canvas=args.canvas, device=device,
                                         seed=seed, split=split)
        else:
            images, targets = data.pathfinder(per * batch, length=length, size=args.size,
                                              task="seg" if args.task == "pathfinder" else "cls", device=device,
                                              seed=seed, split=split)
        _chunk.update(key=key, images=images, targets=targets.long())
    images, targets = (_chunk[k][i * batch:(i + 1) * batch] for k in ("images", "targets"))
    return images, targets, (images.amax(1) > 0 if args.task == "mazes" else None)  # mazes: free = not black


def task_loss(args, logits, target, free):
    if args.task == "pathfinder":
        return focal_loss(logits, target)
    if args.task == "mazes":
        return maze_loss(logits, target, free.float())
    return F.cross_entropy(logits.float(), target)


def crbp_options(args):
    """The crbp.run options of this run (models pass them through to crbp.run)."""
    opts = dict(algo=args.algo, neumann_steps=args.neumann_steps, mu=args.mu)
    if "tbptt" in args.algo:
        opts["truncate"] = args.truncate
    return opts


def autocast(args, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)


def lr_at(args, it, iters):
    """Linear warmup over --warmup of the iterations, then constant (the paper) or cosine decay to 0."""
    warm = max(1, round(args.warmup * iters))
    if it < warm:
        return args.lr * (it + 1) / warm
    if args.schedule == "constant":
        return args.lr
    return args.lr * 0.5 * (1 + math.cos(math.pi * (it - warm) / max(1, iters - warm)))


# ----------------------------------------------------------------------------------------------------
# Evaluation: the papers' metrics at the trained T, per-step curves, state-space analysis


@torch.no_grad()
def evaluate(model, args, device, steps, n_images, length=None, grid=None, per_step=False):
    """Held-out metrics at `steps`, or (per_step=True) at every t = 1..steps: returns a dict, or a list of
    dicts indexed by t - 1. Evaluation batches come from the test seed stream only."""
    model.eval()
    bs = min(args.eval_batch_size, n_images)
    results = None
    for b in range(math.ceil(n_images / bs)):
        images, target, free = batch_of(args, "test", b, bs, device, length, grid)
        with autocast(args, device):
            out = forward(model, images, steps, algo="bptt", per_step=per_step)
        logits_t = out.per_step if out.per_step is not None else [out.logits]  # T x (B, classes, ...)
        if results is None:
            results = [[] for _ in logits_t]
        for r, logits in zip(results, logits_t):
            if args.task == "pathfinder":
                r.append(seg_counts(logits, target).sum(0))
            elif args.task == "mazes":
                r.append(maze_solved(logits, target, free).double().mean())
            else:
                r.append((logits.argmax(1) == target).double().mean())
    model.train()
    summary = [summarize_seg(r) if args.task == "pathfinder" else {"acc": torch.stack(r).mean().item()}
               for r in results]
    return summary if per_step else summary[0]


def main_metric(args):
    return {"pathfinder": "bal_acc", "pathfinder-cls": "acc", "mazes": "acc"}[args.task]


def curve_metric(args):
    """The metric of the per-step (extrapolation) curves: F1 for Pathfinder-seg, as the paper's Fig. S8.
    (Balanced accuracy is lenient there: marking every bright contour still scores ~0.97.)"""
    return "f1" if args.task == "pathfinder" else main_metric(args)


# ----------------------------------------------------------------------------------------------------
# Run directory: config, metrics log, atomic checkpoints


def save_checkpoint(run_dir, state):
    """Write to a temporary file, then rename: a crash mid-write never leaves a corrupt checkpoint."""
    path = os.path.join(run_dir, "checkpoint.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(run_dir):
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        raise SystemExit(f"--resume {run_dir}: no checkpoint.pt there; point it at a run directory that train.py wrote")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise SystemExit(f"--resume {run_dir}: checkpoint.pt cannot be read ({type(e).__name__}: {e})") from None


def log_jsonl(run_dir, record):
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


class Progress:
    """One updating line on a terminal; plain lines (one every `every` seconds) when piped to a file."""

    def __init__(self, total, every=30.0):
        self.total, self.every, self.tty = total, every, sys.stdout.isatty()
        self.t0 = self.last = time.time()

    def update(self, done, images_per_s, text):
        now = time.time()
        if not self.tty and now - self.last < self.every and done < self.total:
            return
        eta = (self.total - done) / max(images_per_s, 1e-9)
        line = f"{done:>9,}/{self.total:,} img  {images_per_s:7.1f} img/s  {text}  ETA {eta / 60:5.1f} min"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)
        self.last = now

    def close(self):
        if self.tty:
            print()


# ----------------------------------------------------------------------------------------------------
# Command line


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--task", default="pathfinder", choices=sorted(TASKS),
      help="pathfinder: segment the contour touching the dot (C-RBP); pathfinder-cls: are the two markers "
           "on one contour (LocRNN); mazes: segment the path from green to red (LocRNN)")
    a("--length", type=int, default=14, help="Pathfinder contour length (paper: 14, 20, 25)")
    a("--size", type=int, default=150, help="Pathfinder image size in pixels (the papers used 150)")
    a("--grid", type=int, default=11, help="maze grid size, odd (9/11/13 -> 24/28/32 px images)")
    a("--canvas", type=int, default=32, help="mazes are zero-padded into this canvas, as the LocRNN code did")
    a("--model", default="hgru", help=f"one of {sorted(models.MODELS)}")
    a("--kernel", type=int, default=None, help="horizontal kernel size of the hGRU (paper 15; 3/5/9 for the sweep)")
    a("--channels", type=int, default=None,
      help="state channels of convlstm/locrnn/convgru (width of resnet/rresnet); the hGRU's follow its front end")
    a("--algo", default=None, choices=crbp.ALGOS,
      help="c-rbp trains at the fixed point in O(1) memory; bptt is exact but its memory grows with --steps "
           "(default: the task's, c-rbp for pathfinder, bptt for the LocRNN tasks and feedforward models)")
    a("--steps", type=int, default=None,
      help="recurrent steps T in training (default: the task's: 20 pathfinder, 12 pathfinder-cls, 15 mazes)")
    a("--neumann-steps", type=int, default=15,
      help="most Neumann terms in the rbp gradient (paper 15). If stats say 'diverging', F is not contractive: "
           "raise --penalty-weight or lower --mu rather than adding terms")
    a("--mu", type=float, default=0.9, help="LCP bound on the Jacobian's column sums, in [0, 1) (paper 0.9)")
    a("--penalty-weight", type=float, default=10.0, help="weight of the LCP in the loss (paper 10)")
    a("--truncate", type=int, default=None, help="tbptt: backpropagate through this many last steps")
    a("--batch-size", type=int, default=32, help="images per step (the paper: 32 per GPU)")
    a("--lr", type=float, default=1e-3, help="Adam learning rate (paper 1e-3, constant)")
    a("--schedule", default="cosine", choices=["constant", "cosine"],
      help="constant is the paper's; cosine decay after warmup reaches high accuracy in fewer images")
    a("--warmup", type=float, default=0.02, help="linear warmup, as a fraction of the run")
    a("--images", type=int, default=200_000,
      help="training budget in images (the paper's C-RBP needed ~1.15 M on PF-14 at constant lr)")
    a("--eval-images", type=int, default=2048, help="held-out images for the final metrics (paper 10,000)")
    a("--eval-batch-size", type=int, default=64)
    a("--eval-every", type=int, default=20_000, help="images between quick held-out checks (256 images)")
    a("--eval-steps", type=int, default=None, help="T of the per-step curve (default 40 Pathfinder, 3T mazes)")
    a("--eval-lengths", type=int, nargs="*", default=None,
      help="also report the per-step curve on these Pathfinder lengths / maze grids (extrapolation)")
    a("--amp", action="store_true",
      help="bf16 autocast (the Neumann sum still accumulates in fp32). For the 25-channel hGRU it was slower "
           "on an H200 and its gradient was off by 11%% (README): prefer --fast")
    a("--compile", action="store_true",
      help="torch.compile the cell for every step and Neumann term (the LCP takes one extra eager step, as it "
           "needs a double backward). With --conv fft: 1.6x faster C-RBP on an H200 (README); the first steps "
           "compile for about a minute")
    a("--conv", default=None, choices=("direct", "fft"),
      help="hGRU horizontal convolutions: direct (F.conv2d) or fft (the same function, kernel spectra computed "
           "once per forward; float32). fft is faster for 15x15 kernels on a GPU (default: direct)")
    a("--fast", action=argparse.BooleanOptionalAction, default=False,
      help="--conv fft --compile: the fastest path measured, 1.9x the plain one for C-RBP (README). On in "
           "--preset pathfinder; --no-fast there gives the plain path")
    a("--seed", type=int, default=0)
    a("--device", default="auto", help="auto (cuda if available), cuda, cuda:1 or cpu")
    a("--out", default=None, help="run directory (default runs/<task>-<model>-<algo>)")
    a("--resume", default=None, metavar="RUN_DIR", help="continue a run exactly where it stopped")
    a("--until", type=int, default=None, metavar="IMAGES",
      help="stop (with a checkpoint) after this many images; the schedule still follows --images. "
           "Continue with --resume: pieces give exactly the result of one uninterrupted run")
    a("--until-minutes", type=float, default=None, help="stop (with a checkpoint) after this much wall time")
    a("--preset", choices=sorted(PRESETS), default=None,
      help="a named configuration (see PRESETS); options given as well override it. `make pathfinder` runs "
           "--preset pathfinder, which falls back to pathfinder-cpu without a GPU")
    a("--dry-run", action="store_true", help="a few iterations at tiny sizes, to check that everything runs")
    a("--ks", nargs=2, default=None, metavar="RUN_DIR",
      help="compare two trained runs' state-space drift distances with a two-sample KS test, and exit")
    return p


PRESETS = {
    # `make pathfinder`: the paper's C-RBP hGRU on PF-14 seg (T=20, K=15, mu 0.9, LCP weight 10, 15x15
    # kernels, 150 px) on one GPU, on the fast path (FFT convs + compiled cell, same function to ~1e-6):
    # 100k images, measured at 8.0 min on an H200 with compilation and evaluation (README).
    "pathfinder": dict(task="pathfinder", length=14, model="hgru", algo="c-rbp", steps=20, neumann_steps=15,
                       mu=0.9, penalty_weight=10.0, batch_size=32, lr=1e-3, images=100_000, eval_images=2048,
                       eval_every=8000, eval_steps=40, fast=True, out="runs/pathfinder-14"),
    # the same without a GPU, small enough for a few minutes on 2 CPU cores: 75 px PF-6, 5x5 kernels, T=8
    "pathfinder-cpu": dict(task="pathfinder", length=6, size=75, model="hgru", kernel=5, algo="c-rbp", steps=8,
                           neumann_steps=8, mu=0.9, penalty_weight=10.0, batch_size=8, lr=3e-3, images=960,
                           eval_images=64, eval_batch_size=32, eval_every=320, eval_steps=16,
                           out="runs/pathfinder-cpu"),
}
# options a --resume may change: where it runs, when it stops, and how it is evaluated (not what is trained)
RESUMABLE = {"resume", "until", "until_minutes", "preset", "device", "eval_images", "eval_every", "eval_steps",
             "eval_lengths", "out", "compile", "conv", "fast"}


def parse_args(argv=None):
    """Parse, fill model defaults, validate; with --resume, load the run's config and refuse changes."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.resume:
        given = _given_args(parser, argv)
        cfg_path = os.path.join(args.resume, "config.json")
        if not os.path.isfile(cfg_path):
            parser.error(f"--resume {args.resume}: no config.json there")
        saved = json.load(open(cfg_path))
        changed = {k: (saved.get(k), v) for k, v in given.items() if k not in RESUMABLE and saved.get(k) != v}
        if changed:
            parser.error("--resume continues the same run; these differ from its config.json: "
                         + ", ".join(f"--{k.replace('_', '-')} {new} (run has {old})"
                                     for k, (old, new) in changed.items())
                         + ". Start a new run with --out instead.")
        args = argparse.Namespace(**{**vars(args), **saved, **given, "out": args.resume})
    if args.ks:
        return args
    if args.preset:
        name = args.preset
        no_gpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
        if name == "pathfinder" and no_gpu:
            print("no CUDA GPU here: running the small CPU configuration of --preset pathfinder-cpu instead "
                  "(the paper's config needs a GPU)")
            name = "pathfinder-cpu"
        given = _given_args(parser, argv)
        for k, v in PRESETS[name].items():  # options typed on the command line win over the preset
            if k not in given:
                setattr(args, k, v)
    if args.model not in models.MODELS:
        parser.error(f"--model must be one of {sorted(models.MODELS)}, got {args.model!r}")
    has_conv = "conv" in inspect.signature(models.MODELS[args.model]).parameters
    if args.conv is not None and not has_conv:
        parser.error(f"--conv is an option of the hGRU; --model {args.model} has no FFT path")
    if args.fast:
        args.compile, args.conv = True, "fft" if has_conv else None
    if args.dry_run:  # tiny sizes: 75-px Pathfinder, 3x3 kernels, 8 channels, 3 steps, 3 Neumann terms
        args.images, args.batch_size, args.eval_images, args.eval_every, args.eval_batch_size = 8, 4, 4, 4, 4
        args.size, args.length, args.steps, args.neumann_steps = 75, 6, args.steps or 3, 3
        args.eval_steps, args.kernel = args.eval_steps or 4, args.kernel or 3
    try:  # the model's own defaults for T and the algo (e.g. 20 and c-rbp for the Pathfinder hGRU)
        probe = models.build(args.model, task=TASKS[args.task], **model_options(args))
    except ValueError as e:
        parser.error(f"--model {args.model}: {e}")
    if not probe.recurrent and args.algo not in (None, "bptt"):
        parser.error(f"--model {args.model} is feedforward: it has no recurrence for {args.algo}; use --algo bptt")
    args.algo, args.steps = args.algo or probe.algo or "bptt", args.steps or probe.steps or 1
    if args.eval_steps is None:
        args.eval_steps = 40 if args.task.startswith("pathfinder") else 3 * args.steps
    for k in ("steps", "batch_size", "images", "eval_images", "eval_steps"):
        if getattr(args, k) < 1:
            parser.error(f"--{k.replace('_', '-')} must be >= 1")
    if "tbptt" in args.algo and not (args.truncate and 1 <= args.truncate <= args.steps):
        parser.error(f"--algo {args.algo} needs --truncate in 1..--steps ({args.steps})")
    if "rbp" in args.algo and args.steps < 2:
        parser.error("--algo rbp/c-rbp runs T-1 steps without grad and one with it: use --steps >= 2")
    if not 0 <= args.mu < 1:
        parser.error("--mu must be in [0, 1)")
    args.out = args.out or os.path.join("runs", f"{args.task}-{args.model}-{args.algo}")
    return args


def _given_args(parser, argv):
    """The options the user actually typed (argparse fills defaults in, so parse again without them)."""
    quiet = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kw = {"dest": action.dest, "default": argparse.SUPPRESS}
            if isinstance(action, argparse.BooleanOptionalAction):  # --fast / --no-fast
                quiet.add_argument(action.option_strings[0], action=argparse.BooleanOptionalAction, **kw)
                continue
            if action.nargs == 0:
                kw["action"] = "store_true"
            else:
                kw.update(nargs=action.nargs, type=action.type)
            quiet.add_argument(*action.option_strings, **kw)
    return vars(quiet.parse_args(argv))


# ----------------------------------------------------------------------------------------------------
# Training


def main(argv=None):
    args = parse_args(argv)
    if args.ks:
        return compare_runs(*args.ks)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True  # shapes are fixed across steps: let cuDNN pick its fastest convs
    model = models.build(args.model, task=TASKS[args.task], **model_options(args)).to(device)
    if args.compile and model.recurrent:
        model.compile_cell()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    iters = math.ceil(args.images / args.batch_size)
    start = 0
    if args.resume:
        ck = load_checkpoint(args.out)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start = ck["iteration"]
        torch.set_rng_state(ck["rng"])
        if device.type == "cuda" and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"], device)
    else:
        if os.path.exists(os.path.join(args.out, "checkpoint.pt")):
            raise SystemExit(f"{args.out} already holds a run: continue it with --resume {args.out}, or pick --out")
        os.makedirs(args.out, exist_ok=True)
        json.dump({k: v for k, v in vars(args).items() if k not in ("resume", "until", "until_minutes", "preset")},
                  open(os.path.join(args.out, "config.json"), "w"), indent=1)

    n_params = sum(p.numel() for p in model.parameters())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.task} {f'grid {args.grid}' if args.task == 'mazes' else f'length {args.length}'} | {args.model} "
          f"({n_params:,} parameters) | {args.algo}, T={args.steps}, K={args.neumann_steps}, mu={args.mu}, "
          f"LCP weight {args.penalty_weight if args.algo.startswith('c-') else 0}")
    print(f"device {gpu}, torch {torch.__version__}, amp {'bf16' if args.amp else 'off'}, compile "
          f"{'on' if args.compile else 'off'}{', fft conv' if args.conv == 'fft' else ''} | {args.batch_size} "
          f"images/step x {iters:,} steps = {iters * args.batch_size:,} images, {args.schedule} lr {args.lr} | "
          f"run dir {args.out}" + (f" | resuming at step {start:,}" if start else ""))

    def checkpoint(it):
        save_checkpoint(args.out, {"model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": it,
                                   "rng": torch.get_rng_state(),
                                   "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None})

    if start == 0:  # the untrained model's held-out score, so the learning curve starts at 0 images
        quick = evaluate(model, args, device, args.steps, min(256, args.eval_images))
        log_jsonl(args.out, {"images": 0, "eval": quick})
        print(f"before training: held-out {main_metric(args)} {quick[main_metric(args)]:.4f}")
    progress, t0, seen0 = Progress(iters * args.batch_size), time.time(), start * args.batch_size
    next_eval = (start * args.batch_size // args.eval_every + 1) * args.eval_every
    model.train()
    it = start
    while it < iters:
        for group in opt.param_groups:
            group["lr"] = lr_at(args, it, iters)
        images, target, free = batch_of(args, "train", it, args.batch_size, device)
        try:
            with autocast(args, device):
                out = forward(model, images, args.steps, **crbp_options(args))
            loss = task_loss(args, out.logits, target, free)
            total = loss + args.penalty_weight * out.penalty if args.algo.startswith("c-") else loss
            if not torch.isfinite(total):  # one sync per step; cheap next to a recurrent step
                raise FloatingPointError(f"non-finite loss ({out.stats})")
        except FloatingPointError as e:  # crbp.run raises it too, for a non-finite state
            progress.close()
            log_jsonl(args.out, {"images": it * args.batch_size, "error": str(e)})
            raise SystemExit(f"stopped at step {it:,}: {e}. The last good checkpoint is kept in {args.out}. "
                             "Lower --lr, raise --penalty-weight, or try --algo c-bptt") from None
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        it += 1
        seen = it * args.batch_size
        rate = (seen - seen0) / (time.time() - t0)
        if it % 10 == 0 or it == iters:
            progress.update(seen, rate, f"loss {loss.item():.4f} pen {out.penalty.item():.2e}")
            log_jsonl(args.out, {"images": seen, "loss": loss.item(), "penalty": out.penalty.item(),
                                 "lr": opt.param_groups[0]["lr"], **(out.stats.as_dict() if out.stats else {})})
        if seen >= next_eval or it == iters:
            next_eval += args.eval_every
            quick = evaluate(model, args, device, args.steps, min(256, args.eval_images))
            log_jsonl(args.out, {"images": seen, "eval": quick})
            progress.update(seen, rate, f"loss {loss.item():.4f} held-out {main_metric(args)} "
                                        f"{quick[main_metric(args)]:.4f}")
            checkpoint(it)
        if (args.until and seen >= args.until) or (args.until_minutes and time.time() - t0 > 60 * args.until_minutes):
            break
    progress.close()
    checkpoint(it)
    if it < iters:
        print(f"stopped at {it * args.batch_size:,} images; continue with: python train.py --resume {args.out}")
        return None
    return report(model, args, device)


def report(model, args, device):
    """Held-out metrics at the trained T, per-step curves (also on other lengths), the state-space
    analysis and the figures; printed as a short table and saved in the run directory."""
    metric = curve_metric(args)
    curves = {(args.grid if args.task == "mazes" else args.length): evaluate(
        model, args, device, args.eval_steps, args.eval_images, per_step=True)}
    curve = next(iter(curves.values()))  # the metrics after each step t = 1..eval_steps
    if not model.recurrent:
        final = curve[0]  # one readout
    elif args.eval_steps >= args.steps:
        final = curve[args.steps - 1]  # the per-step pass already evaluated t = T
    else:
        final = evaluate(model, args, device, args.steps, args.eval_images)
    for n in args.eval_lengths or []:
        kw = {"grid": n} if args.task == "mazes" else {"length": n}
        curves[n] = evaluate(model, args, device, args.eval_steps, args.eval_images, per_step=True, **kw)
    drift = analyse_states(model, args, device) if model.recurrent else torch.zeros(0)
    log_jsonl(args.out, {"final": final, "steps": args.steps,
                         "per_step": {str(n): [c[metric] for c in curve] for n, curve in curves.items()}})
    json.dump({"N": args.steps, "T": args.eval_steps, "distance": drift.tolist()},
              open(os.path.join(args.out, "state_space.json"), "w"))
    plot_run(args)
    train_curve = curves[args.grid if args.task == "mazes" else args.length]
    print(f"held-out ({args.eval_images} images) at T={args.steps}: "
          + ", ".join(f"{k} {v:.4f}" for k, v in final.items() if not k.startswith("pooled_")))
    for n, curve in curves.items():
        best = max(range(len(curve)), key=lambda t: curve[t][metric])
        print(f"per-step {metric} on {'grid' if args.task == 'mazes' else 'length'} {n}: "
              + "  ".join(f"t={t}: {curve[t - 1][metric]:.3f}" for t in sorted({1, args.steps, args.eval_steps} | {
                  min(args.eval_steps, 2 * args.steps)}) if t <= len(curve))
              + f"  (best {curve[best][metric]:.3f} at t={best + 1})")
    if args.task == "pathfinder":
        print(f"F1 at T={args.steps}: {final['f1']:.4f}, at t={args.eval_steps}: {train_curve[-1]['f1']:.4f}")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")
    if model.recurrent:
        print(f"state-space drift t={args.steps} -> t={args.eval_steps}: median {drift.median().item():.3g}")
    print(f"figures and metrics in {args.out}")
    return final


@torch.no_grad()
def analyse_states(model, args, device, n_images=None):
    """Spatially pooled states h_1..h_T on held-out images; PCA on t <= N = the trained steps; returns the
    per-image N -> T distances and draws PC1/PC2 and a segmentation time course."""
    model.eval()
    n_images = n_images or min(args.eval_images, 256)
    images, target, _ = batch_of(args, "test", 0, n_images, device)
    pooled, probs = [], []
    for i in range(0, n_images, args.eval_batch_size):
        chunk = images[i:i + args.eval_batch_size]
        with autocast(args, device):
            states = forward(model, chunk, args.eval_steps, algo="bptt", per_step="state").per_step
            if i == 0:
                logits = forward(model, chunk, args.eval_steps, algo="bptt", per_step=True).per_step
                probs = torch.stack([z.float().softmax(1)[:, 1] for z in logits], 1)  # (B, T, ...)
        # the first tensor of the state (h of ConvLSTM's (h, c), L of LocRNN's (L, S)), pooled over space
        pooled.append(torch.stack([(h[0] if isinstance(h, tuple) else h).float().mean((-2, -1)) for h in states], 1))
    model.train()
    proj, dist = state_space(torch.cat(pooled).cpu(), args.steps)
    T, N, shown = args.eval_steps, args.steps, proj[:32]  # 32 images' trajectories keep the SVG small
    figures.svg_plot(os.path.join(args.out, "state_space.svg"),
             {f"t <= {N}": (shown[:, :N, 0].flatten().tolist(), shown[:, :N, 1].flatten().tolist()),
              f"t > {N}": (shown[:, N:, 0].flatten().tolist(), shown[:, N:, 1].flatten().tolist())},
             "PC1", "PC2", f"pooled hidden states of 32 images, PCA fit on t <= {N}", points=True)
    if probs.dim() == 4:  # per-pixel tasks: the segmentation over steps, as the project page shows
        show = [t for t in (1, 2, 4, 8, args.steps, T) if t <= T]
        show = sorted(set(show))
        figures.timecourse_png(os.path.join(args.out, "timecourse.png"), images[:4].cpu(), target[:4].cpu(),
                       probs[:4, [t - 1 for t in show]].cpu(), show)
    return dist


def plot_run(args):
    """Learning curve and per-step curves from metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(args.out, "metrics.jsonl"))]
    metric = curve_metric(args)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    figures.svg_plot(os.path.join(args.out, "learning_curve.svg"),
             {"train loss (x10)": ([r["images"] for r in train], [10 * r["loss"] for r in train]),
              f"held-out {metric}": ([r["images"] for r in evals], [r["eval"][metric] for r in evals])},
             "training images", f"loss x10 / {metric}", f"{args.model} {args.algo}")
    final = [r for r in rows if "per_step" in r][-1]
    figures.svg_plot(os.path.join(args.out, "per_step.svg"),
             {f"{'grid' if args.task == 'mazes' else 'PF'}-{n}": (list(range(1, len(c) + 1)), c)
              for n, c in final["per_step"].items()},
             "step t", metric, f"{args.model} {args.algo}, trained with T={args.steps}")


def compare_runs(run_a, run_b):
    """Two-sample KS test between two runs' per-image state-space drift distances."""
    dist = []
    for run in (run_a, run_b):
        path = os.path.join(run, "state_space.json")
        if not os.path.isfile(path):
            raise SystemExit(f"{path} is missing: train the run to the end first (it writes state_space.json)")
        dist.append(json.load(open(path))["distance"])
    D, p = ks_2samp(*dist)
    med = [torch.tensor(d).median().item() for d in dist]
    print(f"state-space drift: {run_a} median {med[0]:.3g} (n={len(dist[0])}), {run_b} median {med[1]:.3g} "
          f"(n={len(dist[1])}); two-sample KS D = {D:.3f}, p = {p:.3g}")
    return D, p


def model_options(args):
    """Build options from the command line: --kernel, --steps (hgru_gn's gate-bias init depends on T), and
    under --dry-run 3x3 kernels and 8 channels wherever the model takes them."""
    opts = {"kernel": args.kernel, "steps": args.steps, "channels": args.channels, "width": args.channels,
            "conv": args.conv}
    if args.dry_run:
        opts.update(channels=args.channels or 8, width=args.channels or 8, depth=8, long_kernel=3, short_kernel=3)
    takes = inspect.signature(models.MODELS[args.model]).parameters
    return {k: v for k, v in opts.items() if k in takes and v is not None}


def forward(model, images, steps, per_step=False, **opts):
    """The model's Output; feedforward controls take no steps, algo or crbp options."""
    if not model.recurrent:
        return model(images)
    return model(images, steps=steps, per_step=per_step, **opts)


if __name__ == "__main__":
    main()
