"""Training loss of the shapes detector: task-aligned assignment, quality-aware BCE and GIoU.

Assignment (TOOD / YOLOv8's task-aligned assigner, without DFL): for every ground-truth box, the
candidate cells are those whose centre lies inside the box, plus the finest level's cell that holds
the box centre (so that boxes smaller than a stride still get one). Each candidate scores
``t = s ** alpha * iou ** beta`` (``s`` the predicted probability of the box's class, ``iou`` between the
predicted and the true box); the ``topk`` best candidates of each box are its positives, and a cell
claimed by several boxes goes to the one it overlaps most. A positive's classification target is
``t`` rescaled so that each box's best positive gets that box's best IoU (the rest are 0).

Loss = ``cls_gain * BCE(logits, targets).sum() / T + box_gain * sum(w * (1 - GIoU)) / T``, with
``w`` the positive's target score and ``T`` the sum of all target scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _intersection_union(a: torch.Tensor, b: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union (plus ``eps``) of ``x1, y1, x2, y2`` boxes broadcast elementwise."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter, area_a + area_b - inter + eps


def box_iou_pairs(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU of ``x1, y1, x2, y2`` boxes broadcast elementwise: (..., 4) x (..., 4) -> (...)."""
    inter, union = _intersection_union(a, b, eps)
    return inter / union


def giou_pairs(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Generalised IoU, elementwise."""
    inter, union = _intersection_union(a, b, eps)
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    return inter / union - (hull - union) / (hull + eps)


@torch.no_grad()
def assign(
    scores: torch.Tensor,
    boxes: torch.Tensor,
    points: torch.Tensor,
    strides: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_mask: torch.Tensor,
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
    eps: float = 1e-9,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task-aligned assignment.

    ``scores`` (B, N, C) probabilities, ``boxes`` (B, N, 4) predicted xyxy, ``points`` (N, 2),
    ``strides`` (N,), ``gt_labels`` (B, M) long, ``gt_boxes`` (B, M, 4), ``gt_mask`` (B, M) bool
    (padding False). Returns ``(target_boxes (B, N, 4), target_scores (B, N, C), fg (B, N) bool)``.
    """
    b, n, c = scores.shape
    m = gt_boxes.shape[1]
    if m == 0:
        return torch.zeros_like(boxes), torch.zeros_like(scores), torch.zeros(b, n, dtype=torch.bool)
    px, py = points[:, 0], points[:, 1]  # N
    x1, y1, x2, y2 = gt_boxes.unbind(-1)  # B, M
    inside = (px > x1[..., None]) & (px < x2[..., None]) & (py > y1[..., None]) & (py < y2[..., None])  # B, M, N
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half = strides / 2
    finest = strides == strides.min()
    centre_cell = ((px - cx[..., None]).abs() <= half) & ((py - cy[..., None]).abs() <= half) & finest
    cand = (inside | centre_cell) & gt_mask[..., None]  # B, M, N

    ious = box_iou_pairs(gt_boxes[:, :, None, :], boxes[:, None, :, :]).clamp(min=0)  # B, M, N
    cls_scores = scores.gather(2, gt_labels.clamp(min=0)[:, None, :].expand(b, n, m)).transpose(1, 2)  # B, M, N
    align = cls_scores.pow(alpha) * ious.pow(beta) * cand
    ious = ious * cand
    k = min(topk, n)
    top_val, top_idx = align.topk(k, dim=2)
    is_top = torch.zeros_like(align, dtype=torch.bool).scatter_(2, top_idx, top_val > eps)
    # a box with no aligned candidate yet (early training) keeps its candidates with the best IoU
    pos = is_top & cand
    # cells claimed by several boxes go to the box they overlap most
    multi = pos.sum(1, keepdim=True) > 1  # B, 1, N
    if multi.any():
        best = F.one_hot(ious.argmax(1), m).transpose(1, 2).bool()  # B, M, N
        pos = torch.where(multi, best & cand, pos)
    fg = pos.any(1)  # B, N
    gt_idx = pos.float().argmax(1)  # B, N
    target_boxes = gt_boxes.gather(1, gt_idx[..., None].expand(b, n, 4))
    target_labels = gt_labels.gather(1, gt_idx).clamp(min=0)
    align = align * pos
    norm = align * (ious * pos).amax(2, keepdim=True) / (align.amax(2, keepdim=True) + eps)
    quality = norm.amax(1)  # B, N
    target_scores = F.one_hot(target_labels, c).to(scores.dtype) * (quality * fg)[..., None]
    return target_boxes, target_scores, fg


class DetectionLoss:
    """Callable ``(model raw outputs, targets) -> (loss, parts dict)``.

    ``targets`` is ``(gt_labels (B, M) long 0-based, gt_boxes (B, M, 4) xyxy input pixels,
    gt_mask (B, M) bool)``.
    """

    def __init__(self, cls_gain: float = 1.0, box_gain: float = 5.0, topk: int = 10) -> None:
        self.cls_gain = cls_gain
        self.box_gain = box_gain
        self.topk = topk

    def __call__(self, raw, targets) -> tuple[torch.Tensor, dict[str, float]]:
        logits, dists, points, strides = raw
        gt_labels, gt_boxes, gt_mask = targets
        boxes = torch.cat([points - dists[..., :2], points + dists[..., 2:]], -1)
        tb, ts, fg = assign(
            logits.detach().sigmoid(), boxes.detach(), points, strides, gt_labels, gt_boxes, gt_mask, self.topk
        )
        total = ts.sum().clamp(min=1.0)
        cls = F.binary_cross_entropy_with_logits(logits, ts, reduction="sum") / total
        if fg.any():
            w = ts.sum(-1)[fg]
            box = ((1.0 - giou_pairs(boxes[fg], tb[fg])) * w).sum() / total
        else:
            box = dists.sum() * 0.0
        loss = self.cls_gain * cls + self.box_gain * box
        return loss, {
            "cls": float(cls.detach()),
            "box": float(box.detach()),
            "fg": float(fg.sum()) / max(1, fg.shape[0]),
        }
