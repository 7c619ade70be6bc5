"""Train recurrent vision models on Pathfinder and Mazes, on one GPU or a CPU; evaluate and report saved runs.

    Linsley et al. "Stable and expressive recurrent vision models." NeurIPS 2020 (C-RBP, Pathfinder-seg).
    "Cortically motivated recurrence enables task extrapolation" (LocRNN, Pathfinder-cls and Mazes).

The paper's C-RBP hGRU on Pathfinder-14 (`make pathfinder`; a small CPU version without a GPU):
    python train.py --preset pathfinder
Any model, tiny, on the CPU (writes to a temporary directory unless --out is given):
    python train.py --task mazes --model locrnn --dry-run
Split a long run into pieces (the same result as one run); Ctrl-C also stops with a checkpoint:
    python train.py ... --images 400000 --until 200000 --out runs/a;  python train.py --resume runs/a
From a saved run: every table and figure again, or another test set (here 25-paddle contours, 40 steps):
    python train.py --report runs/pathfinder-14
    python train.py --eval runs/pathfinder-14 --length 25 --steps 40
Compare the state-space drift of two runs (two-sample KS test):
    python train.py --ks runs/bptt runs/crbp
On N GPUs of one machine (DistributedDataParallel; --batch-size is the global batch, N x the per-GPU one):
    torchrun --standalone --nproc_per_node 4 train.py --preset pathfinder --batch-size 128

Data are rendered on the training device every iteration (data.py): no dataset on disk. A run directory
holds config.json, metrics.jsonl, checkpoint.pt (written atomically), and when the run is finished
model.pt (models.load reads it), report.json and the figures (report.py).
"""
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import data
import fastpath
import models
import options
import report

CHECK_IMAGES = 2048  # held-out images per check during training (at most --eval-images); the final report uses all


def lr_at(args, it, iters):
    """Linear warmup over --warmup of the iterations, then constant (the paper) or cosine decay to 0."""
    warm = max(1, round(args.warmup * iters))
    if it < warm:
        return args.lr * (it + 1) / warm
    if args.schedule == "constant":
        return args.lr
    return args.lr * 0.5 * (1 + math.cos(math.pi * (it - warm) / max(1, iters - warm)))


def write_atomic(path, write):
    """write(tmp), then rename: a crash or a full disk never leaves a half-written file, nor the .tmp."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def log_jsonl(run_dir, record):
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_metrics(run_dir, images):
    """On resume, drop the rows logged after the checkpoint (at `images`): the resumed run logs them again."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = report.read_metrics(run_dir)
    keep = [r for r in rows if images and r.get("images", 0) <= images]
    if len(keep) < len(rows):
        write_atomic(path, lambda p: open(p, "w").writelines(json.dumps(r) + "\n" for r in keep))


class Progress:
    """One updating line on a terminal, plain lines (one every `every` seconds) when piped; note() prints a
    line of its own that the progress line does not overwrite."""

    def __init__(self, total, every=30.0, quiet=False):
        self.total, self.every, self.tty, self.quiet = total, every, sys.stdout.isatty(), quiet
        self.last, self.open = time.time(), False

    def update(self, done, images_per_s, text):
        now = time.time()
        if self.quiet:
            return
        if not self.tty and now - self.last < self.every and done < self.total:
            return
        eta = (self.total - done) / max(images_per_s, 1e-9)
        line = f"{done:>9,}/{self.total:,} img  {images_per_s:7.1f} img/s  {text}  ETA {eta / 60:5.1f} min"
        print(("\r\033[K" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)
        self.last, self.open = now, self.tty

    def note(self, line):
        self.close()
        if not self.quiet:
            print(line, flush=True)

    def close(self):
        if self.open:
            print()
        self.open = False


class StopOnCtrlC:
    """The first Ctrl-C asks the loop to stop after the current step (it then saves a checkpoint); a second
    one stops at once."""

    def __enter__(self):
        self.asked, self.old = False, None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self.handler)
        return self

    def handler(self, *_):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        print("\nCtrl-C: stopping after this step with a checkpoint (press again to quit at once)", flush=True)

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


