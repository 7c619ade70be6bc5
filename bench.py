"""Training throughput of the paper's Pathfinder hGRU under each algorithm, on one GPU: `make bench`.

One training step = forward + focal loss + LCP + backward + Adam on a batch, plus that batch's share of
rendering the data (train.py renders chunks of train.RENDER_CHUNK images on the GPU; one chunk is timed and
its cost split over its batches). The paper config: 150 x 150 PF-14 seg, 25 channels, 15 x 15 kernels,
15 Neumann terms, mu 0.9. Each row is the median of --repeats timed steps after --warmup steps
(torch.cuda.synchronize around each step), with the peak memory of those steps, the Neumann terms used,
and the relative error of the benchmarked path's parameter gradient against the plain path in true float32
(TF32 off) on the same weights and batch. The last column is the ratio to the paper code's throughput on
one H100 80GB (PyTorch 2.11, same config).

    python bench.py                   # the plain path (cuDNN convs, eager), every config of the anchor table
    python bench.py --fast            # FFT convs with reused kernel spectra + the compiled cell
    python bench.py --fast --configs c-rbp:20:32 bptt:6:32 --repeats 10
    python bench.py --fast --profile  # where a C-RBP step's time goes
"""
import argparse
import statistics
import time

import torch

import data
import models
import train

# (algo, T, batch) -> the paper code's img/s and peak GiB on one H100 80GB, PyTorch 2.11
PAPER = {("c-rbp", 20, 32): (119, 3.76), ("c-rbp", 20, 128): (140, 14.7), ("c-rbp", 40, 32): (84, 3.69),
         ("c-rbp", 80, 32): (52, 3.69), ("c-bptt", 6, 32): (239, 9.3), ("bptt", 6, 32): (305, 7.6),
         ("bptt", 20, 32): (94, 23.5)}


def build(args, device, fast=True):
    """The paper's hGRU; with fast=True, on the levers asked for (--conv fft, --compile)."""
    torch.manual_seed(0)
    model = models.build("hgru", conv=args.conv if fast else "direct").to(device)
    if fast and args.compile:
        torch._dynamo.reset()  # each model compiles afresh, so that no config meets dynamo's recompile limit
        model.compile_cell()
    return model


def loss_of(model, images, target, algo, T, K, amp):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        out = model(images, steps=T, algo=algo, neumann_steps=K, mu=0.9)
    return train.focal_loss(out.logits, target.long()) + (10 * out.penalty if algo.startswith("c-") else 0), out


def grad_error(algo, T, batch, device, args):
    """Relative error of the benchmarked path's parameter gradient against the plain path in true float32
    (F.conv2d with TF32 off), same weights and batch."""
    images, target = data.pathfinder(batch, length=14, task="seg", device=device, seed=12345)
    grads, terms = [], []
    for fast in (False, True):
        torch.backends.cudnn.allow_tf32 = fast  # the reference without TF32; the fast path as benchmarked
        model = build(args, device, fast)
        loss, out = loss_of(model, images, target, algo, T, args.neumann_steps, amp=fast and args.amp)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))]))
        terms.append((out.stats.neumann_terms, out.stats.neumann_stop))
    torch.backends.cudnn.allow_tf32 = True
    if terms[0] != terms[1]:  # a stop rule decided differently: the two gradients are different sums
        print(f"  note: Neumann series of the reference and the benchmarked path stopped differently: {terms}")
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


