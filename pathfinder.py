"""Pathfinder, rendered on the fly with batched torch ops, on the GPU or the CPU (data.py re-exports it).

Pathfinder (Linsley, Kim et al., NeurIPS 2018, hGRU; Kim*, Linsley* et al., ICLR 2020; Pathfinder-SEG of
C-RBP, Linsley et al., NeurIPS 2020): two target "snakes" of N dashed paddles plus short distractor snakes
on a 300-px canvas, shown to the models at 150 px. This re-implements the *distribution* of the 2019
generator (drewlinsley/pathfinder @ ab9c130, snakes2.py). The geometry follows the original step by step
(integer pixel coordinates with its ceil/trunc rounding, the fixed candidate circle, cos²(c·δ) continuity,
3 draws per step, whole-pair restarts, 5 attempts per distractor); only the raster masks are replaced by
distances to paddle centre lines (RHO below) and PIL's Lanczos paddles by an analytic anti-aliased bar.

    images, masks  = pathfinder(batch, length=14, task="seg", device="cuda", seed=step)
    images, labels = pathfinder(batch, length=14, task="cls", ...)

Seeds and splits are data.py's (see its docstring); _generator below draws them, for every task of data.py.

Speed: everything is batched; Python loops run only over growth steps (2(N-1) per round of pair
attempts, Nd per distractor). On CUDA these small steps are bound by kernel launches, so each step is
fused with torch.compile (the first call compiles). The switch is COMPILE here, for Pathfinder and Mazes
both: `import pathfinder; pathfinder.COMPILE = False` (the module, not data.pathfinder the function)
runs eagerly, with identical results. A call then costs nearly the same whatever the batch, so ask for
large batches.
"""
import functools
import math

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------
# Pathfinder parameters: the v2019 wrapper behind the C-RBP SEG data. Pixels of the canvas.
L, T, MARGIN, CONT = 5, 2.0, 3, 1.8      # paddle length, thickness, margin m, continuity c
PAD, SD, RADIUS = 22, 27, 5              # padding frame, seed distance, marker radius
RW = L + math.ceil(T) + MARGIN           # half-side of the window a paddle is rastered in
RATIO = (4 * RW + 1) / (2 * RW + 1)      # that window is drawn 2x supersampled, then shrunk by this ratio
# The original keeps an occupancy image M of paddle "footprints" (the bar grown by m, soft edge). We
# model a footprint as clamp(RHO + 1/2 - d, 0, 1) at distance d from the paddle's centre line. RHO = 3.7
# gives the measured footprint area (80.5 px for L5 T2 m3), 3.9 the measured restart rates (4.2 attempts
# per image at N=14, 56 at N=25); we take 3.8. Every raster test of the original becomes a distance test:
RHO = 3.8
D_HIT = 2 * RHO - 0.8                    # accept iff max(M + footprint) < 1.8
D_SEED = 2 * RHO - 0.3                   # seeds: footprint core (=1, d <= RHO-1/2) must avoid M > 0.3
S_PTS = 4                                # points per centre line (1.7 px apart: distances off by < 0.06 px)
FAR = -1e4                               # where points of paddles that must not count are parked
TRIES, ATTEMPTS, PROPOSALS = 3, 5, 16    # draws per growth step; attempts per distractor; seed proposals
MIN_CANVAS = 4 * SD + 2 * (L + MARGIN)   # snake 0's seed sits 2·sd inside the edge


