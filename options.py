"""train.py's command line: its options, the presets, and the checks that reject bad input before anything is
written (the device, the run directory, every number), each with a message saying what to pass.

    args = options.parse_args(["--preset", "pathfinder", "--images", "50000"])
    model = models.build(args.model, task=..., **options.model_options(args))
    out = model(images, steps=args.steps, **options.crbp_options(args))
"""
import argparse
import inspect
import os

import torch

import crbp
import models
import report

PRESETS = {
    # `make pathfinder`: the paper's C-RBP hGRU on PF-14 seg (T=20, K=15, mu 0.9, LCP weight 10, 15x15
    # kernels, 150 px) on one GPU, on the fast path (FFT convs + compiled cell: the same function)
    "pathfinder": dict(task="pathfinder", length=14, model="hgru", algo="c-rbp", steps=20, neumann_steps=15,
                       mu=0.9, penalty_weight=10.0, batch_size=32, lr=1e-3, images=100_000, eval_images=2048,
                       eval_every=8000, eval_steps=40, fast=True, out="runs/pathfinder-14"),
    # the same without a GPU, small enough for a few minutes on 2 CPU cores: 75 px PF-6, 5x5 kernels, T=8
    "pathfinder-cpu": dict(task="pathfinder", length=6, size=75, model="hgru", kernel=5, algo="c-rbp", steps=8,
                           neumann_steps=8, mu=0.9, penalty_weight=10.0, batch_size=8, lr=3e-3, images=960,
                           eval_images=64, eval_batch_size=32, eval_every=320, eval_steps=16,
                           out="runs/pathfinder-cpu"),
}
# The paper's PF-14 rows (make reproduce): 1.2 M images each (the paper's C-RBP: ~1.15 M to its best F1), batch
# 32, cosine lr, the fast path; trained in pieces (--until-minutes, then --resume) into results/
_PF14 = dict(task="pathfinder", length=14, model="hgru", batch_size=32, lr=1e-3, images=1_200_000, eval_images=10_000,
             eval_lengths=[20, 25], eval_every=100_000, eval_steps=40, fast=True)  # final report: 10k images, PF-20/25
REPRODUCE = {"pf14-crbp": dict(algo="c-rbp", steps=20, neumann_steps=15, mu=0.9, penalty_weight=10.0),
             "pf14-bptt": dict(algo="bptt", steps=6), "pf14-cbptt": dict(algo="c-bptt", steps=6, penalty_weight=10.0),
             "pf14-rbp": dict(algo="rbp", steps=20, neumann_steps=20),  # RBP without the LCP (the paper: K = 20)
             "pf14-ff6": dict(model="ff", algo="bptt", steps=None),  # the 6-layer 15 x 15 CNN control
             # the paper's effective batch: 128 images a step, BatchNorm statistics per 32 (its 4 GPUs), on one GPU
             "pf14-crbp-b128": dict(algo="c-rbp", steps=20, neumann_steps=15, mu=0.9, penalty_weight=10.0,
                                    batch_size=128, bn_group=32)}
# The LocRNN paper's runs (make extrapolate): medium (11 x 11) mazes, batch 256, 50 epochs of 50k mazes, warmup
# over 5 epochs then decay (the paper's was a step decay; cosine here), T = 15 (R-ResNet-36: 8 iterations);
# tested on the 10k-maze test sets of small, medium and large at t = 1..3T. PF-14 cls: LocRNN at T = 12, Adam
# 1e-4, batch 256, one epoch of 700k images (the paper: "often solves PF-14 in < 1 epoch"), tested on PF-9 and 18.
_MAZES = dict(task="mazes", grid=11, batch_size=256, lr=1e-3, warmup=0.1, images=2_500_000, eval_images=10_000,
              eval_every=250_000, eval_lengths=[9, 13], fast=True)
