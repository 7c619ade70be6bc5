"""Train and evaluate panoptic.py's mask heads on data.py's panoptic scenes: the program, as train.py is for Pathfinder.

    jitter_boxes, training_loss       the training proposals (jittered GT boxes) and Panoptic FPN's loss
    predict, evaluate                 panoptic predictions and held-out PQ / SQ / RQ, at T or at every t
    train, report                     one run: config, metrics, checkpoints (resumable), figures
    experiment, summarize             the head comparison over seeds, its table and per-step figure
    memory_profile, show              peak CUDA memory of a head step against T; a sample sheet of the task

    python train_panoptic.py --head hgru --algo c-rbp --steps 20      # train + evaluate one model (GPU)
    python train_panoptic.py --dry-run                                # seconds on a CPU
    python train_panoptic.py --show samples.png                       # a sample sheet of the task
    python train_panoptic.py --experiment --out runs/panoptic         # the issue's whole comparison (GPU)
    python train_panoptic.py --memory --out runs/panoptic             # peak CUDA memory of a head step vs T

At test time the model gets the ground-truth boxes and classes with score 1 (an oracle detector): PQ_th
and SQ_th then measure the masks alone, which is what the heads differ in.
"""
import argparse
import glob
import json
import math
import os
import statistics
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import figures
from data import IGNORE, STUFF, THINGS
from panoptic import (HEAD_ALGOS, HEADS, MaskHead, PanopticModel, mask_loss, mask_targets, panoptic_fusion,
                      paste_masks, pq_stats, pq_summary)

# ----------------------------------------------------------------------------------------------------------
# Training proposals and loss; predictions and held-out PQ with the oracle detector


