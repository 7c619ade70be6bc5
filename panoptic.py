"""Panoptic segmentation with a recurrent mask head (hGRU-GN trained by C-RBP), in torch only.

    Linsley et al. "Stable and expressive recurrent vision models." NeurIPS 2020, §4.2 and SI §3.3: the
    4-conv mask head of Panoptic FPN (Kirillov et al. 2019) replaced by one hGRU run to a fixed point.

What is here (specs: shared/specs/panoptic_spec.md; crbp_official_spec.md §5, §6.4):
    MaskHead("conv4" | "hgru", ...)   (K, 256, 14, 14) RoI features -> (K, classes, 28, 28) mask logits;
                                      .penalty (xi * LCP, to add to the loss) and .stats after each forward
    roi_align, mask_targets, mask_loss, paste_masks      RoIAlign and Mask R-CNN's mask plumbing
    panoptic_fusion, pq_stats, pq_summary                Panoptic FPN's fusion rules and panopticapi's PQ
    data.panoptic                                        the synthetic task: curves and blobs over texture
    PanopticModel                                        shallow backbone + FPN + semantic head + mask head
    into_torchvision(maskrcnn, head)                     the head inside a torchvision Mask R-CNN

    python panoptic.py --head hgru --algo c-rbp --steps 20      # train + evaluate one model (GPU)
    python panoptic.py --dry-run                                # seconds on a CPU
    python panoptic.py --show samples.png                       # a sample sheet of the task
    python panoptic.py --experiment --out runs/panoptic         # the issue's whole comparison (GPU)
    python panoptic.py --memory --out runs/panoptic             # peak CUDA memory of a head step vs T

At test time the model gets the ground-truth boxes and classes with score 1 (an oracle detector): PQ_th
and SQ_th then measure the masks alone, which is what the heads differ in.
"""
import argparse
import json
import math
import os
import statistics
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import crbp
import data
import figures
import models
from data import IGNORE, STUFF, THINGS

HEADS = ("conv4", "hgru")
HEAD_ALGOS = ("bptt", "c-bptt", "rbp", "c-rbp")

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


