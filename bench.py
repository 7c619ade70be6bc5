"""Training throughput of the paper's Pathfinder hGRU under each algorithm, on one GPU: `make bench`.
(`--model locrnn` or `convgru`: the LocRNN paper's cells on 11 x 11 mazes, 28 px padded to 32, instead.)

One training step = forward + focal loss + LCP + backward + Adam on a batch, plus that batch's share of
rendering the data (train.py renders chunks of RENDER_CHUNK images on the GPU; one chunk is timed and its
cost split over its batches). The paper config: 150 x 150 PF-14 seg, 25 channels, 15 x 15 kernels, 15
Neumann terms, mu 0.9. Every config runs on both paths in the same process, so that each speed is a ratio
to the plain path measured on the same GPU a moment before:

    plain   cuDNN convolutions, eager, autograd for the Neumann terms and the LCP (the readers' reference)
    fast    FFT convolutions with the kernel spectra reused, the compiled cell for every step, and the
            compiled explicit VJP (fastpath.py) for every Neumann term and for the LCP

Each row is the median of --repeats timed steps after --warmup steps (torch.cuda.synchronize around each),
with the peak memory of those steps, the Neumann terms used, and the relative error of the path's parameter
gradient against the plain path in true float32 (TF32 off) on the same weights and batch. PAPER_H200 is the
original hgrucleanSEG.py code measured on one H200 (issue 11), printed as a labelled constant column.
The table also goes to results/bench_<gpu>.json, one record per config and path.

    python bench.py                                   # every config, plain and fast
    python bench.py --configs c-rbp:20:32 bptt:6:32 --repeats 10
    python bench.py --paths fast --profile            # where a C-RBP step's time goes on the fast path
    python bench.py --model locrnn --configs bptt:15:256 c-rbp:15:256   # a mazes row (fast = compiled cell)
"""
import argparse
import functools
import json
import os
import statistics
import time

import torch

import crbp
import data
import fastpath
import models
from data import RENDER_CHUNK  # train.py renders its batches in chunks of this many images
from report import TASKS

# (algo, T, batch) -> the paper code's (hgrucleanSEG.py) img/s and peak GiB on one H200, torch 2.11 (issue 11)
PAPER_H200 = {("c-rbp", 20, 32): (135.7, 3.76), ("c-rbp", 20, 128): (161.7, 14.74), ("c-rbp", 40, 32): (95.2, 3.69),
              ("c-rbp", 80, 32): (59.6, 3.69), ("c-bptt", 6, 32): (271.0, 9.32), ("bptt", 6, 32): (343.3, 7.58),
              ("bptt", 20, 32): (105.7, 23.54)}
CONFIGS = ["c-rbp:20:32", "c-bptt:6:32", "bptt:6:32", "c-rbp:80:32", "c-rbp:20:64", "c-rbp:20:128", "c-rbp:40:32",
           "bptt:20:32"]


MODEL = "hgru"  # --model: hgru on PF-14 (the C-RBP paper), or a LocRNN-paper cell on mazes
COMPILE_MODE = None  # --compile-mode: torch.compile's mode for the fast path ("reduce-overhead": CUDA graphs)
AMP = False  # --amp: the training step under bf16 autocast, as train.py --amp


def build(device, fast):
    """The paper's hGRU (or --model's cell); on the fast path with the compiled cell (the hGRU: FFT convolutions
    and the compiled explicit VJP too)."""
    torch.manual_seed(0)
    opts = dict(conv="fft" if fast else "direct") if MODEL == "hgru" else dict(task="mazes")
    model = models.build(MODEL, **opts).to(device)
    if fast:
        torch._dynamo.reset()  # each model compiles afresh, so that no config meets dynamo's recompile limit
        model.compile_cell(**({"mode": COMPILE_MODE} if COMPILE_MODE else {}))
    return model