def main(argv=None):
    args = options.parse_args(argv, __doc__)
    if args.ks:
        return report.compare_runs(*args.ks)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.report or args.eval:
        return evaluate_saved(args, device)
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return train(args, device)
    # under torchrun: one process per device (cuda:LOCAL_RANK), NCCL between GPUs, gloo between CPU processes
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return train(args, device, dist.get_rank(), dist.get_world_size())
    finally:
        if dist.is_initialized():  # a failed step (every rank stops at the same one): leave the group together
            end_group()


def end_group():
    """Leave the process group together: a gloo rank that leaves while another still holds the group can abort
    at exit ("terminate called without an active exception")."""
    dist.barrier()
    dist.destroy_process_group()


def render_chunk(args, device):
    """Images per render call: a multiple of the global batch, so that rank r's part of batch `it` (batch index
    it * world + r of the per-rank stream) is exactly part r of the batch one process renders for `it`."""
    per = data.RENDER_CHUNK // args.batch_size if device.type == "cuda" else 1
    return max(1, per) * args.batch_size


def train(args, device, rank=0, world=1):
    """One process, or rank `rank` of `world` under torchrun: each rank trains on its own part of every global
    batch (BatchNorm statistics per rank, or per --bn-group, unless --sync-bn) and DDP averages the gradients;
    the held-out evaluations are split over the ranks (report.evaluate); rank 0 alone prints, logs and writes
    the run directory."""
    task, main_rank, local_batch = report.TASKS[args.task], rank == 0, args.batch_size // world
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True  # shapes are fixed across steps: let cuDNN pick its fastest convs
    try:
        model = models.build(args.model, task=task.name, **options.model_options(args)).to(device)
    except ValueError as e:
        options.get_parser().error(f"--model {args.model}: {e}")
    if args.out is None and main_rank:  # a dry run without --out
        args.out = tempfile.mkdtemp(prefix="crbp-dry-run-")
    graphs = args.compile and args.compile_mode in fastpath.GRAPH_MODES  # CUDA graphs: each step marks a replay
    if args.compile and model.recurrent:
        model.compile_cell(**({} if args.compile_mode == "default" else {"mode": args.compile_mode}))
    net = model  # what the training step calls; evaluations and checkpoints use the model itself
    if world > 1:
        if args.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    iters, start, minutes0 = math.ceil(args.images / args.batch_size), 0, 0.0  # minutes0: earlier pieces' wall time
    if args.resume:
        try:
            ck = torch.load(os.path.join(args.out, "checkpoint.pt"), map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file
            raise SystemExit(f"--resume {args.out}: checkpoint.pt cannot be read ({type(e).__name__}: {e})") from None
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, minutes0 = ck["iteration"], ck.get("minutes", 0.0)
        torch.set_rng_state(ck["rng"])
        if device.type == "cuda" and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"], device)
        if main_rank:
            trim_metrics(args.out, start * args.batch_size)
    elif main_rank:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump({k: v for k, v in vars(args).items() if k not in options.NOT_SAVED}, f, indent=1)
        open(os.path.join(args.out, "metrics.jsonl"), "w").close()  # no rows of an attempt without a checkpoint

    n_params = sum(p.numel() for p in model.parameters())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    say = print if main_rank else (lambda *a, **k: None)
    say(f"{args.task} {task.knob} {getattr(args, task.knob)} | {args.model} ({n_params:,} parameters) | "
          f"{args.algo}, T={args.steps}, K={args.neumann_steps}, mu={args.mu}, "
          f"LCP weight {args.penalty_weight if args.algo.startswith('c-') else 0}")
    ranks = (f" | global batch {args.batch_size} = {world} ranks x {local_batch} images per rank, BatchNorm "
             + ("synchronised" if args.sync_bn else "per rank"))
    say(f"device {gpu}{ranks if world > 1 else ''}, torch {torch.__version__}, amp {'bf16' if args.amp else 'off'}, "
          f"compile "
          f"{'on' if args.compile else 'off'}{f' ({args.compile_mode})' if graphs else ''}"
          f"{', fft conv' if args.conv == 'fft' else ''} | {args.batch_size} "
          f"images/step x {iters:,} steps = {iters * args.batch_size:,} images, {args.schedule} lr {args.lr} | "
          f"run dir {args.out}" + (f" | resuming at step {start:,}" if start else ""))

    def checkpoint(it):
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": it,  # of global batches
                 "images": it * args.batch_size, "world": world, "minutes": minutes(),
                 "rng": torch.get_rng_state(), "build": model.build_config,
                 "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        path = os.path.join(args.out, "checkpoint.pt")
        try:
            write_atomic(path, lambda p: torch.save(state, p))
        except OSError as e:
            progress.close()
            raise SystemExit(f"could not write {path} ({e}); the previous checkpoint is kept. Free some space, "
                             f"then continue with: python train.py --resume {args.out}") from None

    def minutes():  # wall time of the run's training so far, over all its pieces, held-out checks included
        return minutes0 + (time.time() - t0) / 60

    def held_out():  # a held-out check; under torchrun split over the ranks
        n_images = min(CHECK_IMAGES, args.eval_images)
        quick = report.evaluate(model, args, device, args.steps, n_images)
        text = f"{task.metric} {quick[task.metric]:.4f} on {n_images} test images (chance: {task.chance})"
        if model.recurrent and main_rank:  # is the cell contractive where the LCP and the Neumann series act?
            dyn = report.dynamics(model, args, device, steps=args.steps)  # one batch: T steps and 40 VJPs
            quick.update(residual=dyn["residual"][-1], rho=dyn["probe"][str(args.steps - 1)]["rho"])
            text += f"; at h_(T-1) J's spectral radius {quick['rho']:.3f}, residual at T {quick['residual']:.3g}"
        return quick, text

    progress, t0, seen0 = Progress(iters * args.batch_size, quiet=not main_rank), time.time(), start * args.batch_size
    if start == 0:  # the untrained model's held-out score, so the learning curve starts at 0 images
        quick, text = held_out()
        if main_rank:
            log_jsonl(args.out, {"images": 0, "eval": quick})
            progress.note(f"before training: held-out {text}")
    next_eval = (start * args.batch_size // args.eval_every + 1) * args.eval_every
    model.train()
    it, run_opts = start, options.crbp_options(args)
    group_size = args.bn_group or local_batch
    groups = local_batch // group_size

    def group_loss(images, target, free):
        """(task loss, loss + weighted LCP, model output) of one BatchNorm group; FloatingPointError if not finite."""
        with report.autocast(args, device):
            out = net(images, steps=args.steps, **run_opts) if model.recurrent else net(images)
        loss = task.loss(out.logits, target, free)
        total = loss + args.penalty_weight * out.penalty if args.algo.startswith("c-") else loss
        if not torch.isfinite(total):  # one sync per group; cheap next to a recurrent step
            raise FloatingPointError(f"non-finite loss ({out.stats})")
        return loss, total, out

    with StopOnCtrlC() as ctrl_c:
        while it < iters:
            if graphs:  # the last step's graph outputs are dead: its replays may reuse their memory
                torch.compiler.cudagraph_mark_step_begin()
            for group in opt.param_groups:
                group["lr"] = lr_at(args, it, iters)
            images, target, free = data.task_batch(task.name, it * world + rank, local_batch, split="train",
                                                   device=device, chunk=render_chunk(args, device),
                                                   **report.data_options(args))
            # --bn-group: the batch runs as groups with their own BatchNorm statistics (the paper's DataParallel
            # replicas); their gradients add up in .grad, so memory is one group's
            opt.zero_grad(set_to_none=True)
            error, loss_sum, penalty_sum = None, 0, 0
            for g in range(groups):
                part = slice(g * group_size, (g + 1) * group_size)
                try:
                    loss, total, out = group_loss(images[part], target[part], None if free is None else free[part])
                except FloatingPointError as e:  # crbp.run raises it too, for a non-finite state
                    error = str(e)
                    break
                loss_sum, penalty_sum = loss_sum + loss.detach(), penalty_sum + out.penalty.detach()
                if g < groups - 1:  # the last group's backward waits for the ranks' agreement below
                    with net.no_sync() if world > 1 else contextlib.nullcontext():  # DDP reduces once, at the last
                        (total / groups).backward()
            asked = lambda: ctrl_c.asked or bool(args.until_minutes and time.time() - t0 > 60 * args.until_minutes)
            stop = None  # one process: asked() after the step
            if world > 1:  # every rank takes the same branches: one rank's error or stop request stops them all
                ok = error is None
                agreed = torch.tensor([not ok, asked(), float(loss_sum / groups) if ok else 0,
                                       float(penalty_sum / groups) if ok else 0], dtype=torch.float64, device=device)
                dist.all_reduce(agreed)
                if agreed[0] and ok:
                    error = "non-finite loss or state on another rank"
                stop, logged = bool(agreed[1]), (agreed[2] / world, agreed[3] / world)  # the mean over ranks
            else:
                logged = (loss_sum / groups, penalty_sum / groups) if error is None else None
            if error is not None:
                progress.close()
                if main_rank:
                    log_jsonl(args.out, {"images": it * args.batch_size, "error": error})
                raise SystemExit(f"stopped at step {it:,}: {error}. The last good checkpoint is kept in {args.out}. "
                                 "Lower --lr, raise --penalty-weight, or try --algo c-bptt")
            (total / groups).backward()
            opt.step()
            it += 1
            seen = it * args.batch_size
            rate = (seen - seen0) / (time.time() - t0)
            if main_rank and (it % 10 == 0 or it == iters):  # stats: rank 0's Neumann series and residual
                loss_i, penalty_i = (float(v) for v in logged)
                progress.update(seen, rate, f"loss {loss_i:.4f} LCP {penalty_i:.2e}")
                log_jsonl(args.out, {"images": seen, "loss": loss_i, "penalty": penalty_i,
                                     "lr": opt.param_groups[0]["lr"], **(out.stats.as_dict() if out.stats else {})})
            if seen >= next_eval or it == iters:
                next_eval += args.eval_every
                quick, text = held_out()
                if main_rank:
                    log_jsonl(args.out, {"images": seen, "minutes": round(minutes(), 2), "eval": quick})
                    progress.note(f"held-out check at {seen:,} images: {text}")
                    checkpoint(it)
            if (asked() if stop is None else stop) or (args.until and seen >= args.until):
                break
    progress.close()
    if not main_rank:  # under torchrun the other ranks only share the final evaluation (report.full)
        return report.full(model, args, device) if it == iters else None
    checkpoint(it)
    print(f"trained {(it - start) * args.batch_size:,} images in {(time.time() - t0) / 60:.1f} min")
    if device.type == "cuda":
        print(f"peak GPU memory of the training loop (with its held-out checks): "
              f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")
        torch.cuda.reset_peak_memory_stats(device)
    if it < iters:
        print(f"{'interrupted' if ctrl_c.asked else 'stopped'} at {it * args.batch_size:,} of "
              f"{iters * args.batch_size:,} images, checkpoint saved; continue with: "
              f"python train.py --resume {args.out}")
        return None
    write_atomic(os.path.join(args.out, "model.pt"), lambda p: models.save(model, p))
    try:
        return report.full(model, args, device)
    except KeyboardInterrupt:
        raise SystemExit(f"\ninterrupted in the final evaluation; the trained model is saved: draw its tables and "
                         f"figures with: python train.py --report {args.out}") from None


def evaluate_saved(args, device):
    """--report: every table and figure of a saved run; --eval: its model on another test set."""
    try:
        model = models.load(args.out, device)
    except ValueError as e:
        raise SystemExit(f"--{'report' if args.report else 'eval'}: {e}") from None
    if args.report:
        return report.full(model, args, device)
    knob = report.TASKS[args.task].knob
    return report.other_test_set(model, args, device, args.eval_to, **{knob: getattr(args, knob)})


if __name__ == "__main__":
    main()
