"""Tests of data.py and pathfinder.py: properties of the generated tasks (not pixels), on the CPU with small batches.
References: specs/pathfinder_spec.md (§ numbers), specs/mazes_locrnn_spec.md §1."""
import math
import struct
import zlib
from collections import deque

import pytest
import torch

import figures
import torch.nn.functional as F

import data
import pathfinder as pf


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The generators run long chains of small ops; on a busy 2-core machine OpenMP's threads spin against
    other processes and make them ~50x slower, so this module runs single-threaded (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def components(mask):
    """Number of 8-connected components of a bool (H, W) mask: min-label propagation with max-pool."""
    h, w = mask.shape
    big = float(h * w + 1)
    lab = torch.where(mask, torch.arange(h * w, dtype=torch.float32).view(h, w), big)
    while True:
        new = torch.where(mask, -F.max_pool2d(-lab[None, None], 3, 1, 1)[0, 0], big)
        if torch.equal(new, lab):
            return len(torch.unique(lab[mask]))
        lab = new


def seg_geometry(batch, length, seed, task="seg", faithful=False, size=150):
    """The geometry and the rendering of pathfinder(batch, length, task, size, seed=seed), taken apart."""
    gen, _ = data._generator(None, seed, "train")
    g = pf._geometry(batch, length, task, None, 300, faithful, gen, 10_000)
    img, mask = pf._render(g, 300, size)
    return g, img, mask


def to150(p):  # a 300-px canvas coordinate -> the pixel that holds it at 150 px (align_corners=False)
    return ((p + 0.5) / 2 - 0.5).round().long().clamp(0, 149)


def pt_seg(p, a, b):
    """Exact distance from points p to segments [a, b] (broadcasting, last dim (y, x)), in float64."""
    p, a, b = p.double(), a.double(), b.double()
    t = (((p - a) * (b - a)).sum(-1) / ((b - a) ** 2).sum(-1).clamp_min(1e-12)).clamp(0, 1)
    return (p - a - t[..., None] * (b - a)).norm(dim=-1)


def seg_dist(p, segs):  # distance of a point p (2,) to the nearest of segments (K, 2, 2)
    return pt_seg(p, segs[:, 0], segs[:, 1]).min()


def seg_seg(s, r):
    """Distance between every segment of s (..., K, 2, 2) and of r (..., M, 2, 2): (..., K, M). For segments
    that do not cross it is attained at an end point; crossing paddles (~5 px) have one within 2.6 px."""
    s, r = s[..., :, None, :, :], r[..., None, :, :, :]
    return torch.stack([pt_seg(s[..., e, :], r[..., 0, :], r[..., 1, :]) for e in (0, 1)]
                       + [pt_seg(r[..., e, :], s[..., 0, :], s[..., 1, :]) for e in (0, 1)]).amin(0)


@pytest.fixture(scope="module")
def pf14():
    return seg_geometry(12, 14, seed=1)


def test_public_call_matches_its_parts(pf14):
    g, img, mask = pf14
    img2, mask2 = data.pathfinder(12, 14, seed=1)
    assert torch.equal(img, img2) and torch.equal(mask, mask2)
    assert img2.shape == (12, 1, 150, 150) and img2.dtype == torch.float32 and mask2.dtype == torch.bool
    assert 0 <= img2.min() and img2.max() <= 1 and torch.equal((img2 * 255).round(), img2 * 255)


def test_seg_target_is_the_marked_snake_and_its_dot(pf14):
    g, img, mask = pf14
    N = 14
    for b in range(len(img)):
        m = mask[b]
        # the snake is dashed (gaps of 2m = 6 px at 300, 3 px at 150): after closing the gaps with a 5x5
        # dilation it is one 8-connected component
        closed = F.max_pool2d(m[None, None].float(), 5, 1, 2)[0, 0] > 0
        assert components(closed) == 1
        assert components(m) > 1                                      # ... and it is dashed
        # it contains the dot on the marked snake's origin (a seed tail, §4)
        y, x = to150(g["tail"][b, g["o"][b]] - 0.25)
        assert m[y, x]
        # it lies on bright pixels of the image
        assert (img[b, 0][m] > 0.1).float().mean() > 0.98 and img[b, 0][m].mean() > 0.5
        # the other target snake is not in it: none of its paddle centres is a target pixel
        other = g["seg"][b, :2 * N].view(N, 2, 2, 2)[:, 1 - g["o"][b]].mean(1)     # (N, 2)
        yy, xx = to150(other).unbind(-1)
        assert not m[yy, xx].any()
        # and every paddle of the marked snake is
        own = g["seg"][b, :2 * N].view(N, 2, 2, 2)[:, g["o"][b]].mean(1)
        yy, xx = to150(own).unbind(-1)
        assert F.max_pool2d(m[None, None].float(), 3, 1, 1)[0, 0][yy, xx].all()


def test_seg_area_grows_with_length(pf14):
    _, _, m14 = pf14
    _, m25 = data.pathfinder(12, 25, seed=2)
    ratio = m25.float().sum() / m14.float().sum()
    # 25 vs 14 paddles of ~11 px plus one dot of ~79 px (at 300 px): (25*11+79)/(14*11+79) = 1.52
    assert 1.35 < ratio < 1.7, ratio


def test_cls_labels_balanced_and_markers_on_the_right_snakes():
    N, B = 6, 300
    g, img, label = seg_geometry(B, N, seed=3, task="cls", size=300)
    label = g["label"]
    assert label.dtype == torch.int64 and set(label.tolist()) == {0, 1}
    assert abs(label.float().mean() - 0.5) < 0.1
    segs = g["seg"][:, :2 * N].view(B, N, 2, 2, 2)
    for b in range(B):
        o = g["o"][b]
        marked, other = segs[b, :, o], segs[b, :, 1 - o]              # (N, 2, 2) paddles of each target
        m0, m1 = g["markers"][b]
        # the markers are drawn (peak 1.0, §1.2) where the geometry says
        for m in (m0, m1):
            assert img[b, 0, int(m[0]), int(m[1])] == 1
        # the marked snake is one chain: consecutive paddle centres one period L + 2m apart (plus up to
        # 3 px from the ceil rounding of head, pivot and step)
        assert ((marked[1:].mean(1) - marked[:-1].mean(1)).norm(dim=-1) < pf.L + 2 * pf.MARGIN + 3).all()
        # marker 0 sits on the marked snake's origin; marker 1 on its far end (label 1), or on the other
        # target's far end (label 0), which the fixed generator keeps clear of the marked snake
        assert seg_dist(m0, marked) < 0.5
        if label[b] == 1:
            assert seg_dist(m1, marked) < 0.5
        else:
            assert seg_dist(m1, other) < 0.5 and seg_dist(m1, marked) > pf.D_HIT - 1


def test_fingerprints_of_the_spec():
    """§6: bright-pixel fraction, marker distances, turning angles, paddle period, seed box; §8: restarts."""
    N, B = 14, 48
    g, img, _ = seg_geometry(B, N, seed=4, task="cls", size=300)
    bright = (img > 0.5).float().mean().item()
    assert 0.006 < bright < 0.011, bright                            # reference 0.81 % (v2019, N = 14)
    d = (g["markers"][:, 0] - g["markers"][:, 1]).norm(dim=-1)
    pos, neg = d[g["label"] == 1], d[g["label"] == 0]
    assert 110 < pos.mean() < 145 and 110 < neg.mean() < 150          # reference 129 ± 11 vs 131 ± 30
    assert neg.std() > pos.std()                                      # negatives spread wider (the sd offset)
    segs = g["seg"][:, :2 * N].view(B, N, 2, 2, 2)
    ang = g["ang"][:, :2 * N].view(B, N, 2)
    turn = ((ang[:, 1:] - ang[:, :-1] + math.pi) % (2 * math.pi) - math.pi).abs()
    assert turn.max() < math.pi / (2 * pf.CONT) + 1e-5             # max turn 90°/c = 50°
    assert 12 < math.degrees(turn.mean()) < 18                       # free-space mean 0.467/c rad = 15°
    period = (segs[:, 1:].mean(-2) - segs[:, :-1].mean(-2)).norm(dim=-1)
    assert 10 < period.median() < 11.5                               # L + 2m = 11 px
    tail = g["tail"]
    assert ((tail[:, 0] >= 2 * pf.SD) & (tail[:, 0] < 300 - 2 * pf.SD)).all()   # §2.2 box [54, 246)
    assert ((tail[:, 1] - tail[:, 0]).norm(dim=-1) - pf.SD).abs().max() < 1       # §2.3
    # whole-pair restarts: the original needed 4.2 attempts per image at N = 14 (§8)
    gen = torch.Generator().manual_seed(0)
    p = len(pf._pairs(torch.zeros(800, dtype=torch.long), N, 300, True, gen)["row"]) / 800
    assert 3.0 < 1 / p < 6.0, 1 / p


def test_known_bugs_fixed_by_default_and_kept_when_faithful():
    N, B = 14, 48
    def closest(g):  # per image: target 0 vs target 1, and snake 0's last paddle vs any distractor
        s = g["seg"][:, :2 * N].view(B, N, 2, 2, 2)
        cross = seg_seg(s[:, :, 0], s[:, :, 1]).flatten(1).amin(1)
        last = seg_seg(s[:, -1:, 0], g["seg"][:, 2 * N:])[:, 0].masked_fill(~g["ok"][:, 2 * N:], math.inf).amin(1)
        return cross, last
    # the generator tests distances between points 1.7 px apart on the centre lines: exact to ~0.1 px
    cross, last = closest(seg_geometry(B, N, seed=5)[0])
    assert (cross >= pf.D_HIT - 0.1).all() and (last >= pf.D_HIT - 0.1).all()
    cross, last = closest(seg_geometry(B, N, seed=5, faithful=True)[0])
    assert (cross < pf.D_HIT - 0.5).any()                           # §9.3: the targets may touch


def test_mazes_solution_is_the_bfs_path():
    for grid, side in ((9, 24), (11, 28), (13, 32)):
        img, mask = data.mazes(6, grid, seed=grid)
        assert img.shape == (6, 3, side, side) and mask.shape == (6, side, side) and mask.dtype == torch.bool
        c = (grid + 1) // 2
        for b in range(6):
            x, m = img[b], mask[b]
            colours = {tuple(v) for v in x.permute(1, 2, 0).reshape(-1, 3).tolist()}
            assert colours == {(0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)}
            assert x[:, :3].sum() == 0 and x[:, -3:].sum() == 0       # 3-px black border
            # read the lattice back (one pixel per 2x2 block) and solve it by breadth-first search
            lat = x[:, 1:-1:2, 1:-1:2]                                # (3, 2c+1, 2c+1)
            free = lat.sum(0) > 0
            assert free.sum() == 2 * c * c - 1                        # cells + the n-1 passages of a tree
            start = tuple((lat[1] * (lat[0] == 0)).nonzero()[0].tolist())
            goal = tuple((lat[0] * (lat[1] == 0)).nonzero()[0].tolist())
            prev, todo = {start: None}, deque([start])
            while todo:
                p = todo.popleft()
                for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    q = (p[0] + dy, p[1] + dx)
                    if 0 <= q[0] < 2 * c + 1 and 0 <= q[1] < 2 * c + 1 and free[q] and q not in prev:
                        prev[q] = p
                        todo.append(q)
            assert len(prev) == 2 * c * c - 1                         # every free unit reachable
            path = torch.zeros_like(free)
            p = goal
            while p is not None:
                path[p] = True
                p = prev[p]
            want = F.pad(path.repeat_interleave(2, 0).repeat_interleave(2, 1), (1, 1, 1, 1))
            assert torch.equal(m, want)
            assert (x.sum(0)[m] > 0).all()                            # only free pixels


def test_mazes_canvas_places_the_same_maze():
    img, mask = data.mazes(4, 9, seed=7)
    big, bigm = data.mazes(4, 9, seed=7, canvas=32)
    assert big.shape == (4, 3, 32, 32) and bigm.shape == (4, 32, 32)
    for b in range(4):
        y, x = (big[b].sum(0) > 0).nonzero().min(0).values.tolist()
        assert torch.equal(big[b, :, y - 3:y + 21, x - 3:x + 21], img[b])
        assert torch.equal(bigm[b, y - 3:y + 21, x - 3:x + 21], mask[b]) and bigm[b].sum() == mask[b].sum()


def test_determinism_and_disjoint_splits():
    a, _ = data.pathfinder(4, 6, seed=11)
    b, _ = data.pathfinder(4, 6, seed=11)
    c, _ = data.pathfinder(4, 6, seed=12)
    d, _ = data.pathfinder(4, 6, seed=11, split="test")
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    ma, _ = data.mazes(4, 9, seed=3)
    assert torch.equal(ma, data.mazes(4, 9, seed=3)[0])
    assert not torch.equal(ma, data.mazes(4, 9, seed=3, split="test")[0])
    train = {data._generator(None, s, "train")[0].initial_seed() for s in range(1000)}
    test = {data._generator(None, s, "test")[0].initial_seed() for s in range(1000)}
    assert len(train) == len(test) == 1000 and not train & test


@pytest.mark.parametrize("call", [
    lambda: data.pathfinder(0), lambda: data.pathfinder(2.0), lambda: data.pathfinder(True),
    lambda: data.pathfinder(2, length=1), lambda: data.pathfinder(2, task="detect"),
    lambda: data.pathfinder(2, size=32), lambda: data.pathfinder(2, canvas=100),
    lambda: data.pathfinder(2, distractors=-1), lambda: data.pathfinder(2, faithful=1),
    lambda: data.pathfinder(2, split="val"), lambda: data.pathfinder(2, seed=-1),
    lambda: data.pathfinder(2, max_tries=0), lambda: data.mazes(0), lambda: data.mazes(2, grid=10),
    lambda: data.mazes(2, grid=1), lambda: data.mazes(2, grid=9, canvas=20),
    lambda: figures.write_png("/tmp/x.png", torch.zeros(4, 4, 3)),
])
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_unknown_keyword_is_an_error():
    with pytest.raises(TypeError):
        data.pathfinder(2, lenght=14)


def test_bounded_retries():
    # 60-paddle snakes on the smallest canvas essentially never fit: after max_tries it must stop
    with pytest.raises(RuntimeError, match="attempts"):
        data.pathfinder(2, length=60, canvas=pf.MIN_CANVAS, size=pf.MIN_CANVAS, max_tries=3)

def test_restart_rounds(monkeypatch):
    # one attempt per image and round: images that fail get more rounds, and the result stays seeded
    monkeypatch.setattr(pf, "_lanes_per_row", lambda N, B, cuda: 1)
    a, _ = data.pathfinder(3, length=18, distractors=0, seed=1)
    b, _ = data.pathfinder(3, length=18, distractors=0, seed=1)
    assert torch.equal(a, b) and (a.flatten(1) > 0.5).sum(1).min() > 100


def test_write_png_round_trip(tmp_path):
    rgb = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8)
    path = tmp_path / "x.png"
    figures.write_png(path, rgb)
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    w, h, depth, kind = struct.unpack(">IIBB", raw[16:26])
    assert (w, h, depth, kind) == (7, 5, 8, 2)
    n = struct.unpack(">I", raw[33:37])[0]
    assert raw[37:41] == b"IDAT"
    rows = zlib.decompress(raw[41:41 + n])
    assert torch.equal(torch.tensor(list(rows)).view(5, 22)[:, 1:].view(5, 7, 3).byte(), rgb)