@functools.lru_cache(maxsize=None)
def _tables(device):
    """All that depends on a direction alone, computed once in float64 like the original's NumPy.
    A direction is an index into `ang`: 0..359 the integer degrees -180..179 (seeds), 360 + j the
    direction psi_j of candidate j (a snake's heading after choosing it), 360 + nc + j the opposite
    direction psi_j + pi (the way that paddle is drawn)."""
    r = L + MARGIN
    # candidate heads trunc(pivot + (L+m)·u(k/(L+m))), de-duplicated; pivots are integers, so this
    # is one fixed table of offsets. u(theta) = (sin, cos) in (row, col): theta = 0 points right.
    offs = sorted({(math.floor(r * math.sin(k / r)), math.floor(r * math.cos(k / r)))
                   for k in range(math.ceil(2 * math.pi * r))})
    psi = [math.atan2(*o) for o in offs]
    ang = [math.radians(d) for d in range(-180, 180)] + psi + [p + math.pi for p in psi]
    u = torch.tensor([(math.sin(a), math.cos(a)) for a in ang], dtype=torch.float64)
    ub = torch.tensor([(math.sin(a + math.pi), math.cos(a + math.pi)) for a in ang], dtype=torch.float64)
    # for each heading, the candidates within the max turn 90°/c and their weights cos²(c·δ)
    cand = []
    for a in ang[:360 + len(psi)]:
        dl = [CONT * abs((p - a + math.pi) % (2 * math.pi) - math.pi) for p in psi]
        cand.append([(j, math.cos(d) ** 2) for j, d in enumerate(dl) if d < math.pi / 2])
    width = max(map(len, cand))
    cand = [c + [(0, 0.0)] * (width - len(c)) for c in cand]
    # a paddle drawn towards a runs from its start to ceil(C + 2L·u) - C on the 2x canvas, / RATIO
    pvec = (torch.ceil(2 * RW + 2 * L * u) - 2 * RW) / RATIO
    t = torch.linspace(0, 1, S_PTS, dtype=torch.float64)[:, None]
    f32 = lambda x: x.to(device=device, dtype=torch.float32)
    return dict(ang=f32(torch.tensor(ang)), off=f32(torch.tensor(offs, dtype=torch.float64)),
                step=f32((L + 2 * MARGIN) * u), lead=f32(L * u), behind=f32((L + MARGIN) * ub), sd=f32(SD * u),
                pvec=f32(pvec), pts=f32(t * pvec[:, None]), nc=len(psi),
                cand=torch.tensor([[j for j, _ in c] for c in cand], device=device),
                cont=f32(torch.tensor([[w for _, w in c] for c in cand], dtype=torch.float64)))


def _near2(p, occ):
    """Squared distance from each point p (n, X, 2) to the nearest point of occ (n, Q >= 1, 2): (n, X)."""
    dy = p[:, :, None, 0] - occ[:, None, :, 0]                       # (n, X, Q)
    dx = p[:, :, None, 1] - occ[:, None, :, 1]
    return torch.addcmul(dy * dy, dx, dx).amin(2)


def _box_tail(a, lo, hi, shape, gen):
    """Uniform integer tails p (shape + (2,)) for directions a (shape[:1]) whose seed-footprint core, placed
    at p + (1, 1) (the seed kernel is off-centre by one pixel in the original), lies strictly inside (lo, hi)."""
    d = _tables(a.device)["pvec"][a]                                  # (n, 2)
    pmin, pmax = torch.floor(lo - 1 - d.clamp(max=0)) + 1, torch.ceil(hi - 1 - d.clamp(min=0)) - 1
    if len(shape) == 2:
        pmin, pmax = pmin[:, None], pmax[:, None]
    u = torch.rand(*shape, 2, generator=gen, device=a.device)
    return pmin + torch.floor(u * (pmax - pmin + 1)), (pmax >= pmin).flatten(1).all(1)


