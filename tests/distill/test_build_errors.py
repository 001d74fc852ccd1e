"""Config mistakes in ``distill`` that must be a clear error naming the entry: unknown loss params, levels the
detector lacks, out-of-range temperatures and task_weights keys that are no task loss of the student."""

from __future__ import annotations

import re

import pytest
import torch

from detkd.build import build_distiller, build_loss
from detkd.config import ConfigError, DistillConfig, LossConfig
from detkd.distill.teacher import FrozenTeacher
from detkd.losses import LOSSES
from detkd.models import build
from detkd.models.adapters import build_adapter

SIZE = 64


def _model(family: str, fpn: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    opts = {"representation_size": 32} if family == "faster_rcnn" else {}
    return build(family, backbone="resnet18", num_classes=3, fpn_channels=fpn, head_convs=1, min_size=SIZE,
                 max_size=SIZE, **opts)


@pytest.fixture(scope="module")
def gfl_pair():
    """A GFL student and a same-width GFL teacher (every method, head methods included, can pair them)."""
    return _model("gfl"), FrozenTeacher(_model("gfl", seed=1))


def _build(pair, *losses: LossConfig, **dc):
    student, teacher = pair
    return build_distiller(student, teacher, DistillConfig(losses=list(losses), **dc), num_classes=3, max_steps=10)


def _batch():
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 10.0, 30.0, 44.0]]), "labels": torch.tensor([2])}]
    return images, targets


def test_misspelt_cwd_param_names_the_entry_and_the_known_params(gfl_pair):
    with pytest.raises(ConfigError, match=re.escape("distill.losses[1] (cwd): unknown param(s) ['tua']")) as info:
        _build(gfl_pair, LossConfig("fgd"), LossConfig("cwd", params={"tua": 2.0}))
    assert "known: align, form, source, tau" in str(info.value)


@pytest.mark.parametrize("method", sorted(LOSSES))
def test_every_method_rejects_an_unknown_param_before_construction(gfl_pair, method):
    # MainLD and the other named-argument losses raised a raw TypeError from __init__ before
    with pytest.raises(ConfigError, match=re.escape(f"distill.losses[0] ({method}): unknown param(s) ['bogus']")):
        _build(gfl_pair, LossConfig(method, params={"bogus": 1}))


@pytest.mark.parametrize("method", ["cwd", "fgd", "hint", "kd"])
def test_a_level_the_detector_lacks_is_a_pair_error_naming_entry_level_and_levels(gfl_pair, method):
    with pytest.raises(ValueError, match=re.escape(f"distill.losses[0] ({method}): level 'p8' is missing in the "
                                                   "student (its levels: ['p3', 'p4', 'p5', 'p6', 'p7'])")):
        _build(gfl_pair, LossConfig(method, levels=["p3", "p8"]))


def test_build_loss_alone_names_the_method_on_a_bad_level(gfl_pair):
    student, teacher = gfl_pair
    with pytest.raises(ValueError, match=re.escape("cwd: level 'p8' is missing in the student")):
        build_loss(LossConfig("cwd", levels=["p8"]), build_adapter(student), teacher.adapter, num_classes=3,
                   max_steps=10)


@pytest.mark.parametrize(("method", "param"), [("cwd", "tau"), ("fgd", "temp"), ("ld", "tau"), ("kd", "tau"),
                                               ("vlr_ld", "tau"), ("chen_dense", "T")])
def test_a_temperature_of_zero_is_a_config_error(gfl_pair, method, param):
    with pytest.raises(ConfigError, match=re.escape(f"distill.losses[0] ({method}): ") + f".*{param} must be > 0"):
        _build(gfl_pair, LossConfig(method, params={param: 0.0}))


def test_unknown_task_weights_key_is_an_error_at_the_first_step(gfl_pair):
    # loss_classifier is Faster R-CNN's name; a dense recipe's key is "classification"
    d = _build(gfl_pair, LossConfig("cwd"), task_weights={"loss_classifier": 0.5, "classification": 0.5})
    d.train()
    with pytest.raises(ConfigError, match=re.escape("distill.task_weights: ['loss_classifier'] are not task losses "
                                                    "of the student (gfl); its task losses are")) as info:
        d(*_batch())
    assert "'classification'" in str(info.value) and "'bbox_regression'" in str(info.value)


def test_known_task_weights_keys_train(gfl_pair):
    d = _build(gfl_pair, LossConfig("cwd"), task_weights={"classification": 0.5})
    d.train()
    for _ in range(2):
        out = d(*_batch())
        assert torch.isfinite(out["loss"])


@pytest.mark.parametrize(("method", "family", "hint"), [
    ("ld", "fcos", "LD needs a GFL teacher and student"),
    ("vlr_ld", "retinanet", "LD needs a GFL teacher and student"),
    ("chen", "retinanet", "use method 'chen_dense'"),
    ("chen_dense", "faster_rcnn", "use method 'chen'"),
])
def test_a_method_on_a_family_whose_outputs_it_cannot_read_fails_when_built(method, family, hint):
    """LD reads GFL's box-edge distributions, Chen the RPN and RoI head: on another family the error came only at the
    first training step, and did not say which method fits."""
    pair = (_model(family), FrozenTeacher(_model(family, seed=1)))
    with pytest.raises(ConfigError, match=re.escape(f"distill.losses[0] ({method}): needs a")) as info:
        _build(pair, LossConfig(method))
    assert f"this one is {family}" in str(info.value) and hint in str(info.value)