def jitter_boxes(boxes, size, gen, scale=0.1, min_iou=0.5):
    """Training proposals: GT boxes (K, 4) with corners moved by N(0, scale * side); IoU < min_iou keeps the GT."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    j = (boxes + scale * wh * torch.randn(boxes.shape, generator=gen, device=boxes.device)).clamp(0, size)
    j = torch.cat([torch.minimum(j[:, :2], j[:, 2:] - 1), torch.maximum(j[:, 2:], j[:, :2] + 1)], 1)
    return torch.where((box_iou(j, boxes) >= min_iou)[:, None], j, boxes)


def box_iou(a, b):
    """IoU of paired boxes a[i], b[i] (K, 4)."""
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp_min(0)
    inter = wh.prod(1)
    area = lambda z: (z[:, 2:] - z[:, :2]).prod(1)
    return inter / (area(a) + area(b) - inter).clamp_min(1e-9)


def training_loss(model, batch, gen, proposals=2):
    """Panoptic FPN's loss on a rendered batch: 0.5 x semantic CE + mask BCE + xi x LCP (the head's)."""
    p2, sem = model.features(batch["image"])
    loss_sem = F.cross_entropy(sem, batch["semantic"], ignore_index=IGNORE)
    b, n = batch["valid"].nonzero(as_tuple=True)
    b, n = b.repeat(proposals), n.repeat(proposals)  # `proposals` jittered boxes per GT instance
    gt = batch["boxes"][b, n]
    boxes = jitter_boxes(gt, batch["image"].shape[-1], gen)
    targets = mask_targets(batch["masks"][b, n], boxes, 28, "detectron2")
    logits = model.masks(p2, boxes, b)
    loss_mask = mask_loss(logits, batch["labels"][b, n], targets)
    head = model.mask_head
    return {"loss_sem": 0.5 * loss_sem, "loss_mask": loss_mask, "loss_lcp": head.penalty}, head.stats


@torch.no_grad()
def predict(model, batch, steps, per_step=False):
    """Panoptic predictions with the oracle detector (GT boxes and classes, score 1): a list over t = 1..steps
    (or [the prediction at steps]) of (pan (B, H, W), cats (B, N + S + 1))."""
    p2, sem = model.features(batch["image"])
    B, N, H, W = batch["masks"].shape
    b, n = batch["valid"].nonzero(as_tuple=True)
    boxes, labels = batch["boxes"][b, n], batch["labels"][b, n]
    res = model.masks(p2, boxes, b, steps, per_step)
    semantic = sem.argmax(1)
    out = []
    for lg in (res[1] if per_step else [res]):
        probs = lg[torch.arange(len(lg), device=lg.device), labels].sigmoid()  # (K, 28, 28)
        masks = torch.zeros(B, N, H, W, dtype=torch.bool, device=lg.device)
        masks[b, n] = paste_masks(probs, boxes, H, W) >= 0.5
        out.append(panoptic_fusion(masks, batch["valid"].float(), batch["labels"], semantic))
    return out


def evaluate(model, args, device, steps, n_images, per_step=False):
    """PQ / SQ / RQ on held-out images at `steps`, or at every t = 1..steps. The test seeds 0, 1, .. are the
    same for every model and training seed: all runs are scored on the same images."""
    model.eval()
    stats = None
    for i in range(math.ceil(n_images / args.eval_batch_size)):
        batch = data.panoptic(min(args.eval_batch_size, n_images - i * args.eval_batch_size), split="test", seed=i,
                       device=device, **task_options(args))
        preds = predict(model, batch, steps, per_step)
        s = torch.stack([pq_stats(batch["pan"], batch["pan_cats"], pan, cats, len(THINGS) + len(STUFF))
                         for pan, cats in preds])  # (t, categories, 4)
        stats = s if stats is None else stats + s
    model.train()
    out = [pq_summary(s.cpu()) for s in stats]
    return out if per_step else out[0]


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


# ----------------------------------------------------------------------------------------------------------
# Command line: train and evaluate one model, the sample sheet, the experiment, the memory profile

EXPERIMENT = [("conv4", "bptt", 1), ("hgru", "bptt", 1), ("hgru", "bptt", 3), ("hgru", "bptt", 5),
              ("hgru", "c-rbp", 5), ("hgru", "c-rbp", 10), ("hgru", "c-rbp", 20)]
SEEDS = (0, 1, 2)
TASK_KEYS = ("size", "curves", "blobs", "length", "stroke", "curvature")


def task_options(args):
    return {k: getattr(args, k) for k in TASK_KEYS}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--head", default="hgru", help=f"mask head: one of {HEADS}")
    a("--algo", default=None, help=f"hgru training: one of {HEAD_ALGOS} (default c-rbp; conv4 has no recurrence)")
    a("--steps", type=int, default=None, help="hGRU steps T in training (default 20 for c-rbp, 3 for bptt)")
    a("--neumann-steps", type=int, default=15, help="most Neumann terms of the rbp gradient (paper 15)")
    a("--tau", type=float, default=0.95, help="LCP bound on the Jacobian's column sums (panoptic code 0.95)")
    a("--xi", type=float, default=1e-3, help="weight of the summed LCP in the loss (panoptic code 1e-3)")
    a("--channels", type=int, default=256, help="FPN and mask-head channels (paper 256)")
    a("--width", type=int, default=64, help="backbone width at stride 4 (doubled at stride 8)")
    a("--size", type=int, default=128, help="image side in pixels, a multiple of 8")
    a("--curves", type=int, default=4, help="thin curves per image (one colour: grouping needs continuity)")
    a("--blobs", type=int, default=2, help="ellipses per image")
    a("--length", type=float, default=90.0, help="curve length in pixels at 128 px")
    a("--stroke", type=float, default=2.5, help="curve width in pixels at 128 px")
    a("--curvature", type=float, default=0.25, help="s.d. of the heading change per 4-px segment (radians)")
    a("--batch-size", type=int, default=8, help="images per step")
    a("--proposals", type=int, default=2, help="jittered proposals per GT instance in training")
    a("--iters", type=int, default=1000, help="training steps")
    a("--lr", type=float, default=0.02, help="SGD learning rate (Panoptic FPN 0.02), momentum 0.9")
    a("--weight-decay", type=float, default=1e-4, help="SGD weight decay (not on norm layers)")
    a("--warmup", type=float, default=0.05, help="linear warmup from lr / 1000, as a fraction of --iters; "
                                                 "then x0.1 at 2/3 and 8/9 of the run (the 1x schedule's shape)")
    a("--eval-images", type=int, default=256, help="held-out images for the final metrics")
    a("--eval-batch-size", type=int, default=32)
    a("--eval-every", type=int, default=200, help="steps between quick held-out checks (64 images)")
    a("--eval-steps", type=int, default=40, help="the per-step PQ curve runs t = 1..this")
    a("--seed", type=int, default=0)
    a("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    a("--out", default=None, help="run directory (default runs/panoptic-<head>-<algo>-T<steps>-s<seed>); "
                                  "the experiment's root with --experiment / --memory")
    a("--resume", default=None, metavar="RUN_DIR", help="continue a run where it stopped")
    a("--until-minutes", type=float, default=None, help="stop (with a checkpoint) after this much wall time")
    a("--dry-run", action="store_true", help="a few steps at tiny sizes (seconds on a CPU); writes to a "
                                             "temporary directory unless --out is given")
    a("--show", default=None, metavar="PNG", help="write a sample sheet of the task (image, GT, semantic)")
    a("--experiment", action="store_true", help="train every model of the comparison for 3 seeds under --out "
                                                "(finished runs are skipped, stopped ones resumed), then "
                                                "write table.md and per_step.svg")
    a("--memory", action="store_true", help="peak CUDA memory of one head training step against T at 512 RoIs")
    return p


def parse_args(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    if args.resume:
        path = os.path.join(args.resume, "config.json")
        if not os.path.isfile(path):
            p.error(f"--resume {args.resume}: no config.json there; pass a run directory panoptic.py wrote")
        # a resume may change where it runs, when it stops and how it is evaluated, not what it trains
        given = {k: v for k, v in vars(args).items() if v != p.get_default(k)}
        changed = sorted(set(given) - {"resume", "device", "until_minutes", "eval_images", "eval_steps"})
        if changed:
            p.error(f"--resume continues the run in its config.json; it does not take --{changed[0].replace('_', '-')}")
        return argparse.Namespace(**{**vars(args), **json.load(open(path)), **given, "out": args.resume})
    if args.head not in HEADS:
        p.error(f"--head must be one of {HEADS}, got {args.head!r}")
    if args.head == "conv4":
        if args.algo not in (None, "bptt") or args.steps not in (None, 1):
            p.error("--head conv4 is feedforward: leave --algo and --steps out (or pass bptt and 1)")
        args.algo, args.steps = "bptt", 1
    args.algo = args.algo or "c-rbp"
    if args.algo not in HEAD_ALGOS:
        p.error(f"--algo must be one of {HEAD_ALGOS}, got {args.algo!r}")
    args.steps = args.steps or (20 if args.algo.endswith("rbp") else 3)
    if args.algo.endswith("rbp") and args.steps < 2:
        p.error(f"--algo {args.algo} runs T-1 steps without grad and one with it: pass --steps >= 2")
    if args.dry_run:
        args.size, args.channels, args.width, args.batch_size, args.iters = 64, 16, 8, 2, 3
        args.eval_images, args.eval_batch_size, args.eval_every, args.eval_steps = 4, 4, 2, 4
        args.steps, args.neumann_steps = min(args.steps, 3), min(args.neumann_steps, 3)
        args.out = args.out or tempfile.mkdtemp(prefix="panoptic-dry-run-")
    for k in ("iters", "batch_size", "eval_images", "eval_batch_size", "eval_every", "eval_steps", "proposals"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.size % 8 or args.size < 32:
        p.error(f"--size must be a multiple of 8 and >= 32, got {args.size}")
    if args.channels % 4 or args.channels < 4:
        p.error(f"--channels must be a multiple of 4, got {args.channels}")
    one = f"panoptic-{args.head}-{args.algo}-T{args.steps}-s{args.seed}"
    default = "panoptic" if args.experiment or args.memory else one
    args.out = args.out or os.path.join("runs", default)
    return args


def lr_at(args, it):
    warm = max(1, round(args.warmup * args.iters))
    if it < warm:  # linear warmup from lr / 1000 (warmup factor 1e-3)
        return args.lr * (1e-3 + (1 - 1e-3) * it / warm)
    return args.lr * 0.1 ** ((it >= 2 * args.iters // 3) + (it >= 8 * args.iters // 9))


def save_checkpoint(out, state):
    path = os.path.join(out, "checkpoint.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash never leaves a half-written checkpoint


def log(out, record):
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def build(args, device):
    head_opts = dict(steps=args.steps, algo=args.algo, neumann_steps=args.neumann_steps, tau=args.tau, xi=args.xi)
    model = PanopticModel(args.head, args.channels, args.width, **head_opts).to(device)
    norm = [p for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)) for p in m.parameters()]
    ids = {id(p) for p in norm}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opt = torch.optim.SGD([{"params": rest, "weight_decay": args.weight_decay}, {"params": norm, "weight_decay": 0}],
                          lr=args.lr, momentum=0.9)
    return model, opt


def train(args):
    """Train one model (one run directory), then evaluate it at its T and at every t = 1..--eval-steps."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)  # the same backbone initialisation for every head of one seed
    model, opt = build(args, device)  # (no cudnn.benchmark: the number of RoIs changes every step)
    if device.type == "cuda":  # the final record's peak memory is this run's, also inside --experiment
        torch.cuda.reset_peak_memory_stats(device)
    start = 0
    if args.resume:
        ck = torch.load(os.path.join(args.out, "checkpoint.pt"), map_location=device, weights_only=False)
        model.load_state_dict(ck["model"]); opt.load_state_dict(ck["optimizer"]); start = ck["iteration"]
    else:
        if os.path.exists(os.path.join(args.out, "checkpoint.pt")):
            raise SystemExit(f"{args.out} already holds a run: continue it with --resume {args.out}, or pick --out")
        os.makedirs(args.out, exist_ok=True)
        skip = ("resume", "until_minutes", "show", "experiment", "memory")
        json.dump({k: v for k, v in vars(args).items() if k not in skip}, open(os.path.join(args.out, "config.json"),
                                                                                 "w"), indent=1)
    n_head = sum(p.numel() for p in model.mask_head.parameters())
    print(f"panoptic | {args.head} head ({n_head:,} parameters) | {args.algo}, T={args.steps}, K={args.neumann_steps}, "
          f"tau {args.tau}, xi {args.xi} | {args.iters} steps x {args.batch_size} images of {args.size} px | "
          f"device {device} | run dir {args.out}" + (f" | resuming at step {start}" if start else ""), flush=True)
    quick = min(64, args.eval_images)
    if start == 0:
        ev = evaluate(model, args, device, args.steps, quick)
        log(args.out, {"iter": 0, "eval": ev})
        print(f"before training: PQ {ev['pq']:.2f}  PQ_th {ev['pq_th']:.2f}  PQ_st {ev['pq_st']:.2f}", flush=True)
    ckpt = lambda it: save_checkpoint(args.out, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                 "iteration": it})
    t0, t_eval, it = time.time(), 0.0, start
    while it < args.iters:
        for group in opt.param_groups:
            group["lr"] = lr_at(args, it)
        seed = args.seed * 1_000_003 + it  # every step's data and proposals follow from (seed, step): resumable
        batch = data.panoptic(args.batch_size, seed=seed, device=device, **task_options(args))
        gen = torch.Generator(device=device).manual_seed(seed)
        try:  # crbp.run raises FloatingPointError for a non-finite state
            losses, stats = training_loss(model, batch, gen, args.proposals)
            total = sum(losses.values())
            if not torch.isfinite(total):
                raise FloatingPointError(f"non-finite loss {({k: v.item() for k, v in losses.items()})}")
        except FloatingPointError as e:
            log(args.out, {"iter": it, "error": str(e)})
            raise SystemExit(f"{args.out} stopped at step {it}: {e}. Lower --lr or raise --xi") from None
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        it += 1
        if it % 10 == 0 or it == args.iters:
            rec = {"iter": it, "lr": opt.param_groups[0]["lr"], **{k: v.item() for k, v in losses.items()},
                   "s_per_step": (time.time() - t0 - t_eval) / (it - start), **(stats.as_dict() if stats else {})}
            log(args.out, rec)
        if it % args.eval_every == 0 or it == args.iters:
            t1 = time.time()
            ev = evaluate(model, args, device, args.steps, quick)
            log(args.out, {"iter": it, "eval": ev})
            t_eval += time.time() - t1
            print(f"step {it}/{args.iters}  loss {total.item():.4f} (mask {losses['loss_mask'].item():.4f}, lcp "
                  f"{losses['loss_lcp'].item():.2e})  held-out PQ {ev['pq']:.2f}  "
                  f"{(time.time() - t0 - t_eval) / (it - start):.3f} s/step (training only)", flush=True)
            ckpt(it)
        if args.until_minutes and time.time() - t0 > 60 * args.until_minutes:
            break
    ckpt(it)
    if it < args.iters:
        print(f"stopped at step {it}; continue with: python panoptic.py --resume {args.out}")
        return None
    return report(model, args, device)


