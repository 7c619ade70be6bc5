"""Tests of panoptic.py, data.panoptic and train_panoptic.py: RoIAlign against a per-sample transcription of
the bilinear kernel, PQ against hand-worked cases, the fusion rules, the renderer's invariants, the heads, and
the entry point (train_panoptic.py)."""
import json
import math
import os

import pytest
import torch

import crbp
import data
import panoptic as P
import train_panoptic as TP

# ----------------------------------------------------------------------------------------------------------
# RoIAlign


def bilinear(f, y, x):
    """torchvision roi_align_common.h bilinear_interpolate for one sample of f (C, H, W), written out."""
    H, W = f.shape[1:]
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return f[:, 0, 0] * 0
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= H - 1:
        y_low = y_high = H - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= W - 1:
        x_low = x_high = W - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return (hy * hx * f[:, y_low, x_low] + hy * lx * f[:, y_low, x_high] + ly * hx * f[:, y_high, x_low]
            + ly * lx * f[:, y_high, x_high])


def roi_align_reference(feat, rois, ph, pw, scale, ratio, aligned):
    """The C++ kernel's loops, one RoI, bin and sample at a time."""
    out = []
    for r in rois.tolist():
        b, x1, y1, x2, y2 = int(r[0]), *r[1:]
        o = 0.5 if aligned else 0.0
        sx, sy, ex, ey = x1 * scale - o, y1 * scale - o, x2 * scale - o, y2 * scale - o
        rw, rh = ex - sx, ey - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph, rw / pw
        gh = ratio if ratio > 0 else math.ceil(rh / ph)
        gw = ratio if ratio > 0 else math.ceil(rw / pw)
        bins = []
        for i in range(ph):
            for j in range(pw):
                acc = feat[b][:, 0, 0] * 0
                for iy in range(gh):
                    y = sy + i * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        x = sx + j * bw + (ix + 0.5) * bw / gw
                        acc = acc + bilinear(feat[b], y, x)
                bins.append(acc / max(gh * gw, 1))
        out.append(torch.stack(bins, 1).view(-1, ph, pw))
    return torch.stack(out)


ROIS = torch.tensor([[0, 1.2, 0.7, 6.3, 5.1],      # inside
                     [1, -2.5, 3.0, 4.0, 9.5],     # partly outside (left, bottom)
                     [0, 5.0, -1.7, 11.9, 2.2],    # partly outside (top, right)
                     [1, 3.3, 2.2, 3.6, 2.4],      # smaller than a pixel
                     [0, 0.0, 0.0, 8.0, 6.0],
                     [1, 4.0, 2.5, 4.0, 2.5]], dtype=torch.float64)  # empty


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [1, 2, 3, 0])
def test_roi_align_matches_kernel_transcription_forward_and_backward(aligned, ratio):
    torch.manual_seed(0)
    feat = torch.randn(2, 3, 7, 9, dtype=torch.float64, requires_grad=True)
    scale = 0.9
    out = P.roi_align(feat, ROIS, (3, 4), scale, ratio, aligned)
    ref = roi_align_reference(feat, ROIS, 3, 4, scale, ratio, aligned)
    assert out.shape == (6, 3, 3, 4)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    g = torch.randn_like(out)
    (ga,) = torch.autograd.grad(out, feat, g)
    (gr,) = torch.autograd.grad(ref, feat, g)
    assert ga.abs().sum() > 0
    assert torch.allclose(ga, gr, atol=1e-12, rtol=0)


def test_roi_align_matches_torchvision():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(1)
    feat = torch.randn(2, 3, 7, 9, dtype=torch.float64, requires_grad=True)
    for aligned in (False, True):
        for ratio in (1, 2, 3, 0, -1):
            ours = P.roi_align(feat, ROIS, (3, 4), 0.9, ratio, aligned)
            theirs = tv.ops.roi_align(feat, ROIS, (3, 4), 0.9, ratio, aligned)
            assert torch.allclose(ours, theirs, atol=1e-12)
            g = torch.randn_like(ours)
            assert torch.allclose(torch.autograd.grad(ours, feat, g)[0], torch.autograd.grad(theirs, feat, g)[0],
                                  atol=1e-12)