def jitter_boxes(boxes, size, gen, scale=0.1, min_iou=0.5):
    """Training proposals: GT boxes (K, 4) with corners moved by N(0, scale * side); IoU < min_iou keeps the GT."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    j = (boxes + scale * wh * torch.randn(boxes.shape, generator=gen, device=boxes.device)).clamp(0, size)
    j = torch.cat([torch.minimum(j[:, :2], j[:, 2:] - 1), torch.maximum(j[:, 2:], j[:, :2] + 1)], 1)
    return torch.where((box_iou(j, boxes) >= min_iou)[:, None], j, boxes)


def box_iou(a, b):
    """IoU of paired boxes a[i], b[i] (K, 4)."""
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp_min(0)
    inter = wh.prod(1)
    area = lambda z: (z[:, 2:] - z[:, :2]).prod(1)
    return inter / (area(a) + area(b) - inter).clamp_min(1e-9)


def training_loss(model, batch, gen, proposals=2):
    """Panoptic FPN's loss on a rendered batch: 0.5 x semantic CE + mask BCE + xi x LCP (the head's)."""
    p2, sem = model.features(batch["image"])
    loss_sem = F.cross_entropy(sem, batch["semantic"], ignore_index=IGNORE)
    b, n = batch["valid"].nonzero(as_tuple=True)
    b, n = b.repeat(proposals), n.repeat(proposals)  # `proposals` jittered boxes per GT instance
    gt = batch["boxes"][b, n]
    boxes = jitter_boxes(gt, batch["image"].shape[-1], gen)
    targets = mask_targets(batch["masks"][b, n], boxes, 28, "detectron2")
    logits = model.masks(p2, boxes, b)
    loss_mask = mask_loss(logits, batch["labels"][b, n], targets)
    head = model.mask_head
    return {"loss_sem": 0.5 * loss_sem, "loss_mask": loss_mask, "loss_lcp": head.penalty}, head.stats


@torch.no_grad()
def predict(model, batch, steps, per_step=False):
    """Panoptic predictions with the oracle detector (GT boxes and classes, score 1): a list over t = 1..steps
    (or [the prediction at steps]) of (pan (B, H, W), cats (B, N + S + 1))."""
    p2, sem = model.features(batch["image"])
    B, N, H, W = batch["masks"].shape
    b, n = batch["valid"].nonzero(as_tuple=True)
    boxes, labels = batch["boxes"][b, n], batch["labels"][b, n]
    res = model.masks(p2, boxes, b, steps, per_step)
    semantic = sem.argmax(1)
    out = []
    for lg in (res[1] if per_step else [res]):
        probs = lg[torch.arange(len(lg), device=lg.device), labels].sigmoid()  # (K, 28, 28)
        masks = torch.zeros(B, N, H, W, dtype=torch.bool, device=lg.device)
        masks[b, n] = paste_masks(probs, boxes, H, W) >= 0.5
        out.append(panoptic_fusion(masks, batch["valid"].float(), batch["labels"], semantic))
    return out


def evaluate(model, args, device, steps, n_images, per_step=False):
    """PQ / SQ / RQ on held-out images at `steps`, or at every t = 1..steps. The test seeds 0, 1, .. are the
    same for every model and training seed: all runs are scored on the same images."""
    model.eval()
    stats = None
    for i in range(math.ceil(n_images / args.eval_batch_size)):
        batch = data.panoptic(min(args.eval_batch_size, n_images - i * args.eval_batch_size), split="test", seed=i,
                       device=device, **task_options(args))
        preds = predict(model, batch, steps, per_step)
        s = torch.stack([pq_stats(batch["pan"], batch["pan_cats"], pan, cats, len(THINGS) + len(STUFF))
                         for pan, cats in preds])  # (t, categories, 4)
        stats = s if stats is None else stats + s
    model.train()
    out = [pq_summary(s.cpu()) for s in stats]
    return out if per_step else out[0]
# ----------------------------------------------------------------------------------------------------------
# Command line: train and evaluate one model, the sample sheet, the experiment, the memory profile

EXPERIMENT = [("conv4", "bptt", 1), ("hgru", "bptt", 1), ("hgru", "bptt", 3), ("hgru", "bptt", 5),
              ("hgru", "c-rbp", 5), ("hgru", "c-rbp", 10), ("hgru", "c-rbp", 20)]
SEEDS = (0, 1, 2)
TASK_KEYS = ("size", "curves", "blobs", "length", "stroke", "curvature", "centred")


def task_options(args):
    return {k: getattr(args, k) for k in TASK_KEYS}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--head", default="hgru", help=f"mask head: one of {HEADS}")
    a("--algo", default=None, help=f"hgru training: one of {HEAD_ALGOS} (default c-rbp; conv4 has no recurrence)")
    a("--steps", type=int, default=None, help="hGRU steps T in training (default 20 for c-rbp, 3 for bptt)")
    a("--neumann-steps", type=int, default=15, help="most Neumann terms of the rbp gradient (paper 15)")
    a("--tau", type=float, default=0.95, help="LCP bound on the Jacobian's column sums (panoptic code 0.95)")
    a("--xi", type=float, default=1e-3, help="weight of the summed LCP in the loss (panoptic code 1e-3)")
    a("--channels", type=int, default=256, help="FPN and mask-head channels (paper 256)")
    a("--width", type=int, default=64, help="backbone width at stride 4 (doubled at stride 8)")
    a("--size", type=int, default=128, help="image side in pixels, a multiple of 8")
    a("--curves", type=int, default=4, help="thin curves per image (one colour: grouping needs continuity)")
    a("--blobs", type=int, default=2, help="ellipses per image")
    a("--length", type=float, default=90.0, help="curve length in pixels at 128 px")
    a("--stroke", type=float, default=2.5, help="curve width in pixels at 128 px")
    a("--curvature", type=float, default=0.25, help="s.d. of the heading change per 4-px segment (radians)")
    a("--centred", action="store_true", help="S-curves, point-symmetric about their midpoints: the curve through "
                                             "the box centre is the instance, traced out from there")
    a("--batch-size", type=int, default=8, help="images per step")
    a("--proposals", type=int, default=2, help="jittered proposals per GT instance in training")
    a("--iters", type=int, default=1000, help="training steps")
    a("--lr", type=float, default=0.02, help="SGD learning rate (Panoptic FPN 0.02), momentum 0.9")
    a("--weight-decay", type=float, default=1e-4, help="SGD weight decay (not on norm layers)")
    a("--warmup", type=float, default=0.05, help="linear warmup from lr / 1000, as a fraction of --iters; "
                                                 "then x0.1 at 2/3 and 8/9 of the run (the 1x schedule's shape)")
    a("--eval-images", type=int, default=256, help="held-out images for the final metrics")
    a("--eval-batch-size", type=int, default=32)
    a("--eval-every", type=int, default=200, help="steps between quick held-out checks (64 images)")
    a("--eval-steps", type=int, default=40, help="the per-step PQ curve runs t = 1..this")
    a("--seed", type=int, default=0)
    a("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    a("--out", default=None, help="run directory (default runs/panoptic-<head>-<algo>-T<steps>-s<seed>); "
                                  "the experiment's root with --experiment / --memory")
    a("--resume", default=None, metavar="RUN_DIR", help="continue a run where it stopped")
    a("--until-minutes", type=float, default=None, help="stop (with a checkpoint) after this much wall time")
    a("--dry-run", action="store_true", help="a few steps at tiny sizes (seconds on a CPU); writes to a "
                                             "temporary directory unless --out is given")
    a("--show", default=None, metavar="PNG", help="write a sample sheet of the task (image, GT, semantic)")
    a("--experiment", action="store_true", help="train every model of the comparison for --seeds under --out "
                                                "(finished runs are skipped, stopped ones resumed), then "
                                                "write table.md and per_step.svg")
    a("--seeds", type=int, nargs="+", default=list(SEEDS),
      help="with --experiment: the seeds to train; one process per seed can run side by side on one GPU "
           "(--seeds 0 & --seeds 1 & ...; the table counts every seed present)")
    a("--memory", action="store_true", help="peak CUDA memory of one head training step against T at 512 RoIs")
    return p


COUNTS = ("iters", "batch_size", "eval_images", "eval_batch_size", "eval_every", "eval_steps", "proposals")  # >= 1


def parse_args(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    if args.resume:
        path = os.path.join(args.resume, "config.json")
        if not os.path.isfile(path):
            p.error(f"--resume {args.resume}: no config.json there; pass a run directory train_panoptic.py wrote")
        # the run's config becomes the defaults, so an option given on the command line wins even when it equals
        # the parser's default; a resume may change where it runs, when it stops and how it is evaluated
        saved = {k: v for k, v in json.load(open(path)).items() if k in vars(args)}
        p.set_defaults(**saved)
        args = p.parse_args(argv)
        may_change = {"device", "until_minutes", "eval_images", "eval_batch_size", "eval_steps"}
        changed = sorted(k for k, v in saved.items() if k not in may_change and getattr(args, k) != v)
        if changed:
            p.error(f"--resume continues the run in its config.json; it does not take --{changed[0].replace('_', '-')}")
        for k in may_change & set(COUNTS):
            if getattr(args, k) < 1:
                p.error(f"--{k.replace('_', '-')} must be >= 1")
        args.out = args.resume
        return args
    if args.head not in HEADS:
        p.error(f"--head must be one of {HEADS}, got {args.head!r}")
    if args.head == "conv4":
        if args.algo not in (None, "bptt") or args.steps not in (None, 1):
            p.error("--head conv4 is feedforward: leave --algo and --steps out (or pass bptt and 1)")
        args.algo, args.steps = "bptt", 1
    args.algo = args.algo or "c-rbp"
    if args.algo not in HEAD_ALGOS:
        p.error(f"--algo must be one of {HEAD_ALGOS}, got {args.algo!r}")
    args.steps = args.steps or (20 if args.algo.endswith("rbp") else 3)
    if args.algo.endswith("rbp") and args.steps < 2:
        p.error(f"--algo {args.algo} runs T-1 steps without grad and one with it: pass --steps >= 2")
    if args.dry_run:
        args.size, args.channels, args.width, args.batch_size, args.iters = 64, 16, 8, 2, 3
        args.eval_images, args.eval_batch_size, args.eval_every, args.eval_steps = 4, 4, 2, 4
        args.steps, args.neumann_steps = min(args.steps, 3), min(args.neumann_steps, 3)
        args.out = args.out or tempfile.mkdtemp(prefix="panoptic-dry-run-")
    for k in COUNTS:
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.size % 8 or args.size < 32:
        p.error(f"--size must be a multiple of 8 and >= 32, got {args.size}")
    if args.channels % 4 or args.channels < 4:
        p.error(f"--channels must be a multiple of 4, got {args.channels}")
    one = f"panoptic-{args.head}-{args.algo}-T{args.steps}-s{args.seed}"
    default = "panoptic" if args.experiment or args.memory else one
    args.out = args.out or os.path.join("runs", default)
    return args


def lr_at(args, it):
    warm = max(1, round(args.warmup * args.iters))
    if it < warm:  # linear warmup from lr / 1000 (warmup factor 1e-3)
        return args.lr * (1e-3 + (1 - 1e-3) * it / warm)
    return args.lr * 0.1 ** ((it >= 2 * args.iters // 3) + (it >= 8 * args.iters // 9))


def save_checkpoint(out, state):
    path = os.path.join(out, "checkpoint.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash never leaves a half-written checkpoint


def log(out, record):
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_log(out, it):
    """On resume, drop the rows logged after the checkpoint's step (a run killed between checkpoints): the
    resumed run logs those steps again."""
    path = os.path.join(out, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    keep = [r for r in rows if r.get("iter", 0) <= it]
    if len(keep) < len(rows):
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(path + ".tmp", path)


def build(args, device):
    head_opts = dict(steps=args.steps, algo=args.algo, neumann_steps=args.neumann_steps, tau=args.tau, xi=args.xi)
    model = PanopticModel(args.head, args.channels, args.width, **head_opts).to(device)
    norm = [p for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)) for p in m.parameters()]
    ids = {id(p) for p in norm}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opt = torch.optim.SGD([{"params": rest, "weight_decay": args.weight_decay}, {"params": norm, "weight_decay": 0}],
                          lr=args.lr, momentum=0.9)
    return model, opt


def train(args):
    """Train one model (one run directory), then evaluate it at its T and at every t = 1..--eval-steps."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)  # the same backbone initialisation for every head of one seed
    model, opt = build(args, device)  # (no cudnn.benchmark: the number of RoIs changes every step)
    if device.type == "cuda":  # the final record's peak memory is this run's, also inside --experiment
        torch.cuda.reset_peak_memory_stats(device)
    start = 0
    if args.resume:
        ck = torch.load(os.path.join(args.out, "checkpoint.pt"), map_location=device, weights_only=False)
        model.load_state_dict(ck["model"]); opt.load_state_dict(ck["optimizer"]); start = ck["iteration"]
        trim_log(args.out, start)
    else:
        if os.path.exists(os.path.join(args.out, "checkpoint.pt")):
            raise SystemExit(f"{args.out} already holds a run: continue it with --resume {args.out}, or pick --out")
        os.makedirs(args.out, exist_ok=True)
        skip = ("resume", "until_minutes", "show", "experiment", "seeds", "memory")
        json.dump({k: v for k, v in vars(args).items() if k not in skip}, open(os.path.join(args.out, "config.json"),
                                                                                 "w"), indent=1)
    n_head = sum(p.numel() for p in model.mask_head.parameters())
    print(f"panoptic | {args.head} head ({n_head:,} parameters) | {args.algo}, T={args.steps}, K={args.neumann_steps}, "
          f"tau {args.tau}, xi {args.xi} | {args.iters} steps x {args.batch_size} images of {args.size} px | "
          f"device {device} | run dir {args.out}" + (f" | resuming at step {start}" if start else ""), flush=True)
    quick = min(64, args.eval_images)
    if start == 0:
        ev = evaluate(model, args, device, args.steps, quick)
        log(args.out, {"iter": 0, "eval": ev})
        print(f"before training: PQ {ev['pq']:.2f}  PQ_th {ev['pq_th']:.2f}  PQ_st {ev['pq_st']:.2f}", flush=True)
    ckpt = lambda it: save_checkpoint(args.out, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                 "iteration": it})
    t0, t_eval, it = time.time(), 0.0, start
    while it < args.iters:
        for group in opt.param_groups:
            group["lr"] = lr_at(args, it)
        seed = args.seed * 1_000_003 + it  # every step's data and proposals follow from (seed, step): resumable
        batch = data.panoptic(args.batch_size, seed=seed, device=device, **task_options(args))
        gen = torch.Generator(device=device).manual_seed(seed)
        try:  # crbp.run raises FloatingPointError for a non-finite state
            losses, stats = training_loss(model, batch, gen, args.proposals)
            total = sum(losses.values())
            if not torch.isfinite(total):
                raise FloatingPointError(f"non-finite loss {({k: v.item() for k, v in losses.items()})}")
        except FloatingPointError as e:
            log(args.out, {"iter": it, "error": str(e)})
            raise SystemExit(f"{args.out} stopped at step {it}: {e}. Lower --lr or raise --xi") from None
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        it += 1
        if it % 10 == 0 or it == args.iters:
            rec = {"iter": it, "lr": opt.param_groups[0]["lr"], **{k: v.item() for k, v in losses.items()},
                   "s_per_step": (time.time() - t0 - t_eval) / (it - start), **(stats.as_dict() if stats else {})}
            log(args.out, rec)
        if it % args.eval_every == 0 or it == args.iters:
            t1 = time.time()
            ev = evaluate(model, args, device, args.steps, quick)
            log(args.out, {"iter": it, "eval": ev})
            t_eval += time.time() - t1
            print(f"step {it}/{args.iters}  loss {total.item():.4f} (mask {losses['loss_mask'].item():.4f}, lcp "
                  f"{losses['loss_lcp'].item():.2e})  held-out PQ {ev['pq']:.2f}  "
                  f"{(time.time() - t0 - t_eval) / (it - start):.3f} s/step (training only)", flush=True)
            ckpt(it)
        if args.until_minutes and time.time() - t0 > 60 * args.until_minutes:
            break
    ckpt(it)
    if it < args.iters:
        print(f"stopped at step {it}; continue with: python train_panoptic.py --resume {args.out}")
        return None
    return report(model, args, device)


