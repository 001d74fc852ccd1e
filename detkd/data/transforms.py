"""Box-aware image transforms on ``torchvision.transforms.v2`` functionals and ``tv_tensors``.

Every transform maps ``(image, target)`` to ``(image, target)``: image (3, H, W) float in [0, 1], target with
``boxes`` (M, 4) xyxy pixels and ``labels`` (M,); other keys pass through. Random choices come from an explicit
``torch.Generator`` when one is given (same seed -> same output), else from torch's global RNG, which the
DataLoader seeds per worker from its own seeded generator (see ``loader.py``), so training stays reproducible.

Note on scale jitter: torchvision detectors resize every image to their ``min_size`` themselves, which would undo a
plain random rescale. ``ScaleJitter`` therefore keeps the canvas size: it rescales the content by ``s`` and then
crops (``s > 1``) or pads (``s < 1``) back to the original size, at a random offset -- large-scale jitter (Ghiasi et
al., "Simple Copy-Paste", 2021). Objects really change size in the network input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from detkd.config import DataConfig

#: pad value for ScaleJitter: the ImageNet mean, i.e. zero after the detector's normalisation, like batch padding.
IMAGENET_MEAN = [0.485, 0.456, 0.406]


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [0, high]."""
    return int(torch.randint(0, high + 1, (), generator=generator))


def _wrap(image: Tensor, target: dict[str, Any]) -> tuple[tv_tensors.Image, tv_tensors.BoundingBoxes]:
    boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:]))
    return tv_tensors.Image(image), boxes


def _unwrap(image: Tensor, boxes: Tensor, target: dict[str, Any], keep: Tensor | None = None) -> tuple[Tensor, dict]:
    out = dict(target)
    boxes = boxes.as_subclass(Tensor)
    if keep is not None:
        boxes = boxes[keep]
        out["labels"] = target["labels"][keep]
    out["boxes"] = boxes
    return image.as_subclass(Tensor), out


class HorizontalFlip:
    """Flip image and boxes left-right with probability ``p``: ``x1' = W - x2``, ``x2' = W - x1``."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        self.p = p
        self.generator = generator

    def __call__(self, image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        if self.p <= 0 or float(torch.rand((), generator=self.generator)) >= self.p:
            return image, target
        img, boxes = _wrap(image, target)
        return _unwrap(F.horizontal_flip(img), F.horizontal_flip(boxes), target)


class Resize:
    """Resize keeping the aspect ratio: shorter side -> ``size``, longer side capped at ``max_size``."""

    def __init__(self, size: int, max_size: int | None = None):
        self.size = size
        self.max_size = max_size

    def __call__(self, image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        img, boxes = _wrap(image, target)
        h, w = image.shape[-2:]
        scale = self.size / min(h, w)
        if self.max_size is not None and max(h, w) * scale > self.max_size:
            scale = self.max_size / max(h, w)
        size = [max(1, round(h * scale)), max(1, round(w * scale))]
        return _unwrap(F.resize(img, size, antialias=True), F.resize(boxes, size), target)


class ScaleJitter:
    """Rescale content by ``s ~ U(lo, hi)``, then crop or pad back to the input size (see module docstring).

    Boxes are shifted with the crop/pad, clipped to the canvas, and dropped when a side becomes ``<= min_side`` px.
    """

    def __init__(
        self,
        scale_range: Sequence[float] = (0.8, 1.2),
        generator: torch.Generator | None = None,
        min_side: float = 1.0,
        fill: Sequence[float] = tuple(IMAGENET_MEAN),
    ):
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_jitter must be [lo, hi] with 0 < lo <= hi, got {list(scale_range)}")
        self.scale_range = tuple(scale_range)
        self.generator = generator
        self.min_side = min_side
        self.fill = list(fill)

    def __call__(self, image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        img, boxes = _wrap(image, target)
        h, w = image.shape[-2:]
        s = _uniform(*self.scale_range, self.generator)
        sh, sw = max(1, round(h * s)), max(1, round(w * s))
        img, boxes = F.resize(img, [sh, sw], antialias=True), F.resize(boxes, [sh, sw])
        # One scale for both axes, so the scaled image is at least as large on both (crop) or at most (pad).
        dy, dx = _randint(abs(sh - h), self.generator), _randint(abs(sw - w), self.generator)
        if s >= 1:
            img, boxes = F.crop(img, dy, dx, h, w), F.crop(boxes, dy, dx, h, w)
        else:
            padding = [dx, dy, w - sw - dx, h - sh - dy]  # left, top, right, bottom
            img, boxes = F.pad(img, padding, fill=self.fill), F.pad(boxes, padding)
        boxes = boxes.as_subclass(Tensor).clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)  # explicit: independent of tv_tensors' clamping mode
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        side = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        return _unwrap(img, boxes, target, keep=side > self.min_side)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: list):
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


def build_transforms(cfg: DataConfig, *, train: bool, generator: torch.Generator | None = None) -> Compose | None:
    """Training: optional ``ScaleJitter(cfg.scale_jitter)`` then ``HorizontalFlip(cfg.hflip)``; eval: none."""
    if not train:
        return None
    steps: list = []
    if cfg.scale_jitter:
        steps.append(ScaleJitter(cfg.scale_jitter, generator=generator))
    if cfg.hflip > 0:
        steps.append(HorizontalFlip(cfg.hflip, generator=generator))
    return Compose(steps) if steps else None
