"""Detector zoo: every family x backbone trains and evaluates; specs, head depth, norms, options, weights."""

import dataclasses
import math
import os

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detkd.models import FAMILIES, ModelSpec, build, count_parameters
from detkd.models.weights import read_state_dict
from detkd.models.zoo import FCOS_BOX_BIAS

TINY = {"fpn_channels": 16, "head_convs": 1, "min_size": 64, "max_size": 64}


def _batch():
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [
        {"boxes": torch.tensor([[5.0, 6.0, 40.0, 50.0], [30.0, 2.0, 70.0, 30.0]]), "labels": torch.tensor([2, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # an image without boxes
    ]
    return images, targets


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_one_step_and_evaluates(family, backbone):
    model = build(family, backbone, num_classes=3, **TINY)
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.backbone.fpn.parameters())
    model.eval()
    with torch.no_grad():
        dets = model(images)
    assert len(dets) == 2 and all(set(d) == {"boxes", "scores", "labels"} for d in dets)
    for d in dets:
        assert d["labels"].numel() == 0 or (d["labels"].min() >= 1 and d["labels"].max() <= 3)

    # the spec describes the real feature maps: names/order, channels and strides
    spec = model.detkd_spec
    feats = model.backbone(torch.rand(1, 3, 128, 192))
    assert tuple(feats) == spec.level_names
    for (name, f), stride in zip(feats.items(), spec.strides):
        assert f.shape[1] == spec.fpn_channels == 16, name
        assert f.shape[-2:] == (math.ceil(128 / stride), math.ceil(192 / stride)), name


def test_level_layouts():
    dense = build("gfl", num_classes=1, **TINY).detkd_spec
    rcnn = build("faster_rcnn", num_classes=1, **TINY).detkd_spec
    assert dense.level_names == ("p3", "p4", "p5", "p6", "p7") and dense.strides == (8, 16, 32, 64, 128)
    assert rcnn.level_names == ("p2", "p3", "p4", "p5", "p6") and rcnn.strides == (4, 8, 16, 32, 64)
    assert dense.feature_specs()["p4"].stride == 16 and dense.feature_specs()["p4"].channels == 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        dense.family = "fcos"


def test_spec_is_not_part_of_the_state_dict():
    model = build("retinanet", num_classes=2, **TINY)
    assert isinstance(model.detkd_spec, ModelSpec)
    assert not any("detkd" in k for k in model.state_dict())
    # the state_dict loads into the same torchvision class without detkd in the way
    twin = build("retinanet", num_classes=2, **TINY)
    del twin.detkd_spec
    twin.load_state_dict(model.state_dict())


def _tower_depths(model: nn.Module, family: str) -> list[int]:
    def convs(m):
        return sum(isinstance(x, nn.Conv2d) for x in m.modules())

    if family == "retinanet":
        return [convs(model.head.classification_head.conv), convs(model.head.regression_head.conv)]
    if family == "fcos":
        return [convs(model.head.classification_head.conv), convs(model.head.regression_head.conv)]
    if family == "faster_rcnn":
        return [convs(model.rpn.head.conv)]
    return [convs(model.head.cls_convs), convs(model.head.reg_convs)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("depth", [2, 5])
def test_head_convs_and_class_outputs(family, depth):
    model = build(family, num_classes=4, fpn_channels=16, head_convs=depth)
    assert _tower_depths(model, family) == [depth] * len(_tower_depths(model, family))
    outputs = {
        "retinanet": lambda m: m.head.classification_head.cls_logits.out_channels // 9,
        "fcos": lambda m: m.head.classification_head.cls_logits.out_channels,
        "faster_rcnn": lambda m: m.roi_heads.box_predictor.cls_score.out_features,
        "gfl": lambda m: m.head.gfl_cls.out_channels,
    }[family](model)
    assert outputs == (4 if family == "gfl" else 5)  # K sigmoid outputs for GFL, K + 1 for torchvision


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
def test_backbone_norms(backbone):
    def kinds(norm):
        body = build("fcos", backbone, num_classes=1, backbone_norm=norm, fpn_channels=16).backbone.body
        return {type(m) for m in body.modules()}

    assert nn.BatchNorm2d in kinds("bn") and FrozenBatchNorm2d not in kinds("bn")
    frozen = kinds("frozen_bn")
    assert FrozenBatchNorm2d in frozen and nn.BatchNorm2d not in frozen
    gn = kinds("gn")
    assert nn.GroupNorm in gn and nn.BatchNorm2d not in gn


def test_options_and_errors():
    model = build("faster_rcnn", num_classes=2, representation_size=64, box_detections_per_img=7, **TINY)
    assert model.roi_heads.box_head.fc7.out_features == 64 and model.roi_heads.detections_per_img == 7
    assert build("gfl", num_classes=2, nms_thresh=0.5, **TINY).nms_thresh == 0.5
    with pytest.raises(TypeError, match="'reg_maxx'"):
        build("gfl", num_classes=2, reg_maxx=8, **TINY)
    with pytest.raises(TypeError, match="'representation_size'"):
        build("retinanet", num_classes=2, representation_size=8, **TINY)
    with pytest.raises(ValueError, match="family"):
        build("yolo", num_classes=2)
    with pytest.raises(ValueError, match="backbone"):
        build("fcos", "vgg16", num_classes=2)
    with pytest.raises(ValueError, match="backbone_norm"):
        build("fcos", num_classes=2, backbone_norm="sync_bn")
    with pytest.raises(ValueError, match="num_classes"):
        build("fcos")


def test_min_max_size_reach_the_transform():
    model = build("gfl", num_classes=2, fpn_channels=16, min_size=320, max_size=480)
    assert model.transform.min_size == (320,) and model.transform.max_size == 480
    assert model.transform.size_divisible == 32


def test_count_parameters():
    model = build("retinanet", num_classes=2, **TINY)
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == total
    for p in model.backbone.body.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in model.backbone.body.parameters())
    assert count_parameters(model, trainable_only=True) == total - frozen


# ------------------------------------------------------------------------------------------- weights


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("wrap", [None, "model", "student"])
def test_detector_checkpoint_round_trip(tmp_path, wrap):
    torch.manual_seed(1)
    source = build("gfl", num_classes=2, **TINY)
    state = source.state_dict()
    torch.save(state if wrap is None else {wrap: state, "step": torch.tensor(3)}, tmp_path / "ckpt.pt")
    torch.manual_seed(2)
    loaded = build("gfl", num_classes=2, weights=str(tmp_path / "ckpt.pt"), **TINY)
    _assert_same_state(loaded.state_dict(), state)


def test_detector_checkpoint_mismatches_name_the_key(tmp_path):
    state = build("gfl", num_classes=2, **TINY).state_dict()
    torch.save(state, tmp_path / "k2.pt")
    with pytest.raises(ValueError, match=r"head\.gfl_cls\.weight.*\(2, 16, 3, 3\).*\(3, 16, 3, 3\)"):
        build("gfl", num_classes=3, weights=str(tmp_path / "k2.pt"), **TINY)
    missing = dict(state)
    del missing["head.scales.0.scale"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"'head\.scales\.0\.scale' is missing"):
        build("gfl", num_classes=2, weights=str(tmp_path / "missing.pt"), **TINY)
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"unexpected key 'extra\.weight'"):
        build("gfl", num_classes=2, weights=str(tmp_path / "extra.pt"), **TINY)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build("gfl", num_classes=2, weights=str(tmp_path / "nope.pt"), **TINY)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """A private torch hub cache with a fake (random) ImageNet ResNet-18 file under its real name."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    return tmp_path / "hub" / "checkpoints"


def test_backbone_weights_from_torchvision_name(hub_dir):
    net = torchvision.models.resnet18(weights=None)
    net.bn1.running_mean.uniform_(-1, 1)  # distinctive buffers, so the test sees them arrive
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    torch.save(net.state_dict(), hub_dir / os.path.basename(url))
    for norm in ("bn", "frozen_bn"):  # FrozenBatchNorm2d must accept the file's num_batches_tracked keys
        model = build(
            "retinanet", num_classes=2, backbone_weights="ResNet18_Weights.IMAGENET1K_V1", backbone_norm=norm, **TINY
        )
        body = model.backbone.body
        assert torch.equal(body.conv1.weight, net.conv1.weight)
        assert torch.equal(body.bn1.running_mean, net.bn1.running_mean)
        assert torch.equal(body.layer4[1].conv2.weight, net.layer4[1].conv2.weight)


def test_missing_torchvision_weights_file_says_where(hub_dir):
    with pytest.raises(FileNotFoundError, match=str(hub_dir / "resnet50-0676ba61.pth")):
        build("fcos", "resnet50", num_classes=2, backbone_weights="ResNet50_Weights.IMAGENET1K_V1", **TINY)
    with pytest.raises(FileNotFoundError, match="retinanet_resnet50_fpn_coco"):
        read_state_dict("RetinaNet_ResNet50_FPN_Weights.COCO_V1")
    with pytest.raises(ValueError, match="unknown torchvision weights"):
        read_state_dict("ResNet50_Weights.NOPE")


def test_backbone_weights_from_a_detector_checkpoint(tmp_path):
    teacher = build("fcos", "mobilenet_v3_large", num_classes=2, **TINY)
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pt")
    student = build("gfl", "mobilenet_v3_large", num_classes=5, backbone_weights=str(tmp_path / "teacher.pt"), **TINY)
    _assert_same_state(student.backbone.body.state_dict(), teacher.backbone.body.state_dict())
    with pytest.raises(ValueError, match="backbone weights"):
        build("gfl", "resnet18", num_classes=5, backbone_weights=str(tmp_path / "teacher.pt"), **TINY)


@pytest.mark.parametrize("fpn", [32, 48])  # torchvision's own head and the narrow one with fewer GroupNorm groups
def test_fcos_box_branch_starts_alive(fpn):
    """FCOS's box branch is ReLU'd: it must start above 0 (non-degenerate boxes), not at torchvision's bias 0."""
    model = build("fcos", backbone="resnet18", num_classes=3, fpn_channels=fpn, head_convs=1, min_size=64,
                  max_size=64).eval()
    bias = model.head.regression_head.bbox_reg.bias
    assert torch.equal(bias, torch.full_like(bias, FCOS_BOX_BIAS)) and FCOS_BOX_BIAS > 0
    features = [torch.randn(1, fpn, 8, 8)]
    with torch.no_grad():
        boxes, _ = model.head.regression_head(features)
    assert (boxes > 0).float().mean() > 0.99  # every side of (nearly) every box starts positive