EXTRAPOLATE = {"mazes-locrnn": dict(_MAZES, model="locrnn"), "mazes-convgru": dict(_MAZES, model="convgru"),
               "mazes-rresnet": dict(_MAZES, model="rresnet"), "mazes-resnet": dict(_MAZES, model="resnet"),
               "mazes-locrnn-cbptt": dict(_MAZES, model="locrnn", algo="c-bptt"),  # the LCP for LocRNN (issue 14)
               "mazes-locrnn-crbp": dict(_MAZES, model="locrnn", algo="c-rbp"),  # slow at T = 15 (README)
               "mazes-locrnn-crbp30": dict(_MAZES, model="locrnn", algo="c-rbp", steps=30),  # its fix at small scale
               "pfcls-locrnn": dict(task="pathfinder-cls", length=14, model="locrnn", batch_size=256, lr=1e-4,
                                    images=700_000, eval_images=10_000, eval_every=100_000, eval_lengths=[9, 18],
                                    eval_steps=24, fast=True)}
RESULTS = {**REPRODUCE, **EXTRAPOLATE}  # the presets that write results/<name>: runs to commit, not make clean's
PRESETS.update({name: {**_PF14, **run, "out": f"results/{name}"} for name, run in REPRODUCE.items()})
PRESETS.update({name: {**run, "out": f"results/{name}"} for name, run in EXTRAPOLATE.items()})
# --dry-run: a few iterations at tiny sizes (75-px PF-6, 3x3 kernels, 8 channels, 3 steps); typed options win
DRY_RUN = dict(images=8, batch_size=4, bn_group=None, eval_images=4, eval_every=4, eval_batch_size=4, size=75,
               length=6, steps=3, neumann_steps=3, kernel=3, out=None)
# options a --resume or --report may change: where it runs, when it stops, how it is evaluated (not what is trained)
RESUMABLE = {"until", "until_minutes", "device", "eval_images", "eval_batch_size", "eval_every", "eval_steps",
             "eval_lengths", "compile", "conv", "fast", "compile_mode"}
MODES = ("resume", "report", "eval", "ks")  # what train.py does instead of a new run; not saved in config.json
NOT_SAVED = set(MODES) | {"until", "until_minutes", "preset", "halt"}