def _grow(tb, pivot, head, occ, u, px: int):
    """One extension step of n snakes at once: the next paddle, drawn among the candidates in reach with
    weights for continuity and free space. pivot (n, 2) and heading head (n,) are the snakes' state;
    occ (n, Q, 2) points on the centre lines of the committed paddles; u (n, 3) uniforms for the 3 draws.
    Returns the new pivot, the new paddle's start (n, 2), direction and heading (n,), its
    centre-line points (n, S, 2) and whether the step succeeded (n,)."""
    n = len(pivot)
    pivot = torch.ceil(pivot + tb["step"][head])                      # m px beyond the last paddle's head
    cand = tb["cand"][head]                                           # (n, W) the candidates in reach
    q = pivot[:, None] + tb["off"][cand]                              # (n, W, 2)
    # w(q) = (1 - D(q)) · cos²(min(c·δ, π/2)), D = M dilated by disk(m): 1 within m of the frame, and a ramp
    # from 1 to 0 between m + RHO -/+ 1/2 px of a committed paddle
    w = tb["cont"][head] * ((q >= PAD + MARGIN) & (q <= px - 1 - PAD - MARGIN)).all(2)
    w = w * (_near2(q, occ).sqrt() - (RHO - 0.5 + MARGIN)).clamp(0, 1)
    cdf = w.cumsum(1)
    alive = cdf[:, -1] >= 1e-4                                        # else a dead end
    # 3 draws from w / Σw by inverse CDF (t < Σw strictly, so a zero-weight candidate is never drawn)
    t = u * cdf[:, -1:] * (1 - 2 ** -20)
    j = cand.gather(1, (cdf[:, None, :] <= t[:, :, None]).sum(2).clamp(max=cand.shape[1] - 1))  # (n, 3)
    start = pivot[:, None] + tb["off"][j]                             # the paddle starts at q and points
    pts = start[:, :, None] + tb["pts"][360 + tb["nc"] + j]           # back to the pivot: (n, 3, S, 2)
    # accept the first draw whose footprint stays off the frame (< 0.8 there) and off committed footprints
    lo, hi = PAD - 1 + RHO - 0.3, px - PAD - RHO + 0.3
    good = ((pts > lo) & (pts < hi)).flatten(2).all(2)
    good = good & (_near2(pts.flatten(1, 2), occ).view(n, TRIES, S_PTS).amin(2) >= D_HIT ** 2)
    k = good.int().argmax(1)
    rows = torch.arange(n, device=pivot.device)
    j = j[rows, k]
    return pivot, start[rows, k], 360 + tb["nc"] + j, 360 + j, pts[rows, k], alive & good.any(1)


COMPILE = True   # on CUDA, fuse the ~50 tiny ops of a growth or maze step (set before the first call)


def _fused(fn, device):
    """fn, torch.compile'd on CUDA (dynamic shapes), where the generators are bound by kernel launches, not
    arithmetic; with an eager fallback if no compiler works. Plain fn on the CPU."""
    if device.type != "cuda" or not COMPILE:
        return fn
    fast, failed = torch.compile(fn, dynamic=True), []

    def call(*args):
        if not failed:
            try:  # contiguous inputs: the strides of views would each trigger a recompilation
                return fast(*[a.contiguous() if torch.is_tensor(a) else a for a in args])
            except Exception as e:  # stay correct, just slower
                print(f"data.py: torch.compile failed ({type(e).__name__}: {e}); running eagerly")
                failed.append(e)
        return fn(*args)
    return call


@functools.lru_cache(maxsize=None)
def _grower(device):
    return _fused(functools.partial(_grow, _tables(device)), device)


