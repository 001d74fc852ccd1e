"""The Python entry points of design.md: ``detkd.models.build`` and ``detkd.distill``."""

from __future__ import annotations

import torch

import detkd
from detkd.build import build_model
from detkd.cli import main
from detkd.config import DataConfig, LossConfig, ModelConfig, SynthConfig, load_config


def _data(tmp_path) -> DataConfig:
    return DataConfig(format="synthetic", root=str(tmp_path / "synth"), batch_size=2,
                      synthetic=SynthConfig(num_train=4, num_val=2, image_size=64, max_objects=3, seed=2))


def _build(backbone: str, fpn: int):
    return detkd.models.build("fcos", backbone=backbone, num_classes=7, fpn_channels=fpn, head_convs=1,
                              min_size=64, max_size=64)


def test_train_teacher_then_distill_from_python(tmp_path):
    teacher = _build("resnet18", 32)
    t_run = detkd.train_student(teacher, data=_data(tmp_path), epochs=1, output_dir=str(tmp_path), name="teacher")
    assert {"AP", "AP50", "AP75"} <= set(t_run.metrics) and not teacher.training  # returned ready for inference
    teacher = detkd.models.build("fcos", backbone="resnet18", num_classes=7, fpn_channels=32, head_convs=1,
                                 min_size=64, max_size=64, weights=str(t_run.run_dir / "last.pt"))
    student = _build("resnet18", 16)
    result = detkd.distill(teacher, student, data=_data(tmp_path), methods=["cwd", "hint"], epochs=1,
                           output_dir=str(tmp_path), name="student")
    assert result.steps == 2 and "AP" in result.metrics
    lines = (result.run_dir / "metrics.jsonl").read_text()
    assert "distill/cwd" in lines and "distill/hint" in lines
    assert not student.training and teacher.training  # the teacher as it came: train mode, trainable
    assert all(p.requires_grad for p in teacher.parameters())
    plain = _build("resnet18", 16)
    plain.load_state_dict(torch.load(result.run_dir / "last.pt", weights_only=True), strict=True)
    # config.yaml names the student and the teacher: `detkd eval` re-evaluates the run
    cfg = load_config(result.run_dir / "config.yaml")
    assert cfg.model == ModelConfig(family="fcos", backbone="resnet18", num_classes=7, fpn_channels=16, head_convs=1,
                                    min_size=64, max_size=64)
    assert cfg.teacher.fpn_channels == 32 and cfg.teacher.weights == str(t_run.run_dir / "last.pt")
    build_model(cfg.model, 7).load_state_dict(torch.load(result.run_dir / "last.pt", weights_only=True), strict=True)
    assert main(["eval", str(result.run_dir / "config.yaml"), "--checkpoint", str(result.run_dir / "last.pt"),
                 "--json"]) == 0


def test_lgd_from_python_needs_no_teacher(tmp_path):
    student = _build("resnet18", 32)
    lgd = LossConfig("lgd", params={"eval_teacher": True, "pre_nondistill_steps": 1, "freeze_backbone_steps": 1})
    result = detkd.distill(None, student, data=_data(tmp_path), methods=[lgd], epochs=1,
                           output_dir=str(tmp_path), name="lgd")
    assert "AP" in result.metrics and "lgd_branch/AP" in result.metrics  # the label-guided branch, evaluated too
    assert "distill/lgd" in (result.run_dir / "metrics.jsonl").read_text()


def test_lgd_by_name_scales_its_warmup_to_the_run(tmp_path):
    from detkd.api import default_losses
    from detkd.config import TrainConfig
    from detkd.losses.lgd import scaled_warmup
    from detkd.runner import planned_steps

    # the reference 30k detached / 20k frozen of 180k, kept as fractions of a 480-step run
    assert scaled_warmup(480) == {"pre_nondistill_steps": 80, "freeze_backbone_steps": 53}
    assert scaled_warmup(180_000) == {"pre_nondistill_steps": 30_000, "freeze_backbone_steps": 20_000}
    (lgd,) = default_losses("lgd", "fcos", total_steps=480)
    assert lgd.params == {"pre_nondistill_steps": 80, "freeze_backbone_steps": 53}
    assert default_losses("lgd", "fcos")[0].params == {}  # no length known: the loss's reference counts
    # 4 training images in batches of 2 for 3 epochs: 6 steps
    assert planned_steps(_data(tmp_path), TrainConfig(epochs=3)) == 6
    assert planned_steps(_data(tmp_path), TrainConfig(epochs=3, accumulate=2)) == 3  # one step per 2 batches