def report(model, args, device):
    T = max(args.eval_steps, args.steps)
    curve = evaluate(model, args, device, T, args.eval_images, per_step=True)
    final = curve[args.steps - 1]
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    log(args.out, {"final": final, "steps": args.steps, "per_step_pq": [c["pq"] for c in curve], "peak_gib": peak})
    rows = [json.loads(line) for line in open(os.path.join(args.out, "metrics.jsonl"))]
    ev = [r for r in rows if "eval" in r]
    tr = [r for r in rows if "loss_mask" in r]
    figures.svg_plot(os.path.join(args.out, "learning_curve.svg"),
                     {"mask loss x100": ([r["iter"] for r in tr], [100 * r["loss_mask"] for r in tr]),
                      "held-out PQ": ([r["iter"] for r in ev], [r["eval"]["pq"] for r in ev])},
                     "training step", "PQ / loss x100", f"{args.head} {args.algo} T={args.steps}")
    figures.svg_plot(os.path.join(args.out, "per_step.svg"), {"PQ": (list(range(1, T + 1)), [c["pq"] for c in curve])},
                     "step t", "PQ", f"{args.head} {args.algo}, trained with T={args.steps}")
    batch = data.panoptic(4, split="test", seed=0, device=device, **task_options(args))
    model.eval()
    pan, _ = predict(model, batch, args.steps)[0]
    model.train()
    sheet = torch.cat([batch["image"].cpu(), colorize(batch["pan"]), colorize(pan)], 0)  # rows: image, GT, pred
    figures.write_png(os.path.join(args.out, "predictions.png"), figures.grid(sheet, cols=4, zoom=2))
    print(f"held-out ({args.eval_images} images) at T={args.steps}: " + "  ".join(
        f"{k} {final[k]:.2f}" for k in ("pq", "pq_th", "pq_st", "sq_th", "rq_th", "pq_curve", "pq_blob")))
    print("per-step PQ: " + "  ".join(f"t={t}: {curve[t - 1]['pq']:.2f}" for t in sorted({1, args.steps, 2 * args.steps,
                                                                                          T}) if t <= T))
    print(f"figures and metrics in {args.out}")
    return final


