"""The tasks, rendered on the fly with batched torch ops, on the GPU or the CPU: Pathfinder, Mazes, panoptic scenes.

Pathfinder (pathfinder.py, re-exported here as data.pathfinder): two target snakes of dashed paddles among
distractors, the re-implemented 2019 generator of the hGRU and C-RBP papers.

Mazes (Schwarzschild et al., NeurIPS 2021 "easy-to-hard" data, as used by the LocRNN paper): a recursive
backtracker (depth-first) maze on an s×s lattice, rendered 2 px per lattice unit with a 1-px frame
(side 2s+6), target = the 2-px solution path.

Panoptic scenes (the synthetic task of train_panoptic.py, for panoptic.py's mask heads): thin same-colour
curves that cross and occlude, and blobs, over two stripe textures, with their panoptic ground truth;
THINGS, STUFF and IGNORE name its categories and void label.

    images, masks  = pathfinder(batch, length=14, task="seg", device="cuda", seed=step)
    images, labels = pathfinder(batch, length=14, task="cls", ...)
    images, masks  = mazes(batch, grid=11, device="cuda", seed=step)
    scenes         = panoptic(batch, 128, device="cuda", seed=step)   # dict: image, semantic, masks, boxes, pan...

Seeds and splits: every call builds its own torch.Generator on `device` from (seed, split): training uses
the even generator seeds 2·seed, split="test" the odd ones 2·seed+1, so no training call can ever draw a
test image. A held-out test set is (parameters, batch, seeds): e.g. pathfinder(1000, 14, seed=k,
split="test") for k = 0..9. The same arguments on the same device type give the same images; CPU and
CUDA give *different* (equally distributed) images, because their random number generators differ.

Speed: everything is batched; Python loops run only over growth steps and maze moves. On CUDA each step
is fused with torch.compile (the first call compiles; pathfinder.COMPILE = False, in the module
pathfinder.py, runs eagerly, with identical results). A call then costs nearly the same whatever the
batch, so ask for large batches (task_batch renders RENDER_CHUNK images per call on a GPU and cuts
batches from them).

    python data.py --show pathfinder --length 14 --out samples.png   # look at a grid of samples
    python data.py --show mazes --grid 11 --out mazes.png
    python data.py --bench                                           # images/s
"""
import argparse
import functools
import math
import time

import torch
import torch.nn.functional as F

import figures
import pathfinder as pf  # pf.COMPILE: the torch.compile switch, read when a renderer is first called
from pathfinder import _check, _fused, _generator, _is_int, pathfinder


def _dfs_step(nb, parent, stack, cur, sp, r):
    """One move of B depth-first walks: to a uniformly chosen unvisited neighbour (knocking the wall down,
    pushing cur), else back (popping). nb (n, 4) neighbours (n: outside); parent (B, n+1) (-1: unvisited;
    column n is "outside", always visited, and a sink for no-op writes); stack (B, n+1); cur, sp (B,);
    r (B, 4) uniforms."""
    sink = parent.shape[1] - 1
    nbs = nb[cur]                                                     # (B, 4)
    unvis = parent.gather(1, nbs) < 0
    nxt = nbs.gather(1, (r + unvis).argmax(1, keepdim=True))[:, 0]   # uniform over the unvisited ones
    fwd = unvis.any(1)
    parent = parent.scatter(1, torch.where(fwd, nxt, sink)[:, None], cur[:, None])
    stack = stack.scatter(1, torch.where(fwd, sp, sink)[:, None], cur[:, None])
    top = stack.gather(1, (sp - 1).clamp(min=0)[:, None])[:, 0]
    return parent, stack, torch.where(fwd, nxt, top), sp + 2 * fwd.long() - 1


@functools.lru_cache(maxsize=None)
def _walker(device):
    return _fused(_dfs_step, device)


