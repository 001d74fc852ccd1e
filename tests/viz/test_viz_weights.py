"""Which weights the pictures use: a given or configured file that does not exist is an error (never a silent fresh
network); only with no weights at all is the model freshly initialised, and a warning says so."""

from __future__ import annotations

import warnings

import pytest
import torch

from detkd.config import Config, ModelConfig
from detkd.viz import build_viz_models


def _cfg(teacher_weights: str | None = None) -> Config:
    def model(fpn: int, weights: str | None = None) -> ModelConfig:
        return ModelConfig(family="retinanet", backbone="resnet18", fpn_channels=fpn, head_convs=1, min_size=64,
                           max_size=64, weights=weights)

    return Config(name="viz", model=model(16), teacher=model(32, teacher_weights))


def test_configured_teacher_weights_that_do_not_exist_are_an_error(tmp_path):
    missing = tmp_path / "runs" / "teacher" / "last.pt"
    with pytest.raises(FileNotFoundError, match=f"teacher.weights: teacher weights not found: {missing}"):
        build_viz_models(_cfg(str(missing)), 3)


def test_given_teacher_weights_that_do_not_exist_name_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="--teacher: teacher weights not found"):
        build_viz_models(_cfg(), 3, teacher_weights=tmp_path / "nope.pt")


def test_no_teacher_weights_falls_back_to_a_fresh_teacher_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match=r"the teacher has no weights \(--teacher / teacher.weights\)"):
        models = build_viz_models(_cfg(), 3)
    assert models.teacher is not None and models.teacher_source is None
    assert "teacher: FRESH INIT" in models.note()


def test_existing_configured_teacher_weights_are_loaded_without_a_warning(tmp_path):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="the teacher has no weights"):
        fresh = build_viz_models(_cfg(), 3).teacher
    state = {k: v + 1 if v.is_floating_point() else v for k, v in fresh.state_dict().items()}
    torch.save(state, tmp_path / "last.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models = build_viz_models(_cfg(str(tmp_path / "last.pt")), 3)
    assert models.teacher_source == str(tmp_path / "last.pt")
    assert not [w for w in caught if "teacher has no weights" in str(w.message)]
    for k, v in models.teacher.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_configured_student_weights_that_do_not_exist_are_an_error(tmp_path):
    cfg = _cfg()
    cfg.model.weights = str(tmp_path / "student.pt")
    with pytest.raises(FileNotFoundError, match="model.weights: student weights not found"):
        build_viz_models(cfg, 3)


def test_a_torchvision_weights_name_is_not_loaded_and_says_so():
    # viz never downloads: a weights name counts as no weights (fresh, with the warning), not as a missing file
    with pytest.warns(UserWarning, match="the teacher has no weights"):
        models = build_viz_models(_cfg("RetinaNet_ResNet50_FPN_Weights.COCO_V1"), 3)
    assert models.teacher_source is None
