"""Panoptic segmentation with a recurrent mask head (hGRU-GN trained by C-RBP), in torch only: the library.

    Linsley et al. "Stable and expressive recurrent vision models." NeurIPS 2020, §4.2 and SI §3.3: the
    4-conv mask head of Panoptic FPN (Kirillov et al. 2019) replaced by one hGRU run to a fixed point.

What is here (specs: shared/specs/panoptic_spec.md; crbp_official_spec.md §5, §6.4):
    MaskHead("conv4" | "hgru", ...)   (K, 256, 14, 14) RoI features -> (K, classes, 28, 28) mask logits;
                                      .penalty (xi * LCP, to add to the loss) and .stats after each forward
    roi_align, mask_targets, mask_loss, paste_masks      RoIAlign and Mask R-CNN's mask plumbing
    panoptic_fusion, pq_stats, pq_summary                Panoptic FPN's fusion rules and panopticapi's PQ
    PanopticModel                                        shallow backbone + FPN + semantic head + mask head
    into_torchvision(maskrcnn, head)                     the head inside a torchvision Mask R-CNN

The synthetic task is data.panoptic (its categories THINGS, STUFF and the void label IGNORE live in data.py);
train_panoptic.py is the program that trains and scores a head on it (python train_panoptic.py --dry-run).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import crbp
import models
from data import STUFF, THINGS

HEADS = ("conv4", "hgru")
HEAD_ALGOS = ("bptt", "c-bptt", "rbp", "c-rbp")
crbp.WRAPPERS.add(__name__)  # crbp's warnings name the line that called the head, not this file

# ----------------------------------------------------------------------------------------------------------
# RoIAlign (a transcription of torchvision's roi_align_common.h into grid_sample), masks, the mask loss


def _check_rois(rois):
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be (K, 5) rows [image index, x1, y1, x2, y2], got {tuple(rois.shape)}")
    if len(rois) and bool(((rois[:, 3] < rois[:, 1]) | (rois[:, 4] < rois[:, 2])).any()):
        raise ValueError("boxes must have x2 >= x1 and y2 >= y1 (pass [x1, y1, x2, y2], not [x, y, w, h])")


def roi_align(input, rois, output_size, spatial_scale=1.0, sampling_ratio=2, aligned=False):
    """torchvision.ops.roi_align in pure torch: input (N, C, H, W), rois (K, 5) -> (K, C, PH, PW).

    sampling_ratio s >= 1 takes s x s samples per bin; s <= 0 is adaptive, ceil(roi size / bins) per RoI.
    One grid_sample per image with its RoIs stacked along the grid's height: features are not copied per RoI.
    """
    PH, PW = (output_size, output_size) if isinstance(output_size, int) else output_size
    _check_rois(rois)
    K, C = len(rois), input.shape[1]
    if K == 0:
        return input.new_zeros(0, C, PH, PW) + 0 * input.sum()
    if sampling_ratio > 0:
        return _roi_align(input, rois, PH, PW, spatial_scale, sampling_ratio, sampling_ratio, aligned)
    # adaptive: s_h = ceil(roi_h / PH), s_w = ceil(roi_w / PW), as in the C++ kernel; one call per (s_h, s_w)
    rw, rh = (rois[:, 3] - rois[:, 1]) * spatial_scale, (rois[:, 4] - rois[:, 2]) * spatial_scale
    if not aligned:
        rw, rh = rw.clamp_min(1), rh.clamp_min(1)
    s = torch.stack([torch.ceil(rh / PH), torch.ceil(rw / PW)], 1).long()  # (K, 2)
    out = input.new_zeros(K, C, PH, PW)  # an empty aligned RoI has no samples: zeros, as the kernel
    for sh, sw in torch.unique(s[(s > 0).all(1)], dim=0).tolist():
        idx = ((s[:, 0] == sh) & (s[:, 1] == sw)).nonzero()[:, 0]
        out = out.index_put((idx,), _roi_align(input, rois[idx], PH, PW, spatial_scale, sh, sw, aligned))
    return out


def _roi_align(input, rois, PH, PW, scale, sh, sw, aligned):
    N, C, H, W = input.shape
    o = 0.5 if aligned else 0.0  # aligned: pixel centres sit at +0.5 (detectron2's ROIAlignV2)
    x1, y1 = rois[:, 1] * scale - o, rois[:, 2] * scale - o
    rw, rh = rois[:, 3] * scale - o - x1, rois[:, 4] * scale - o - y1
    if not aligned:  # the legacy kernel forces RoIs to at least 1x1
        rw, rh = rw.clamp_min(1), rh.clamp_min(1)
    #   x_j = x1 + (j + 0.5) / (PW s) * rw,  j < PW s   (s samples per bin, spread evenly)
    jx = (torch.arange(PW * sw, device=input.device, dtype=input.dtype) + 0.5) / (PW * sw)
    jy = (torch.arange(PH * sh, device=input.device, dtype=input.dtype) + 0.5) / (PH * sh)
    xs, ys = x1[:, None] + jx * rw[:, None], y1[:, None] + jy * rh[:, None]  # (K, PW s), (K, PH s)
    # a sample outside [-1, H] x [-1, W] is 0 but still counts in the bin's mean; inside, clamp to the border
    valid = ((ys >= -1) & (ys <= H))[:, :, None] & ((xs >= -1) & (xs <= W))[:, None, :]  # (K, PH s, PW s)
    gx = 2 * xs.clamp(0, W - 1) / max(W - 1, 1) - 1
    gy = 2 * ys.clamp(0, H - 1) / max(H - 1, 1) - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)  # (K, PH s, PW s, 2)
    b = rois[:, 0].long()
    if N == len(rois) and torch.equal(b, torch.arange(N, device=b.device)):  # one RoI per image (mask targets)
        vals = F.grid_sample(input, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return F.avg_pool2d(vals * valid[:, None], (sh, sw))
    order = torch.argsort(b, stable=True)
    vals, start = [], 0
    for i, n in zip(*(t.tolist() for t in torch.unique_consecutive(b[order], return_counts=True))):
        g = grid[order[start:start + n]].reshape(1, n * PH * sh, PW * sw, 2)  # this image's RoIs, stacked
        v = F.grid_sample(input[i:i + 1], g, mode="bilinear", padding_mode="border", align_corners=True)
        vals.append(v.view(C, n, PH * sh, PW * sw).transpose(0, 1))  # (n, C, PH s, PW s)
        start += n
    vals = torch.cat(vals)[torch.argsort(order)] * valid[:, None]  # back to the RoIs' order
    return F.avg_pool2d(vals, (sh, sw))  # (K, C, PH, PW): the mean of each bin's samples


def mask_targets(masks, boxes, size=28, style="detectron2"):
    """Mask R-CNN targets: masks (K, H, W) of each RoI's matched instance, boxes (K, 4) -> (K, size, size).

    style "detectron2": RoIAlign aligned=True, adaptive sampling, then >= 0.5 (binary targets);
    style "torchvision": aligned=False, adaptive sampling, soft (unthresholded) targets.
    """
    if style not in ("detectron2", "torchvision"):
        raise ValueError(f"style must be 'detectron2' or 'torchvision', got {style!r}")
    if masks.dim() != 3 or boxes.dim() != 2 or boxes.shape[-1] != 4 or len(masks) != len(boxes):
        raise ValueError(f"pass one mask (K, H, W) per box (K, 4): got masks {tuple(masks.shape)} and boxes "
                         f"{tuple(boxes.shape)}")
    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None], boxes], 1)
    t = roi_align(masks[:, None].to(boxes.dtype), rois, size, 1.0, 0, aligned=style == "detectron2")[:, 0]
    return (t >= 0.5).to(t.dtype) if style == "detectron2" else t


def mask_loss(logits, labels, targets):
    """Binary cross-entropy (mean) on each RoI's class channel: logits (K, classes, M, M), labels (K,),
    targets (K, M, M) in [0, 1]. No RoIs: a zero that keeps the graph (as torchvision's maskrcnn_loss)."""
    if len(logits) != len(labels) or len(logits) != len(targets):
        raise ValueError(f"pass one label and one target per RoI: logits {len(logits)}, labels {len(labels)}, "
                         f"targets {len(targets)}")
    if len(logits) == 0:
        return logits.sum() * 0
    picked = logits[torch.arange(len(logits), device=logits.device), labels]  # (K, M, M)
    return F.binary_cross_entropy_with_logits(picked, targets.to(picked.dtype))


def paste_masks(probs, boxes, H, W):
    """Paste (K, M, M) mask probabilities into (K, H, W) images at their boxes (detectron2 _do_paste_mask)."""
    y = (torch.arange(H, device=probs.device, dtype=probs.dtype) + 0.5)
    x = (torch.arange(W, device=probs.device, dtype=probs.dtype) + 0.5)
    x0, y0, x1, y1 = boxes.to(probs.dtype).unbind(1)
    gy = ((y[None] - y0[:, None]) / (y1 - y0).clamp_min(1e-6)[:, None] * 2 - 1)  # (K, H)
    gx = ((x[None] - x0[:, None]) / (x1 - x0).clamp_min(1e-6)[:, None] * 2 - 1)  # (K, W)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)  # (K, H, W, 2)
    return F.grid_sample(probs[:, None], grid, align_corners=False)[:, 0]


# ----------------------------------------------------------------------------------------------------------
# Mask heads: conv4 (Mask R-CNN) or one hGRU run by crbp (C-RBP's RecurrentMaskRCNNConvUpsampleHead)


class MaskHead(nn.Module):
    """(K, channels, 14, 14) RoI features -> (K, classes, 28, 28) mask logits.

    kind "conv4": 4 x [3x3 conv + ReLU]; "hgru": one HGRUGNCell, x = the RoI features, h0 = 0, run for
    `steps` by crbp.run with `algo`. Both end in the same readout: norm, 2x2/2 deconv, ReLU, 1x1 predictor.
    After each forward, .lcp is the LCP (tau, reduction "sum"), .penalty = xi * lcp (add it to the loss),
    .stats the crbp Stats (None for conv4). forward(x, steps=t) runs t steps instead of the trained T.
    """

    def __init__(self, kind="hgru", classes=len(THINGS), channels=256, *, steps=20, algo="c-rbp",
                 neumann_steps=15, tau=0.95, xi=1e-3):
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"kind must be one of {HEADS}, got {kind!r}")
        if algo not in HEAD_ALGOS:
            raise ValueError(f"algo must be one of {HEAD_ALGOS} (the paper: bptt or c-rbp), got {algo!r}")
        if not (isinstance(steps, int) and steps >= (2 if algo.endswith("rbp") and kind == "hgru" else 1)):
            raise ValueError(f"steps must be an int >= 1 (>= 2 for {algo}), got {steps!r}")
        if not (isinstance(channels, int) and channels >= 4 and isinstance(classes, int) and classes >= 1):
            raise ValueError(f"channels must be an int >= 4 and classes >= 1, got {channels!r}, {classes!r}")
        self.kind, self.channels, self.steps, self.algo = kind, channels, steps, algo
        self.neumann_steps, self.tau, self.xi = neumann_steps, tau, xi
        if kind == "conv4":
            self.convs = nn.Sequential(*[m for _ in range(4) for m in (nn.Conv2d(channels, channels, 3, padding=1),
                                                                       nn.ReLU())])
            for m in self.convs[::2]:  # c2_msra_fill
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        else:
            self.cell = models.HGRUGNCell(channels, 3, groups=math.gcd(32, channels), timesteps=steps)
        # readout (SyncBN on one device is BatchNorm), deconv 2x2/2 (c2_msra_fill), ReLU, 1x1 (N(0, 0.001))
        self.readout = nn.Sequential(nn.BatchNorm2d(channels), nn.ConvTranspose2d(channels, channels, 2, 2),
                                     nn.ReLU(), nn.Conv2d(channels, classes, 1))
        nn.init.kaiming_normal_(self.readout[1].weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.readout[1].bias)
        nn.init.normal_(self.readout[3].weight, std=0.001)
        nn.init.zeros_(self.readout[3].bias)
        self.penalty = self.lcp = self.stats = None

    def stack(self, x, steps=None, on_step=None):
        """The part before the readout: (K, C, 14, 14) -> (K, C, 14, 14). Sets .lcp, .penalty, .stats."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"pass RoI features (K, {self.channels}, h, w), got {tuple(x.shape)}")
        T = self.steps if steps is None else steps
        if len(x) == 0 or self.kind == "conv4":
            h = self.convs(x) if self.kind == "conv4" else x * 0
            self.lcp = self.penalty = h.sum() * 0
            self.stats = None
            if on_step is not None:
                for t in range(1, T + 1):  # a feedforward head reads out the same at every t
                    on_step(t, h)
            return h
        h, mean_lcp, self.stats = crbp.run(self.cell, x, self.cell.init_state(x), steps=T, algo=self.algo,
                                           neumann_steps=self.neumann_steps, mu=self.tau, on_step=on_step)
        # LCP = sum_i ((1^T J)_i - tau)_+^2 over all K x C x 14 x 14 elements (crbp returns the mean)
        self.lcp = mean_lcp * h.numel()
        self.penalty = self.xi * self.lcp
        return h

    def forward(self, x, steps=None, per_step=False):
        """Mask logits (K, classes, 2h, 2w); with per_step=True also the list of readouts after t = 1..T."""
        if per_step and self.training:
            raise ValueError("per_step is for evaluation: call .eval() first (in train mode every per-step readout "
                             "would update the BatchNorm running statistics)")
        readouts = []
        on_step = (lambda t, h: readouts.append(self.readout(h))) if per_step else None
        logits = self.readout(self.stack(x, steps, on_step))
        return (logits, readouts) if per_step else logits


# ----------------------------------------------------------------------------------------------------------
# Panoptic FPN fusion and PQ (panopticapi's pq_compute semantics), batched on tensors


def panoptic_fusion(masks, scores, labels, semantic, overlap=0.5, stuff_area=None, score_thresh=0.5):
    """Panoptic FPN's combine_semantic_and_instance_outputs, for a batch of B images with N instance slots.

    masks (B, N, H, W) bool, scores (B, N), labels (B, N) thing categories; semantic (B, H, W) labels
    (0 = things, s >= 1 = stuff category len(THINGS) + s - 1). Returns pan (B, H, W) long segment ids
    (0 = void, 1..N the instances in slot order, N + s the stuff) and cats (B, N + S + 1) their categories
    (-1 where none). stuff_area: default 4096 px scaled from 1024 x 1024 to H x W.
    """
    if masks.dim() != 4 or semantic.shape != masks.shape[:1] + masks.shape[2:] or scores.shape != masks.shape[:2]:
        raise ValueError(f"pass masks (B, N, H, W), scores and labels (B, N), semantic (B, H, W); got "
                         f"{tuple(masks.shape)}, {tuple(scores.shape)}, {tuple(semantic.shape)}")
    B, N, H, W = masks.shape
    S = len(STUFF)
    stuff_area = 4096 * H * W / 1024 ** 2 if stuff_area is None else stuff_area
    pan = torch.zeros(B, H, W, dtype=torch.long, device=masks.device)
    cats = torch.full((B, N + S + 1), -1, dtype=torch.long, device=masks.device)
    order = torch.argsort(-scores.float(), dim=1, stable=True)  # highest score first
    rows = torch.arange(B, device=masks.device)
    live = torch.ones(B, dtype=torch.bool, device=masks.device)
    for r in range(N):
        i = order[:, r]  # (B,) the r-th instance of every image
        m = masks[rows, i].bool()
        live &= scores[rows, i] >= score_thresh  # stop at the first score below the threshold
        area, inter = m.flatten(1).sum(1), (m & (pan > 0)).flatten(1).sum(1)
        # skip empty masks and those mostly covered already: |mask & assigned| / |mask| > overlap
        keep = live & (area > 0) & (inter <= overlap * area)
        take = m & (pan == 0) & keep[:, None, None]  # the kept instance gets the free pixels only
        pan = torch.where(take, i[:, None, None] + 1, pan)
        cats[rows, i + 1] = torch.where(keep, labels[rows, i].long(), cats[rows, i + 1])
    for s in range(1, S + 1):  # each stuff label takes its free pixels, unless they are fewer than stuff_area
        m = (semantic == s) & (pan == 0)
        keep = m.flatten(1).sum(1) >= stuff_area
        pan = torch.where(m & keep[:, None, None], N + s, pan)
        cats[:, N + s] = torch.where(keep, len(THINGS) + s - 1, -1)
    return pan, cats


def pq_stats(gt, gt_cats, pred, pred_cats, categories, gt_crowd=None):
    """Per-category [TP, FP, FN, sum of TP IoUs] (categories, 4) float64, summed over a batch.

    gt, pred (B, H, W) or (H, W) segment ids, 0 = void; gt_cats (B, G), pred_cats (B, P) the category of
    each id (ids must be < G, P); gt_crowd (B, G) bool. A segment exists where it has pixels. Matching as
    panopticapi: same category, GT not crowd, IoU = |g&p| / (|p| + |g| - |g&p| - |p & GT void|) > 0.5.
    """
    if gt.dim() == 2:
        gt, pred, gt_cats, pred_cats = gt[None], pred[None], gt_cats[None], pred_cats[None]
        gt_crowd = None if gt_crowd is None else gt_crowd[None]
    if gt.shape != pred.shape or gt_cats.shape[0] != gt.shape[0] or pred_cats.shape[0] != gt.shape[0]:
        raise ValueError(f"pass gt and pred id maps of one shape with one category row per image; got "
                         f"{tuple(gt.shape)}, {tuple(pred.shape)}, {tuple(gt_cats.shape)}, {tuple(pred_cats.shape)}")
    B, G, P = gt.shape[0], gt_cats.shape[1], pred_cats.shape[1]
    if bool((gt >= G).any() or (pred >= P).any() or (gt < 0).any() or (pred < 0).any()):
        raise ValueError(f"segment ids must lie in [0, {G}) for gt and [0, {P}) for pred")
    crowd = torch.zeros(B, G, dtype=torch.bool, device=gt.device) if gt_crowd is None else gt_crowd.bool()
    # intersections |g & p| of every (gt id, pred id) pair of each image, from one bincount
    key = (torch.arange(B, device=gt.device)[:, None] * G + gt.flatten(1)) * P + pred.flatten(1)
    inter = torch.bincount(key.flatten(), minlength=B * G * P).view(B, G, P).double()
    g_area, p_area = inter.sum(2), inter.sum(1)  # (B, G), (B, P)
    void_p = inter[:, 0]  # (B, P): |p & GT void|
    g_ok = (g_area > 0) & (torch.arange(G, device=gt.device) > 0)  # real GT segments
    p_ok = (p_area > 0) & (torch.arange(P, device=gt.device) > 0)
    gc, pc = gt_cats.long(), pred_cats.long()
    for ok, c, what in ((g_ok, gc, "gt"), (p_ok, pc, "pred")):
        if bool((ok & ((c < 0) | (c >= categories))).any()):
            raise ValueError(f"every {what} segment with pixels needs a category in [0, {categories}) in {what}_cats")
    union = p_area[:, None] + g_area[:, :, None] - inter - void_p[:, None]
    iou = inter / union.clamp_min(1e-12)
    match = ((iou > 0.5) & (gc[:, :, None] == pc[:, None]) & (g_ok & ~crowd)[:, :, None] & p_ok[:, None])
    stats = torch.zeros(categories, 4, dtype=torch.float64, device=gt.device)
    pair_cat = gc[:, :, None].expand(-1, -1, P)[match]
    stats[:, 0].index_add_(0, pair_cat, torch.ones_like(iou[match]))
    stats[:, 3].index_add_(0, pair_cat, iou[match])
    # FN: unmatched non-crowd GT segments
    fn = g_ok & ~crowd & ~match.any(2)
    stats[:, 2].index_add_(0, gc[fn], torch.ones_like(g_area[fn]))
    # FP: unmatched predictions, unless (|p & void| + |p & crowd of its category|) / |p| > 0.5; the crowd
    # region of a category is its last crowd GT segment (panopticapi keeps one per category)
    ids = torch.arange(G, device=gt.device).expand(B, -1)
    crowd_of = torch.full((B, categories), -1, dtype=torch.long, device=gt.device)
    cw = g_ok & crowd
    crowd_of.scatter_reduce_(1, gc.clamp_min(0) * cw, torch.where(cw, ids, -1), "amax")
    cp = crowd_of.gather(1, pc.clamp(0, categories - 1))  # (B, P) crowd id of each prediction's category
    p_crowd = torch.where(cp >= 0, inter.gather(1, cp.clamp_min(0)[:, None])[:, 0], 0.0)
    fp = p_ok & ~match.any(1) & ((void_p + p_crowd) / p_area.clamp_min(1) <= 0.5)
    stats[:, 1].index_add_(0, pc[fp], torch.ones_like(p_area[fp]))
    return stats


def pq_summary(stats, things=range(len(THINGS))):
    """PQ, SQ, RQ (in %) over all categories and the thing / stuff subsets, from summed pq_stats. A
    category with TP + FP + FN = 0 is left out of the averages; an empty average is nan."""
    tp, fp, fn, iou = stats.double().unbind(1)
    den = tp + 0.5 * fp + 0.5 * fn
    present = den > 0
    pq, sq, rq = iou / den.clamp_min(1e-12), iou / tp.clamp_min(1), tp / den.clamp_min(1e-12)
    is_thing = torch.zeros(len(stats), dtype=torch.bool)
    is_thing[list(things)] = True
    out = {}
    for suffix, sel in (("", torch.ones_like(is_thing)), ("_th", is_thing), ("_st", ~is_thing)):
        sel = sel.to(stats.device) & present
        for name, v in (("pq", pq), ("sq", sq), ("rq", rq)):
            out[name + suffix] = 100 * v[sel].mean().item() if sel.any() else float("nan")
    if len(stats) == len(THINGS + STUFF):  # this task's categories one by one
        out.update({f"pq_{name}": 100 * pq[c].item() if present[c] else float("nan")
                    for c, name in enumerate(THINGS + STUFF)})
    return out


# ----------------------------------------------------------------------------------------------------------
# A small Panoptic FPN: shallow backbone (strides 4, 8) + FPN, a semantic head, RoIAlign on P2, a mask head


def _conv(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(math.gcd(32, cout), cout),
                         nn.ReLU())


class PanopticModel(nn.Module):
    """images (B, 3, H, W), H and W multiples of 8 -> semantic logits and, for given boxes, mask logits."""

    def __init__(self, head="conv4", channels=256, width=64, **head_options):
        super().__init__()
        self.c2 = nn.Sequential(_conv(3, width // 2, 2), _conv(width // 2, width, 2), _conv(width, width))  # /4
        self.c3 = nn.Sequential(_conv(width, 2 * width, 2), _conv(2 * width, 2 * width))  # /8
        self.lat2, self.lat3 = nn.Conv2d(width, channels, 1), nn.Conv2d(2 * width, channels, 1)
        self.out2, self.out3 = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 3, padding=1)
        # semantic branch of Panoptic FPN: 3x3 conv + GN + ReLU per level, upsampled to 1/4, summed, 1x1
        sem = max(channels // 2, 8)
        self.sem2, self.sem3 = _conv(channels, sem), _conv(channels, sem)
        self.sem_out = nn.Conv2d(sem, 1 + len(STUFF), 1)
        self.mask_head = MaskHead(head, len(THINGS), channels, **head_options)

    def features(self, images):
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] % 8 or images.shape[3] % 8:
            raise ValueError(f"pass images (B, 3, H, W) with H and W multiples of 8 (pad them), got "
                             f"{tuple(images.shape)}")
        c2 = self.c2(images)
        c3 = self.c3(c2)
        # FPN top-down: P3 = lat(C3); P2 = lat(C2) + up2(P3); then a 3x3 conv on each
        p3 = self.lat3(c3)
        p2 = self.lat2(c2) + F.interpolate(p3, scale_factor=2, mode="nearest")
        p2, p3 = self.out2(p2), self.out3(p3)
        sem = self.sem2(p2) + F.interpolate(self.sem3(p3), scale_factor=2, mode="bilinear", align_corners=False)
        sem = F.interpolate(self.sem_out(sem), scale_factor=4, mode="bilinear", align_corners=False)
        return p2, sem  # (B, C, H/4, W/4), (B, 1 + S, H, W)

    def masks(self, p2, boxes, index, steps=None, per_step=False):
        """Mask logits for boxes (K, 4) in image pixels of images `index` (K,): RoIAlignV2 14 x 14 on P2."""
        rois = torch.cat([index[:, None].to(boxes.dtype), boxes], 1)
        x = roi_align(p2, rois, 14, 0.25, 2, aligned=True)  # (K, C, 14, 14)
        return self.mask_head(x, steps, per_step)



# ----------------------------------------------------------------------------------------------------------
# torchvision drop-in (optional: torchvision is not a dependency)


class _TVMaskHead(nn.Module):
    """torchvision's mask_head slot: (K, 256, 14, 14) -> (K, 256, 14, 14), the head's stack."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head.stack(x)