def batch_of(batch, device, seed):
    """(images, target, free) of the benchmarked task: PF-14 seg at 150 px, or 11 x 11 mazes."""
    if MODEL == "hgru":
        images, target = data.pathfinder(batch, length=14, task="seg", device=device, seed=seed)
        return images, target.long(), None
    images, target = data.mazes(batch, grid=11, canvas=32, device=device, seed=seed)  # as train.py's task_batch
    return images, target.long(), images.amax(1) > 0


def loss_of(model, batch, algo, T, K, amp=None):
    images, target, free = batch
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=AMP if amp is None else amp):
        out = model(images, steps=T, algo=algo, neumann_steps=K, mu=0.9)
    task = TASKS["pathfinder" if MODEL == "hgru" else "mazes"]
    return task.loss(out.logits, target, free) + (10 * out.penalty if algo.startswith("c-") else 0), out


def grad_error(algo, T, batch, device, fast, K):
    """Relative error of a path's parameter gradient against the plain path in true float32 (F.conv2d with
    TF32 off), same weights and batch; and whether both Neumann series stopped alike."""
    sample = batch_of(batch, device, 12345)
    grads, terms = [], []
    for path_fast, tf32, amp in ((False, False, False), (fast, True, AMP)):
        torch.backends.cudnn.allow_tf32 = tf32  # the reference without TF32 (nor --amp); the path as benchmarked
        model = build(device, path_fast)
        loss, out = loss_of(model, sample, algo, T, K, amp)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))]))
        terms.append((out.stats.neumann_terms, out.stats.neumann_stop))
    torch.backends.cudnn.allow_tf32 = True
    if terms[0] != terms[1]:  # a stop rule decided differently: the two gradients are different sums
        print(f"  note: the Neumann series of the reference and the benchmarked path stopped differently: {terms}")
    return ((grads[1] - grads[0]).norm() / grads[0].norm()).item()


def cuda_ms(fn, warmup, repeats):
    """Median wall time of fn() in ms over `repeats` calls after `warmup` calls, synchronizing around each."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def trainer(model, batch, algo, T, K, stats=None):
    """One Adam training step on batch = (images, target, free), as train.py takes it."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        if COMPILE_MODE in fastpath.GRAPH_MODES:  # CUDA graphs: a new training step, as train.py marks it
            torch.compiler.cudagraph_mark_step_begin()
        loss, out = loss_of(model, batch, algo, T, K)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if stats is not None:
            stats.append(out.stats)
    return step


def bench(algo, T, batch, fast, args, device, render_ms):
    """One record: img/s of training steps plus the batch's share of rendering a chunk of RENDER_CHUNK
    images (train.py renders that way); peak GiB; the Neumann terms used; the gradient error."""
    model = build(device, fast)
    stats = []
    step = trainer(model, batch_of(batch, device, 0), algo, T, args.neumann_steps, stats)
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = cuda_ms(step, args.warmup, args.repeats) + render_ms * batch / RENDER_CHUNK
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    del model, step
    terms = [s.neumann_terms for s in stats if s.neumann_terms is not None]
    err = grad_error(algo, T, min(batch, 32), device, fast, args.neumann_steps) if args.grad_err else None
    torch.cuda.empty_cache()
    return dict(model=MODEL, algo=algo, T=T, batch=batch, path="fast" if fast else "plain", img_s=1e3 * batch / ms,
                peak_gib=peak, neumann_terms=statistics.median(terms) if terms else None, grad_err=err)