def bench(algo, T, batch, args, device, render_ms):
    """img/s of training steps on one batch, plus the batch's share of rendering a chunk of RENDER_CHUNK
    images (train.py renders that way); peak GiB; the Neumann terms used; the gradient error."""
    model = build(args, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, target = data.pathfinder(batch, length=14, task="seg", device=device, seed=0)
    stats = []

    def step():
        loss, out = loss_of(model, images, target, algo, T, args.neumann_steps, amp=args.amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stats.append(out.stats)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = cuda_ms(step, args.warmup, args.repeats) + render_ms * batch / train.RENDER_CHUNK
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    del model, opt
    terms = [s.neumann_terms for s in stats if s.neumann_terms is not None]
    err = grad_error(algo, T, min(batch, 32), device, args)
    return 1e3 * batch / ms, peak, (statistics.median(terms) if terms else None), err


def profile(args, device, batch=32, T=20):
    """Where one C-RBP training step's time goes: each phase timed alone (median of 5), then the top CUDA
    kernels of a whole step from torch.profiler."""
    model = build(args, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, target = data.pathfinder(batch, length=14, task="seg", device=device, seed=0)

    def forward(steps, algo, grad):
        with torch.set_grad_enabled(grad), torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp):
            return model(images, steps=steps, algo=algo)

    def train_step(algo="c-rbp", K=15):
        loss, _ = loss_of(model, images, target, algo, T, K, args.amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    phases = [(f"render {train.RENDER_CHUNK} images (data.pathfinder)",
               lambda: data.pathfinder(train.RENDER_CHUNK, 14, device=device, seed=1)),
              ("one step, no grad", lambda: forward(1, "bptt", False)),
              (f"forward, {T} steps, no grad", lambda: forward(T, "bptt", False)),
              ("forward rbp (T-1 no-grad steps + taped step)", lambda: forward(T, "rbp", True)),
              ("forward c-rbp (+ LCP: its VJP with create_graph)", lambda: forward(T, "c-rbp", True)),
              ("training step rbp, K=0", lambda: train_step("rbp", K=0)),
              ("training step c-rbp, K=0 (LCP, no Neumann terms)", lambda: train_step(K=0)),
              ("training step c-rbp, K=15", lambda: train_step())]
    print(f"\nC-RBP T={T}, batch {batch}: time per phase (ms)")
    for name, fn in phases:
        print(f"  {name:<52}{cuda_ms(fn, 2, 5):9.2f}", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        train_step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=[f"{a}:{T}:{b}" for a, T, b in PAPER],
                   help="algo:T:batch, e.g. c-rbp:20:32")
    p.add_argument("--conv", default="direct", choices=("direct", "fft"),
                   help="the hGRU's 15x15 convolutions: cuDNN (direct) or FFT with kernel spectra reused")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the cell for every step and Neumann term (model.compile_cell())")
    p.add_argument("--fast", action="store_true", help="--conv fft --compile, the fastest path measured")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast (the Neumann sum accumulates in fp32); slower and less exact for this hGRU")
    p.add_argument("--neumann-steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, cuDNN autotuning)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps; the median is reported")
    p.add_argument("--profile", action="store_true", help="time each phase of a C-RBP step and list the top kernels")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.py measures GPU throughput: run it on a machine with a CUDA GPU")
    if args.fast:
        args.conv, args.compile = "fft", True
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    levers = [name for name, on in (("FFT conv", args.conv == "fft"), ("compiled cell", args.compile),
                                    ("bf16 autocast", args.amp)) if on]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {' + '.join(levers) or 'plain fp32'} path; "
          f"median of {args.repeats} steps after {args.warmup} warm-up steps, plus each batch's share of "
          f"rendering {train.RENDER_CHUNK} images", flush=True)
    if args.profile:
        return profile(args, device)
    render_ms = cuda_ms(lambda: data.pathfinder(train.RENDER_CHUNK, 14, device=device, seed=1), 1, 3)
    rows = []
    for cfg in args.configs:
        algo, T, batch = cfg.split(":")
        T, batch = int(T), int(batch)
        ips, peak, terms, err = bench(algo, T, batch, args, device, render_ms)
        paper = PAPER.get((algo, T, batch))
        rows.append((f"{algo} T={T}", batch, ips, peak, terms, err, ips / paper[0] if paper else None))
        print(f"  {cfg}: {ips:.1f} img/s", flush=True)
        torch.cuda.empty_cache()
    print(f"\n{'config':<14}{'batch':>6}{'img/s':>9}{'peak GiB':>10}{'Neumann':>9}{'grad err':>10}{'x paper':>9}")
    for name, b, ips, peak, terms, err, ratio in rows:
        print(f"{name:<14}{b:>6}{ips:>9.1f}{peak:>10.2f}{'-' if terms is None else terms:>9}{err:>10.1e}"
              f"{'-' if ratio is None else f'{ratio:.2f}':>9}")


if __name__ == "__main__":
    main()