def get_parser(description=None):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--task", default="pathfinder", choices=sorted(report.TASKS),
      help="pathfinder: segment the contour touching the dot (C-RBP); pathfinder-cls: are the two markers "
           "on one contour (LocRNN); mazes: segment the path from green to red (LocRNN)")
    a("--length", type=int, default=14, help="Pathfinder contour length in paddles, >= 2 (papers: 6, 14, 20, 25)")
    a("--size", type=int, default=150, help="Pathfinder image side in pixels, >= 75 (the papers used 150)")
    a("--distractors", type=int, default=None, metavar="K",
      help="Pathfinder distractor snakes per image (default 30 // (length // 3), the 2018 rule: 7 at PF-14; the "
           "2019 wrapper as committed used 15). With --eval: another test set")
    a("--grid", type=int, default=11, help="maze grid size, odd, >= 3 (9/11/13 -> 24/28/32 px images)")
    a("--canvas", type=int, default=32, help="mazes are zero-padded into this canvas, as the LocRNN code did")
    a("--model", default="hgru", help=f"one of {sorted(models.MODELS)}")
    a("--kernel", type=int, default=None, help="horizontal kernel size, odd (hGRU: paper 15; 3/5/9 for the sweep)")
    a("--channels", type=int, default=None,
      help="state channels of convlstm/locrnn/convgru (width of resnet/rresnet); the hGRU's follow its front end")
    a("--algo", default=None, choices=crbp.ALGOS,
      help="c-rbp trains at the fixed point in O(1) memory; bptt is exact but its memory grows with --steps "
           "(default: the model's: c-rbp for pathfinder, bptt for the LocRNN tasks and feedforward models)")
    a("--steps", type=int, default=None,
      help="recurrent steps T in training (default: the task's: 20 pathfinder, 12 pathfinder-cls, 15 mazes). "
           "With --eval: the steps to evaluate")
    a("--neumann-steps", type=int, default=15,
      help="most Neumann terms in the rbp gradient, >= 0 (paper 15). If the run reports 'diverging', F is not "
           "contractive: raise --penalty-weight or lower --mu rather than adding terms")
    a("--mu", type=float, default=0.9, help="LCP bound on the Jacobian's column sums, in [0, 1) (paper 0.9)")
    a("--penalty-weight", type=float, default=10.0, help="weight of the LCP in the loss, >= 0 (paper 10)")
    a("--truncate", type=int, default=None, help="tbptt: backpropagate through this many last steps")
    a("--batch-size", type=int, default=32,
      help="images per step, over all ranks under torchrun (the paper: 32 per GPU, 4 GPUs: 128)")
    a("--bn-group", type=int, default=None, metavar="N",
      help="BatchNorm statistics over groups of N images, whose gradients add up (the paper: --batch-size 128 "
           "--bn-group 32, its 4 DataParallel GPUs on one); default: the whole (per-rank) batch")
    a("--sync-bn", action="store_true",
      help="under torchrun: BatchNorm statistics over the global batch (torch.nn.SyncBatchNorm, GPUs only, "
           "bptt/tbptt only); default: per-rank statistics, as the paper's DataParallel had")
    a("--lr", type=float, default=1e-3, help="Adam learning rate, > 0 (paper 1e-3, constant)")
    a("--schedule", default="cosine", choices=["constant", "cosine"],
      help="constant is the paper's; cosine decay after warmup reaches high accuracy in fewer images")
    a("--warmup", type=float, default=0.02, help="linear warmup, as a fraction of the run, in [0, 1)")
    a("--images", type=int, default=200_000,
      help="training budget in images (the paper's C-RBP saw about 1.15 M on PF-14 at constant lr)")
    a("--eval-images", type=int, default=2048, help="held-out images for the final metrics (paper 10,000)")
    a("--eval-batch-size", type=int, default=64,
      help="images per forward in evaluation; the hGRU's BatchNorm uses batch statistics at test time too, over "
           "these (paper 32)")
    a("--eval-every", type=int, default=20_000,
      help="images between held-out checks (2,048 test images, at most --eval-images)")
    a("--eval-steps", type=int, default=None, help="T of the per-step curve (default 40 Pathfinder, 3T mazes)")
    a("--eval-lengths", type=int, nargs="*", default=None,
      help="also report the per-step curve on these Pathfinder lengths / maze grids (extrapolation)")
    a("--amp", action="store_true", help="bf16 autocast (the Neumann sum still accumulates in fp32); the "
                                         "hGRU's gradient loses accuracy under it: prefer --fast")
    a("--compile", action="store_true",
      help="torch.compile the cell for every step and Neumann term (the LCP takes one extra eager step, as it "
           "needs a double backward); the first steps take a while to compile")
    a("--conv", default=None, choices=("direct", "fft"),
      help="hGRU horizontal convolutions: direct (F.conv2d) or fft (the same function, kernel spectra computed "
           "once per forward; float32), faster for 15x15 kernels on a GPU (default: direct)")
    a("--fast", action=argparse.BooleanOptionalAction, default=False,
      help="--conv fft --compile, the fastest path on a GPU. On in --preset pathfinder; --no-fast there gives "
           "the plain path")
    a("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"),
      help="with --compile/--fast: torch.compile's mode; reduce-overhead replays CUDA graphs, which pays only "
           "where the steps are launch-bound (each call's outputs are then copied out of the graph)")
    a("--seed", type=int, default=0, help="seed of the weights and of the training and test data streams")
    a("--device", default="auto", help="auto (cuda if available), cuda, cuda:1 or cpu")
    a("--out", default=None, help="run directory (default runs/<task>-<model>-<algo>; --dry-run: a temporary one)")
    a("--resume", default=None, metavar="RUN_DIR", help="continue a run exactly where it stopped")
    a("--until", type=int, default=None, metavar="IMAGES",
      help="stop (with a checkpoint) after this many images; the schedule still follows --images. "
           "Continue with --resume: pieces give exactly the result of one uninterrupted run")
    a("--until-minutes", type=float, default=None, help="stop (with a checkpoint) after this much wall time")
    a("--preset", choices=sorted(PRESETS), default=None,
      help="a named configuration (PRESETS in options.py); options given as well override it. `make pathfinder` "
           "runs --preset pathfinder, which falls back to pathfinder-cpu without a GPU")
    a("--dry-run", action="store_true", help="a few iterations at tiny sizes, to check that everything runs")
    a("--report", default=None, metavar="RUN_DIR",
      help="evaluate a saved run's model again and redraw all its tables and figures, without training")
    a("--eval", default=None, metavar="RUN_DIR",
      help="evaluate a saved run's model on another test set: --length/--grid N, --steps T, --eval-images")
    a("--halt", type=float, default=None, metavar="TOL",
      help="with --eval: also let each image stop once a step changes its state by <= TOL (relative, e.g. 1e-3), "
           "at most --steps, and report the metric and the steps the images took")
    a("--ks", nargs=2, default=None, metavar="RUN_DIR",
      help="compare two trained runs' state-space drift distances with a two-sample KS test, and exit")
    return p