def profile(args, device, fast, batch=32, T=20, K=15):
    """Where one C-RBP training step's time goes: each phase timed alone (median of 5), then the top CUDA
    kernels of a whole step from torch.profiler."""
    model = build(device, fast)
    sample = batch_of(batch, device, 0)
    images = sample[0]
    with torch.no_grad():
        x = model.front(images)
        extra = model.cell.prepare(x)
    cell = functools.partial(model.compiled.get("cell", model.cell), **extra)
    h = torch.rand_like(x)
    hp = h.detach().requires_grad_()
    if fast:  # the compiled explicit VJP, as Recurrent hands it to crbp
        vjp = fastpath.StepVJP(functools.partial(model.compiled["linearize"], **extra),
                               functools.partial(model.compiled["adjoint"], **extra))
        lcp = lambda: (vjp(hp, x, torch.ones_like(x)) - 0.9).clamp(min=0).square().mean()  # noqa: E731
        term = lambda: _no_grad(lambda: vjp(h, x, x))  # noqa: E731
        # as trained: h_T by linearize, then the LCP through its factors, one backward for both
        last = lambda: (vjp.step(hp, x).sum() + lcp()).backward()  # noqa: E731
    else:  # autograd, as crbp does without vjp: double backward for the LCP, the taped step's backward per term
        lcp = lambda: crbp.lcp(cell(hp, x), hp, 0.9)  # noqa: E731
        h_next = cell(hp, x)
        term = lambda: torch.autograd.grad(h_next, hp, x, retain_graph=True)  # noqa: E731
        last = lambda: (cell(hp, x).sum() + lcp()).backward()  # noqa: E731
    phases = [(f"render {RENDER_CHUNK} images (data.pathfinder)",
               lambda: data.pathfinder(RENDER_CHUNK, 14, device=device, seed=1)),
              ("one step, no grad", lambda: _no_grad(lambda: cell(h, x))),
              (f"forward, {T} steps, no grad", lambda: _no_grad(lambda: model(images, steps=T, algo="bptt"))),
              ("one taped step + its backward", lambda: cell(hp, x).sum().backward()),
              ("the LCP at one transition + its backward", lambda: lcp().backward()),
              ("the last step and the LCP, one backward (as trained)", last),
              (f"one Neumann term v^T J (K={K} a step)", term),
              ("training step c-rbp, K=0 (LCP, no Neumann terms)", trainer(model, sample, "c-rbp", T, 0)),
              (f"training step c-rbp, K={K}", trainer(model, sample, "c-rbp", T, K))]
    print(f"\nC-RBP T={T}, batch {batch}, {'fast' if fast else 'plain'} path: time per phase (ms)")
    for name, fn in phases:
        print(f"  {name:<52}{cuda_ms(fn, 2, 5):9.2f}", flush=True)
    step = phases[-1][1]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.profile_rows, max_name_column_width=60))


