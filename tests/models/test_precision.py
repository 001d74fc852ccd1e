"""Box geometry stays fp32 under autocast (detkd.models.precision): anchors, head outputs, targets, decoded boxes.

CPU bf16 autocast stands in for CUDA's (train.amp=auto there): the same torchvision code paths make anchors follow
the feature dtype, so these tests fail without the hooks.
"""

from __future__ import annotations

import copy

import pytest
import torch

from detkd.engine.task import TaskModel
from detkd.models import build
from detkd.models.adapters import build_adapter
from detkd.models.precision import geometry_modules, keep_geometry_fp32

SIZE = 512  # anchors up to ~600 px: bf16 would round them to multiples of 4


def _model(family: str):
    torch.manual_seed(0)
    opts = {"representation_size": 32} if family == "faster_rcnn" else {}
    return build(family, backbone="resnet18", num_classes=3, fpn_channels=16, head_convs=1, min_size=SIZE,
                 max_size=SIZE, **opts)


def _batch():
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)]
    targets = [{"boxes": torch.tensor([[40.0, 61.0, 403.0, 497.0], [301.0, 203.0, 509.0, 441.0]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[3.0, 5.0, 77.0, 91.0]]), "labels": torch.tensor([2])}]
    return images, targets


def _floats(value):
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    return [t for v in value for t in _floats(v)] if isinstance(value, (list, tuple)) else []


@pytest.mark.parametrize("family", ["retinanet", "fcos", "faster_rcnn", "gfl"])
def test_anchors_and_head_outputs_are_fp32_under_bf16_autocast_and_equal_the_fp32_anchors(family):
    model = _model(family)
    images, targets = _batch()
    reference = build_adapter(copy.deepcopy(model)).run(build_adapter(model).preprocess(images, targets), "loss")
    adapter = build_adapter(model)
    seen = []
    for head in geometry_modules(model)[1]:
        head.register_forward_hook(lambda m, a, out: seen.extend(_floats(out)))  # runs after the fp32 hook
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter.run(adapter.preprocess(images, targets), "loss")
    assert out.anchors.dtype == torch.float32 and torch.equal(out.anchors, reference.anchors)
    assert seen and all(t.dtype == torch.float32 for t in seen)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.losses.values())
    if "regression_targets" in out.extras:
        assert out.extras["regression_targets"].dtype == torch.float32
    if family == "faster_rcnn":  # the proposals an fp32 teacher's roi_align reads
        assert all(p.dtype == torch.float32 for p in out.extras["roi"]["proposals"])
    # the cell anchors kept by the generator were not rounded either (a later fp32 run reuses them)
    for gen in geometry_modules(model)[0]:
        assert all(c.dtype == torch.float32 for c in gen.cell_anchors)


def test_without_the_hooks_torchvision_anchors_follow_the_bf16_features():
    """What the hooks are for: a plain torchvision model's anchors come out bf16 and rounded."""
    model = _model("retinanet")
    images, _ = _batch()
    image_list, _ = model.transform(images)
    feats = list(model.backbone(image_list.tensors).values())
    exact = copy.deepcopy(model.anchor_generator)(image_list, feats)[0]
    rounded = model.anchor_generator(image_list, [f.bfloat16() for f in feats])[0]
    assert rounded.dtype == torch.bfloat16 and (rounded.float() - exact).abs().max() >= 2.0
    keep_geometry_fp32(model)
    kept = model.anchor_generator(image_list, [f.bfloat16() for f in feats])[0]
    assert kept.dtype == torch.float32


@pytest.mark.parametrize("family", ["retinanet", "fcos", "faster_rcnn", "gfl"])
def test_a_baseline_trains_under_bf16_with_fp32_anchors(family):
    model = _model(family)
    anchors = []
    for gen in geometry_modules(model)[0]:
        gen.register_forward_hook(lambda m, a, out: anchors.extend(out))
    task = TaskModel(model).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = task(*_batch())
    out["loss"].backward()
    assert anchors and all(a.dtype == torch.float32 for a in anchors)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_the_hooks_are_registered_once_and_change_nothing_in_fp32():
    model = _model("faster_rcnn").eval()
    images, _ = _batch()
    with torch.no_grad():
        before = model(images)
    keep_geometry_fp32(model)
    keep_geometry_fp32(model)
    anchors, heads = geometry_modules(model)
    assert len(anchors) == 1 and len(heads) == 2  # the RPN's generator; the RPN head and the RoI box predictor
    assert all(len(m._forward_pre_hooks) == 1 for m in anchors) and all(len(m._forward_hooks) == 1 for m in heads)
    with torch.no_grad():
        after = model(images)
    for a, b in zip(before, after):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_outputs_of_every_container_shape_come_back_fp32():
    from typing import NamedTuple

    from detkd.models.precision import _to_fp32

    class Pair(NamedTuple):
        logits: torch.Tensor
        index: torch.Tensor

    half = torch.ones(2, dtype=torch.bfloat16)
    out = _to_fp32({"a": [half, (half,)], "b": Pair(half, torch.arange(2)), "c": 3})
    assert out["a"][0].dtype == out["a"][1][0].dtype == out["b"].logits.dtype == torch.float32
    assert isinstance(out["a"][1], tuple) and isinstance(out["b"], Pair) and out["b"].index.dtype == torch.int64
    assert out["c"] == 3
