"""Adapter parity: staged runs reproduce the detector's own forward, for every family.

One module-scoped training-mode run per family (image 0 with two off-centre boxes, image 1 without boxes, different
non-square sizes) feeds most tests, so the whole file stays a few forward passes per family.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from detkd.models import build
from detkd.models.adapters import PreparedBatch, build_adapter
from detkd.models.adapters.base import capture_call

FAMILIES = ["retinanet", "fcos", "faster_rcnn", "gfl"]
K = 3
SIZE = {"min_size": 64, "max_size": 64}


def tiny(family: str, fpn_channels: int = 16):
    # fewer proposals and RoIs than the defaults keep Faster R-CNN cheap; the code paths are the same
    extra = dict(representation_size=32, rpn_post_nms_top_n_train=200, box_batch_size_per_image=64) \
        if family == "faster_rcnn" else {}
    return build(family, "resnet18", num_classes=K, fpn_channels=fpn_channels, head_convs=1, **SIZE, **extra)


def data(empty_second: bool = True):
    """Two non-square images of different sizes; boxes off-centre; by default the second image has no boxes."""
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 60, 84, generator=g), torch.rand(3, 72, 64, generator=g)]
    t0 = {"boxes": torch.tensor([[10.0, 8.0, 50.0, 40.0], [30.0, 20.0, 80.0, 58.0]]), "labels": torch.tensor([1, 3])}
    t1 = {"boxes": torch.tensor([[5.0, 30.0, 40.0, 70.0]]), "labels": torch.tensor([2])}
    if empty_second:
        t1 = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
    return images, [t0, t1]


def staged(adapter, batch, seed):
    torch.manual_seed(seed)  # Faster R-CNN's samplers draw random numbers
    return adapter.run(batch, "loss")


def assert_same_losses(a: dict, b: dict):
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"loss {key}")


@pytest.fixture(scope="module", params=FAMILIES)
def run(request):
    """(model, adapter, images, targets, batch, out, expected losses) of one training-mode step."""
    torch.manual_seed(0)
    model = tiny(request.param).train()
    adapter = build_adapter(model)
    images, targets = data()
    torch.manual_seed(7)  # the transform draws a random min_size in training mode, the samplers draw too
    expected = model(images, targets)
    torch.manual_seed(7)
    batch = adapter.preprocess(images, targets)
    out = adapter.run(batch, "loss")
    return model, adapter, images, targets, batch, out, expected


def test_staged_losses_equal_model_forward(run):
    model, adapter, *_, out, expected = run
    assert_same_losses(out.losses, expected)
    assert all(torch.isfinite(v) for v in out.losses.values())
    # the capture wrappers were removed again
    if adapter.family == "faster_rcnn":
        assert isinstance(model.rpn.fg_bg_sampler, BalancedPositiveNegativeSampler)
    else:
        assert "compute_loss" not in vars(model.head)


def test_features_stage_and_specs(run):
    model, adapter, images, targets, batch, out, _ = run
    with torch.no_grad():
        feats = adapter.run(batch, "features")
    assert feats.head == {} and feats.losses == {} and feats.assignment is None
    assert feats.level_names == out.level_names == list(model.detkd_spec.level_names)
    specs = adapter.feature_specs()
    assert list(specs) == feats.level_names
    h, w = feats.batch_shape
    assert (h, w) == tuple(batch.images.tensors.shape[-2:])
    for name, fmap in feats.features.items():
        torch.testing.assert_close(fmap, out.features[name])
        assert fmap.shape[1] == specs[name].channels == 16
        # each level is the padded input divided by its stride (rounded up by the P6/P7 stride-2 conv/pool)
        assert tuple(fmap.shape[-2:]) == (math.ceil(h / specs[name].stride), math.ceil(w / specs[name].stride))
        assert feats.strides[name] == specs[name].stride


def test_head_losses_reproduce_losses(run):
    model, adapter, images, targets, batch, _, expected = run
    out = staged(adapter, batch, seed=11)
    again = staged_head_losses(adapter, out.features, out, seed=11)
    assert_same_losses(again, out.losses)
    # another pyramid gives other losses: the head really runs on the maps it is given
    other = staged_head_losses(adapter, {k: v.flip(-1) for k, v in out.features.items()}, out, seed=11)
    assert any(not torch.allclose(other[k], out.losses[k]) for k in other)


def staged_head_losses(adapter, features, like, seed):
    torch.manual_seed(seed)
    return adapter.head_losses(features, like)


def test_head_losses_rejects_other_geometry(run):
    _, adapter, *_, out, _ = run
    first = out.level_names[0]
    bad = dict(out.features)
    bad[first] = bad[first][..., :-1]
    with pytest.raises(ValueError, match=f"level {first}"):
        adapter.head_losses(bad, out)


def test_dense_head_layout_and_assignment(run):
    model, adapter, images, targets, batch, out, _ = run
    if adapter.family == "faster_rcnn":
        pytest.skip("dense layout only; Faster R-CNN's extras are tested below")
    n, total = 2, sum(out.level_sizes)
    assert out.head["cls_logits"].shape == (n, total, K)
    assert out.anchors.shape == (total, 4)
    for fmap, size in zip(out.features.values(), out.level_sizes):
        assert size == fmap.shape[-2] * fmap.shape[-1] * out.num_anchors_per_location
    m0, m1 = out.assignment.matched_idxs
    labels = out.assignment.labels
    assert labels.shape == (n, total)
    # image 0: positives carry the label of their matched box; image 1 has no boxes, so nothing is positive
    expected0 = torch.where(m0 >= 0, batch.targets[0]["labels"][m0.clamp(min=0)], torch.zeros_like(m0))
    assert torch.equal(labels[0], expected0)
    assert out.assignment.positive_mask[0].sum() > 0 and not out.assignment.positive_mask[1].any()
    assert (m1 == -1).all()
    assert set(labels[0].unique().tolist()) <= {0, 1, 3}


def test_detect_equals_model_eval(run):
    model, adapter, images, *_ = run
    holder = model.roi_heads if adapter.family == "faster_rcnn" else model
    old = holder.score_thresh
    holder.score_thresh = 0.0  # a random-init head scores below 0.05: keep detections so the comparison bites
    try:
        model.eval()
        with torch.no_grad():
            expected = model(images)
            model.train()  # detect switches to eval itself and restores the mode afterwards
            got = adapter.detect(images)
        assert model.training
    finally:
        holder.score_thresh = old
        model.train()
    assert len(got) == len(expected) == 2
    for g, e in zip(got, expected):
        assert len(e["boxes"]) > 0
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(g[key], e[key])


@pytest.mark.parametrize("family", ["retinanet", "faster_rcnn"])
def test_teacher_sees_the_students_batch(family):
    student, teacher = tiny(family).eval(), tiny(family, fpn_channels=32).eval()
    s_adapter, t_adapter = build_adapter(student), build_adapter(teacher)
    seen = {}
    hooks = [
        m.backbone.register_forward_pre_hook(lambda mod, args, key=key: seen.__setitem__(key, args[0]))
        for key, m in (("student", student), ("teacher", teacher))
    ]
    try:
        images, targets = data()
        batch = s_adapter.preprocess(images, targets)
        with torch.no_grad():
            s_out = s_adapter.run(batch, "features")
            t_out = t_adapter.run(batch, "features")
    finally:
        for h in hooks:
            h.remove()
    assert seen["teacher"] is batch.images.tensors and seen["student"] is batch.images.tensors
    assert t_out.targets is s_out.targets and t_out.image_sizes == s_out.image_sizes
    for name in s_out.features:
        assert s_out.features[name].shape[-2:] == t_out.features[name].shape[-2:]
        assert (s_out.features[name].shape[1], t_out.features[name].shape[1]) == (16, 32)


def test_retinanet_cls_logits_drop_background_channel():
    model = tiny("retinanet").train()
    adapter = build_adapter(model)
    images, targets = data()
    out = adapter.run(adapter.preprocess(images, targets), "head")
    # by hand: cls conv output (N, A*(K+1), H, W) -> per anchor, channels 1..K, ordered (anchor, class)
    head = model.head.classification_head
    raw = head.cls_logits(head.conv(out.features["p4"]))
    n, _, h, w = raw.shape
    a = out.num_anchors_per_location
    expected = raw.view(n, a, K + 1, h, w)[:, :, 1:].reshape(n, a * K, h, w)
    torch.testing.assert_close(out.as_maps("cls_logits")["p4"], expected)
    # the slice is a view: gradients reach the real-class weights and never the unused channel 0
    model.zero_grad()
    out.head["cls_logits"].sum().backward()
    grad = head.cls_logits.weight.grad.view(a, K + 1, -1)
    assert grad[:, 0].abs().sum() == 0 and grad[:, 1:].abs().sum() > 0


def test_fcos_and_gfl_head_keys(run):
    model, adapter, *_, out, _ = run
    raw = out.extras["raw_head"] if adapter.family != "faster_rcnn" else None
    if adapter.family == "fcos":
        assert out.head["centerness"] is raw["bbox_ctrness"]
        torch.testing.assert_close(out.head["cls_logits"], raw["cls_logits"][..., 1:])
    elif adapter.family == "gfl":
        assert out.head["cls_logits"] is raw["cls_logits"]  # GFL already has K sigmoid outputs
        assert out.head["bbox_dist"].shape[-1] == 4 * (model.reg_max + 1)
    else:
        pytest.skip("family-specific keys of FCOS and GFL")
    assert out.num_anchors_per_location == 1


def test_faster_rcnn_extras_match_losses():
    model = tiny("faster_rcnn").train()
    adapter = build_adapter(model)
    images, targets = data(empty_second=False)
    batch = adapter.preprocess(images, targets)
    out = staged(adapter, batch, seed=5)
    rpn, roi = out.extras["rpn"], out.extras["roi"]
    a_total = rpn["num_anchors"]
    assert out.head["objectness"].shape == (2, a_total, 1) and out.anchors.shape == (a_total, 4)
    torch.testing.assert_close(rpn["objectness"], out.head["objectness"].flatten()[rpn["sampled_index"]])
    assert rpn["sampled_index"].max() < 2 * a_total and set(rpn["labels"].unique().tolist()) == {0.0, 1.0}
    # the task losses recomputed by hand from the captured samples (torchvision's formulas)
    torch.testing.assert_close(F.binary_cross_entropy_with_logits(rpn["objectness"], rpn["labels"]),
                               out.losses["loss_objectness"])
    pos = rpn["labels"] > 0
    box = F.smooth_l1_loss(rpn["deltas"][pos], rpn["regression_targets"][pos], beta=1 / 9, reduction="sum")
    torch.testing.assert_close(box / len(rpn["labels"]), out.losses["loss_rpn_box_reg"])
    torch.testing.assert_close(F.cross_entropy(roi["class_logits"], roi["labels"]), out.losses["loss_classifier"])
    assert roi["class_logits"].shape == (sum(len(p) for p in roi["proposals"]), K + 1)
    assert roi["box_regression"].shape[1] == (K + 1) * 4
    # the public per-stage calls give the same numbers on the same pyramid and proposals
    obj, deltas = adapter.rpn_head_outputs(out.features, batch)
    torch.testing.assert_close(obj[rpn["sampled_index"]], rpn["objectness"])
    torch.testing.assert_close(deltas[rpn["sampled_index"]], rpn["deltas"])
    logits, reg = adapter.roi_outputs(out.features, roi["proposals"], out.image_sizes)
    torch.testing.assert_close(logits, roi["class_logits"])
    torch.testing.assert_close(reg, roi["box_regression"])


def _torchvision_fpn(returned: dict[str, str], in_channels: list[int], extra=None) -> BackboneWithFPN:
    """A resnet18 FPN keyed the way torchvision's own builders key it ('0', '1', ..., 'pool' / 'p6', 'p7')."""
    body = torchvision.models.resnet18(weights=None)
    return BackboneWithFPN(body, returned, in_channels, 16, extra_blocks=extra)