def mazes(batch, grid=11, *, canvas=None, split="train", seed=0, device=None):
    """A batch of easy-to-hard mazes, generated on `device`.

    grid: odd lattice side s >= 3 (9, 11, 13 -> 24, 28, 32 px; side 2s+6); (s+1)/2 cells per side.
    Start and goal are two distinct uniform cells; the maze is a randomized depth-first search (recursive
    backtracker) from the start, rendered as in the current generator (v1, "unique solutions").
    canvas: if given, each maze is placed at a uniformly random offset on a black canvas×canvas image, as
    the LocRNN loader did (it pads 9/11-mazes to 32); the offsets come from the seeded stream, so a test set
    is fixed. Returns images (B, 3, H, W) float32 (walls black, free white, start green, goal red) and
    masks (B, H, W) bool: the 2-px-wide solution path, start and goal included.
    """
    _check(_is_int(batch, 1), f"batch must be an int >= 1, got {batch!r}")
    _check(_is_int(grid, 3) and grid % 2 == 1, f"grid must be an odd int >= 3 (e.g. 9, 11, 13), got {grid!r}")
    side = 2 * grid + 6
    _check(canvas is None or _is_int(canvas, side), f"canvas must be None or an int >= {side}, got {canvas!r}")
    gen, dev = _generator(device, seed, split)
    c = (grid + 1) // 2
    n, S, B = c * c, 2 * c + 1, batch
    cy, cx = torch.arange(n, device=dev) // c, torch.arange(n, device=dev) % c
    lat = (2 * cy + 1) * S + 2 * cx + 1                               # lattice index of each cell
    # 4-neighbours of each cell; n stands for "outside", a sentinel that is always visited
    nb = torch.stack((torch.where(cy > 0, torch.arange(n, device=dev) - c, n),
                      torch.where(cy < c - 1, torch.arange(n, device=dev) + c, n),
                      torch.where(cx > 0, torch.arange(n, device=dev) - 1, n),
                      torch.where(cx < c - 1, torch.arange(n, device=dev) + 1, n)), 1)
    start = torch.randint(0, n, (B,), generator=gen, device=dev)
    goal = (start + 1 + torch.randint(0, n - 1, (B,), generator=gen, device=dev)) % n   # distinct from start
    rows = torch.arange(B, device=dev)
    # parent[x]: the cell x was entered from (-1: not visited yet); column n is "outside", always visited
    parent = torch.full((B, n + 1), -1, dtype=torch.long, device=dev)
    parent[:, n] = n
    parent[rows, start] = start
    stack = torch.zeros(B, n + 1, dtype=torch.long, device=dev)       # column n: sink for no-op writes
    cur, sp = start.clone(), torch.zeros_like(start)
    rand, step = torch.rand(2 * n - 2, B, 4, generator=gen, device=dev), _walker(dev)
    for t in range(2 * n - 2):  # a full depth-first walk of a tree on n cells is 2(n-1) moves
        parent, stack, cur, sp = step(nb, parent, stack, cur, sp, rand[t])
    # free lattice units: every cell, and the passage between each cell and its parent
    parent = parent[:, :n]
    mids = (lat + lat[parent]) // 2                                   # (B, n); the start maps onto itself
    free = torch.zeros(B, S * S, dtype=torch.bool, device=dev)
    free[:, lat] = True
    free.scatter_(1, mids, True)
    # the solution is the tree path goal -> start: mark the ancestors of goal by pointer doubling
    on = (torch.arange(n, device=dev) == goal[:, None]).float()       # (B, n)
    jump = parent
    for _ in range(max(1, math.ceil(math.log2(n)))):
        on = on.scatter_reduce(1, jump, on, "amax")                   # on |= jump(on)
        jump = jump.gather(1, jump)
    on = on > 0
    sol = torch.zeros(B, S * S + 1, dtype=torch.bool, device=dev)     # column S*S: sink
    sol.scatter_(1, torch.where(on, lat, S * S), True)
    sol.scatter_(1, torch.where(on & (parent != torch.arange(n, device=dev)), mids, S * S), True)
    img = free.float()[:, None].repeat(1, 3, 1)                       # (B, 3, S*S)
    img[rows, :, lat[start]] = torch.tensor([0.0, 1, 0], device=dev)  # start green
    img[rows, :, lat[goal]] = torch.tensor([1.0, 0, 0], device=dev)   # goal red
    up = lambda x: F.pad(x.view(B, -1, S, S).repeat_interleave(2, 2).repeat_interleave(2, 3), (1, 1, 1, 1))
    img, mask = up(img), up(sol[:, :-1].float())[:, 0] > 0.5         # 2 px per lattice unit, 1-px frame
    if canvas is not None:
        off = torch.randint(0, canvas - side + 1, (B, 2), generator=gen, device=dev)
        yy = (off[:, 0, None] + torch.arange(side, device=dev))[:, :, None]           # (B, side, 1)
        xx = (off[:, 1, None] + torch.arange(side, device=dev))[:, None, :]           # (B, 1, side)
        big, bigm = img.new_zeros(B, canvas, canvas, 3), mask.new_zeros(B, canvas, canvas)
        big[rows[:, None, None], yy, xx] = img.permute(0, 2, 3, 1)
        bigm[rows[:, None, None], yy, xx] = mask
        img, mask = big.permute(0, 3, 1, 2).contiguous(), bigm
    return img, mask