def report(model, args, device):
    T = max(args.eval_steps, args.steps)
    curve = evaluate(model, args, device, T, args.eval_images, per_step=True)
    final = curve[args.steps - 1]
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    log(args.out, {"final": final, "steps": args.steps, "per_step_pq": [c["pq"] for c in curve], "peak_gib": peak})
    rows = [json.loads(line) for line in open(os.path.join(args.out, "metrics.jsonl"))]
    ev = [r for r in rows if "eval" in r]
    tr = [r for r in rows if "loss_mask" in r]
    figures.svg_plot(os.path.join(args.out, "learning_curve.svg"),
                     {"mask loss x100": ([r["iter"] for r in tr], [100 * r["loss_mask"] for r in tr]),
                      "held-out PQ": ([r["iter"] for r in ev], [r["eval"]["pq"] for r in ev])},
                     "training step", "PQ / loss x100", f"{args.head} {args.algo} T={args.steps}")
    figures.svg_plot(os.path.join(args.out, "per_step.svg"), {"PQ": (list(range(1, T + 1)), [c["pq"] for c in curve])},
                     "step t", "PQ", f"{args.head} {args.algo}, trained with T={args.steps}")
    batch = data.panoptic(4, split="test", seed=0, device=device, **task_options(args))
    model.eval()
    pan, _ = predict(model, batch, args.steps)[0]
    model.train()
    sheet = torch.cat([batch["image"].cpu(), colorize(batch["pan"]), colorize(pan)], 0)  # rows: image, GT, pred
    figures.write_png(os.path.join(args.out, "predictions.png"), figures.grid(sheet, cols=4, zoom=2))
    print(f"held-out ({args.eval_images} images) at T={args.steps}: " + "  ".join(
        f"{k} {final[k]:.2f}" for k in ("pq", "pq_th", "pq_st", "sq_th", "rq_th", "pq_curve", "pq_blob")))
    print("per-step PQ: " + "  ".join(f"t={t}: {curve[t - 1]['pq']:.2f}" for t in sorted({1, args.steps, 2 * args.steps,
                                                                                          T}) if t <= T))
    print(f"figures and metrics in {args.out}")
    return final