def test_mask_targets_conventions_and_loss():
    masks = torch.zeros(2, 16, 16)
    masks[0, 4:12, 2:10] = 1
    masks[1, 0:8, 8:16] = 1
    boxes = torch.tensor([[2.0, 4.0, 10.0, 12.0], [6.0, 0.0, 16.0, 8.0]])
    d2 = P.mask_targets(masks, boxes, 8, "detectron2")
    tv = P.mask_targets(masks, boxes, 8, "torchvision")
    assert set(d2.unique().tolist()) <= {0.0, 1.0} and d2[0].min() == 1  # the box is exactly the mask
    assert torch.allclose(d2[1][:, :2], torch.zeros(8, 2)) and d2[1][:, 2:].min() == 1  # 2 of 10 columns empty
    assert ((tv > 0) & (tv < 1)).any()  # torchvision's targets are soft (aligned=False blurs the edges)
    ref = roi_align_reference(masks[:, None].double(), torch.cat([torch.arange(2.0)[:, None], boxes], 1).double(),
                              8, 8, 1.0, 0, False)[:, 0]
    assert torch.allclose(tv.double(), ref, atol=1e-6)
    logits = torch.zeros(2, 2, 8, 8, requires_grad=True)
    loss = P.mask_loss(logits, torch.tensor([0, 1]), d2)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    empty = P.mask_loss(logits[:0], torch.zeros(0, dtype=torch.long), d2[:0])
    empty.backward()
    assert empty.item() == 0 and logits.grad is not None  # a zero that keeps the graph


