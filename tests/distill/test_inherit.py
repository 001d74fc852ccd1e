"""FGD's inheriting strategy: copy the teacher's neck and head into the student where the shapes fit."""

from __future__ import annotations

import torch
from torch import nn

from detkd.distill.inherit import inherit_from_teacher

HEAD_PREFIXES = ("backbone.fpn.", "head.")


def _tiny_retinanet(depth: int, width: int) -> nn.Module:
    from torchvision.models import resnet18, resnet34
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    body = {18: resnet18, 34: resnet34}[depth](weights=None)
    backbone = BackboneWithFPN(
        body, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], width, LastLevelP6P7(width, width)
    )
    return RetinaNet(backbone, num_classes=3, min_size=64, max_size=64)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_different_depth_same_fpn_width_copies_all_of_fpn_and_head():
    teacher, student = _tiny_retinanet(34, 16), _tiny_retinanet(18, 16)
    before = _snapshot(student)
    report = inherit_from_teacher(student, teacher)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    expected = [k for k in t_state if k.startswith(HEAD_PREFIXES)]
    assert len(expected) > 20 and sorted(report.copied) == sorted(expected)
    assert report.skipped == []
    for key in expected:
        assert torch.equal(s_state[key], t_state[key]), key
    body = [k for k in s_state if k.startswith("backbone.body.")]
    assert body and all(torch.equal(s_state[k], before[k]) for k in body)  # the student's own backbone is kept


def test_different_fpn_width_skips_with_shape_reasons():
    teacher, student = _tiny_retinanet(18, 32), _tiny_retinanet(18, 16)
    before = _snapshot(student)
    report = inherit_from_teacher(student, teacher)
    skipped = dict(report.skipped)
    key = "head.classification_head.cls_logits.weight"  # (9 anchors * 3 classes, width, 3, 3)
    assert skipped[key] == "shape: teacher (27, 32, 3, 3) vs student (27, 16, 3, 3)"
    assert (
        skipped["backbone.fpn.inner_blocks.0.0.weight"] == "shape: teacher (32, 128, 1, 1) vs student (16, 128, 1, 1)"
    )
    assert torch.equal(student.state_dict()[key], before[key])
    # the last convs' biases (one per anchor and class / box coordinate) do not depend on the width: copied
    assert "head.classification_head.cls_logits.bias" in report.copied
    assert "head.regression_head.bbox_reg.bias" in report.copied
    t_state, s_state = teacher.state_dict(), student.state_dict()
    fitting = [k for k in t_state if k.startswith(HEAD_PREFIXES) and t_state[k].shape == s_state[k].shape]
    assert sorted(report.copied) == sorted(fitting)
    assert len(report.copied) + len(report.skipped) == len([k for k in t_state if k.startswith(HEAD_PREFIXES)])
    assert sorted(report.mismatched) == sorted(k for k, why in report.skipped if why.startswith("shape"))
    assert key in report.mismatched and "head.classification_head.cls_logits.bias" not in report.mismatched


class _Toy(nn.Module):
    def __init__(self, extra: bool, head_out: int):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = nn.Linear(3, 4)
        self.backbone.fpn = nn.Linear(4, 4)
        self.head = nn.Sequential(nn.Linear(4, head_out), nn.BatchNorm1d(head_out))
        if extra:
            self.head.add_module("extra", nn.Linear(4, 2))


def test_missing_keys_buffers_and_custom_prefixes():
    teacher, student = _Toy(extra=True, head_out=5), _Toy(extra=False, head_out=5)
    with torch.no_grad():
        teacher.head[1].running_mean.fill_(3.0)
    report = inherit_from_teacher(student, teacher)
    assert ("head.extra.weight", "not in student") in report.skipped
    assert report.mismatched == []  # missing keys are skipped, not mismatched
    assert torch.all(student.head[1].running_mean == 3.0)  # buffers travel too
    assert "backbone.body.weight" not in report.copied  # outside the prefixes: neither copied nor reported
    assert all(not k.startswith("backbone.body") for k, _ in report.skipped)

    back = inherit_from_teacher(teacher, student, prefixes=("head.",))
    assert ("head.extra.bias", "not in teacher") in back.skipped
    assert all(k.startswith("head.") for k in back.copied)