def colorize(pan):
    """(B, H, W) segment ids -> (B, 3, H, W) colours from a fixed hash of the id; void (0) black."""
    g = torch.Generator().manual_seed(0)
    lut = 0.2 + 0.8 * torch.rand(1024, 3, generator=g)
    lut[0] = 0
    return lut[pan.cpu().clamp(0, 1023)].permute(0, 3, 1, 2)


def show(path, args, n=6):
    """A sample sheet: rows of images, their panoptic ground truth, their semantic labels (void white)."""
    b = data.panoptic(n, seed=args.seed, **task_options(args))
    sem = torch.tensor([[0.15, 0.15, 0.15], [0.8, 0.5, 0.2], [0.2, 0.5, 0.8]])[b["semantic"].clamp(max=2)]
    sem[b["semantic"] == IGNORE] = 1.0
    sheet = torch.cat([b["image"], colorize(b["pan"]), sem.permute(0, 3, 1, 2)], 0)
    figures.write_png(path, figures.grid(sheet, cols=n, zoom=2 if args.size <= 64 else 1))
    return path


def memory_profile(args, rois=512):
    """Peak CUDA memory (GiB above the inputs) and time of one mask-head training step (forward, BCE + xi LCP,
    backward) at `rois` RoIs, against T. Writes memory.json and memory.svg. On a CPU (--device cpu) times only."""
    cuda = args.device != "cpu"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--memory measures CUDA memory: run it on a GPU (or pass --device cpu for timings only)")
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = [("conv4", "bptt", 1)] + [("hgru", "bptt", t) for t in (1, 2, 3, 5, 10)] + \
           [("hgru", "c-rbp", t) for t in (2, 5, 10, 20)]
    out = {}
    for kind, algo, T in rows:
        head = MaskHead(kind, len(THINGS), args.channels, steps=T, algo=algo).to(dev)
        x = torch.randn(rois, args.channels, 14, 14, device=dev, requires_grad=True)
        labels = torch.randint(0, len(THINGS), (rois,), device=dev)
        target = (torch.rand(rois, 28, 28, device=dev) > 0.5).float()
        step = lambda: (mask_loss(head(x), labels, target) + head.penalty).backward()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) if cuda else 0
        step()
        sync()
        gib = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 30 if cuda else float("nan")
        times = []
        for _ in range(3):  # the step's time too: what the experiment's runs cost per RoI
            t0 = time.perf_counter(); step(); sync(); times.append(time.perf_counter() - t0)
        out[f"{kind}-{algo}-T{T}"] = {"peak_gib": gib, "ms": 1000 * min(times)}
        print(f"{kind:5s} {algo:5s} T={T:2d}: peak {gib:6.2f} GiB above the inputs, {1000 * min(times):8.1f} ms "
              f"per step at {rois} RoIs", flush=True)
        del head, x, step
        if cuda:
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    json.dump(out, open(os.path.join(args.out, "memory.json"), "w"), indent=1)
    series = {name: ([int(k.rsplit("T", 1)[1]) for k in out if k.startswith(pre)],
                     [v["peak_gib"] for k, v in out.items() if k.startswith(pre)])
              for name, pre in (("hGRU BPTT", "hgru-bptt"), ("hGRU C-RBP", "hgru-c-rbp"), ("conv4", "conv4"))}
    figures.svg_plot(os.path.join(args.out, "memory.svg"), series, "steps T", f"peak GiB (head step, {rois} RoIs)",
                     "mask-head training memory")
    return out