def test_bad_inputs_raise_value_errors():
    feat = torch.zeros(1, 2, 5, 5)
    with pytest.raises(ValueError, match="x2 >= x1"):
        P.roi_align(feat, torch.tensor([[0, 3.0, 0, 1.0, 2]]), 2)
    with pytest.raises(ValueError, match="one mask"):
        P.mask_targets(torch.zeros(3, 5, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="kind"):
        P.MaskHead("conv5")
    with pytest.raises(ValueError, match="algo"):
        P.MaskHead("hgru", algo="tbptt")
    with pytest.raises(ValueError, match="multiple of 8"):
        data.panoptic(1, size=100)
    with pytest.raises(ValueError, match="multiples of 8"):
        P.PanopticModel("conv4", 8, 8).features(torch.zeros(1, 3, 36, 40))
    with pytest.raises(ValueError, match="RoI features"):
        P.MaskHead("hgru", channels=8, steps=2)(torch.zeros(2, 4, 6, 6))
    with pytest.raises(SystemExit):
        TP.main(["--head", "conv9"])


# ----------------------------------------------------------------------------------------------------------
# PQ (panopticapi semantics), hand-worked


def stats_of(gt, gc, pred, pc, crowd=None, categories=4):
    row = lambda v: torch.tensor(v)[None]
    return P.pq_stats(row(gt), torch.tensor(gc), row(pred), torch.tensor(pc), categories,
                      None if crowd is None else torch.tensor(crowd))


def expect(cases):
    out = torch.zeros(4, 4, dtype=torch.float64)
    for c, v in cases.items():
        out[c] = torch.tensor(v, dtype=torch.float64)
    return out


def test_pq_iou_exactly_half_is_not_a_match():
    # segment 1: |g & p| = 2, |p| = 2, |g| = 4: IoU = 2 / 4 = 0.5, not > 0.5; segment 2: IoU 3 / 4
    s = stats_of([1, 1, 1, 1, 2, 2, 2, 2], [-1, 0, 0], [1, 1, 0, 0, 2, 2, 2, 0], [-1, 0, 0])
    assert torch.allclose(s, expect({0: [1, 1, 1, 0.75]}))
    assert math.isclose(P.pq_summary(s)["pq"], 100 * 0.75 / 2)


def test_pq_void_in_prediction_and_ground_truth():
    # g1 has 6 px; p1 covers 4 of them, 4 GT-void px, and the other 2 px of g1 are predicted void:
    # union = |p| + |g| - |g & p| - |p & GT void| = 8 + 6 - 4 - 4 = 6, IoU 4 / 6. p2 lies in GT void: no FP.
    s = stats_of([1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [-1, 0], [1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 2, 2], [-1, 0, 1])
    assert torch.allclose(s, expect({0: [1, 0, 0, 4 / 6]}))
    # 3 of g1 and 3 void px: IoU = 3 / (6 + 6 - 3 - 3) = 0.5, no match; p1 is exactly half void (not > 0.5): FP
    s = stats_of([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], [-1, 0], [1, 1, 1, 0, 0, 0, 1, 1, 1, 0], [-1, 0])
    assert torch.allclose(s, expect({0: [0, 1, 1, 0]}))
    # one more void px: IoU = 3 / (7 + 6 - 3 - 4) = 0.5, no match; p1 is 4/7 void: ignored, not an FP
    s = stats_of([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], [-1, 0], [1, 1, 1, 0, 0, 0, 1, 1, 1, 1], [-1, 0])
    assert torch.allclose(s, expect({0: [0, 0, 1, 0]}))


def test_pq_crowd():
    # g2 is a crowd of category 1: never matched, never FN; p2 (category 1) lies in it: no FP. p3 (category
    # 0) overlaps it too but it is not of its category: FP. g3 (category 1) is missed: FN.
    s = stats_of([1, 1, 1, 1, 2, 2, 2, 2, 3, 3], [-1, 0, 1, 1], [1, 1, 1, 1, 2, 2, 2, 3, 3, 3], [-1, 0, 1, 0],
                 crowd=[False, False, True, False])
    assert torch.allclose(s, expect({0: [1, 1, 0, 1.0], 1: [0, 0, 1, 0]}))


def test_pq_stuff_class_in_two_segments_and_empty_categories():
    # GT stuff category 2 in two segments (ids 3, 4); one prediction covers all of 3 and half of 4:
    # IoU with 3 = 4 / 6 (TP), with 4 = 2 / 8 (4 is FN); p6 of category 3 is an FP
    s = stats_of([3, 3, 3, 3, 4, 4, 4, 4], [-1, -1, -1, 2, 2], [5, 5, 5, 5, 5, 5, 6, 6], [-1] * 5 + [2, 3])
    assert torch.allclose(s, expect({2: [1, 0, 1, 4 / 6], 3: [0, 1, 0, 0]}))
    summary = P.pq_summary(s)
    # categories 0 and 1 have no TP + FP + FN: left out, so PQ_th is empty (nan) and PQ = PQ_st
    assert math.isnan(summary["pq_th"])
    assert math.isclose(summary["pq_st"], 100 * ((4 / 6) / 1.5 + 0) / 2)
    assert math.isclose(summary["pq"], summary["pq_st"]) and math.isclose(summary["sq_st"], 100 * (4 / 6) / 2)


def panopticapi_reference(gt, gt_cats, gt_crowd, pred, pred_cats, categories):
    """panopticapi's pq_compute_single_core for one image, transcribed loop by loop (dicts, no tensors)."""
    stat = [[0, 0, 0, 0.0] for _ in range(categories)]  # tp, fp, fn, iou
    gt_segms = {i: {"category_id": gt_cats[i], "iscrowd": gt_crowd[i], "area": gt.count(i)}
                for i in set(gt) if i != 0}
    pred_segms = {i: {"category_id": pred_cats[i], "area": pred.count(i)} for i in set(pred) if i != 0}
    gt_pred_map = {}
    for g, p in zip(gt, pred):
        gt_pred_map[(g, p)] = gt_pred_map.get((g, p), 0) + 1
    gt_matched, pred_matched = set(), set()
    for (g, p), inter in gt_pred_map.items():
        if g not in gt_segms or p not in pred_segms or gt_segms[g]["iscrowd"]:
            continue
        if gt_segms[g]["category_id"] != pred_segms[p]["category_id"]:
            continue
        union = pred_segms[p]["area"] + gt_segms[g]["area"] - inter - gt_pred_map.get((0, p), 0)
        if inter / union > 0.5:
            stat[gt_segms[g]["category_id"]][0] += 1
            stat[gt_segms[g]["category_id"]][3] += inter / union
            gt_matched.add(g)
            pred_matched.add(p)
    crowd_labels = {}
    for g, info in sorted(gt_segms.items()):
        if g in gt_matched:
            continue
        if info["iscrowd"]:
            crowd_labels[info["category_id"]] = g
            continue
        stat[info["category_id"]][2] += 1
    for p, info in pred_segms.items():
        if p in pred_matched:
            continue
        inter = gt_pred_map.get((0, p), 0)
        if info["category_id"] in crowd_labels:
            inter += gt_pred_map.get((crowd_labels[info["category_id"]], p), 0)
        if inter / info["area"] > 0.5:
            continue
        stat[info["category_id"]][1] += 1
    return torch.tensor(stat, dtype=torch.float64)


def test_pq_matches_a_transcription_of_panopticapi_on_random_maps():
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        G, Pn, C = 6, 7, 3
        # blocky random maps so that segments overlap in many ways, with void, crowd and shared categories
        gt = torch.randint(0, G, (4, 5), generator=g).repeat_interleave(3, 0).repeat_interleave(3, 1)
        pred = gt.clone()
        flip = torch.rand(gt.shape, generator=g) < 0.35
        pred[flip] = torch.randint(0, Pn, (int(flip.sum()),), generator=g)
        gc = torch.randint(0, C, (G,), generator=g)
        pc = torch.randint(0, C, (Pn,), generator=g)
        pc[:G] = torch.where(torch.rand(G, generator=g) < 0.8, gc, pc[:G])
        crowd = torch.rand(G, generator=g) < 0.2
        ours = P.pq_stats(gt, gc, pred, pc, C, crowd)
        ref = panopticapi_reference(gt.flatten().tolist(), gc.tolist(), crowd.tolist(), pred.flatten().tolist(),
                                    pc.tolist(), C)
        assert torch.allclose(ours, ref, atol=1e-12), trial


def test_pq_sums_over_a_batch_and_rejects_bad_ids():
    gt = torch.tensor([[[1, 1, 2, 2]], [[1, 0, 2, 2]]])
    pred = torch.tensor([[[1, 1, 2, 0]], [[1, 1, 0, 2]]])
    cats = torch.tensor([[-1, 0, 2], [-1, 1, 3]])
    total = P.pq_stats(gt, cats, pred, cats, 4)
    parts = sum(P.pq_stats(gt[i], cats[i], pred[i], cats[i], 4) for i in range(2))
    assert torch.equal(total, parts) and total[:, 0].sum() == 2  # g1 twice; both g2 sit at IoU 0.5
    with pytest.raises(ValueError, match="segment ids"):
        P.pq_stats(gt, cats, pred + 5, cats, 4)


# ----------------------------------------------------------------------------------------------------------
# Panoptic FPN fusion


def test_fusion_rules():
    H = W = 10
    masks = torch.zeros(1, 4, H, W, dtype=torch.bool)
    masks[0, 0, :, 0:4] = True  # A, score 0.9: 40 px
    masks[0, 1, :, 2:6] = True  # B, score 0.8: half of it under A -> kept, takes its free 20 px
    masks[0, 2, :, 1:4] = True  # C, score 0.7: all of it under A -> skipped (overlap > 0.5)
    masks[0, 3, :, 8:10] = True  # D, score 0.4: below 0.5 -> fusion stops there
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.4]])
    labels = torch.tensor([[0, 1, 0, 1]])
    semantic = torch.zeros(1, H, W, dtype=torch.long)
    semantic[0, :, 6:8] = 1  # 20 free px of stuff 1: kept at stuff_area 20
    semantic[0, :, 8:10] = 2  # 20 free px of stuff 2: dropped at stuff_area 21 -> void
    pan, cats = P.panoptic_fusion(masks, scores, labels, semantic, stuff_area=20)
    assert (pan[0, :, 0:4] == 1).all() and (pan[0, :, 4:6] == 2).all() and (pan[0, :, 6:8] == 4 + 1).all()
    assert (pan[0, :, 8:10] == 4 + 2).all()
    assert cats[0].tolist() == [-1, 0, 1, -1, -1, 2, 3]
    pan, cats = P.panoptic_fusion(masks, scores, labels, semantic, stuff_area=21)
    assert (pan[0, :, 6:8] == 0).all() and (pan[0, :, 8:10] == 0).all() and cats[0, 5:].tolist() == [-1, -1]
    # overlap exactly 0.5 is kept (the rule is > 0.5); the score order decides, not the slot order
    masks2 = masks[:, :2].clone()
    pan, _ = P.panoptic_fusion(masks2, torch.tensor([[0.6, 0.95]]), labels[:, :2], torch.zeros(1, H, W).long())
    assert (pan[0, :, 2:6] == 2).all() and (pan[0, :, 0:2] == 1).all()  # B first, then A's free half
    # semantic label 0 (things) never becomes a stuff segment; an empty mask is skipped
    none = torch.zeros(1, 1, H, W, dtype=torch.bool)
    pan, cats = P.panoptic_fusion(none, torch.ones(1, 1), torch.zeros(1, 1).long(), torch.zeros(1, H, W).long())
    assert (pan == 0).all() and (cats == -1).all()