def colorize(pan):
    """(B, H, W) segment ids -> (B, 3, H, W) colours from a fixed hash of the id; void (0) black."""
    g = torch.Generator().manual_seed(0)
    lut = 0.2 + 0.8 * torch.rand(1024, 3, generator=g)
    lut[0] = 0
    return lut[pan.cpu().clamp(0, 1023)].permute(0, 3, 1, 2)


def show(path, args, n=6):
    """A sample sheet: rows of images, their panoptic ground truth, their semantic labels (void white)."""
    b = data.panoptic(n, seed=args.seed, **task_options(args))
    sem = torch.tensor([[0.15, 0.15, 0.15], [0.8, 0.5, 0.2], [0.2, 0.5, 0.8]])[b["semantic"].clamp(max=2)]
    sem[b["semantic"] == IGNORE] = 1.0
    sheet = torch.cat([b["image"], colorize(b["pan"]), sem.permute(0, 3, 1, 2)], 0)
    figures.write_png(path, figures.grid(sheet, cols=n, zoom=2 if args.size <= 64 else 1))
    return path


def memory_profile(args, rois=512):
    """Peak CUDA memory (GiB above the inputs) and time of one mask-head training step (forward, BCE + xi LCP,
    backward) at `rois` RoIs, against T. Writes memory.json and memory.svg. On a CPU (--device cpu) times only."""
    cuda = args.device != "cpu"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--memory measures CUDA memory: run it on a GPU (or pass --device cpu for timings only)")
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = [("conv4", "bptt", 1)] + [("hgru", "bptt", t) for t in (1, 2, 3, 5, 10)] + \
           [("hgru", "c-rbp", t) for t in (2, 5, 10, 20)]
    out = {}
    for kind, algo, T in rows:
        head = MaskHead(kind, len(THINGS), args.channels, steps=T, algo=algo).to(dev)
        x = torch.randn(rois, args.channels, 14, 14, device=dev, requires_grad=True)
        labels = torch.randint(0, len(THINGS), (rois,), device=dev)
        target = (torch.rand(rois, 28, 28, device=dev) > 0.5).float()
        step = lambda head=head, x=x: (mask_loss(head(x), labels, target) + head.penalty).backward()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) if cuda else 0
        step()
        sync()
        gib = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 30 if cuda else float("nan")
        times = []
        for _ in range(3):  # the step's time too: what the experiment's runs cost per RoI
            t0 = time.perf_counter(); step(); sync(); times.append(time.perf_counter() - t0)
        out[f"{kind}-{algo}-T{T}"] = {"peak_gib": gib, "ms": 1000 * min(times)}
        print(f"{kind:5s} {algo:5s} T={T:2d}: peak {gib:6.2f} GiB above the inputs, {1000 * min(times):8.1f} ms "
              f"per step at {rois} RoIs", flush=True)
        del head, x, step
        if cuda:
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    json.dump(out, open(os.path.join(args.out, "memory.json"), "w"), indent=1)
    series = {name: ([int(k.rsplit("T", 1)[1]) for k in out if k.startswith(pre)],
                     [v["peak_gib"] for k, v in out.items() if k.startswith(pre)])
              for name, pre in (("hGRU BPTT", "hgru-bptt"), ("hGRU C-RBP", "hgru-c-rbp"), ("conv4", "conv4"))}
    figures.svg_plot(os.path.join(args.out, "memory.svg"), series, "steps T", f"peak GiB (head step, {rois} RoIs)",
                     "mask-head training memory")
    return out


