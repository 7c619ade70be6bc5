"""Training throughput of the paper's Pathfinder hGRU under each algorithm, on one GPU: `make bench`.

One training step = render a batch (data.py, on the GPU) + forward + focal loss + LCP + backward + Adam.
The paper config: 150 x 150 PF-14 seg, 25 channels, 15 x 15 kernels, 15 Neumann terms, mu 0.9. Each row
is the median of --repeats timed steps after --warmup steps (torch.cuda.synchronize around each step),
with the peak memory of those steps, the Neumann terms used, and the relative error of the fast path's
gradient against the plain float32 path on the same batch (0 when the row is the plain path).
The last column is the ratio to the paper code's throughput on one H100 80GB (PyTorch 2.11, same config).

    python bench.py                   # the plain float32 path, every config of the anchor table
    python bench.py --fast            # bf16 autocast + channels-last + compiled no-grad steps
    python bench.py --configs c-rbp:20:32 bptt:6:32 --repeats 10
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


def step_fn(model, opt, args, algo, T, batch, device):
    """One training step on batch `i`; returns the crbp stats."""
    def step(i):
        images, target = data.pathfinder(batch, length=14, task="seg", device=device, seed=i)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp):
            if args.compile:
                images = images.contiguous(memory_format=torch.channels_last)
            out = model(images, steps=T, algo=algo, neumann_steps=args.neumann_steps, mu=0.9,
                        **({"no_grad_cell": model.compiled_cell} if args.compile else {}))
        loss = train.focal_loss(out.logits, target.long()) + (10 * out.penalty if algo.startswith("c-") else 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return out.stats
    return step


def make_fast(model):
    """Channels-last weights, and a compiled cell for the T - 1 steps without grad (crbp's no_grad_cell)."""
    model.to(memory_format=torch.channels_last)
    object.__setattr__(model, "compiled_cell", torch.compile(model.cell))  # not a submodule: same state_dict


def grad_error(algo, T, batch, device, args):
    """Relative error of the fast path's parameter gradient against the float32 path, same weights and batch."""
    torch.manual_seed(0)
    ref, fast = models.build("hgru").to(device), models.build("hgru").to(device)
    fast.load_state_dict(ref.state_dict())
    if args.compile:
        make_fast(fast)
    images, target = data.pathfinder(batch, length=14, task="seg", device=device, seed=12345)
    grads = []
    for m, on in ((ref, False), (fast, True)):
        c = on and args.compile
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on and args.amp):
            out = m(images.contiguous(memory_format=torch.channels_last) if c else images, steps=T, algo=algo,
                    **({"no_grad_cell": m.compiled_cell} if c else {}))
        loss = train.focal_loss(out.logits, target.long()) + (10 * out.penalty if algo.startswith("c-") else 0)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(m.parameters()))]))
    return ((grads[1] - grads[0]).norm() / grads[0].norm()).item()


def bench(algo, T, batch, args, device):
    torch.manual_seed(0)
    model = models.build("hgru").to(device)
    if args.compile:
        make_fast(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = step_fn(model, opt, args, algo, T, batch, device)
    for i in range(args.warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, terms = [], []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        stats = step(args.warmup + i)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        terms.append(stats.neumann_terms)
    ips = batch / statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    err = grad_error(algo, T, min(batch, 32), device, args) if args.fast else 0.0
    del model, opt
    used = [t for t in terms if t is not None]
    return ips, peak, (statistics.median(used) if used else None), err


def profile(args, device, batch=32, T=20):
    """Where one C-RBP training step's time goes: each phase timed alone (synchronize, median of 5), then
    the top CUDA kernels of a whole step from torch.profiler."""
    torch.manual_seed(0)
    model = models.build("hgru").to(device)
    if args.compile:
        make_fast(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    extra = {"no_grad_cell": model.compiled_cell} if args.compile else {}
    images, target = data.pathfinder(batch, length=14, task="seg", device=device, seed=0)

    def timed(fn, n=5):
        fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            out.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(out)

    def forward(steps, algo, grad):
        with torch.set_grad_enabled(grad), torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp):
            return model(images, steps=steps, algo=algo, **extra)

    def train_step(algo="c-rbp", K=15):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp):
            out = model(images, steps=T, algo=algo, neumann_steps=K, **extra)
        loss = train.focal_loss(out.logits, target.long()) + 10 * out.penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rows = [("render a batch (data.pathfinder)", timed(lambda: data.pathfinder(batch, 14, device=device, seed=1))),
            ("one step, no grad", timed(lambda: forward(1, "bptt", False))),
            (f"forward, {T} steps, no grad", timed(lambda: forward(T, "bptt", False))),
            (f"forward c-rbp (T-1 no-grad + taped step + LCP)", timed(lambda: forward(T, "c-rbp", True))),
            ("training step c-rbp, K=0 (no Neumann terms)", timed(lambda: train_step(K=0))),
            ("training step c-rbp, K=15", timed(lambda: train_step()))]
    print(f"\nC-RBP T={T}, batch {batch}: time per phase (ms)")
    for name, ms in rows:
        print(f"  {name:<50}{ms:9.2f}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        train_step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=[f"{a}:{T}:{b}" for a, T, b in PAPER],
                   help="algo:T:batch, e.g. c-rbp:20:32")
    p.add_argument("--fast", action="store_true", help="all of --amp --compile")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (the Neumann sum accumulates in fp32)")
    p.add_argument("--compile", action="store_true", help="channels-last, and torch.compile for the no-grad steps")
    p.add_argument("--neumann-steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, cuDNN autotuning)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps; the median is reported")
    p.add_argument("--profile", action="store_true", help="time each phase of a C-RBP step and list the top kernels")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.py measures GPU throughput: run it on a machine with a CUDA GPU")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    levers = [name for name, on in (("bf16 autocast", args.amp),
                                    ("channels-last + compiled no-grad steps", args.compile)) if on]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {' + '.join(levers) or 'plain fp32'} "
          f"path, median of {args.repeats} steps after {args.warmup} warm-up steps, data rendering included")
    args.amp, args.compile = args.amp or args.fast, args.compile or args.fast
    args.fast = args.amp or args.compile  # any lever on: report the error against the plain fp32 path
    if args.profile:
        return profile(args, device)
    rows = []
    for cfg in args.configs:
        algo, T, batch = cfg.split(":")
        T, batch = int(T), int(batch)
        ips, peak, terms, err = bench(algo, T, batch, args, device)
        paper = PAPER.get((algo, T, batch))
        rows.append((f"{algo} T={T}", batch, ips, peak, terms, err, ips / paper[0] if paper else None))
        torch.cuda.empty_cache()
    print(f"\n{'config':<14}{'batch':>6}{'img/s':>9}{'peak GiB':>10}{'Neumann':>9}{'grad err':>10}{'x paper':>9}")
    for name, b, ips, peak, terms, err, ratio in rows:
        print(f"{name:<14}{b:>6}{ips:>9.1f}{peak:>10.2f}{'-' if terms is None else terms:>9}{err:>10.1e}"
              f"{'-' if ratio is None else f'{ratio:.2f}':>9}")


if __name__ == "__main__":
    main()