def _pairs(row, N, px, faithful, gen):
    """One attempt at the two target snakes per lane, all lanes in lock-step. row (n,) names
    the image each lane works for. Returns the lanes that succeeded (dict of tensors, in lane order):
    start (n, 2N, 2) and direction direc (n, 2N) of each paddle, slot 2i+k = paddle i of snake k; heading
    (n, 2N); tail (n, 2, 2) the two seed tails."""
    n, dev, tb = len(row), row.device, _tables(row.device)
    grow = _grower(dev)
    a = torch.randint(0, 360, (n, 3), generator=gen, device=dev)      # θ0, θ1 and α, integer degrees
    # snake 0's tail is uniform where its footprint core clears an extra frame of width 2·sd
    tail0, ok = _box_tail(a[:, 0], 2 * SD - 1 + RHO - 0.5, px - 2 * SD - RHO + 0.5, (n,), gen)
    # snake 1 starts sd px away in a random direction α, with no occupancy test
    tail = torch.stack((tail0, torch.round(tail0 + tb["sd"][a[:, 2]])), 1)               # (n, 2, 2)
    pivot = torch.ceil(torch.ceil(tail + tb["lead"][a[:, :2]]) + tb["behind"][a[:, :2]])  # m px behind tail
    ok &= ((pivot >= 0) & (pivot < px)).flatten(1).all(1)
    start = torch.cat((tail, tail.new_zeros(n, 2 * N - 2, 2)), 1)
    direc = torch.cat((a[:, :2], a.new_zeros(n, 2 * N - 2)), 1)
    # M as centre-line points of the committed paddles (slot order), after two points far away (so it is
    # never empty, nor of size 1, which torch.compile would specialise on); one more slot is scratch
    occ = tail.new_full((n, 2 + (2 * N + 1) * S_PTS, 2), FAR)
    st = dict(row=row, ok=ok, tail=tail, start=start, direc=direc, occ=occ)
    for k in (0, 1):  # per snake: pivot, heading and its pending paddle's points
        st[f"pv{k}"], st[f"hd{k}"] = pivot[:, k].contiguous(), a[:, k].contiguous()
        st[f"pd{k}"] = tail[:, k, None] + tb["pts"][a[:, k]]
    for i in range(1, N):
        if not len(st["ok"]):
            break
        for k in (0, 1):
            s, c = 2 * i + k, 2 + (2 * i + k - 2) * S_PTS             # this paddle's slot; end of committed M
            # A snake's newest paddle is "pending", not yet in M, so it never blocks its successor.
            # The original also skips the other snake's pending paddle, so the targets may touch:
            # we test it (in the scratch slot) unless faithful=True.
            if not faithful:
                st["occ"][:, c:c + S_PTS] = st[f"pd{1 - k}"]
            u = torch.rand(len(st["ok"]), TRIES, generator=gen, device=dev)
            st[f"pv{k}"], st["start"][:, s], st["direc"][:, s], st[f"hd{k}"], pts, good = grow(
                st[f"pv{k}"], st[f"hd{k}"], st["occ"][:, :c + (0 if faithful else S_PTS)], u, px)
            st["occ"][:, c:c + S_PTS], st[f"pd{k}"] = st[f"pd{k}"], pts     # commit the previous paddle
            st["ok"] &= good
            if k and i % 2 == 0 and 2 * int(st["ok"].sum()) < len(st["ok"]):   # drop dead lanes (a sync)
                keep = st["ok"].nonzero()[:, 0]
                st = {key: v[keep] for key, v in st.items()}
    keep = st["ok"].nonzero()[:, 0]
    st = {key: st[key][keep] for key in ("row", "tail", "start", "direc")}
    st["heading"] = torch.where(st["direc"] >= 360 + tb["nc"], st["direc"] - tb["nc"], st["direc"])
    return st


def _lanes_per_row(N, B, cuda):
    """Pair attempts per image for a round of B images: c/p, with p the success rate of one attempt at
    300 px (log 1/p fitted to this code's rates: 0.4, 1.55, 4.0 at N = 6, 14, 25). On the CPU c = 3 (~95 %
    of the images get placed); on a GPU, where a round's 2(N-1) steps cost kernel launches more than
    arithmetic, c = 2 + ln B, so that usually all B are placed at once."""
    return max(2, math.ceil((2 + math.log(B) if cuda else 3) * math.exp(0.0043 * N * N + 0.06 * N - 0.1)))


