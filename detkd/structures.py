"""Data structures shared by adapters, regions, losses and the distiller.

Layout conventions (every family follows them, so that no method reaches into a model):

* Images are preprocessed by the detector's own transform and padded into one batch tensor of shape
  ``batch_shape = (H, W)``. ``image_sizes[i] = (h_i, w_i)`` is image i's resized, *unpadded* size.
* ``targets`` are in network-input coordinates: ``boxes`` (M, 4) xyxy float pixels, ``labels`` (M,) int64 in 1..K.
* ``features`` maps FPN level names (``"p2"`` .. ``"p7"``) to (N, C, H_l, W_l) tensors, in stride order.
* Dense head outputs are concatenated over levels in the torchvision order: for each level, locations in
  row-major (y, x) order and, inside a location, its A anchors. ``head["cls_logits"]`` is (N, L, K) over the K real
  classes only (no background channel; adapters drop torchvision's unused channel 0). ``head["bbox_regression"]`` is
  (N, L, 4) box deltas of the family's own box coder, ``head["bbox_dist"]`` (GFL) is (N, L, 4 * (reg_max + 1))
  edge-distribution logits in (l, t, r, b) order, ``head["centerness"]`` (FCOS) is (N, L, 1).
  ``level_sizes[l] = H_l * W_l * A`` splits L back into levels.
* ``anchors`` (L, 4) xyxy in input coordinates is shared by every image of the batch (same padded size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class FeatureSpec:
    """Channels and stride of one feature map; enough to size connectors without a dummy forward pass."""

    channels: int
    stride: int


@dataclass
class Assignment:
    """Label assignment of a dense head, over the concatenated locations of all levels.

    matched_idxs: per image, (L,) int64: index of the matched target box, -1 background, -2 ignored
        (torchvision's Matcher convention).
    labels: (N, L) int64 assigned class in 1..K for positives, 0 elsewhere.
    """

    matched_idxs: list[Tensor]
    labels: Tensor

    @property
    def positive_mask(self) -> Tensor:
        """(N, L) bool, True where a location is a positive sample."""
        return self.labels > 0


@dataclass
class DetOutputs:
    """What an adapter returns for one batch; see the module docstring for layouts."""

    family: str
    batch_shape: tuple[int, int]
    image_sizes: list[tuple[int, int]]
    targets: list[dict[str, Tensor]] | None
    features: dict[str, Tensor]
    strides: dict[str, int]
    head: dict[str, Tensor] = field(default_factory=dict)
    level_sizes: list[int] = field(default_factory=list)
    num_anchors_per_location: int = 1
    anchors: Tensor | None = None
    assignment: Assignment | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def level_names(self) -> list[str]:
        return list(self.features)

    def split_levels(self, key: str) -> list[Tensor]:
        """``head[key]`` (N, L, D) split into per-level (N, L_l, D) tensors."""
        return list(self.head[key].split(self.level_sizes, dim=1))

    def as_maps(self, key: str) -> dict[str, Tensor]:
        """``head[key]`` reshaped to per-level maps (N, A * D, H_l, W_l), keyed like ``features``."""
        out = {}
        a = self.num_anchors_per_location
        for name, part in zip(self.features, self.split_levels(key)):
            n, _, h, w = self.features[name].shape
            d = part.shape[-1]
            out[name] = part.reshape(n, h, w, a * d).permute(0, 3, 1, 2)
        return out
