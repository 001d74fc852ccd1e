"""GFL detector (Li et al., "Generalized Focal Loss", NeurIPS 2020) in the torchvision dense-detector mould.

Same attributes and stages as torchvision's RetinaNet/FCOS (``transform``, ``backbone``, ``anchor_generator``,
``head``, ``compute_loss``, ``postprocess_detections``) so that detkd adapters treat it like any torchvision
family. ATSS assigns positives (``detkd.regions.atss``); the head trains QFL + GIoU + DFL (``gfl_head``).
The pure functions LD builds on are re-exported here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms, clip_boxes_to_image

from detkd.models.gfl_head import GFLHead, Scale
from detkd.models.gfl_losses import (
    aligned_box_iou,
    bbox2distance,
    distance2bbox,
    distribution_focal_loss,
    integral,
    quality_focal_loss,
)
from detkd.regions.atss import atss_assign

__all__ = [
    "GFL",
    "GFLHead",
    "Scale",
    "StrideAnchorGenerator",
    "aligned_box_iou",
    "bbox2distance",
    "distance2bbox",
    "distribution_focal_loss",
    "integral",
    "quality_focal_loss",
]


class StrideAnchorGenerator(AnchorGenerator):
    """torchvision ``AnchorGenerator`` that places anchors at the nominal strides (x * s, y * s).

    torchvision derives each level's stride as ``padded_size // map_size``, which for P6/P7 of a 32-divisible image
    is not 64/128 (e.g. 800 // 7 = 114). GFL decodes distances in units of the nominal stride and mmdet places its
    anchors on the nominal grid, so the strides are fixed here. One anchor per location.
    """

    def __init__(self, strides: tuple[int, ...], anchor_scale: float = 8.0):
        super().__init__(tuple((anchor_scale * s,) for s in strides), ((1.0,),) * len(strides))
        self.strides = tuple(int(s) for s in strides)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"StrideAnchorGenerator: {len(feature_maps)} feature maps for strides {self.strides}")
        device = feature_maps[0].device
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(feature_maps[0].dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


class GFL(nn.Module):
    """GFL (v1) detector: ``forward(images, targets)`` -> losses in train mode, detections in eval mode.

    ``num_classes`` is K, the number of real classes: the head has K sigmoid outputs and label l (1..K) is channel
    l - 1; detections carry labels 1..K. ``backbone`` must return 5 maps (P3-P7) with ``out_channels`` channels.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        min_size: int = 800,
        max_size: int = 1333,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        head_convs: int = 4,
        strides: tuple[int, ...] = (8, 16, 32, 64, 128),
        reg_max: int = 16,
        anchor_scale: float = 8.0,
        atss_topk: int = 9,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        **kwargs,
    ):
        super().__init__()
        if not hasattr(backbone, "out_channels"):
            raise ValueError("GFL: the backbone needs an `out_channels` attribute (e.g. torchvision BackboneWithFPN)")
        self.backbone = backbone
        self.anchor_generator = StrideAnchorGenerator(tuple(strides), anchor_scale)
        self.head = GFLHead(backbone.out_channels, num_classes, len(strides), head_convs, reg_max, anchor_scale)
        self.transform = GeneralizedRCNNTransform(
            min_size, max_size, image_mean or [0.485, 0.456, 0.406], image_std or [0.229, 0.224, 0.225], **kwargs
        )
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.atss_topk = atss_topk
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        num_anchors_per_level: list[int],
    ) -> dict[str, Tensor]:
        """ATSS assignment per image, then ``head.compute_loss`` (the seam adapters wrap to see ``matched_idxs``)."""
        matched_idxs = [
            atss_assign(a, num_anchors_per_level, t["boxes"], self.atss_topk) for a, t in zip(anchors, targets)
        ]
        return self.head.compute_loss(targets, head_outputs, anchors, matched_idxs, num_anchors_per_level)

    def postprocess_detections(
        self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Per image: per level top-k (location, class) pairs above ``score_thresh``, decode, class-wise NMS."""
        detections = []
        for i, image_shape in enumerate(image_shapes):
            boxes_all, scores_all, labels_all = [], [], []
            for logits, dists, level_anchors in zip(head_outputs["cls_logits"], head_outputs["bbox_dist"], anchors[i]):
                scores = logits[i].sigmoid().flatten()
                keep = torch.where(scores > self.score_thresh)[0]
                scores, order = scores[keep].topk(min(self.topk_candidates, keep.numel()))
                keep = keep[order]
                loc = torch.div(keep, self.num_classes, rounding_mode="floor")
                boxes = self.head.decode(dists[i][loc], level_anchors[loc])
                boxes_all.append(clip_boxes_to_image(boxes, image_shape))
                scores_all.append(scores)
                labels_all.append(keep % self.num_classes + 1)  # channel c <-> label c + 1
            boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Train mode: ``{"classification", "bbox_regression", "bbox_dfl"}``; eval: detections per image in the
        original image coordinates (``boxes`` (D, 4) xyxy, ``scores`` (D,), ``labels`` (D,) in 1..K)."""
        if self.training:
            _check_targets(targets, self.num_classes)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.transform(images, targets)
        features = list(self.backbone(image_list.tensors).values())
        head_outputs = self.head(features)
        anchors = self.anchor_generator(image_list, features)
        num_anchors_per_level = [f.shape[-2] * f.shape[-1] for f in features]
        if self.training:
            return self.compute_loss(targets, head_outputs, anchors, num_anchors_per_level)
        split = {k: list(v.split(num_anchors_per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(num_anchors_per_level)) for a in anchors]
        detections = self.postprocess_detections(split, split_anchors, image_list.image_sizes)
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)


def _check_targets(targets: list[dict[str, Tensor]] | None, num_classes: int) -> None:
    """Fail early, naming the image, instead of deep inside ATSS or a loss."""
    if targets is None:
        raise ValueError("GFL: targets are required in training mode")
    for i, t in enumerate(targets):
        boxes = t["boxes"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"GFL: targets[{i}]['boxes'] must be (M, 4), got {tuple(boxes.shape)}")
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if bad.any():
            j = int(bad.nonzero()[0])
            raise ValueError(f"GFL: targets[{i}] box {j} {boxes[j].tolist()} has non-positive width or height")
        labels = t["labels"]
        if labels.numel() and (labels.min() < 1 or labels.max() > num_classes):
            bad_label = int(labels.min()) if labels.min() < 1 else int(labels.max())
            raise ValueError(f"GFL: targets[{i}] has label {bad_label}; labels must be in 1..{num_classes}")
