"""Adapter for detkd's GFL (Li et al., NeurIPS 2020; :mod:`detkd.models.gfl`), ATSS-assigned.

The head already predicts the K real classes (sigmoid, label l <-> channel l - 1), so ``cls_logits`` is passed
through unchanged; ``bbox_dist`` (N, L, 4 * (reg_max + 1)) holds the (l, t, r, b) edge-distribution logits that LD
distils. One anchor per location.
"""

from __future__ import annotations

from torch import Tensor

from detkd.models.adapters.base import DenseAdapter


class GFLAdapter(DenseAdapter):
    family = "gfl"

    def _num_classes_from_model(self) -> int:
        return int(self.model.num_classes)

    @property
    def reg_max(self) -> int:
        return int(self.model.reg_max)

    def _compute_loss(self, targets, raw_head, anchors, level_sizes) -> dict[str, Tensor]:
        # GFL.compute_loss runs ATSS per image and calls head.compute_loss(..., matched_idxs, num_anchors_per_level)
        return self.model.compute_loss(targets, raw_head, anchors, list(level_sizes))

    def _convert_head(self, raw_head: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"cls_logits": raw_head["cls_logits"], "bbox_dist": raw_head["bbox_dist"]}
