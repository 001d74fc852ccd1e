"""LGD inside-masks: which feature-map grid points lie inside a box (Zhang et al., AAAI'22, arXiv 2109.11496).

The rule is the official LGD one (``get_inside_gt_mask``, docs/methods.md §5.3-§5.4): the box is scaled from the
padded batch size (h, w) to the level size (H_l, W_l) by (H_l / h, W_l / w); grid point (i, j) is addressed by its
*integer* indices (no half-pixel offset) and is inside when ``|i - cy| / box_h <= 0.5`` and ``|j - cx| / box_w <= 0.5``.
Consequences that are kept on purpose: tiny boxes (and medium ones on coarse levels) can contain no grid point at
all; a degenerate box (zero width or height) contains none, because 0/0 is NaN and x/0 is inf.
"""

from __future__ import annotations

import torch
from torch import Tensor


def inside_masks(boxes: Tensor, batch_shape: tuple[int, int], feat_hw: tuple[int, int]) -> Tensor:
    """Inside-masks of ``boxes`` on one feature level.

    Args:
        boxes: (B, 4) xyxy in network-input pixels of the padded batch (LGD passes boxes already clamped to
            [0, w - 1] x [0, h - 1]).
        batch_shape: (h, w) of the padded batch tensor.
        feat_hw: (H_l, W_l) of the feature level.

    Returns:
        (B, H_l, W_l) bool, True where the integer grid point lies inside the scaled box.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"inside_masks: boxes must be (B, 4) xyxy, got shape {tuple(boxes.shape)}")
    h, w = batch_shape
    fh, fw = feat_hw
    # float32 on purpose: the <= 0.5 boundary must not move with a bf16/fp16 autocast region
    b = boxes.detach().float()
    x1, y1, x2, y2 = (b[:, 0] * (fw / w), b[:, 1] * (fh / h), b[:, 2] * (fw / w), b[:, 3] * (fh / h))
    cx, cy = (x1 + x2) * 0.5, (y1 + y2) * 0.5
    bw, bh = x2 - x1, y2 - y1
    ys = torch.arange(fh, device=boxes.device, dtype=torch.float32)
    xs = torch.arange(fw, device=boxes.device, dtype=torch.float32)
    # division (not |d| <= 0.5 * size) reproduces the reference exactly, including its treatment of empty boxes
    in_y = (ys[None, :] - cy[:, None]).abs() / bh[:, None] <= 0.5  # (B, H_l)
    in_x = (xs[None, :] - cx[:, None]).abs() / bw[:, None] <= 0.5  # (B, W_l)
    return in_y[:, :, None] & in_x[:, None, :]