def conv_parts(device, warmup, repeats):
    """fft_conv at the paper's shape (32 x 25 x 150 x 150, 15 x 15 kernel) and its parts, against cuDNN's
    direct convolution: ms per call. The parts bound what a faster channel mix could gain."""
    x, w = torch.randn(32, 25, 150, 150, device=device), torch.randn(25, 25, 15, 15, device=device)
    size = tuple(fastpath.fft_size(n, 7) for n in x.shape[-2:])
    w_hat, X = fastpath.kernel_spectrum(w, size), torch.fft.rfft2(x, s=size)
    mix = lambda: (X.permute(2, 3, 0, 1) @ w_hat).permute(2, 3, 0, 1).contiguous()  # noqa: E731
    Y = mix()  # a contiguous spectrum, as irfft2 gets it
    rows = [("fft_conv (rfft2, channel mix, irfft2)", lambda: fastpath.fft_conv(x, w_hat, size)),
            ("  rfft2 of x (zero-padded)", lambda: torch.fft.rfft2(x, s=size)),
            ("  the channel mix: permute + batched matmul (+ the copy irfft2 makes)", mix),
            ("  irfft2 of a contiguous spectrum (with its copy: c2r overwrites its input)",
             lambda: torch.fft.irfft2(Y, s=size)),
            ("one pass over a state tensor (copy)", lambda: x.clone()),
            ("F.conv2d, 15 x 15 (cuDNN)", lambda: torch.nn.functional.conv2d(x, w, padding=7))]
    print(f"\nfft_conv at 32 x 25 x 150 x 150 (FFT grid {size[0]} x {size[1]}); ms per call")
    for name, fn in rows:
        print(f"  {name:<72}{cuda_ms(fn, warmup, repeats):9.3f}", flush=True)


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def table(records):
    """The bench table: one line per config and path, every speed also as a ratio to the plain path."""
    key_of = lambda r: (r.get("model", "hgru"), r["algo"], r["T"], r["batch"])  # noqa: E731
    plain = {key_of(r): r["img_s"] for r in records if r["path"] == "plain"}
    head = (f"{'config':<14}{'batch':>6}{'path':>7}{'img/s':>9}{'x plain':>9}{'peak GiB':>10}{'Neumann':>9}"
            f"{'grad err':>10}{'paper code H200 img/s (GiB)':>30}")
    lines = [head]
    for r in records:
        key = key_of(r)
        ratio = r["img_s"] / plain[key] if key in plain else None
        paper = PAPER_H200.get(key[1:]) if key[0] == "hgru" else None
        name = ("" if key[0] == "hgru" else key[0] + " ") + r["algo"] + " T=" + str(r["T"])
        lines.append(f"{name:<14}{r['batch']:>6}{r['path']:>7}{r['img_s']:>9.1f}"
                     f"{'-' if ratio is None else f'{ratio:.2f}':>9}{r['peak_gib']:>10.2f}"
                     f"{'-' if r['neumann_terms'] is None else r['neumann_terms']:>9}"
                     f"{'-' if r['grad_err'] is None else format(r['grad_err'], '.1e'):>10}"
                     f"{'-' if paper is None else f'{paper[0]} ({paper[1]})':>30}")
        r["ratio_to_plain"] = ratio
    return "\n".join(lines)


