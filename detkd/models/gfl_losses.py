"""Generalized Focal Loss pieces (Li et al., "Generalized Focal Loss", NeurIPS 2020), as pure tensor functions.

GFL predicts each box edge (l, t, r, b) as a discrete distribution over ``reg_max + 1`` bins (distances
0..reg_max in stride units) and trains the class scores as IoU-quality estimates. These functions are also what LD
(Localization Distillation) builds on, so they are kept free of any model code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def integral(dist_logits: Tensor, reg_max: int = 16) -> Tensor:
    """Expected distance of each edge: softmax over the ``reg_max + 1`` bins, dotted with ``[0, 1, .., reg_max]``.

    dist_logits: (..., 4 * (reg_max + 1)), edges in (l, t, r, b) order. Returns (..., 4) in bin (stride) units.
    """
    n = reg_max + 1
    if dist_logits.shape[-1] != 4 * n:
        raise ValueError(f"integral: last dim {dist_logits.shape[-1]} != 4 * (reg_max + 1) = {4 * n}")
    probs = dist_logits.reshape(*dist_logits.shape[:-1], 4, n).softmax(dim=-1)
    bins = torch.arange(n, dtype=probs.dtype, device=probs.device)
    return (probs * bins).sum(dim=-1)


def distance2bbox(points: Tensor, distances: Tensor) -> Tensor:
    """Boxes from a point and its distances to the four edges.

    points: (..., 2) as (x, y); distances: (..., 4) as (l, t, r, b), same unit as points. Returns (..., 4) xyxy.
    """
    x, y = points[..., 0], points[..., 1]
    return torch.stack(
        [x - distances[..., 0], y - distances[..., 1], x + distances[..., 2], y + distances[..., 3]], dim=-1
    )


def bbox2distance(points: Tensor, boxes: Tensor, reg_max: float | None = None, eps: float = 0.1) -> Tensor:
    """Distances (l, t, r, b) from ``points`` (..., 2) to the edges of ``boxes`` (..., 4) xyxy -> (..., 4).

    With ``reg_max`` the distances are clamped to ``[0, reg_max - eps]`` so that the upper DFL bin stays inside the
    distribution; ``eps = 0.1`` is the official mmdet v2 value (``bbox2distance`` / ``DistancePointBBoxCoder``).
    """
    x, y = points[..., 0], points[..., 1]
    d = torch.stack([x - boxes[..., 0], y - boxes[..., 1], boxes[..., 2] - x, boxes[..., 3] - y], dim=-1)
    if reg_max is not None:
        d = d.clamp(min=0, max=reg_max - eps)
    return d


def quality_focal_loss(logits: Tensor, targets: Tensor, beta: float = 2.0) -> Tensor:
    """Quality Focal Loss (GFL Eq. 5), element-wise, no reduction.

    logits, targets: same shape, e.g. (P, K). ``targets`` holds the soft label: the IoU of the predicted box with its
    ground truth at the positive's class, 0 elsewhere (and everywhere for negatives).
    loss = BCE_with_logits(x, y) * |sigmoid(x) - y| ** beta. The modulating factor is not detached (as official).
    """
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return bce * (logits.sigmoid() - targets).abs().pow(beta)


def distribution_focal_loss(dist_logits: Tensor, target_distances: Tensor) -> Tensor:
    """Distribution Focal Loss (GFL Eq. 6) per edge, no reduction.

    dist_logits: (E, reg_max + 1) one row per edge; target_distances: (E,) continuous in [0, reg_max).
    loss = (y_r - y) * CE(logits, y_l) + (y - y_l) * CE(logits, y_r) with y_l = floor(y), y_r = y_l + 1.
    Returns (E,).
    """
    left = target_distances.long()
    right = left + 1
    w_left = right.to(target_distances.dtype) - target_distances
    w_right = target_distances - left.to(target_distances.dtype)
    return (
        F.cross_entropy(dist_logits, left, reduction="none") * w_left
        + F.cross_entropy(dist_logits, right, reduction="none") * w_right
    )


def aligned_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of each pair ``(boxes1[i], boxes2[i])``: (..., 4) xyxy x2 -> (...,). ``eps`` guards the union (mmdet's)."""
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).clamp(min=0).prod(dim=-1)
    area2 = (boxes2[..., 2:] - boxes2[..., :2]).clamp(min=0).prod(dim=-1)
    return inter / (area1 + area2 - inter).clamp(min=eps)