def experiment(args):
    """Every model of EXPERIMENT for each of args.seeds under args.out, one after the other; finished runs are skipped
    and stopped ones resumed, so the same command continues an interrupted experiment. Then the table and figure."""
    deadline = time.time() + 60 * args.until_minutes if args.until_minutes else None
    for seed in args.seeds:  # seed-major: an experiment cut short still has whole seeds of every model
        for head, algo, T in EXPERIMENT:
            run = os.path.join(args.out, f"{head}-{algo}-T{T}-s{seed}")
            if _final(run) is not None or _final(run, "error") is not None:
                continue  # finished, or stopped by a non-finite loss (the table counts it as failed)
            cfg = {**vars(args), "head": head, "algo": algo, "steps": min(T, 3) if args.dry_run else T, "seed": seed,
                   "out": run, "resume": None, "experiment": False}
            if os.path.isfile(os.path.join(run, "checkpoint.pt")):
                cfg.update(json.load(open(os.path.join(run, "config.json"))), resume=run, out=run)
            cfg["until_minutes"] = None if deadline is None else max(1e-9, (deadline - time.time()) / 60)
            try:
                done = train(argparse.Namespace(**cfg))
            except SystemExit as e:  # a diverged run is recorded in its metrics.jsonl; the others still run
                print(e)
                continue
            if done is None:
                print("experiment stopped (--until-minutes): the table has the finished runs; the same command "
                      "continues")
                return summarize(args.out)
            os.remove(os.path.join(run, "checkpoint.pt"))  # the table needs metrics.jsonl; 35 MB a run otherwise
    return summarize(args.out)


