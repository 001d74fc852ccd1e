"""Adapter for torchvision's RetinaNet (Lin et al., ICCV 2017): focal-loss classification over anchors.

torchvision's head predicts K+1 classes (channel 0 unused, labels index channels directly); the adapter exposes the
K real classes as a slice (a view, so gradients flow into the model's logits).
"""

from __future__ import annotations

from torch import Tensor

from detkd.models.adapters.base import DenseAdapter


class RetinaNetAdapter(DenseAdapter):
    family = "retinanet"

    def _num_classes_from_model(self) -> int:
        return int(self.model.head.classification_head.num_classes) - 1

    def _compute_loss(self, targets, raw_head, anchors, level_sizes) -> dict[str, Tensor]:
        # RetinaNet.compute_loss matches anchors (IoU Matcher) and calls head.compute_loss(..., matched_idxs)
        return self.model.compute_loss(targets, raw_head, anchors)

    def _encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        # the regression head's own BoxCoder, as its loss uses it
        return self.model.head.regression_head.box_coder.encode_single(boxes, anchors)

    def _convert_head(self, raw_head: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"cls_logits": raw_head["cls_logits"][..., 1:], "bbox_regression": raw_head["bbox_regression"]}