def into_torchvision(model, head):
    """Put `head` into a torchvision MaskRCNN: roi_heads.mask_head = its stack, mask_predictor = its readout
    (head classes = the model's num_classes, background included), and add "loss_lcp" to the loss dict."""
    roi = getattr(model, "roi_heads", None)
    if roi is None or not hasattr(roi, "mask_predictor"):
        raise ValueError("pass a torchvision MaskRCNN (e.g. maskrcnn_resnet50_fpn(weights=None, num_classes=3))")
    if not isinstance(head, MaskHead):
        raise ValueError(f"pass a panoptic.MaskHead, got {type(head).__name__}")
    roi.mask_head, roi.mask_predictor = _TVMaskHead(head), head.readout
    if not hasattr(roi, "_lcp_head"):  # one hook, which reads whichever head was put in last
        roi.register_forward_hook(_add_lcp)
    object.__setattr__(roi, "_lcp_head", head)  # not a submodule: it already is one as mask_head.head
    return model


def _add_lcp(module, inputs, output):
    """Forward hook on torchvision's RoIHeads, whose forward returns (detections, losses): add xi * LCP."""
    result, losses = output
    head = module._lcp_head
    if module.training and head.penalty is not None and "loss_mask" in losses:
        losses = {**losses, "loss_lcp": head.penalty}
    return result, losses
