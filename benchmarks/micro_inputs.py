"""The hand-built inputs of ``micro.py`` (no detector runs): the ``Shapes`` of the batch (the issue's realistic
defaults, and ``QUICK`` for a smoke run), random boxes, GFL/ATSS anchors on the FPN levels P3–P7 (``LEVELS``,
``STRIDES``) with an ATSS assignment, random feature maps and GFL-shaped head outputs, Faster R-CNN-shaped RPN/RoI
samples for Chen et al. (``chen_extras``), all gathered by ``build_inputs`` into student and teacher ``DetOutputs``
(``Inputs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from detkd.regions.atss import atss_assign
from detkd.structures import Assignment, DetOutputs, FeatureSpec

LEVELS = ("p3", "p4", "p5", "p6", "p7")
STRIDES = (8, 16, 32, 64, 128)


@dataclass(frozen=True)
class Shapes:
    """Sizes of the hand-built batch (defaults: the issue's realistic shapes)."""

    batch: int = 8
    image: int = 512
    channels: int = 256
    classes: int = 80
    reg_max: int = 16
    min_boxes: int = 10
    max_boxes: int = 50
    rpn_samples: int = 256  # per image (torchvision's rpn batch_size_per_image)
    rois: int = 512  # per image (torchvision's box_batch_size_per_image)
    rpn_anchors: int = 3  # anchors per location of the RPN, on p2..p6


QUICK = Shapes(batch=2, image=256, channels=64, classes=20, min_boxes=3, max_boxes=8, rpn_samples=64, rois=64)


@dataclass
class Inputs:
    student: DetOutputs
    teacher: DetOutputs
    specs: dict[str, FeatureSpec]
    leaves: list[Tensor]  # student-side tensors that receive gradients (cleared before every call)


def random_boxes(n: int, image: int, lo: int, hi: int, gen: torch.Generator) -> list[Tensor]:
    """Per image, ``lo..hi`` xyxy boxes of side 16 px .. image/2, inside the image."""
    out = []
    for _ in range(n):
        m = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        wh = 16 + torch.rand(m, 2, generator=gen) * (image / 2 - 16)
        xy = torch.rand(m, 2, generator=gen) * (image - wh)
        out.append(torch.cat([xy, xy + wh], dim=1))
    return out


def grid_anchors(image: int) -> tuple[Tensor, list[int]]:
    """GFL/ATSS anchors: one square of side 8·stride centred at (x·s, y·s) per cell; (L, 4) and per-level sizes."""
    anchors, sizes = [], []
    for s in STRIDES:
        side = image // s
        ys, xs = torch.meshgrid(torch.arange(side) * float(s), torch.arange(side) * float(s), indexing="ij")
        c = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)
        anchors.append(torch.cat([c - 4 * s, c + 4 * s], dim=1))
        sizes.append(side * side)
    return torch.cat(anchors), sizes


def _outputs(features, head, anchors, sizes, targets, assignment, extras, shapes) -> DetOutputs:
    return DetOutputs(
        family="gfl",
        batch_shape=(shapes.image, shapes.image),
        image_sizes=[(shapes.image, shapes.image)] * shapes.batch,
        targets=targets,
        features=features,
        strides=dict(zip(LEVELS, STRIDES)),
        head=head,
        level_sizes=sizes,
        num_anchors_per_location=1,
        anchors=anchors,
        assignment=assignment,
        extras=extras,
    )


def chen_extras(shapes: Shapes, gen: torch.Generator, device: torch.device) -> tuple[dict, dict, list[Tensor]]:
    """Faster R-CNN-shaped RPN and RoI samples (student, teacher) for ``ChenLoss``; a quarter are foreground."""
    n, k1 = shapes.batch, shapes.classes + 1
    num_anchors = n * shapes.rpn_anchors * sum((shapes.image // s) ** 2 for s in (4, 8, 16, 32, 64))
    s_rows, r_rows = n * shapes.rpn_samples, n * shapes.rois

    def randn(*size: int, grad: bool = False) -> Tensor:
        return torch.randn(*size, generator=gen).to(device).requires_grad_(grad)

    rpn_labels = (torch.rand(s_rows, generator=gen) < 0.25).float().to(device)
    roi_labels = torch.randint(1, k1, (r_rows,), generator=gen) * (torch.rand(r_rows, generator=gen) < 0.25)
    s_rpn = {"objectness": randn(s_rows, grad=True), "deltas": randn(s_rows, 4, grad=True), "labels": rpn_labels,
             "regression_targets": randn(s_rows, 4),
             "sampled_index": torch.randint(0, num_anchors, (s_rows,), generator=gen).to(device)}
    s_roi = {"class_logits": randn(r_rows, k1, grad=True), "box_regression": randn(r_rows, 4 * k1, grad=True),
             "labels": roi_labels.to(device), "regression_targets": randn(r_rows, 4)}
    t_rpn = {"objectness": randn(num_anchors), "deltas": randn(num_anchors, 4)}
    t_roi = {"class_logits": randn(r_rows, k1), "box_regression": randn(r_rows, 4 * k1)}
    leaves = [s_rpn["objectness"], s_rpn["deltas"], s_roi["class_logits"], s_roi["box_regression"]]
    return {"rpn": s_rpn, "roi": s_roi}, {"rpn": t_rpn, "roi": t_roi}, leaves


def build_inputs(shapes: Shapes, device: torch.device, seed: int = 0) -> Inputs:
    """Student and teacher ``DetOutputs`` of one hand-built batch (random maps and logits, random boxes)."""
    gen = torch.Generator().manual_seed(seed)
    n, c = shapes.batch, shapes.channels
    boxes = random_boxes(n, shapes.image, shapes.min_boxes, shapes.max_boxes, gen)
    targets = [{"boxes": b.to(device), "labels": torch.randint(1, shapes.classes + 1, (len(b),), generator=gen)
                .to(device)} for b in boxes]
    anchors, sizes = grid_anchors(shapes.image)
    matched = [atss_assign(anchors, sizes, b) for b in boxes]
    labels = torch.stack([torch.where(m >= 0, t["labels"].cpu()[m.clamp(min=0)], 0) for m, t in zip(matched, targets)])
    assignment = Assignment([m.to(device) for m in matched], labels.to(device))
    anchors = anchors.to(device)
    total = sum(sizes)

    def maps(grad: bool) -> dict[str, Tensor]:
        return {lv: torch.randn(n, c, shapes.image // s, shapes.image // s, generator=gen).to(device)
                .requires_grad_(grad) for lv, s in zip(LEVELS, STRIDES)}

    def head(grad: bool) -> dict[str, Tensor]:
        return {"cls_logits": torch.randn(n, total, shapes.classes, generator=gen).to(device).requires_grad_(grad),
                "bbox_dist": torch.randn(n, total, 4 * (shapes.reg_max + 1), generator=gen).to(device)
                .requires_grad_(grad)}

    s_feat, t_feat, s_head, t_head = maps(True), maps(False), head(True), head(False)
    s_extras, t_extras, chen_leaves = chen_extras(shapes, gen, device)
    student = _outputs(s_feat, s_head, anchors, sizes, targets, assignment, s_extras, shapes)
    teacher = _outputs(t_feat, t_head, anchors, sizes, None, None, t_extras, shapes)
    specs = {lv: FeatureSpec(c, s) for lv, s in zip(LEVELS, STRIDES)}
    return Inputs(student, teacher, specs, [*s_feat.values(), *s_head.values(), *chen_leaves])