# ----------------------------------------------------------------------------------------------------------
# Panoptic scenes, train_panoptic.py's task: thin same-colour curves that cross and occlude, and blobs,
# over two textures

THINGS = ("curve", "blob")          # thing categories 0, 1; semantic labels: 0 = things, 1, 2 = stuff
STUFF = ("stripes-h", "stripes-v")  # stuff categories 2, 3 (semantic labels 1, 2); 255 = void
IGNORE = 255


def panoptic(batch, size=128, *, curves=4, blobs=2, length=90.0, stroke=2.5, curvature=0.25, min_area=16,
             centred=False, split="train", seed=0, device=None):
    """B images (B, 3, S, S) in [0, 1] with their panoptic ground truth, rendered with tensor ops.

    Stuff: two classes told apart by texture only (horizontal vs vertical stripes, same colours, noise), in
    regions of a thresholded, bicubically upsampled 4 x 4 Gaussian field. Things: `curves` smooth random
    walks of `length` px and `stroke` px wide (all curves of an image share one colour) and `blobs` rotated
    ellipses (another colour), composited in a random z-order; visible masks in painter's order, boxes from
    the visible masks; instances with fewer than `min_area` visible pixels become void. Sizes scale with
    size / 128. centred=True: each curve is point-symmetric about its midpoint (an S-curve), so its box is
    centred on it: the curve through the box centre is the instance, to be traced out from there.
    Returns a dict: image; semantic (B, S, S) (0 things, 1..2 stuff, 255 void); masks (B, N, S, S) bool;
    labels, valid (B, N); boxes (B, N, 4) [x1, y1, x2, y2) in pixels; pan (B, S, S) ids (0 void, 1..N
    things, N+1.. stuff); pan_cats (B, N + 3).
    """
    if not (isinstance(size, int) and size >= 32 and size % 8 == 0):
        raise ValueError(f"size must be an int >= 32 and a multiple of 8 (the backbone's stride), got {size!r}")
    if not (isinstance(batch, int) and batch >= 1 and curves >= 0 and blobs >= 0 and curves + blobs >= 1):
        raise ValueError(f"pass batch >= 1 and curves + blobs >= 1, got {batch!r}, {curves!r}, {blobs!r}")
    g, dev = _generator(device, seed, split)
    rand = lambda *shape: torch.rand(*shape, generator=g, device=dev)
    B, S, N, k = batch, size, curves + blobs, size / 128
    yy = torch.arange(S, device=dev, dtype=torch.float32) + 0.5  # pixel centres
    # stuff: region from a 4 x 4 field, stripes of period 6 px, shared colours, noise
    field = F.interpolate(torch.randn(B, 1, 4, 4, generator=g, device=dev), size=(S, S), mode="bicubic",
                          align_corners=False)[:, 0]
    stuff = 1 + (field > 0).long()  # (B, S, S) semantic label 1 or 2
    phase = 2 * math.pi * rand(B, 1, 1)
    period = 6 * k
    stripes = torch.where(stuff == 1, torch.sin(2 * math.pi * yy[:, None] / period + phase),
                          torch.sin(2 * math.pi * yy[None, :] / period + phase))
    base = 0.35 + 0.3 * rand(B, 3, 1, 1)
    img = (base + 0.12 * stripes[:, None] + 0.05 * torch.randn(B, 3, S, S, generator=g, device=dev)).clamp(0, 1)
    # curves: n_seg segments of ~4 px, heading turning by N(0, curvature) per segment; distance to the polyline
    n_seg = max(2, round(length / 4))  # the same walk at every size, scaled by k
    head0 = 2 * math.pi * rand(B, curves, 1)
    turns = curvature * torch.randn(B, curves, n_seg, generator=g, device=dev)
    ang = head0 + torch.cumsum(turns, 2)  # (B, c, n_seg)
    step = length * k / n_seg
    start = (0.2 + 0.6 * rand(B, curves, 1, 2)) * S
    walk = torch.cumsum(step * torch.stack([ang.cos(), ang.sin()], -1), 2)  # (B, c, n_seg, 2)
    if centred:  # start is the midpoint: half the walk forwards, and its reflection through start backwards
        half = walk[:, :, : n_seg // 2]
        pts = torch.cat([(start - half).flip(2), start, start + half], 2)  # 2 (n_seg // 2) segments
    else:
        pts = torch.cat([start, start + walk], 2)
    d2 = torch.full((B, curves, S, S), float("inf"), device=dev)
    for j in range(pts.shape[2] - 1):  # separable point-to-segment distance, running min over segments
        a, d = pts[:, :, j], pts[:, :, j + 1] - pts[:, :, j]  # (B, c, 2)
        px, py = yy - a[..., :1], yy - a[..., 1:]  # (B, c, S) x and y offsets
        dx, dy = d[..., 0, None, None], d[..., 1, None, None]  # (B, c, 1, 1)
        qx, qy = px[:, :, None, :], py[:, :, :, None]  # (B, c, 1, S), (B, c, S, 1)
        # the closest point a + t d, t = clamp(<p - a, d> / |d|^2, 0, 1)
        t = ((qx * dx + qy * dy) / (dx.square() + dy.square()).clamp_min(1e-9)).clamp(0, 1)  # (B, c, S, S)
        d2 = torch.minimum(d2, (qx - t * dx).square() + (qy - t * dy).square())
    # coverage = clamp(w / 2 + 0.5 - distance, 0, 1): anti-aliased strokes of width w
    alpha_c = (stroke * k / 2 + 0.5 - d2.sqrt()).clamp(0, 1)
    # blobs: rotated ellipses, semi-axes 5-11 and 3-6 px
    c = (0.15 + 0.7 * rand(B, blobs, 2)) * S
    ax, bx, th = (5 + 6 * rand(B, blobs)) * k, (3 + 3 * rand(B, blobs)) * k, math.pi * rand(B, blobs)
    dx, dy = yy[None, None, None, :] - c[..., 0, None, None], yy[None, None, :, None] - c[..., 1, None, None]
    u = dx * th.cos()[..., None, None] + dy * th.sin()[..., None, None]
    v = -dx * th.sin()[..., None, None] + dy * th.cos()[..., None, None]
    r = (u / ax[..., None, None]).square() + (v / bx[..., None, None]).square()
    alpha_b = ((1 - r.sqrt()) * bx[..., None, None] + 0.5).clamp(0, 1)
    alpha = torch.cat([alpha_c, alpha_b], 1)  # (B, N, S, S)
    labels = torch.cat([torch.zeros(B, curves), torch.ones(B, blobs)], 1).long().to(dev)
    # colours: one per thing class and image, saturated, far from the grey stuff
    hue = rand(B, 1)
    hues = torch.cat([hue, (hue + 0.33 + 0.33 * rand(B, 1)) % 1], 1)  # (B, 2)
    # HSV (h, 1, 1) -> RGB: channel = clamp(|6h + offset mod 6 - 3| - 1, 0, 1)
    rgb = (((6 * hues[..., None] + torch.tensor([0.0, 4.0, 2.0], device=dev)) % 6 - 3).abs() - 1).clamp(0, 1)
    colour = rgb.gather(1, labels[..., None].expand(-1, -1, 3))  # (B, N, 3)
    # painter's order: a random z-order, back to front; a pixel belongs to the front-most cover >= 0.5
    z = torch.argsort(rand(B, N), 1)  # z[b, r] = the instance drawn r-th
    owner = torch.full((B, S, S), -1, dtype=torch.long, device=dev)
    rows = torch.arange(B, device=dev)
    for r_ in range(N):
        i = z[:, r_]
        a = alpha[rows, i][:, None]  # (B, 1, S, S)
        img = img * (1 - a) + colour[rows, i][..., None, None] * a
        owner = torch.where(alpha[rows, i] >= 0.5, i[:, None, None], owner)
    masks = owner[:, None] == torch.arange(N, device=dev)[None, :, None, None]  # (B, N, S, S) disjoint
    area = masks.flatten(2).sum(2)
    valid = area >= min_area
    void = (owner >= 0) & ~valid.gather(1, owner.clamp_min(0).flatten(1)).view(B, S, S)
    masks &= valid[..., None, None]
    # tight boxes [x1, x2) x [y1, y2) of the visible masks
    cols, rws = masks.any(2), masks.any(3)  # (B, N, S)
    ar = torch.arange(S, device=dev)
    x1 = torch.where(cols, ar, S).amin(2); x2 = torch.where(cols, ar + 1, 0).amax(2)
    y1 = torch.where(rws, ar, S).amin(2); y2 = torch.where(rws, ar + 1, 0).amax(2)
    boxes = torch.stack([x1, y1, x2, y2], -1).float() * valid[..., None]
    semantic = torch.where(owner >= 0, torch.where(void, IGNORE, 0), stuff)
    pan = torch.where(owner >= 0, torch.where(void, 0, owner + 1), N + stuff)
    pan_cats = torch.cat([torch.full((B, 1), -1, device=dev), torch.where(valid, labels, -1),
                          torch.tensor([len(THINGS), len(THINGS) + 1], device=dev).expand(B, -1)], 1).long()
    return dict(image=img, semantic=semantic, masks=masks, labels=labels, valid=valid, boxes=boxes, pan=pan,
                pan_cats=pan_cats)


# ----------------------------------------------------------------------------------------------------------
# A task's stream of batches, as train.py trains on it and report.py evaluates on it

TASKS = ("pathfinder-seg", "pathfinder-cls", "mazes")  # the task names of models.py
RENDER_CHUNK = 1024  # images per renderer call on a GPU, where each call has a fixed cost
_chunk = {}  # the chunk rendered last: consecutive batches are cut from it


def task_batch(task, index, batch, *, split="train", seed=0, device=None, length=14, size=150, grid=11,
               canvas=32, distractors=None, chunk=None):
    """Batch number `index` (0, 1, ...) of a task's stream: images, targets (long) and, for mazes, the free
    pixels (B x H x W bool; None otherwise). Batches are cut from chunks of `chunk` images (default
    RENDER_CHUNK on a GPU, one batch on the CPU), each rendered from its own seed (seed * 1_000_003 + chunk
    number), so any batch can be made again: that is how a resumed run replays its data exactly.
    length, size and distractors are Pathfinder's, grid and canvas the mazes'."""
    _check(task in TASKS, f"task must be one of {TASKS}, got {task!r}")
    _check(_is_int(index, 0) and _is_int(batch, 1), f"index must be an int >= 0 and batch one >= 1, got "
                                                    f"{index!r}, {batch!r}")
    device = torch.device("cpu" if device is None else device)
    chunk = chunk or (RENDER_CHUNK if device.type == "cuda" else batch)
    per = max(1, chunk // batch)  # batches per chunk
    n, i = divmod(index, per)
    key = (task, seed, size, canvas, length, grid, distractors, split, n, per * batch, str(device))
    if _chunk.get("key") != key:
        kw = dict(device=device, seed=seed * 1_000_003 + n, split=split)
        if task == "mazes":
            images, targets = mazes(per * batch, grid=grid, canvas=canvas, **kw)
        else:
            images, targets = pathfinder(per * batch, length=length, size=size, task=task[11:], distractors=distractors,
                                         **kw)
        _chunk.update(key=key, images=images, targets=targets.long())
    images, targets = (_chunk[k][i * batch:(i + 1) * batch] for k in ("images", "targets"))
    return images, targets, (images.amax(1) > 0 if task == "mazes" else None)  # mazes: free = not black


def show(kind, out, n=16, device=None, seed=0, **kw):
    """Write a PNG sheet of n samples with their targets overlaid (seg: red; cls: a green border when the
    markers share a snake, red otherwise; mazes: the solution in blue)."""
    if kind == "pathfinder":
        img, tgt = pathfinder(n, device=device, seed=seed, **kw)
        img = img.cpu().expand(-1, 3, -1, -1).clone()
        if tgt.dim() == 3:  # seg: the target in red, the rest grey-white
            t = tgt.cpu()[:, None].float()
            img = torch.cat((torch.maximum(img[:, :1], t), img[:, 1:] * (1 - 0.7 * t)), 1)
        else:
            col = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.9, 0.2]])[tgt.cpu()][:, :, None, None]
            img[..., :2, :], img[..., -2:, :], img[..., :2], img[..., -2:] = col, col, col, col
        sheet = figures.grid(img, cols=4)
    elif kind == "mazes":
        img, tgt = mazes(n, device=device, seed=seed, **kw)
        img, t = img.cpu(), tgt.cpu()[:, None] & (img.cpu().sum(1, keepdim=True) == 3)  # keep start/goal
        img = torch.where(t, torch.tensor([0.25, 0.5, 1.0])[:, None, None], img)
        sheet = figures.grid(img, cols=4, zoom=4)
    else:
        raise ValueError(f"kind must be 'pathfinder' or 'mazes', got {kind!r}")
    figures.write_png(out, sheet)
    return out


