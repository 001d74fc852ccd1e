"""Adapter for torchvision's Faster R-CNN with FPN (Ren et al., NeurIPS 2015; Lin et al., CVPR 2017).

Levels p2..p6 (strides 4..64; torchvision names them '0'..'3', 'pool'). The two stages run as the model's own pieces
in ``RegionProposalNetwork.forward`` / ``RoIHeads.forward`` order; the only addition is observation: the RPN's
sampled anchors are captured by wrapping ``rpn.fg_bg_sampler`` for the call. Chen et al. 2017 distil both stages,
so ``extras`` carries everything their losses need:

* ``extras["rpn"]``: ``objectness`` (S,) logits, ``deltas`` (S, 4), ``labels`` (S,) float {0, 1},
  ``regression_targets`` (S, 4), ``sampled_index`` (S,) into the flattened (N * A_total) anchor list (image-major,
  then the torchvision level/location/anchor order), ``num_anchors`` = A_total per image.
* ``extras["roi"]``: sampled ``proposals`` (list of (R_i, 4) per image), ``class_logits`` (R, K+1) with background at
  index 0 (torchvision), ``box_regression`` (R, (K+1)*4), ``labels`` (R,) in 0..K, ``regression_targets`` (R, 4).

``head`` holds the RPN outputs in the dense layout: ``objectness`` (N, A_total, 1), ``bbox_regression``
(N, A_total, 4).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import concat_box_prediction_layers

from detkd.models.adapters.base import (
    DetectorAdapter,
    PreparedBatch,
    capture_call,
    check_stage,
    same_geometry,
)
from detkd.structures import DetOutputs


class FasterRCNNAdapter(DetectorAdapter):
    family = "faster_rcnn"
    default_levels = ("p2", "p3", "p4", "p5", "p6")
    default_strides = (4, 8, 16, 32, 64)

    def _num_classes_from_model(self) -> int:
        return int(self.model.roi_heads.box_predictor.cls_score.out_features) - 1

    def run(self, batch: PreparedBatch, stage: str = "loss") -> DetOutputs:
        check_stage(stage, batch)
        raw = self._backbone(batch)
        out = self._new_outputs(batch, self._rename(raw))
        if stage == "features":
            return out
        objectness, deltas, anchors, per_level = self._rpn_head(raw, batch.images)
        n = len(anchors)
        out.head = {"objectness": objectness.view(n, -1, 1), "bbox_regression": deltas.view(n, -1, 4)}
        out.level_sizes = per_level
        out.num_anchors_per_location = int(self.model.rpn.anchor_generator.num_anchors_per_location()[0])
        out.anchors = anchors[0]
        out.extras.update(anchor_list=anchors, image_list=batch.images)
        if stage == "loss":
            out.losses, rpn_extras, roi_extras = self._losses(raw, batch.images, batch.targets, objectness, deltas,
                                                               anchors, per_level)
            out.extras.update(rpn=rpn_extras, roi=roi_extras)
        return out

    def _rpn_head(self, raw: OrderedDict[str, Tensor], images: ImageList):
        """RPN head + anchors: objectness (N*A_total, 1), deltas (N*A_total, 4), anchors, A*H*W per level."""
        rpn = self.model.rpn
        feats = list(raw.values())
        objectness, deltas = rpn.head(feats)
        anchors = rpn.anchor_generator(images, feats)
        per_level = [int(o[0].numel()) for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        return objectness, deltas, anchors, per_level

    def _losses(self, raw, images, targets, objectness, deltas, anchors, per_level):
        """Both stages' losses, in RegionProposalNetwork.forward then RoIHeads.forward order."""
        rpn = self.model.rpn
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, _ = rpn.filter_proposals(proposals, objectness, images.image_sizes, per_level)
        labels, matched_gt_boxes = rpn.assign_targets_to_anchors(anchors, targets)
        regression_targets = rpn.box_coder.encode(matched_gt_boxes, anchors)
        record: dict[str, Any] = {}
        with capture_call(rpn, "fg_bg_sampler", record):
            loss_objectness, loss_rpn_box_reg = rpn.compute_loss(objectness, deltas, labels, regression_targets)
        pos, neg = record["result"]
        # same order as RegionProposalNetwork.compute_loss: positives then negatives, over the image-major flat list
        sampled = torch.cat([torch.where(torch.cat(pos))[0], torch.where(torch.cat(neg))[0]])
        rpn_extras = {
            "objectness": objectness.flatten()[sampled],
            "deltas": deltas[sampled],
            "labels": torch.cat(labels)[sampled],
            "regression_targets": torch.cat(regression_targets)[sampled],
            "sampled_index": sampled,
            "num_anchors": int(anchors[0].shape[0]),
        }
        roi_proposals, _, roi_labels, roi_targets = self.model.roi_heads.select_training_samples(boxes, targets)
        class_logits, box_regression = self._roi_head(raw, roi_proposals, images.image_sizes)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, roi_labels, roi_targets)
        roi_extras = {
            "proposals": roi_proposals,
            "class_logits": class_logits,
            "box_regression": box_regression,
            "labels": torch.cat(roi_labels),
            "regression_targets": torch.cat(roi_targets),
        }
        losses = {
            "loss_classifier": loss_classifier,
            "loss_box_reg": loss_box_reg,
            "loss_objectness": loss_objectness,
            "loss_rpn_box_reg": loss_rpn_box_reg,
        }
        return losses, rpn_extras, roi_extras

    def _roi_head(self, raw, proposals, image_sizes) -> tuple[Tensor, Tensor]:
        roi = self.model.roi_heads
        box_features = roi.box_head(roi.box_roi_pool(raw, proposals, image_sizes))
        return roi.box_predictor(box_features)

    def roi_outputs(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """This model's RoI head on given proposals (e.g. the student's sampled ones, on the teacher's pyramid).

        Returns class_logits (R, K+1) (background at index 0) and box_regression (R, (K+1)*4).
        """
        return self._roi_head(self._to_raw(features), proposals, image_sizes)

    def rpn_head_outputs(self, features: dict[str, Tensor], batch: PreparedBatch) -> tuple[Tensor, Tensor]:
        """RPN head on ``features``: objectness (N*A_total,) and deltas (N*A_total, 4), flattened in the order
        that ``extras["rpn"]["sampled_index"]`` indexes."""
        objectness, deltas = self.model.rpn.head(list(self._to_raw(features).values()))
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        n = len(batch.images.image_sizes)
        if objectness.shape[0] % n:
            raise ValueError(f"rpn_head_outputs: {objectness.shape[0]} anchors do not split over {n} images")
        return objectness.flatten(), deltas

    def head_losses(self, features: dict[str, Tensor], like: DetOutputs) -> dict[str, Tensor]:
        """RPN + RoI losses of this model on another pyramid, with ``like``'s batch geometry and targets."""
        if like.targets is None or "image_list" not in like.extras:
            raise ValueError("head_losses needs a DetOutputs from run(batch, stage='head' or 'loss') with targets")
        same_geometry(features, like)
        raw = self._to_raw(features)
        images = like.extras["image_list"]
        objectness, deltas, anchors, per_level = self._rpn_head(raw, images)
        return self._losses(raw, images, like.targets, objectness, deltas, anchors, per_level)[0]

    def _detect_batch(self, batch: PreparedBatch, raw: OrderedDict[str, Tensor] | None = None) -> list[dict]:
        raw = self._backbone(batch) if raw is None else raw
        proposals, _ = self.model.rpn(batch.images, raw)
        detections, _ = self.model.roi_heads(raw, proposals, batch.images.image_sizes)
        return detections