def _targets(B, N, px, faithful, gen, max_tries):
    """Whole-pair rejection sampling, bounded: rounds of many attempts per image side by side; the
    first successful lane of each image is kept, which has exactly the distribution of the original's
    "retry until success". An image still unplaced after max_tries attempts raises RuntimeError."""
    dev, cuda = gen.device, gen.device.type == "cuda"
    cap = 1 << (17 if cuda else 14)                                   # lanes per round (memory, CPU time)
    out, tried = None, torch.zeros(B, dtype=torch.long)
    need = torch.arange(B, device=dev)
    while len(need):
        # fewer attempts per image than planned when they exceed the cap: the unplaced go to the next round
        r = max(1, min(_lanes_per_row(N, len(need), cuda), cap // len(need)))
        rows = need[:max(1, cap // r)]
        r = min(r, max_tries - int(tried[rows.cpu()].max()))
        if r <= 0:
            raise RuntimeError(f"pathfinder: no pair of {N}-paddle snakes placed in {max_tries} attempts; "
                               "pass a shorter length, a larger canvas or a larger max_tries")
        tried[rows.cpu()] += r
        st = _pairs(rows.repeat_interleave(r), N, px, faithful, gen)
        m = len(st["row"])
        first = torch.full((B,), m, device=dev).scatter_reduce(0, st["row"], torch.arange(m, device=dev), "amin")
        done = (first < m).nonzero()[:, 0]
        if out is None:
            out = {k: v.new_zeros((B,) + v.shape[1:]) for k, v in st.items()}
        for k, v in st.items():
            out[k][done] = v[first[done]]
        need = need[first[need] == m]
    return out


def _distractors(g, occ, K, Nd, px, gen):
    """Distractors: K short snakes placed one after the other on the shared occupancy occ (B, Q, 2); each gets 5
    attempts (run side by side: the first that succeeds is kept, as in the sequential original) and is
    skipped if all fail. Fills g's distractor slots in place."""
    tb, B, A, dev = _tables(occ.device), len(occ), ATTEMPTS, occ.device
    grow, n, base, ar = _grower(dev), B * A, g["start"].shape[1] - K * Nd, torch.arange(B, device=dev)
    for d in range(K):
        Q = occ.shape[1]
        locc = torch.cat((occ.repeat_interleave(A, 0), occ.new_full((n, max(0, Nd - 2) * S_PTS, 2), FAR)), 1)
        a = torch.randint(0, 360, (n,), generator=gen, device=dev)
        # seed: uniform over pixels whose footprint core clears the frame and M > 0.3; proposals uniform in
        # the frame's box, the first one that clears the paddles is kept (uniform over the free set)
        p, good = _box_tail(a, PAD - 1 + RHO - 0.5, px - PAD - RHO + 0.5, (n, PROPOSALS), gen)
        core = (p + 1)[:, :, None] + tb["pts"][a][:, None]           # (n, U, S, 2)
        free = _near2(core.flatten(1, 2), locc[:, :Q]).view(n, PROPOSALS, S_PTS).amin(2) >= D_SEED ** 2
        tail = p.gather(1, free.int().argmax(1)[:, None, None].expand(-1, -1, 2))[:, 0]
        good &= free.any(1)
        start, direc, head = tail.new_zeros(n, Nd, 2), a.new_zeros(n, Nd), a.new_zeros(n, Nd)
        start[:, 0], direc[:, 0], head[:, 0] = tail, a, a
        pivot, pend = torch.ceil(torch.ceil(tail + tb["lead"][a]) + tb["behind"][a]), tail[:, None] + tb["pts"][a]
        h = a
        for j in range(1, Nd):
            c = Q + (j - 1) * S_PTS                                   # own paddles 0..j-2 are committed
            u = torch.rand(n, TRIES, generator=gen, device=dev)
            pivot, start[:, j], direc[:, j], h, pts, ok = grow(pivot, h, locc[:, :c], u, px)
            head[:, j] = h
            if j < Nd - 1:
                locc[:, c:c + S_PTS], pend = pend, pts               # commit paddle j-1
            good &= ok
        good = good.view(B, A)
        first, placed = good.int().argmax(1), good.any(1)
        sl = slice(base + d * Nd, base + (d + 1) * Nd)
        for key, v in (("start", start), ("direc", direc), ("heading", head)):
            g[key][:, sl] = v.view(B, A, *v.shape[1:])[ar, first]
        g["ok"][:, sl] = placed[:, None]
        pts = g["start"][:, sl, None] + tb["pts"][g["direc"][:, sl]]  # (B, Nd, S, 2)
        occ = torch.cat((occ, torch.where(placed[:, None, None, None], pts, FAR).flatten(1, 2)), 1)


def _geometry(B, N, task, K, px, faithful, gen, max_tries):
    """All paddles and markers of B images: start (B, P, 2), direc (B, P) (direction index), heading (B, P),
    ok (B, P); snake (P,) ids: 0, 1 the targets, 2.. distractors; markers (B, 2, 2) with marker_ok (B, 2);
    o the marked snake; label (cls); tail (B, 2, 2) the targets' origins."""
    dev, tb = gen.device, _tables(gen.device)
    Nd = max(1, N // 3)                                               # distractor length (N//3, as the original)
    K = 30 // Nd if K is None else K
    t = _targets(B, N, px, faithful, gen, max_tries)
    g = {k: torch.cat((t[k], t[k].new_zeros((B, K * Nd) + t[k].shape[2:])), 1) for k in ("start", "direc", "heading")}
    g["ok"] = torch.arange(2 * N + K * Nd, device=dev).expand(B, -1) < 2 * N
    occ = t["start"][:, :, None] + tb["pts"][t["direc"]]             # (B, 2N, S, 2)
    if faithful:  # the original never commits snake 0's last paddle, so distractors may touch it
        occ[:, 2 * N - 2] = FAR
    _distractors(g, torch.cat((occ.new_full((B, 2, 2), FAR), occ.flatten(1, 2)), 1), K, Nd, px, gen)
    g["snake"] = torch.cat((torch.arange(2 * N, device=dev) % 2, 2 + torch.arange(K * Nd, device=dev) // Nd))
    # o picks the snake whose origin (its seed tail) gets a marker; cls adds a second marker on
    # the far end of the same snake (label 1) or of the other one (label 0)
    g["o"] = torch.randint(0, 2, (B,), generator=gen, device=dev)
    g["label"] = torch.randint(0, 2, (B,), generator=gen, device=dev)
    rows = torch.arange(B, device=dev)
    far = torch.where(g["label"] == 1, g["o"], 1 - g["o"])
    g["tail"] = t["tail"]
    g["markers"] = torch.stack((t["tail"][rows, g["o"]], g["start"][rows, 2 * (N - 1) + far]), 1)
    g["marker_ok"] = torch.tensor([True, task == "cls"], device=dev).expand(B, 2)
    g["seg"] = torch.stack((g["start"], g["start"] + tb["pvec"][g["direc"]]), 2)   # (B, P, 2, 2) ends
    g["ang"] = tb["ang"][g["heading"]]
    return g


def _render(g, px, size):
    """Anti-aliased paddles and marker discs on the px canvas, max-composited, 8-bit like the
    saved PNGs, then the consumers' bicubic resize to `size`. The seg target is the marked
    snake plus its dot, binarised at 0.5, resized the same way and thresholded at 0.2, as C-RBP did."""
    seg, B, dev = g["seg"], len(g["seg"]), g["seg"].device
    a, b = seg[:, :, 0], seg[:, :, 1]                                 # (B, P, 2)
    mid, ab = (a + b) / 2, b - a
    ln = ab.norm(dim=-1)
    u = ab / ln.clamp_min(1e-6)[..., None]
    k = torch.arange(-5, 6, device=dev, dtype=torch.float32)          # an 11x11 window holds one paddle
    grid = torch.stack(torch.meshgrid(k, k, indexing="ij"), -1)       # (11, 11, 2)
    pix = mid.round()[:, :, None, None] + grid                        # (B, P, 11, 11, 2)
    rel = pix - mid[:, :, None, None]
    along = (rel * u[:, :, None, None]).sum(-1).abs()
    across = (rel[..., 0] * u[:, :, None, None, 1] - rel[..., 1] * u[:, :, None, None, 0]).abs()
    # a hard bar of width T with a 1-px anti-aliasing ramp; it reaches 1/4 px past its end points (PIL
    # draws the end pixels), which gives the measured integrated intensity of the original's paddles (11.1 for L5 T2)
    v = (T / 2 + 0.5 - across).clamp(0, 1) * (ln[:, :, None, None] / 2 + 0.75 - along).clamp(0, 1)
    v = v * g["ok"][:, :, None, None]
    k2 = torch.arange(-RADIUS - 1, RADIUS + 2, device=dev, dtype=torch.float32)
    grid2 = torch.stack(torch.meshgrid(k2, k2, indexing="ij"), -1)
    m = g["markers"]                                                  # (B, 2, 2)
    pix2 = m[:, :, None, None] + grid2                                # (B, 2, 13, 13, 2)
    # disc of radius r, its centre 1/4 px up-left of the pixel (the original's 2x Lanczos downsample)
    v2 = (RADIUS + 0.5 - (pix2 - (m - 0.25)[:, :, None, None]).norm(dim=-1)).clamp(0, 1)
    v2 = v2 * g["marker_ok"][:, :, None, None]
    tgt = torch.cat((((g["snake"] == g["o"][:, None])[:, :, None, None] * v).flatten(1),
                     (v2 * torch.tensor([1.0, 0.0], device=dev)[:, None, None]).flatten(1)), 1)
    # (the clamp never bites: paddles and markers stay more than the pad of 22 px inside the canvas)
    pix = torch.cat((pix.flatten(1, 3), pix2.flatten(1, 3)), 1).clamp(0, px - 1).long()   # (B, Q, 2)
    idx = (pix[..., 0] * px + pix[..., 1])[:, None].expand(-1, 2, -1)
    val = torch.stack((torch.cat((v.flatten(1), v2.flatten(1)), 1), tgt), 1)          # (B, 2, Q)
    canvas = torch.zeros(B, 2, px * px, device=dev).scatter_reduce_(2, idx, val, "amax").view(B, 2, px, px)
    img, tgt = (canvas[:, :1] * 255).round() / 255, (canvas[:, 1:] > 0.5).float()
    if size != px:
        x = F.interpolate(torch.cat((img, tgt), 1), size=(size, size), mode="bicubic", antialias=True)
        img, tgt = (x[:, :1].clamp(0, 1) * 255).round() / 255, (x[:, 1:] > 0.2).float()
    return img, tgt[:, 0] > 0.5


def _generator(device, seed, split):
    _check(split in ("train", "test"), f"split must be 'train' or 'test', got {split!r}")
    _check(_is_int(seed, 0) and seed < 2 ** 62, f"seed must be an int in [0, 2**62), got {seed!r}")
    dev = torch.device("cpu" if device is None else device)
    return torch.Generator(device=dev).manual_seed(2 * seed + (split == "test")), dev


def _check(cond, msg):
    if not cond:
        raise ValueError(msg)


def _is_int(x, lo):
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo


def pathfinder(batch, length=14, task="seg", size=150, *, distractors=None, canvas=300, faithful=False,
               split="train", seed=0, device=None, max_tries=10_000):
    """A batch of Pathfinder images, generated on `device`.

    batch: images to make. length: paddles per target snake N (>= 2; the papers used 6, 9, 14, 18, 20, 25).
    task: "seg" (C-RBP): one dot on the marked snake's origin, target = mask of that snake plus the dot;
          "cls" (hGRU, LocRNN): two markers, label 1 when both sit on the same snake (about half of each).
    size: output side; the snakes are drawn on a canvas×canvas image (300 as in the papers) and resized
          (bicubic, antialiased) to size, the models' 150 px; size must be >= canvas // 4.
    distractors: number K of distractor snakes of length N//3. Default 30 // (N//3), the v2018 rule
          (7 at N=14, 3 at N=25); the 2019 wrapper as committed used 15 for every N, pass distractors=15 for that.
    faithful: False (default) fixes two bugs of the original: target snakes are tested against each
          other's newest paddle, so they never touch, and snake 0's last paddle is committed, so no
          distractor touches it. True keeps both bugs.
    split, seed: pick the random stream (see the module docstring). max_tries: pair attempts per image
          before RuntimeError (the original retried forever).
    Returns images (B, 1, size, size) float32 in [0, 1] (multiples of 1/255) and, for "seg", masks
    (B, size, size) bool, for "cls", labels (B,) int64.
    """
    _check(_is_int(batch, 1), f"batch must be an int >= 1, got {batch!r}")
    _check(_is_int(length, 2), f"length must be an int >= 2 (paddles per snake), got {length!r}")
    _check(task in ("seg", "cls"), f"task must be 'seg' or 'cls', got {task!r}")
    _check(_is_int(canvas, MIN_CANVAS), f"canvas must be an int >= {MIN_CANVAS} (seeds sit 2*{SD} px inside "
                                        f"the edge), got {canvas!r}")
    _check(_is_int(size, max(1, canvas // 4)), f"size must be an int >= canvas // 4 = {canvas // 4} (below "
                                                f"that 2-px paddles vanish), got {size!r}")
    _check(distractors is None or _is_int(distractors, 0), f"distractors must be None or an int >= 0, got "
                                                           f"{distractors!r}")
    _check(isinstance(faithful, bool), f"faithful must be True or False, got {faithful!r}")
    _check(_is_int(max_tries, 1), f"max_tries must be an int >= 1, got {max_tries!r}")
    gen, dev = _generator(device, seed, split)
    g = _geometry(batch, length, task, distractors, canvas, faithful, gen, max_tries)
    img, mask = _render(g, canvas, size)
    return img, (mask if task == "seg" else g["label"])