def experiment(args):
    """Every model of EXPERIMENT for each of SEEDS under args.out, one after the other; finished runs are skipped and
    stopped ones resumed, so the same command continues an interrupted experiment. Then the table and figure."""
    deadline = time.time() + 60 * args.until_minutes if args.until_minutes else None
    for seed in SEEDS:  # seed-major: an experiment cut short still has whole seeds of every model
        for head, algo, T in EXPERIMENT:
            run = os.path.join(args.out, f"{head}-{algo}-T{T}-s{seed}")
            if _final(run) is not None or _final(run, "error") is not None:
                continue  # finished, or stopped by a non-finite loss (the table counts it as failed)
            cfg = {**vars(args), "head": head, "algo": algo, "steps": min(T, 3) if args.dry_run else T, "seed": seed,
                   "out": run, "resume": None, "experiment": False}
            if os.path.isfile(os.path.join(run, "checkpoint.pt")):
                cfg.update(json.load(open(os.path.join(run, "config.json"))), resume=run, out=run)
            cfg["until_minutes"] = None if deadline is None else max(1e-9, (deadline - time.time()) / 60)
            try:
                done = train(argparse.Namespace(**cfg))
            except SystemExit as e:  # a diverged run is recorded in its metrics.jsonl; the others still run
                print(e)
                continue
            if done is None:
                print("experiment stopped (--until-minutes): the table has the finished runs; the same command "
                      "continues")
                return summarize(args.out)
    return summarize(args.out)


