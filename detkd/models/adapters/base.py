"""DetectorAdapter: run a torchvision-style detector stage by stage and return :class:`DetOutputs`.

An adapter never re-implements the detector's math. It calls the model's own pieces in the model's own order
(``transform`` -> ``backbone`` -> head -> anchors -> ``compute_loss``) and only *observes*: the label assignment is
captured by wrapping ``head.compute_loss`` for the duration of one call. Layout conventions are those documented in
:mod:`detkd.structures`.

Stages (``run(batch, stage)``):

* ``"features"``: backbone + FPN only (what a feature-distillation teacher needs);
* ``"head"``: + raw head outputs and anchors;
* ``"loss"``: + label assignment and the task losses (needs targets).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from detkd.structures import Assignment, DetOutputs, FeatureSpec

STAGES = ("features", "head", "loss")


@dataclass
class PreparedBatch:
    """What the student's transform produced; the teacher runs on the SAME batch (shared geometry).

    images: padded (N, 3, H, W) tensor + ``image_sizes`` (resized, unpadded (h, w) per image).
    targets: copies of the input targets in network-input coordinates, or None.
    original_sizes: (h, w) of each input image before the transform (to map detections back).
    """

    images: ImageList
    targets: list[dict[str, Tensor]] | None
    original_sizes: list[tuple[int, int]]


class DetectorAdapter:
    """Common part of every family: preprocessing, backbone, level naming, feature specs, detection."""

    family: str = ""
    #: level names and strides used when the model carries no ``detkd_spec`` (plain torchvision model)
    default_levels: tuple[str, ...] = ("p3", "p4", "p5", "p6", "p7")
    default_strides: tuple[int, ...] = (8, 16, 32, 64, 128)

    def __init__(self, model: nn.Module):
        self.model = model
        spec = getattr(model, "detkd_spec", None)
        if spec is not None and spec.family != self.family:
            raise ValueError(f"{type(self).__name__} got a model whose detkd_spec.family is {spec.family!r}")
        self.level_names: list[str] = list(spec.level_names) if spec is not None else list(self.default_levels)
        strides = spec.strides if spec is not None else self.default_strides
        self.strides: dict[str, int] = dict(zip(self.level_names, strides))
        self.num_classes: int = spec.num_classes if spec is not None else self._num_classes_from_model()
        # backbone output keys in order ('0', '1', 'pool', ...), recorded on the first run; needed to hand a renamed
        # pyramid back to modules that index the raw dict (MultiScaleRoIAlign)
        self._raw_keys: list[str] | None = None

    def _num_classes_from_model(self) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------ specs and input
    def feature_specs(self) -> dict[str, FeatureSpec]:
        """``{level: FeatureSpec(channels, stride)}`` from the model's attributes alone (no forward pass)."""
        channels = int(self.model.backbone.out_channels)
        return {name: FeatureSpec(channels, stride) for name, stride in self.strides.items()}

    def preprocess(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> PreparedBatch:
        """Run ``model.transform`` (resize, normalise, pad) on copies; the inputs are never mutated.

        Raises ValueError naming the image/target index for a malformed image, a degenerate box or a label outside
        1..K, instead of failing deep inside a loss.
        """
        for i, img in enumerate(images):
            if not isinstance(img, Tensor) or img.dim() != 3:
                raise ValueError(f"image {i}: expected a (3, H, W) tensor, got {getattr(img, 'shape', type(img))}")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        if targets is not None:
            if len(targets) != len(images):
                raise ValueError(f"{len(images)} images but {len(targets)} targets")
            _check_targets(targets, self.num_classes)
        copies = None if targets is None else [dict(t) for t in targets]
        image_list, new_targets = self.model.transform(list(images), copies)
        return PreparedBatch(image_list, new_targets, original_sizes)

    # ------------------------------------------------------------------ backbone
    def _backbone(self, batch: PreparedBatch) -> OrderedDict[str, Tensor]:
        raw = self.model.backbone(batch.images.tensors)
        if isinstance(raw, Tensor):
            raw = OrderedDict([("0", raw)])
        if len(raw) != len(self.level_names):
            raise ValueError(
                f"{self.family}: backbone returned {len(raw)} maps {list(raw)} but the adapter expects levels "
                f"{self.level_names}; set model.detkd_spec or use detkd.models.build"
            )
        self._raw_keys = list(raw)
        return raw

    def _rename(self, raw: OrderedDict[str, Tensor]) -> dict[str, Tensor]:
        return dict(zip(self.level_names, raw.values()))

    def _to_raw(self, features: dict[str, Tensor]) -> OrderedDict[str, Tensor]:
        """A pyramid keyed by level names, re-keyed like the backbone's own output dict."""
        missing = [n for n in self.level_names if n not in features]
        if missing:
            raise KeyError(f"{self.family}: features lack levels {missing}; got {list(features)}")
        keys = self._raw_keys or self.level_names
        return OrderedDict((k, features[n]) for k, n in zip(keys, self.level_names))

    def _new_outputs(self, batch: PreparedBatch, features: dict[str, Tensor]) -> DetOutputs:
        h, w = batch.images.tensors.shape[-2:]
        return DetOutputs(
            family=self.family,
            batch_shape=(int(h), int(w)),
            image_sizes=[(int(a), int(b)) for a, b in batch.images.image_sizes],
            targets=batch.targets,
            features=features,
            strides={n: self.strides[n] for n in features},
        )

    # ------------------------------------------------------------------ API implemented per family
    def run(self, batch: PreparedBatch, stage: str = "loss") -> DetOutputs:
        raise NotImplementedError

    def head_losses(self, features: dict[str, Tensor], like: DetOutputs) -> dict[str, Tensor]:
        raise NotImplementedError

    def _detect_batch(self, batch: PreparedBatch, raw: OrderedDict[str, Tensor] | None = None) -> list[dict]:
        """Detections in network-input coordinates from the backbone's pyramid (or ``raw``, keyed like it)."""
        raise NotImplementedError

    def detect_from_features(self, batch: PreparedBatch, features: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        """This model's heads and post-processing run on another pyramid (by level name) with ``batch``'s geometry;
        detections in original image coordinates. Used to evaluate LGD's label-guided branch."""
        was_training = self.model.training
        self.model.eval()
        try:
            detections = self._detect_batch(batch, self._to_raw(features))
            return self.model.transform.postprocess(detections, batch.images.image_sizes, batch.original_sizes)
        finally:
            self.model.train(was_training)

    def detect(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections in original image coordinates, equal to ``model(images)`` in eval mode.

        The model is put in eval mode for the call and restored afterwards; gradients are left to the caller.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            batch = self.preprocess(images)
            detections = self._detect_batch(batch)
            return self.model.transform.postprocess(detections, batch.images.image_sizes, batch.original_sizes)
        finally:
            self.model.train(was_training)


class DenseAdapter(DetectorAdapter):
    """Dense one-stage families (RetinaNet, FCOS, GFL): ``head(features)`` -> anchors -> ``compute_loss``.

    A family only says how to call its ``compute_loss`` and how to map its raw head dict to the detkd layout.
    """

    def _compute_loss(self, targets, raw_head, anchors, level_sizes) -> dict[str, Tensor]:
        raise NotImplementedError

    def _convert_head(self, raw_head: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def run(self, batch: PreparedBatch, stage: str = "loss") -> DetOutputs:
        check_stage(stage, batch)
        raw = self._backbone(batch)
        out = self._new_outputs(batch, self._rename(raw))
        if stage == "features":
            return out
        feats = list(raw.values())
        raw_head = self.model.head(feats)
        anchors = self.model.anchor_generator(batch.images, feats)
        hw = [f.shape[-2] * f.shape[-1] for f in feats]
        a = raw_head["cls_logits"].shape[1] // sum(hw)
        out.head = self._convert_head(raw_head)
        out.level_sizes = [n * a for n in hw]
        out.num_anchors_per_location = a
        out.anchors = anchors[0]  # every image of the batch has the same padded size, hence the same anchors
        out.extras.update(raw_head=raw_head, anchor_list=anchors)
        if stage == "loss":
            out.losses, matched = self._losses(out, raw_head)
            out.assignment = assignment_from_matches(matched, batch.targets)
            targets = self._regression_targets(batch.targets, matched, anchors)
            if targets is not None:
                out.extras["regression_targets"] = targets
        return out

    def _encode(self, boxes: Tensor, anchors: Tensor) -> Tensor | None:
        """The family's own box-coder encoding of matched boxes (L, 4) at ``anchors``; None if it has none."""
        return None

    def _regression_targets(self, targets, matched: list[Tensor], anchors: list[Tensor]) -> Tensor | None:
        """(N, L, 4) encoded regression targets of each location's matched box (zeros where unmatched)."""
        rows = []
        for tgt, idx, anc in zip(targets, matched, anchors):
            boxes = tgt["boxes"][idx.clamp(min=0)] if tgt["boxes"].numel() else torch.zeros_like(anc)
            enc = self._encode(boxes.to(anc.dtype), anc)
            if enc is None:
                return None
            rows.append(torch.where((idx >= 0)[:, None], enc, torch.zeros_like(enc)))
        return torch.stack(rows).detach()

    def _losses(self, like: DetOutputs, raw_head: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[Tensor]]:
        """The model's own ``compute_loss``; ``matched_idxs`` observed on its way into ``head.compute_loss``."""
        record: dict[str, Any] = {}
        with capture_call(self.model.head, "compute_loss", record):
            losses = self._compute_loss(like.targets, raw_head, like.extras["anchor_list"], like.level_sizes)
        return losses, list(record["args"]["matched_idxs"])

    def head_losses(self, features: dict[str, Tensor], like: DetOutputs) -> dict[str, Tensor]:
        """This model's head, assignment and losses on another pyramid with ``like``'s geometry and targets."""
        if like.targets is None or "anchor_list" not in like.extras:
            raise ValueError("head_losses needs a DetOutputs from run(batch, stage='head' or 'loss') with targets")
        feats = same_geometry(features, like)
        return self._losses(like, self.model.head(feats))[0]

    def _detect_batch(self, batch: PreparedBatch, raw: OrderedDict[str, Tensor] | None = None) -> list[dict]:
        feats = list((self._backbone(batch) if raw is None else raw).values())
        raw_head = self.model.head(feats)
        anchors = self.model.anchor_generator(batch.images, feats)
        hw = [f.shape[-2] * f.shape[-1] for f in feats]
        sizes = [n * (raw_head["cls_logits"].shape[1] // sum(hw)) for n in hw]
        split = {k: list(v.split(sizes, dim=1)) for k, v in raw_head.items()}
        return self.model.postprocess_detections(split, [list(a.split(sizes)) for a in anchors],
                                                 batch.images.image_sizes)


def _check_targets(targets: list[dict[str, Tensor]], num_classes: int) -> None:
    """The detector's own target checks (plus labels in 1..K), as ValueErrors naming the target and the box."""
    for i, t in enumerate(targets):
        boxes, labels = t.get("boxes"), t.get("labels")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target {i}: 'boxes' must be a (M, 4) tensor, got {getattr(boxes, 'shape', boxes)}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
            raise ValueError(f"target {i}: 'labels' must be an int64 tensor of shape ({boxes.shape[0]},)")
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if bad.any():
            j = int(torch.where(bad)[0][0])
            raise ValueError(f"target {i}: box {j} {boxes[j].tolist()} has non-positive width or height")
        out_of_range = (labels < 1) | (labels > num_classes)
        if out_of_range.any():
            j = int(torch.where(out_of_range)[0][0])
            raise ValueError(f"target {i}: box {j} has label {int(labels[j])}; labels must be in 1..{num_classes}")


def same_geometry(features: dict[str, Tensor], like: DetOutputs) -> list[Tensor]:
    """``features`` in ``like``'s level order, after checking every map has ``like``'s spatial size."""
    out = []
    for name, ref in like.features.items():
        if name not in features:
            raise KeyError(f"features lack level {name!r}; got {list(features)}")
        if features[name].shape[-2:] != ref.shape[-2:] or features[name].shape[0] != ref.shape[0]:
            raise ValueError(
                f"level {name}: features of shape {tuple(features[name].shape)} do not match the batch geometry "
                f"{tuple(ref.shape)}"
            )
        out.append(features[name])
    return out


def check_stage(stage: str, batch: PreparedBatch) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    if stage == "loss" and batch.targets is None:
        raise ValueError("stage 'loss' needs targets: call preprocess(images, targets)")


def assignment_from_matches(matched_idxs: list[Tensor], targets: list[dict[str, Tensor]]) -> Assignment:
    """(N, L) labels from torchvision-style matches: the matched target's label where >= 0, else 0."""
    labels = []
    for m, t in zip(matched_idxs, targets):
        lab = torch.zeros_like(m)
        pos = m >= 0
        if pos.any():
            lab[pos] = t["labels"].to(m.device)[m[pos]]
        labels.append(lab)
    return Assignment(list(matched_idxs), torch.stack(labels))


@contextmanager
def capture_call(owner: Any, attr: str, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Temporarily wrap ``owner.<attr>`` so each call stores its bound arguments and result in ``record``.

    Only observes: the original is called unchanged and restored in a ``finally`` (also when it raises).
    """
    had_instance_attr = attr in vars(owner)
    original = getattr(owner, attr)
    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError):  # e.g. a callable object without a readable signature
        signature = None

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        record["args"] = signature.bind(*args, **kwargs).arguments if signature is not None else (args, kwargs)
        record["result"] = result
        return result

    setattr(owner, attr, wrapper)
    try:
        yield record
    finally:
        if had_instance_attr:
            setattr(owner, attr, original)
        else:
            delattr(owner, attr)


def build_adapter(model: nn.Module) -> DetectorAdapter:
    """The adapter for ``model``'s class (RetinaNet, FCOS, FasterRCNN, GFL); TypeError for anything else."""
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet

    from detkd.models.adapters.faster_rcnn import FasterRCNNAdapter
    from detkd.models.adapters.fcos import FCOSAdapter
    from detkd.models.adapters.gfl import GFLAdapter
    from detkd.models.adapters.retinanet import RetinaNetAdapter
    from detkd.models.gfl import GFL
    from detkd.models.precision import keep_geometry_fp32

    table: list[tuple[type, type[DetectorAdapter]]] = [
        (RetinaNet, RetinaNetAdapter),
        (FCOS, FCOSAdapter),
        (FasterRCNN, FasterRCNNAdapter),
        (GFL, GFLAdapter),
    ]
    for cls, adapter_cls in table:
        if isinstance(model, cls):
            return adapter_cls(keep_geometry_fp32(model))  # fp32 anchors and head outputs under autocast
    known = ", ".join(c.__name__ for c, _ in table)
    raise TypeError(f"no detector adapter for {type(model).__name__}; supported: {known}")
