"""The GFL head (Li et al., NeurIPS 2020): conv towers, QFL classification, distribution (DFL) box regression.

Numerics follow the official mmdet v2 ``GFLHead`` (see docs/methods.md §1): QFL normalised by the number of
positives; GIoU and DFL weighted per positive by its detached max class score and normalised by the sum of those
weights over the whole batch (clamped at 1); loss weights QFL 1.0, GIoU 2.0, DFL 0.25.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation, generalized_box_iou_loss

from detkd.models.gfl_losses import (
    aligned_box_iou,
    bbox2distance,
    distance2bbox,
    distribution_focal_loss,
    integral,
    quality_focal_loss,
)


def _reduce_mean(x: Tensor) -> Tensor:
    """Mean over DDP ranks (identity outside distributed runs), as mmdet's ``reduce_mean`` for loss normalisers."""
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x.div_(dist.get_world_size()))
    return x


class Scale(nn.Module):
    """A learnable scalar multiplier (one per FPN level on the regression output)."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def group_norm_groups(channels: int) -> int:
    """32 groups (mmdet's GN), or for narrow layers the most groups that divide C with >= 2 channels each.

    Two channels per group at least, because a 1x1 map (P7 of a small image) with one channel per group has a
    single value to normalise, which GroupNorm rejects in training.
    """
    for groups in range(min(32, channels // 2), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def _tower(channels: int, depth: int) -> nn.Sequential:
    """``depth`` x (3x3 conv, GroupNorm, ReLU), GroupNorm groups from :func:`group_norm_groups`."""
    norm = partial(nn.GroupNorm, group_norm_groups(channels))
    return nn.Sequential(*[Conv2dNormActivation(channels, channels, norm_layer=norm) for _ in range(depth)])


class GFLHead(nn.Module):
    """Separate cls/reg towers shared over levels; outputs concatenated over levels (torchvision layout).

    ``forward(features)`` -> ``{"cls_logits": (N, L, K), "bbox_dist": (N, L, 4 * (reg_max + 1))}``, per level
    locations in row-major (y, x) order; ``bbox_dist`` edges in (l, t, r, b) order, in stride units.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_levels: int = 5,
        num_convs: int = 4,
        reg_max: int = 16,
        anchor_scale: float = 8.0,
        prior_probability: float = 0.01,
        loss_weights: tuple[float, float, float] = (1.0, 2.0, 0.25),
    ):
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.anchor_scale = anchor_scale  # anchors are squares of side anchor_scale * stride
        self.loss_weights = loss_weights  # (QFL, GIoU, DFL)
        self.cls_convs = _tower(in_channels, num_convs)
        self.reg_convs = _tower(in_channels, num_convs)
        self.gfl_cls = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(in_channels, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(num_levels)])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.gfl_cls.bias, -math.log((1 - prior_probability) / prior_probability))

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        if len(x) != len(self.scales):
            raise ValueError(f"GFLHead: got {len(x)} feature maps, built for {len(self.scales)} levels")
        cls_all, reg_all = [], []
        for feature, scale in zip(x, self.scales):
            cls = self.gfl_cls(self.cls_convs(feature))
            reg = scale(self.gfl_reg(self.reg_convs(feature)))
            cls_all.append(cls.flatten(2).transpose(1, 2))  # (N, H*W, K)
            reg_all.append(reg.flatten(2).transpose(1, 2))  # (N, H*W, 4 * (reg_max + 1))
        return {"cls_logits": torch.cat(cls_all, dim=1), "bbox_dist": torch.cat(reg_all, dim=1)}

    def decode(self, dist_logits: Tensor, anchors: Tensor) -> Tensor:
        """Boxes (..., 4) xyxy in input pixels from ``bbox_dist`` (..., 4 * (reg_max + 1)) and anchors (..., 4)."""
        centres = (anchors[..., :2] + anchors[..., 2:]) / 2
        stride = (anchors[..., 2:3] - anchors[..., 0:1]) / self.anchor_scale
        # float32: a bf16 softmax/expectation would quantise distances to a few pixels on coarse levels
        return distance2bbox(centres.float(), integral(dist_logits.float(), self.reg_max) * stride.float())

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
        num_anchors_per_level: list[int] | None = None,
    ) -> dict[str, Tensor]:
        """QFL / GIoU / DFL losses for a batch, given the assignment (``matched_idxs[i]`` (L,), -1 background).

        Returns ``{"classification", "bbox_regression", "bbox_dfl"}``, already multiplied by the loss weights.
        ``num_anchors_per_level`` is unused (losses over all levels at once equal the official per-level sums).
        """
        cls_logits = head_outputs["cls_logits"].float()  # (N, L, K)
        dist_logits = head_outputs["bbox_dist"].float()  # (N, L, 4 * (reg_max + 1))
        matched = torch.stack(matched_idxs)  # (N, L)
        img_idx, loc_idx = (matched >= 0).nonzero(as_tuple=True)  # image-major, like the per-image loop below
        gt_boxes = torch.cat([t["boxes"][m[m >= 0]] for t, m in zip(targets, matched_idxs)]).float()
        gt_labels = torch.cat([t["labels"][m[m >= 0]] for t, m in zip(targets, matched_idxs)])
        pos_anchors = torch.stack(anchors)[img_idx, loc_idx].float()

        # work in stride units, as the official head does (GIoU and IoU are scale-free; DFL targets are not)
        stride = (pos_anchors[:, 2:3] - pos_anchors[:, 0:1]) / self.anchor_scale
        points = (pos_anchors[:, :2] + pos_anchors[:, 2:]) / 2 / stride
        gt_boxes = gt_boxes / stride
        pos_dist = dist_logits[img_idx, loc_idx]  # (P, 4 * (reg_max + 1))
        pred_boxes = distance2bbox(points, integral(pos_dist, self.reg_max))

        soft_targets = torch.zeros_like(cls_logits)
        soft_targets[img_idx, loc_idx, gt_labels - 1] = aligned_box_iou(pred_boxes.detach(), gt_boxes)
        weight = cls_logits.detach().sigmoid().max(dim=-1).values[img_idx, loc_idx]  # (P,); empty without positives
        # Both normalisers in one reduction that every rank makes, one without positives too (its weight sum is 0):
        # under DDP each rank must issue the same collectives, or the next ones pair up wrongly.
        num_pos, norm = _reduce_mean(torch.stack([cls_logits.new_tensor(float(img_idx.numel())), weight.sum()]))
        num_pos, norm = num_pos.clamp(min=1.0), norm.clamp(min=1.0)
        loss_cls = quality_focal_loss(cls_logits, soft_targets).sum() / num_pos

        w_qfl, w_giou, w_dfl = self.loss_weights
        if img_idx.numel() == 0:
            zero = dist_logits.sum() * 0  # keeps the graph, so DDP sees every parameter used
            return {"classification": w_qfl * loss_cls, "bbox_regression": zero, "bbox_dfl": zero}
        giou = generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="none")
        target_corners = bbox2distance(points, gt_boxes, self.reg_max)  # (P, 4)
        dfl = distribution_focal_loss(pos_dist.reshape(-1, self.reg_max + 1), target_corners.reshape(-1))
        loss_dfl = (dfl.reshape(-1, 4) * weight[:, None]).sum() / 4.0
        return {
            "classification": w_qfl * loss_cls,
            "bbox_regression": w_giou * (giou * weight).sum() / norm,
            "bbox_dfl": w_dfl * loss_dfl / norm,
        }