def test_show_writes_png_sheets(tmp_path):
    for kind, kw in (("pathfinder", dict(length=6)), ("pathfinder", dict(length=6, task="cls")), ("mazes", {})):
        out = data.show(kind, tmp_path / f"{kind}.png", n=4, **kw)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():  # the first CUDA call compiles the growth steps (torch.compile): ~20 s
    img, mask = data.pathfinder(16, 14, device="cuda", seed=1)
    assert img.is_cuda and img.shape == (16, 1, 150, 150) and mask.shape == (16, 150, 150)
    assert torch.equal(img, data.pathfinder(16, 14, device="cuda", seed=1)[0])
    assert 0.003 < (img > 0.5).float().mean() < 0.015
    img, lab = data.pathfinder(16, 9, task="cls", device="cuda")
    assert lab.is_cuda and lab.shape == (16,)
    img, mask = data.mazes(16, 11, device="cuda")
    assert img.is_cuda and img.shape == (16, 3, 28, 28) and mask.sum() > 0


def test_task_batch_cuts_batches_from_seeded_chunks_and_replays_any_of_them():
    kw = dict(split="test", seed=3, grid=9, canvas=24, chunk=8)  # 4 batches of 2 per chunk
    stream = [data.task_batch("mazes", i, 2, **kw) for i in range(6)]
    whole, masks = data.mazes(8, grid=9, canvas=24, seed=3 * 1_000_003 + 1, split="test")  # the second chunk
    assert torch.equal(stream[5][0], whole[2:4]) and torch.equal(stream[5][1], masks[2:4].long())
    again = data.task_batch("mazes", 1, 2, **kw)  # back to the first chunk: the same images again
    assert torch.equal(again[0], stream[1][0]) and torch.equal(again[2], stream[1][0].amax(1) > 0)
    img, lab, free = data.task_batch("pathfinder-cls", 0, 2, length=6, size=75)
    assert img.shape == (2, 1, 75, 75) and lab.dtype == torch.long and free is None
    with pytest.raises(ValueError, match="task must be one of"):
        data.task_batch("pathfinder", 0, 2)