def test_plain_torchvision_models_without_spec():
    """Models built by torchvision itself get the family's default level names, mapped back for the RoI pooler."""
    rcnn_fpn = _torchvision_fpn({"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, [64, 128, 256, 512])
    retina_fpn = _torchvision_fpn({"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], LastLevelP6P7(16, 16))
    rcnn = FasterRCNN(rcnn_fpn, num_classes=K + 1, rpn_post_nms_top_n_train=200, box_batch_size_per_image=64, **SIZE)
    retina = RetinaNet(retina_fpn, num_classes=K + 1, **SIZE)
    images, targets = data()
    for model, levels in ((rcnn, ["p2", "p3", "p4", "p5", "p6"]), (retina, ["p3", "p4", "p5", "p6", "p7"])):
        model.train()
        adapter = build_adapter(model)
        assert adapter.num_classes == K and list(adapter.feature_specs()) == levels
        torch.manual_seed(2)
        expected = model(images, targets)
        torch.manual_seed(2)
        out = adapter.run(adapter.preprocess(images, targets), "loss")
        assert out.level_names == levels
        assert_same_losses(out.losses, expected)
        if model is rcnn:  # the renamed pyramid goes back to MultiScaleRoIAlign under torchvision's keys
            assert adapter._raw_keys == ["0", "1", "2", "3", "pool"]
            got, _ = adapter.roi_outputs(out.features, out.extras["roi"]["proposals"], out.image_sizes)
            torch.testing.assert_close(got, out.extras["roi"]["class_logits"])


def test_preprocess_copies_and_validates():
    model = tiny("retinanet").train()
    adapter = build_adapter(model)
    images, targets = data(empty_second=False)
    before = [{k: v.clone() for k, v in t.items()} for t in targets]
    batch = adapter.preprocess(images, targets)
    assert isinstance(batch, PreparedBatch)
    assert batch.original_sizes == [(60, 84), (72, 64)]
    for t, b in zip(targets, before):
        assert set(t) == set(b) and all(torch.equal(t[k], b[k]) for k in t)
    # image 0: the longer side hits max_size 64 (scale 64/84), boxes follow the per-axis size ratio
    (h0, w0), (h1, w1) = batch.images.image_sizes
    assert w0 == 64 and h0 == math.floor(60 * 64 / 84) and batch.images.tensors.shape[-2:] == (64, 64)
    ratio = torch.tensor([w0 / 84, h0 / 60, w0 / 84, h0 / 60])
    torch.testing.assert_close(batch.targets[0]["boxes"], targets[0]["boxes"] * ratio)
    bad = [dict(targets[0]), {"boxes": torch.tensor([[10.0, 10.0, 10.0, 20.0]]), "labels": torch.tensor([1])}]
    with pytest.raises(ValueError, match="target 1: box 0 .* non-positive width"):
        adapter.preprocess(images, bad)
    bad[1] = {"boxes": torch.tensor([[1.0, 2.0, 10.0, 20.0]]), "labels": torch.tensor([K + 1])}
    with pytest.raises(ValueError, match=f"target 1: box 0 has label {K + 1}; labels must be in 1..{K}"):
        adapter.preprocess(images, bad)
    bad[1] = {"boxes": torch.tensor([[1.0, 2.0, 10.0, 20.0]]), "labels": torch.tensor([1.0])}
    with pytest.raises(ValueError, match="target 1: 'labels' must be an int64"):
        adapter.preprocess(images, bad)
    with pytest.raises(ValueError, match="2 images but 1 targets"):
        adapter.preprocess(images, targets[:1])
    with pytest.raises(ValueError, match="needs targets"):
        adapter.run(adapter.preprocess(images), "loss")
    with pytest.raises(ValueError, match="unknown stage"):
        adapter.run(batch, "everything")


def test_capture_call_restores_on_error():
    class Box:
        def f(self, x, y=1):
            raise RuntimeError("boom")

    box, record = Box(), {}
    with pytest.raises(RuntimeError, match="boom"):
        with capture_call(box, "f", record):
            box.f(2)
    assert "f" not in vars(box) and record == {}


def test_build_adapter_rejects_unknown_model():
    with pytest.raises(TypeError, match="no detector adapter for Linear"):
        build_adapter(torch.nn.Linear(2, 2))