def markdown(path):
    """The README's speed table from a bench JSON file (no GPU needed): one row per config, both paths."""
    run = json.load(open(path))
    rec = {(r.get("model", "hgru"), r["algo"], r["T"], r["batch"], r["path"]): r for r in run["records"]}
    cell = lambda r: "–" if r is None else f"{r['img_s']:.1f} ({r['peak_gib']:.2f})"
    print(f"{run['gpu']}, torch {run['torch']}, median of {run['repeats']} steps after {run['warmup']} warm-up steps\n")
    print("| config | batch | plain img/s (GiB) | fast img/s (GiB) | fast ÷ plain | Neumann terms | grad err (fast) "
          "| paper code img/s (GiB) |\n|---|---|---|---|---|---|---|---|")
    for model, algo, T, batch in dict.fromkeys(k[:4] for k in rec):
        p, f = rec.get((model, algo, T, batch, "plain")), rec.get((model, algo, T, batch, "fast"))
        ratio = f"{f['img_s'] / p['img_s']:.2f}" if p and f else "–"
        terms = "–" if f is None or f["neumann_terms"] is None else int(f["neumann_terms"])
        err = "–" if f is None or f["grad_err"] is None else format(f["grad_err"], ".1e")
        paper = PAPER_H200.get((algo, T, batch)) if model == "hgru" else None
        name = ("" if model == "hgru" else model + " ") + f"{algo.upper()} T={T}"
        print(f"| {name} | {batch} | {cell(p)} | {cell(f)} | {ratio} | {terms} | {err} | "
              + ("–" if paper is None else f"{paper[0]} ({paper[1]})") + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=None, help="algo:T:batch, e.g. c-rbp:20:32 (default: the hGRU's "
                                                              "table; with --model, bptt, c-bptt, c-rbp at T=15, 256)")
    p.add_argument("--model", default="hgru", choices=("hgru", "locrnn", "convgru"),
                   help="hgru: the C-RBP paper's PF-14 config; locrnn, convgru: the LocRNN paper's 11 x 11 mazes")
    p.add_argument("--paths", nargs="*", default=["plain", "fast"], choices=("plain", "fast"),
                   help="which paths to measure (the ratio to plain needs plain)")
    p.add_argument("--neumann-steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, cuDNN autotuning)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps; the median is reported")
    p.add_argument("--no-grad-err", dest="grad_err", action="store_false", help="skip the gradient check")
    p.add_argument("--profile", action="store_true", help="time each phase of a C-RBP step and list the top kernels")
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--amp", action="store_true", help="bf16 autocast, as train.py --amp (for the mazes cells: "
                   "their 64-channel convs run on bf16 tensor cores)")
    p.add_argument("--conv-parts", action="store_true", help="time fft_conv's parts against cuDNN's conv, and exit")
    p.add_argument("--compile-mode", default=None, choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile mode of the fast path's cell and VJP (reduce-overhead replays CUDA graphs)")
    p.add_argument("--out", default="results", help="folder for bench_<gpu>.json")
    p.add_argument("--markdown", metavar="JSON", help="print the README's table from a bench JSON file, and exit")
    args = p.parse_args()
    global MODEL, COMPILE_MODE, AMP
    MODEL, COMPILE_MODE, AMP = args.model, args.compile_mode, args.amp
    if args.profile and MODEL != "hgru":
        p.error("--profile times the hGRU's phases (its FFT spectra and explicit VJP): use it without --model")
    args.configs = args.configs or (CONFIGS if MODEL == "hgru" else ["bptt:15:256", "c-bptt:15:256", "c-rbp:15:256"])
    if args.markdown:
        return markdown(args.markdown)
    if not torch.cuda.is_available():
        raise SystemExit("bench.py measures GPU throughput: run it on a machine with a CUDA GPU")
    configs = []
    for cfg in args.configs:
        algo, T, batch = (cfg.split(":") + ["", "", ""])[:3]
        if algo not in crbp.ALGOS or not (T.isdigit() and batch.isdigit()):
            p.error(f"--configs takes algo:T:batch with algo in {crbp.ALGOS}, e.g. c-rbp:20:32; got {cfg!r}")
        configs.append((algo, int(T), int(batch)))
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}, torch {torch.__version__}; median of {args.repeats} steps after {args.warmup} warm-up steps, "
          f"plus each batch's share of rendering {RENDER_CHUNK} images" + (", bf16 autocast (--amp)" if AMP else ""),
          flush=True)
    if args.conv_parts:
        return conv_parts(device, args.warmup, args.repeats)
    if args.profile:
        for path in args.paths:
            profile(args, device, path == "fast")
        return
    render_ms = cuda_ms(lambda: batch_of(RENDER_CHUNK, device, 1), 1, 3)
    os.makedirs(args.out, exist_ok=True)
    name = os.path.join(args.out, "bench_" + ("" if MODEL == "hgru" else MODEL + "_")
                        + "".join(c if c.isalnum() else "_" for c in gpu.lower()) + ".json")
    records = []
    for algo, T, batch in configs:
        for path in args.paths:
            records.append(bench(algo, T, batch, path == "fast", args, device, render_ms))
            print(f"  {algo}:{T}:{batch} {path}: {records[-1]['img_s']:.1f} img/s, "
                  f"{records[-1]['peak_gib']:.2f} GiB", flush=True)
            text = table(records)  # written after every record, so that a cut-off run keeps what it measured
            with open(name, "w") as f:
                json.dump(dict(gpu=gpu, torch=torch.__version__, compile_mode=args.compile_mode, amp=args.amp,
                               render_ms=render_ms, repeats=args.repeats, warmup=args.warmup,
                               paper_code_h200=[dict(algo=a, T=T, batch=b, img_s=v[0], peak_gib=v[1])
                                                for (a, T, b), v in PAPER_H200.items()], records=records), f,
                          indent=1)
    print(f"\n{text}\n(written to {name})")


if __name__ == "__main__":
    main()
