"""Adapter for torchvision's FCOS (Tian et al., ICCV 2019): anchor-free points, one "anchor" per location.

Head layout: ``cls_logits`` (N, L, K) (torchvision's unused channel 0 sliced off), ``bbox_regression`` (N, L, 4)
(l, t, r, b distances divided by the anchor size, torchvision's ``BoxLinearCoder(normalize_by_size=True)``) and
``centerness`` (N, L, 1) logits.
"""

from __future__ import annotations

from torch import Tensor

from detkd.models.adapters.base import DenseAdapter


class FCOSAdapter(DenseAdapter):
    family = "fcos"

    def _num_classes_from_model(self) -> int:
        return int(self.model.head.classification_head.num_classes) - 1

    def _compute_loss(self, targets, raw_head, anchors, level_sizes) -> dict[str, Tensor]:
        # FCOS.compute_loss takes H*W per level; FCOS has exactly one anchor per location, so it equals level_sizes
        return self.model.compute_loss(targets, raw_head, anchors, list(level_sizes))

    def _encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        # FCOSHead's BoxLinearCoder(normalize_by_size=True), as its GIoU loss decodes with it
        return self.model.head.box_coder.encode(anchors, boxes)

    def _convert_head(self, raw_head: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            "cls_logits": raw_head["cls_logits"][..., 1:],
            "bbox_regression": raw_head["bbox_regression"],
            "centerness": raw_head["bbox_ctrness"],
        }
