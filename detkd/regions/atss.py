"""ATSS: Adaptive Training Sample Selection (Zhang et al., CVPR 2020), as pure geometry.

Used by the GFL detector for its label assignment and by LD's Valuable Localization Region (methods.md §1.4),
which needs the same per-box IoU threshold. All functions work on one image:

* ``anchors`` (L, 4) xyxy, concatenated over levels in stride order; ``num_anchors_per_level`` splits L.
* ``gt_boxes`` (G, 4) xyxy, same coordinates as the anchors.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

# an anchor centre must be at least this far inside a box to be a positive (mmdet v2 ATSSAssigner)
INSIDE_EPS = 0.01


def _centres(boxes: Tensor) -> Tensor:
    return (boxes[:, :2] + boxes[:, 2:]) / 2


def atss_candidates(
    anchors: Tensor, num_anchors_per_level: list[int], gt_boxes: Tensor, topk: int = 9
) -> tuple[Tensor, Tensor]:
    """Per level, the ``k = min(topk, level size)`` anchors whose centres are closest (L2) to each box centre.

    Returns ``(cand_idx, ious)``: cand_idx (k_total, G) int64 indices into the L anchors (levels stacked in order,
    within a level nearest first); ious (L, G) IoU of every anchor with every box.
    """
    if sum(num_anchors_per_level) != anchors.shape[0]:
        raise ValueError(f"atss: num_anchors_per_level sums to {sum(num_anchors_per_level)}, but L={anchors.shape[0]}")
    ious = box_iou(anchors, gt_boxes)
    # explicit L2 (not cdist) so that distance ties break the same way as the reference implementation
    dist = (_centres(anchors)[:, None, :] - _centres(gt_boxes)[None, :, :]).pow(2).sum(-1).sqrt()
    candidates = []
    start = 0
    for n in num_anchors_per_level:
        k = min(topk, n)
        _, idx = dist[start : start + n].topk(k, dim=0, largest=False)
        candidates.append(idx + start)
        start += n
    return torch.cat(candidates, dim=0), ious


def atss_threshold(
    anchors: Tensor, num_anchors_per_level: list[int], gt_boxes: Tensor, topk: int = 9
) -> tuple[Tensor, Tensor]:
    """Per-box IoU threshold ``thr = mean + std`` of its candidates' IoUs (unbiased std, the torch default).

    Returns ``(thr (G,), ious (L, G))``.
    """
    cand_idx, ious = atss_candidates(anchors, num_anchors_per_level, gt_boxes, topk)
    return _threshold(ious.gather(0, cand_idx)), ious


def _threshold(cand_ious: Tensor) -> Tensor:
    """(k_total, G) candidate IoUs -> (G,) mean + unbiased std (std 0 when there is a single candidate)."""
    std = cand_ious.std(dim=0) if cand_ious.shape[0] > 1 else torch.zeros_like(cand_ious[0])
    return cand_ious.mean(dim=0) + std


def atss_assign(anchors: Tensor, num_anchors_per_level: list[int], gt_boxes: Tensor, topk: int = 9) -> Tensor:
    """ATSS assignment -> matched_idxs (L,) int64: index of the assigned box, -1 for background.

    Positives are candidates whose IoU >= the box's threshold and whose centre lies strictly inside the box (more
    than 0.01 from every edge). An anchor positive for several boxes takes the one with the largest IoU.
    """
    num_anchors = anchors.shape[0]
    if gt_boxes.numel() == 0:
        return torch.full((num_anchors,), -1, dtype=torch.int64, device=anchors.device)
    cand_idx, ious = atss_candidates(anchors, num_anchors_per_level, gt_boxes, topk)
    cand_ious = ious.gather(0, cand_idx)
    is_pos = cand_ious >= _threshold(cand_ious)[None, :]

    centres = _centres(anchors)[cand_idx]  # (k_total, G, 2)
    edges = torch.stack(
        [
            centres[..., 0] - gt_boxes[None, :, 0],
            centres[..., 1] - gt_boxes[None, :, 1],
            gt_boxes[None, :, 2] - centres[..., 0],
            gt_boxes[None, :, 3] - centres[..., 1],
        ],
        dim=-1,
    )
    is_pos &= edges.min(dim=-1).values > INSIDE_EPS

    gt_idx = torch.arange(gt_boxes.shape[0], device=anchors.device).expand_as(cand_idx)
    masked = torch.full_like(ious, float("-inf"))
    rows, cols = cand_idx[is_pos], gt_idx[is_pos]
    masked[rows, cols] = ious[rows, cols]
    best, matched = masked.max(dim=1)
    return torch.where(best > float("-inf"), matched, torch.full_like(matched, -1))