def parse_args(argv=None, description=None):
    """Parse; fill presets, --dry-run sizes or a saved run's config in as defaults; check everything
    (the device and the run directory too) before anything is written."""
    parser = get_parser(description)
    args = parser.parse_args(argv)
    modes = [m for m in MODES if getattr(args, m)]
    if len(modes) > 1:
        parser.error(f"pass one of --resume, --report, --eval and --ks, not {' and '.join('--' + m for m in modes)}")
    if args.ks:
        return args
    run_dir = args.resume or args.report or args.eval
    if run_dir:
        try:
            saved = vars(report.load_config(run_dir))
        except ValueError as e:
            parser.error(f"--{modes[0]} {run_dir}: {e}")
        saved = {k: v for k, v in saved.items() if k in vars(args) and k not in NOT_SAVED}
        saved["out"] = run_dir  # where the run is now (it may have been copied or moved)
        parser.set_defaults(**saved)
        if args.eval:  # --steps is the evaluation's T there; None: the run's --eval-steps
            parser.set_defaults(steps=None)
        args = parser.parse_args(argv)
        if args.resume and os.path.abspath(args.out) != os.path.abspath(run_dir):
            parser.error(f"--resume {run_dir} continues the run in {run_dir}, not in --out {args.out}: to branch "
                         f"a run, copy the directory (cp -r {run_dir} {args.out}) and --resume the copy")
        if args.eval:
            args.eval_to, args.steps = args.steps or saved["eval_steps"], saved["steps"]
        may_change = RESUMABLE | ({"length", "grid", "steps", "distractors"} if args.eval else set())
        changed = {k: (v, getattr(args, k)) for k, v in saved.items()
                   if k not in may_change and getattr(args, k) != v}
        if changed:
            parser.error(f"--{modes[0]} keeps the run's configuration; these differ from its config.json: "
                         + ", ".join(f"--{k.replace('_', '-')} {new} (run has {old})"
                                     for k, (old, new) in changed.items())
                         + ". Start a new run with --out instead.")
        args.out = run_dir
    elif args.preset or args.dry_run:
        if args.preset:
            name = args.preset
            no_gpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
            if name == "pathfinder" and no_gpu:
                print("no CUDA GPU here: running the small CPU configuration of --preset pathfinder-cpu instead "
                      "(the paper's config needs a GPU)")
                name = "pathfinder-cpu"
            if name in RESULTS and no_gpu and not args.dry_run:  # a dry run of it checks that it runs
                parser.error(f"--preset {name} trains {PRESETS[name]['images']:,} images of a paper's config: it "
                             "needs a CUDA GPU")
            parser.set_defaults(**PRESETS[name])
        if args.dry_run:
            parser.set_defaults(**DRY_RUN)
        args = parser.parse_args(argv)  # what was typed wins over the preset and the dry-run sizes
    check_args(parser, args)
    return args


AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
RULES = {  # option: (test, what to pass); None passes (the option is off or takes the model's default)
    **{k: AT_LEAST_1 for k in ("steps", "batch_size", "images", "eval_images", "eval_batch_size", "eval_every",
                               "eval_steps", "until", "channels", "bn_group")},
    "lr": (lambda v: v > 0, "> 0 (the paper used 1e-3)"),
    "neumann_steps": (lambda v: v >= 0, ">= 0 (the paper used 15)"),
    "penalty_weight": (lambda v: v >= 0, ">= 0 (the paper used 10; 0 turns the LCP off)"),
    "mu": (lambda v: 0 <= v < 1, "in [0, 1) (the paper used 0.9)"),
    "warmup": (lambda v: 0 <= v < 1, "a fraction of the run, in [0, 1)"),
    "until_minutes": (lambda v: v > 0, "> 0"),
    "halt": (lambda v: v > 0, "> 0, a relative change per step such as 1e-3"),
    "distractors": (lambda v: v >= 0, ">= 0 (the 2019 wrapper used 15)"),
    "kernel": (lambda v: v >= 1 and v % 2 == 1, "odd and >= 1 (for 'same' padding)"),
    "seed": (lambda v: 0 <= v < 2 ** 40, "in [0, 2**40)"),
    "size": (lambda v: v >= 75, ">= 75: contours are drawn on 300 px and shrunk at most 4x"),
}