def _final(run, key="final"):
    """The last record of a run's metrics.jsonl that has `key` ("final": finished; "error": diverged)."""
    path = os.path.join(run, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    rows = [r for r in rows if key in r]
    return rows[-1] if rows else None


def summarize(root):
    """table.md (mean +- s.d. over seeds of PQ, PQ_th, PQ_st, SQ_th at the trained T) and per_step.svg."""
    lines = ["| head | algo | T | PQ | PQ_th | PQ_st | SQ_th | PQ curves | seeds |", "|---" * 9 + "|"]
    curves = {}
    for head, algo, T in EXPERIMENT:
        runs = sorted(filter(os.path.isdir, glob.glob(os.path.join(root, f"{head}-{algo}-T{T}-s*"))))  # every seed
        finals = [f for f in map(_final, runs) if f]
        failed = sum(_final(r, "error") is not None for r in runs)
        if not finals:
            continue
        cell = lambda k: (f"{statistics.mean(f['final'][k] for f in finals):.2f} ± "
                          f"{statistics.pstdev([f['final'][k] for f in finals]):.2f}")
        lines.append(f"| {head} | {algo if head == 'hgru' else '-'} | {T} | {cell('pq')} | {cell('pq_th')} | "
                     f"{cell('pq_st')} | {cell('sq_th')} | {cell('pq_curve')} | {len(finals)}"
                     + (f" ({failed} diverged) |" if failed else " |"))
        per = [f["per_step_pq"] for f in finals]
        n = min(len(p) for p in per)
        curves[f"{head} {algo} T={T}" if head == "hgru" else "conv4"] = (
            list(range(1, n + 1)), [statistics.mean(p[t] for p in per) for t in range(n)])
    open(os.path.join(root, "table.md"), "w").write("\n".join(lines) + "\n")
    figures.svg_plot(os.path.join(root, "per_step.svg"), curves, "step t", "PQ (mean over seeds)",
                     "per-step PQ of the trained heads", size=(640, 400))
    print("\n".join(lines))
    return lines


def main(argv=None):
    args = parse_args(argv)
    if args.show:
        return print(show(args.show, args))
    if args.memory:
        return memory_profile(args)
    if args.experiment:
        return experiment(args)
    return train(args)


if __name__ == "__main__":
    main()