def bench(device=None, repeats=5):
    """Print images/s (median of `repeats` timed calls after a warm-up call) for PF-14 and PF-25 seg at
    150 px and 11-mazes (28 px), at a few batch sizes."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    name = torch.cuda.get_device_name(dev) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}, torch.compile {'on' if cuda and pf.COMPILE else 'off'}")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cases = [("PF-14 seg 150px", lambda b, s: pathfinder(b, 14, device=dev, seed=s), (256, 1024) if cuda else (32,)),
             ("PF-25 seg 150px", lambda b, s: pathfinder(b, 25, device=dev, seed=s), (256, 1024) if cuda else (8,)),
             ("mazes 11 (28px)", lambda b, s: mazes(b, 11, device=dev, seed=s), (256, 1024, 4096) if cuda else (256,))]
    for label, fn, batches in cases:
        for b in batches:
            t0 = time.perf_counter(); fn(b, 10_000); sync(); first = time.perf_counter() - t0
            times = []
            for s in range(repeats):
                t0 = time.perf_counter(); fn(b, s); sync(); times.append(time.perf_counter() - t0)
            med = sorted(times)[len(times) // 2]
            print(f"{label}  batch {b:5d}: {b / med:9.0f} images/s  ({1000 * med:7.1f} ms per batch; "
                  f"warm-up call {first:.1f} s)", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--show", choices=("pathfinder", "mazes"), help="write a PNG sheet of samples to --out")
    ap.add_argument("--bench", action="store_true", help="print images/s")
    ap.add_argument("--out", default="samples.png")
    for name, default in (("n", 16), ("length", 14), ("grid", 11), ("seed", 0)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--task", default="seg", choices=("seg", "cls"))
    ap.add_argument("--faithful", action="store_true")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    kw = dict(grid=args.grid) if args.show == "mazes" else dict(length=args.length, task=args.task,
                                                                 faithful=args.faithful)
    if args.show:
        print(show(args.show, args.out, args.n, args.device, args.seed, **kw))
    if args.bench:
        bench(args.device)
    if not (args.show or args.bench):
        ap.print_help()