# ----------------------------------------------------------------------------------------------------------
# The synthetic task


def test_renderer_invariants():
    a = data.panoptic(4, 64, seed=3)
    masks, boxes, valid = a["masks"], a["boxes"], a["valid"]
    assert masks.sum(1).max() <= 1  # visible masks are disjoint
    assert valid.any()
    for b, n in valid.nonzero().tolist():
        ys, xs = masks[b, n].nonzero(as_tuple=True)
        assert boxes[b, n].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # tight
        assert masks[b, n].sum() >= 16
    assert not masks[~valid].any()
    # panoptic GT: instance ids where masks are, void where a thing is too small, stuff elsewhere
    for n in range(masks.shape[1]):
        assert ((a["pan"] == n + 1) == masks[:, n]).all()
    assert ((a["semantic"] == data.IGNORE) == (a["pan"] == 0)).all()
    assert ((a["semantic"] == 0) == masks.any(1)).all()
    b = data.panoptic(4, 64, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic
    train = torch.cat([data.panoptic(4, 64, seed=s)["image"] for s in range(3)])
    test = torch.cat([data.panoptic(4, 64, seed=s, split="test")["image"] for s in range(3)])
    assert torch.cdist(train.flatten(1), test.flatten(1)).min() > 1  # disjoint splits
    assert not torch.equal(data.panoptic(4, 64, seed=4)["image"], a["image"])


def test_centred_curves_pass_through_their_box_centres():
    """centred=True: each curve is point-symmetric about its midpoint, so a whole (unoccluded, uncut) curve's
    box is centred on the curve; the default curves start anywhere and their boxes are not."""
    dist = {}
    for centred in (True, False):
        a = data.panoptic(32, 128, curves=1, blobs=0, length=60.0, seed=5, centred=centred)
        far = []
        for b in range(32):
            m, (x1, y1, x2, y2) = a["masks"][b, 0], a["boxes"][b, 0].tolist()
            if x1 > 0 and y1 > 0 and x2 < 128 and y2 < 128:  # not cut by the image border
                ys, xs = m.nonzero(as_tuple=True)
                far.append(((xs + 0.5 - (x1 + x2) / 2) ** 2 + (ys + 0.5 - (y1 + y2) / 2) ** 2).sqrt().min().item())
        dist[centred] = torch.tensor(far)
    assert len(dist[True]) >= 16 and dist[True].max() <= 1.5
    assert dist[False].max() > 5  # (a nearly straight curve passes near its centre too)


# ----------------------------------------------------------------------------------------------------------
# Heads


def test_parameter_counts():
    conv4 = P.MaskHead("conv4", 80, 256)
    hgru = P.MaskHead("hgru", 80, 256, steps=20)
    assert sum(p.numel() for p in conv4.convs.parameters()) == 2_360_320
    assert sum(p.numel() for p in hgru.cell.parameters()) == 1_576_256
    # the paper's delta: conv stack - (hGRU + its SyncBN), both heads share deconv and predictor
    total = lambda m: sum(p.numel() for p in m.parameters())
    assert total(conv4) - total(hgru) == 2_360_320 - 1_576_256


@pytest.mark.parametrize("kind,algo", [("conv4", "bptt"), ("hgru", "bptt"), ("hgru", "c-rbp")])
def test_head_forward_backward(kind, algo):
    torch.manual_seed(0)
    head = P.MaskHead(kind, 2, 8, steps=3, algo=algo, neumann_steps=4).double()
    x = torch.randn(5, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    logits = head(x)
    assert logits.shape == (5, 2, 12, 12)
    loss = P.mask_loss(logits, torch.tensor([0, 1, 0, 1, 1]), torch.rand(5, 12, 12).round().double())
    (loss + head.penalty).backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    if algo == "c-rbp":
        assert head.lcp > 0 and head.stats.neumann_terms is not None
        # the sum-LCP equals crbp.lcp(reduction="sum") at the last transition, weighted by xi
        with torch.no_grad():
            h = torch.zeros_like(x)
            for _ in range(2):
                h = head.cell(h, x)
        h = h.requires_grad_()
        ref = crbp.lcp(head.cell(h, x), h, head.tau, reduction="sum")
        assert torch.allclose(head.lcp, ref, rtol=1e-9) and torch.allclose(head.penalty, 1e-3 * ref)
        # the LCP alone trains the cell (its double backward reaches the parameters)
        head.zero_grad()
        head(x)
        head.penalty.backward()
        assert head.cell.w_inh.grad.abs().sum() > 0
    else:
        assert head.lcp == 0


@pytest.mark.parametrize("kind", ["conv4", "hgru"])
def test_per_step_readout_equals_running_t_steps(kind):
    torch.manual_seed(0)
    head = P.MaskHead(kind, 2, 8, steps=4, algo="c-rbp" if kind == "hgru" else "bptt").double().eval()
    x = torch.randn(3, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        final, per = head(x, steps=6, per_step=True)
        assert len(per) == 6 and torch.equal(per[-1], final)
        for t in range(1, 7):
            assert torch.allclose(per[t - 1], head(x, steps=t), atol=1e-12, rtol=0)
    if kind == "hgru":
        assert not torch.allclose(per[0], per[-1])  # the readout does change with t


def test_empty_roi_list_gives_zero_loss_with_graph():
    head = P.MaskHead("hgru", 2, 8, steps=3, algo="c-rbp")
    logits = head(torch.zeros(0, 8, 6, 6))
    loss = P.mask_loss(logits, torch.zeros(0, dtype=torch.long), torch.zeros(0, 12, 12)) + head.penalty
    loss.backward()
    assert loss.item() == 0 and logits.shape == (0, 2, 12, 12)


# ----------------------------------------------------------------------------------------------------------
# Model and entry point


def test_model_loss_and_prediction():
    torch.manual_seed(0)
    model = P.PanopticModel("hgru", 8, 8, steps=3, algo="c-rbp", neumann_steps=3)
    batch = data.panoptic(2, 64, seed=0)
    losses, stats = TP.training_loss(model, batch, torch.Generator().manual_seed(0))
    sum(losses.values()).backward()
    assert set(losses) == {"loss_sem", "loss_mask", "loss_lcp"} and losses["loss_lcp"] > 0
    assert model.c2[0][0].weight.grad.abs().sum() > 0  # the mask loss reaches the backbone through the head
    model.eval()
    preds = TP.predict(model, batch, 5, per_step=True)
    assert len(preds) == 5
    pan, cats = preds[-1]
    assert pan.shape == (2, 64, 64) and cats.shape == (2, batch["masks"].shape[1] + 3)


def test_dry_run_writes_a_run_directory_and_resumes(tmp_path):
    out = str(tmp_path / "run")
    TP.main(["--dry-run", "--out", out, "--until-minutes", "1e-9"])  # stops after one step
    assert {"config.json", "metrics.jsonl", "checkpoint.pt"} <= set(os.listdir(out))
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["iteration"] == 1
    assert TP.parse_args(["--resume", out, "--eval-steps", "40"]).eval_steps == 40  # the parser's default, given
    with pytest.raises(SystemExit):
        TP.parse_args(["--resume", out, "--lr", "0.5"])  # what the run trains stays the run's
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:  # a row logged after the checkpoint, then killed
        f.write(json.dumps({"iter": 2, "loss_mask": -1.0}) + "\n")
    final = TP.main(["--resume", out])
    assert set(final) >= {"pq", "pq_th", "pq_st", "sq_th"}
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert all(r.get("loss_mask") != -1.0 for r in rows)  # the resume dropped it
    assert len(rows[-1]["per_step_pq"]) == 4
    assert {"learning_curve.svg", "per_step.svg", "predictions.png"} <= set(os.listdir(out))
    png = str(tmp_path / "sheet.png")
    TP.main(["--show", png, "--size", "64"])
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_into_torchvision_adapter_on_a_stand_in_roi_heads():
    class RoIHeads(torch.nn.Module):  # torchvision's contract: mask_head, mask_predictor, returns (result, losses)
        def __init__(self):
            super().__init__()
            self.mask_head, self.mask_predictor = torch.nn.Identity(), torch.nn.Identity()

        def forward(self, x):
            return [], {"loss_mask": self.mask_predictor(self.mask_head(x)).sum() * 0}

    model = torch.nn.Module()
    model.roi_heads = RoIHeads()
    first, second = P.MaskHead("hgru", 3, 8, steps=3), P.MaskHead("hgru", 3, 8, steps=3)
    P.into_torchvision(model, first)
    P.into_torchvision(model, second)  # swapping heads again keeps one hook, reading the new head
    _, losses = model.roi_heads(torch.randn(2, 8, 6, 6))
    assert losses["loss_lcp"] is second.penalty and losses["loss_lcp"] > 0
    assert len(model.roi_heads._forward_hooks) == 1
    model.eval()
    assert "loss_lcp" not in model.roi_heads(torch.randn(2, 8, 6, 6))[1]
    with pytest.raises(ValueError, match="MaskRCNN"):
        P.into_torchvision(torch.nn.Linear(2, 2), first)


def test_into_torchvision():
    pytest.importorskip("torchvision")
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128)
    head = P.MaskHead("hgru", 3, 256, steps=3, algo="c-rbp", neumann_steps=2)
    P.into_torchvision(model, head)
    batch = data.panoptic(2, 128, seed=0)
    targets = [{"boxes": batch["boxes"][i][batch["valid"][i]], "labels": batch["labels"][i][batch["valid"][i]] + 1,
                "masks": batch["masks"][i][batch["valid"][i]].to(torch.uint8)} for i in range(2)]
    model.train()
    opt = torch.optim.SGD(head.parameters(), lr=0.01)
    before = head.cell.w_exc.detach().clone()
    losses = model(list(batch["image"]), targets)
    assert "loss_lcp" in losses and losses["loss_lcp"] > 0
    sum(losses.values()).backward()
    opt.step()
    assert not torch.equal(before, head.cell.w_exc)
    model.eval()
    with torch.no_grad():
        out = model(list(batch["image"]))
    assert "masks" in out[0]


def test_experiment_dry_run_writes_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr(TP, "EXPERIMENT", [("conv4", "bptt", 1), ("hgru", "c-rbp", 5)])
    out = str(tmp_path / "exp")
    lines = TP.main(["--experiment", "--dry-run", "--seeds", "0", "--out", out])
    assert len(lines) == 4 and lines[2].startswith("| conv4") and lines[3].startswith("| hgru | c-rbp | 5")
    assert lines[2].endswith("| 1 |")  # one seed so far
    assert os.path.isfile(os.path.join(out, "table.md")) and os.path.isfile(os.path.join(out, "per_step.svg"))
    assert not any(f == "checkpoint.pt" for _, _, files in os.walk(out) for f in files)  # finished: metrics only
    assert TP.main(["--experiment", "--dry-run", "--seeds", "0", "--out", out]) == lines  # not trained again
    both = TP.main(["--experiment", "--dry-run", "--seeds", "1", "--out", out])  # as a second process would
    assert all(line.endswith("| 2 |") for line in both[2:])  # the table counts every seed present


def test_memory_profile_runs(tmp_path):
    args = TP.parse_args(["--memory", "--device", "cpu", "--channels", "8", "--out", str(tmp_path)])
    out = TP.memory_profile(args, rois=4)
    assert len(out) == 10 and all(v["ms"] > 0 for v in out.values())
    assert os.path.isfile(tmp_path / "memory.json") and os.path.isfile(tmp_path / "memory.svg")