def check_args(parser, args):
    """Fill the model's defaults and reject what cannot run, with a message saying what to pass."""
    task = report.TASKS[args.task]
    if args.model not in models.MODELS:
        parser.error(f"--model must be one of {sorted(models.MODELS)}, got {args.model!r}")
    has_conv = "conv" in inspect.signature(models.MODELS[args.model]).parameters
    if args.conv is not None and not has_conv:
        parser.error(f"--conv is an option of the hGRU; --model {args.model} has no FFT path")
    if args.fast:
        args.compile, args.conv = True, "fft" if has_conv else None
    steps, algo = models.defaults(args.model, task.name)
    if steps is None and args.algo not in (None, "bptt"):
        parser.error(f"--model {args.model} is feedforward: it has no recurrence for {args.algo}; use --algo bptt")
    args.algo, args.steps = args.algo or algo or "bptt", args.steps or steps or 1
    if args.halt is not None and not (args.eval and steps is not None):
        parser.error("--halt is for --eval of a recurrent model: python train.py --eval RUN_DIR --steps 60 --halt 1e-3")
    if args.eval_steps is None:  # a dry run evaluates one step past T: enough for the drift, and quick
        args.eval_steps = args.steps + 1 if args.dry_run else task.eval_steps(args.steps)
    if args.eval_steps < args.steps:
        parser.error(f"--eval-steps must be >= --steps ({args.steps}): the per-step curve and the state-space "
                     "drift run on past the trained T")
    for k, (ok, what) in RULES.items():
        if getattr(args, k) is not None and not ok(getattr(args, k)):
            parser.error(f"--{k.replace('_', '-')} must be {what}, got {getattr(args, k)}")
    if "tbptt" in args.algo and not (args.truncate and 1 <= args.truncate <= args.steps):
        parser.error(f"--algo {args.algo} needs --truncate in 1..--steps ({args.steps})")
    if "rbp" in args.algo and args.steps < 2:
        parser.error("--algo rbp/c-rbp runs T-1 steps without grad and one with it: use --steps >= 2")
    for n in [getattr(args, task.knob)] + (args.eval_lengths or []):
        if task.knob == "length" and n < 2:
            parser.error(f"--length / --eval-lengths count paddles per contour: pass >= 2 (papers: 6, 14, 25), got {n}")
        if task.knob == "grid" and not (n >= 3 and n % 2 == 1 and args.canvas >= 2 * n + 6):
            parser.error(f"--grid / --eval-lengths must be odd, >= 3 and fit --canvas {args.canvas} "
                         f"(a grid-n maze is 2n+6 px), got {n}")
    check_device(parser, args.device)
    if args.compile_mode != "default" and not args.compile:
        parser.error(f"--compile-mode {args.compile_mode} is torch.compile's mode: pass --compile (or --fast) too")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun sets it
    if world > 1 and (args.report or args.eval):
        mode = "report" if args.report else "eval"
        parser.error(f"--{mode} runs in one process: python train.py --{mode} {args.out}, without torchrun")
    if world > 1 and args.batch_size % world:
        parser.error(f"--batch-size is the global batch: it must be a multiple of the {world} ranks, got "
                     f"{args.batch_size}")
    if args.bn_group and (args.batch_size // world) % args.bn_group:
        parser.error(f"--bn-group must divide the per-rank batch ({args.batch_size // world}), got {args.bn_group}")
    if args.bn_group and args.sync_bn:
        parser.error("--bn-group keeps BatchNorm statistics per group and --sync-bn pools them over ranks: pass one")
    if args.sync_bn and (args.algo not in ("bptt", "tbptt") or args.conv == "fft"):
        parser.error("--sync-bn is for --algo bptt or tbptt without --fast/--conv fft: SyncBatchNorm has no double "
                     "backward (the LCP), its backward all-reduces once per Neumann term (which ranks may stop at "
                     "different terms), and the fast path's hand-written VJP assumes per-rank BatchNorm")
    if args.sync_bn and (args.device == "cpu" or not torch.cuda.is_available()):
        parser.error("--sync-bn needs CUDA GPUs (torch.nn.SyncBatchNorm does not run on the CPU)")
    if not (args.report or args.eval):
        check_run_dir(parser, args)
    elif not any(os.path.isfile(os.path.join(args.out, f)) for f in ("model.pt", "checkpoint.pt")):
        parser.error(f"{args.out} holds no model.pt or checkpoint.pt to evaluate")
    if args.out is not None:
        check_writable(parser, args.out)


def check_device(parser, name):
    try:
        dev = torch.device("cpu" if name == "auto" else name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        parser.error(f"--device {name!r}: pass auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                     "pass --device cpu, or auto")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")


def check_run_dir(parser, args):
    if args.out is None and not args.dry_run:
        args.out = os.path.join("runs", f"{args.task}-{args.model}-{args.algo}")
    if args.out is None:
        return  # a dry run without --out: a fresh temporary directory
    done = os.path.isfile(os.path.join(args.out, "model.pt"))
    started = os.path.isfile(os.path.join(args.out, "checkpoint.pt"))
    runs = [p["out"] for name, p in PRESETS.items() if name not in RESULTS]  # what make clean removes
    preset_dir = os.path.normpath(args.out) in {os.path.normpath(out) for out in runs}
    fresh = f"to train afresh, delete it ({'make clean' if preset_dir else f'rm -r {args.out}'}) or pick another --out"
    if args.resume and not started:
        parser.error(f"--resume {args.out}: no checkpoint.pt there; point it at a run directory that train.py wrote")
    if done:
        parser.error(f"{args.out} holds a finished run: redraw its figures with --report {args.out}, "
                     f"evaluate it with --eval {args.out}; {fresh}")
    if started and not args.resume:
        parser.error(f"{args.out} holds an unfinished run: continue it with --resume {args.out}; {fresh}")


def check_writable(parser, path):
    """The nearest existing directory on the way to `path` must be one we can write into."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        parser.error(f"--out {path}: {probe} is a file, not a directory; pick another --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        parser.error(f"--out {path}: {probe} is not writable; pick another --out")


def model_options(args):
    """Build options from the command line: --kernel, --steps (hgru_gn's gate-bias init depends on T), --algo
    (so that a saved model's .algo is the one it trained with), and under --dry-run 3x3 kernels and 8 channels
    wherever the model takes them."""
    opts = {"kernel": args.kernel, "steps": args.steps, "algo": args.algo, "channels": args.channels,
            "width": args.channels, "conv": args.conv}
    if args.dry_run:
        opts.update(channels=args.channels or 8, width=args.channels or 8, depth=8, long_kernel=3, short_kernel=3)
    takes = inspect.signature(models.MODELS[args.model]).parameters
    return {k: v for k, v in opts.items() if k in takes and v is not None}


def crbp_options(args):
    """The crbp.run options of this run (models pass them through to crbp.run)."""
    opts = dict(algo=args.algo, neumann_steps=args.neumann_steps, mu=args.mu)
    if "tbptt" in args.algo:
        opts["truncate"] = args.truncate
    return opts