def _final(run, key="final"):
    """The last record of a run's metrics.jsonl that has `key` ("final": finished; "error": diverged)."""
    path = os.path.join(run, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    rows = [r for r in rows if key in r]
    return rows[-1] if rows else None


def summarize(root):
    """table.md (mean +- s.d. over seeds of PQ, PQ_th, PQ_st, SQ_th at the trained T) and per_step.svg."""
    lines = ["| head | algo | T | PQ | PQ_th | PQ_st | SQ_th | PQ curves | seeds |", "|---" * 9 + "|"]
    curves = {}
    for head, algo, T in EXPERIMENT:
        runs = [os.path.join(root, f"{head}-{algo}-T{T}-s{s}") for s in SEEDS]
        finals = [f for f in map(_final, runs) if f]
        failed = sum(_final(r, "error") is not None for r in runs)
        if not finals:
            continue
        cell = lambda k: (f"{statistics.mean(f['final'][k] for f in finals):.2f} ± "
                          f"{statistics.pstdev([f['final'][k] for f in finals]):.2f}")
        lines.append(f"| {head} | {algo if head == 'hgru' else '-'} | {T} | {cell('pq')} | {cell('pq_th')} | "
                     f"{cell('pq_st')} | {cell('sq_th')} | {cell('pq_curve')} | {len(finals)}"
                     + (f" ({failed} diverged) |" if failed else " |"))
        per = [f["per_step_pq"] for f in finals]
        n = min(len(p) for p in per)
        curves[f"{head} {algo} T={T}" if head == "hgru" else "conv4"] = (
            list(range(1, n + 1)), [statistics.mean(p[t] for p in per) for t in range(n)])
    open(os.path.join(root, "table.md"), "w").write("\n".join(lines) + "\n")
    figures.svg_plot(os.path.join(root, "per_step.svg"), curves, "step t", "PQ (mean over seeds)",
                     "per-step PQ of the trained heads", size=(640, 400))
    print("\n".join(lines))
    return lines


def main(argv=None):
    args = parse_args(argv)
    if args.show:
        return print(show(args.show, args))
    if args.memory:
        return memory_profile(args)
    if args.experiment:
        return experiment(args)
    return train(args)


if __name__ == "__main__":
    main()
