"""What ``detkd.distill`` / ``detkd.train_student`` / ``detkd.models.build`` refuse or fill in, without training:
``api.train_models`` is replaced by a stub that records the Config and does to the models what a run does."""

from __future__ import annotations

import shutil

import pytest
import torch

import detkd
from detkd import api
from detkd.config import ConfigError, DataConfig, LossConfig, ModelConfig, SynthConfig, TrainConfig
from detkd.data import build_dataset, synthetic
from detkd.distill.teacher import FrozenTeacher
from detkd.runner import RunResult

SYNTH = SynthConfig(num_train=4, num_val=2, image_size=64, max_objects=3, seed=2)  # 7 classes


def _data(tmp_path) -> DataConfig:
    return DataConfig(format="synthetic", root=str(tmp_path / "synth"), batch_size=2, synthetic=SYNTH)


def _build(num_classes=7, fpn=16, **options):
    return detkd.models.build("fcos", "resnet18", num_classes, fpn_channels=fpn, head_convs=1, min_size=64,
                              max_size=64, **options)


@pytest.fixture
def runs(monkeypatch):
    """The Configs the API hands to ``train_models``; the stub freezes the teacher and leaves the student in train
    mode, as a run does."""
    configs = []

    def fake(cfg, student, teacher, resume=False):
        configs.append(cfg)
        if teacher is not None:
            FrozenTeacher(teacher)
        student.train()
        return RunResult(cfg.run_dir, {}, 0, 0.0)

    monkeypatch.setattr(api, "train_models", fake)
    return configs


def test_build_takes_integer_sizes_and_records_its_arguments():
    for bad in (2.7, True, "3"):
        with pytest.raises(ValueError, match="num_classes must be"):
            _build(num_classes=bad)
    for bad in (0, 16.0):
        with pytest.raises(ValueError, match="fpn_channels must be"):
            _build(fpn=bad)
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="head_convs must be"):
            detkd.models.build("fcos", num_classes=2, fpn_channels=16, head_convs=bad)
    spec = _build(nms_thresh=0.4).detkd_spec
    assert spec.build_args == {"head_convs": 1, "min_size": 64, "max_size": 64, "backbone_norm": "bn", "weights": None,
                               "backbone_weights": None, "options": {"nms_thresh": 0.4}}


def test_models_that_cannot_be_distilled_are_refused(tmp_path, runs):
    kw = {"data": _data(tmp_path), "epochs": 1, "output_dir": str(tmp_path)}
    model = _build()
    with pytest.raises(ValueError, match="teacher and student are the same object"):
        detkd.distill(model, model, **kw)
    plain = _build()
    del plain.detkd_spec  # a plain torchvision FCOS
    with pytest.raises(TypeError, match=r"student: a FCOS without detkd_spec.*detkd\.models\.build"):
        detkd.distill(_build(), plain, **kw)
    with pytest.raises(TypeError, match="teacher: a FCOS without detkd_spec"):
        detkd.distill(plain, _build(), **kw)
    with pytest.raises(ValueError, match=r"teacher has torch.float16 weights: pass teacher.float\(\)"):
        detkd.distill(_build().half(), _build(), **kw)
    with pytest.raises(ValueError, match=r"student has torch.float64 weights: pass student.float\(\)"):
        detkd.train_student(_build().double(), **kw)
    with pytest.raises(ValueError, match="uses a teacher: it would be ignored; pass teacher=None"):
        detkd.distill(_build(), _build(), methods=["lgd"], **kw)
    assert runs == []


def test_arguments_that_would_be_ignored_or_mean_nothing(tmp_path, runs):
    t, s, data = _build(), _build(), _data(tmp_path)
    out = {"output_dir": str(tmp_path)}
    with pytest.raises(ValueError, match="epochs, lr would be ignored next to train="):
        detkd.distill(t, s, data=data, train=TrainConfig(max_steps=1), epochs=3, lr=0.1, **out)
    with pytest.raises(ValueError, match="batch_size would be ignored next to data=DataConfig"):
        detkd.train_student(s, data=data, batch_size=8, **out)
    with pytest.raises(FileNotFoundError, match="nowhere not found"):
        detkd.train_student(s, data=tmp_path / "nowhere", **out)
    # the range checks of a recipe
    with pytest.raises(ConfigError, match="train.epochs must be at least 1"):
        detkd.distill(t, s, data=data, epochs=0, **out)
    with pytest.raises(ConfigError, match="train.epochs must be at least 1"):
        detkd.train_student(s, data=data, epochs=0, **out)
    with pytest.raises(ConfigError, match=r"start_step \(5\) is not before train.max_steps \(2\)"):
        detkd.distill(t, s, data=data, methods=[LossConfig("cwd", start_step=5)], train=TrainConfig(max_steps=2), **out)
    with pytest.raises(ConfigError, match="stop_step"):
        detkd.distill(t, s, data=data, methods=[LossConfig("cwd", start_step=2, stop_step=1)], **out)
    # method entries are checked as a recipe's
    with pytest.raises(ConfigError, match=r"unknown key methods\[0\].wieght"):
        detkd.distill(t, s, data=data, methods=[{"method": "cwd", "wieght": 2}], **out)
    with pytest.raises(ConfigError, match=r"methods\[1\].weight: expected a number, got '10'"):
        detkd.distill(t, s, data=data, methods=["hint", LossConfig("cwd", weight="10")], **out)
    with pytest.raises(ConfigError, match=r"methods\[0\]: expected a method name"):
        detkd.distill(t, s, data=data, methods=[3], **out)
    assert runs == []


def test_an_earlier_run_needs_overwrite(tmp_path, runs):
    run_dir = tmp_path / "runs" / "s"
    run_dir.mkdir(parents=True)
    (run_dir / "last.pt").write_bytes(b"")
    kw = {"data": _data(tmp_path), "output_dir": tmp_path / "runs", "name": "s"}
    with pytest.raises(ValueError, match=r"runs/s already holds a run \(last.pt\): pass overwrite=True"):
        detkd.distill(_build(), _build(), **kw)
    with pytest.raises(ValueError, match="pass overwrite=True"):
        detkd.train_student(_build(), **kw)
    assert runs == []
    detkd.train_student(_build(), overwrite=True, **kw)
    assert len(runs) == 1 and runs[0].run_dir == run_dir


def test_data_paths_methods_models_and_modes(tmp_path, runs):
    synthetic.ensure(tmp_path / "coco", SYNTH)
    teacher, student = _build(fpn=32), _build()
    teacher.backbone.body.conv1.requires_grad_(False)  # the user's own choice, kept after the run
    teacher.backbone.body.bn1.eval()
    moves = []  # a run moves the teacher to the training device; the API moves it back where it was (CPU here)
    teacher.to = lambda *a, **k: moves.append(a) or torch.nn.Module.to(teacher, *a, **k)
    detkd.distill(teacher, student, data=tmp_path / "coco" / "annotations_train.json", methods="hint",
                  output_dir=str(tmp_path), name="d")
    assert moves == [(torch.device("cpu"),)]
    (cfg,) = runs
    assert cfg.data.format == "coco" and cfg.data.ann_file == str(tmp_path / "coco" / "annotations_{split}.json")
    assert len(build_dataset(cfg.data, cfg.data.val_split, train=False)) == SYNTH.num_val
    assert [lc.method for lc in cfg.distill.losses] == ["hint"]
    assert cfg.model == ModelConfig(family="fcos", backbone="resnet18", num_classes=7, fpn_channels=16, head_convs=1,
                                    min_size=64, max_size=64)
    assert cfg.teacher == ModelConfig(family="fcos", backbone="resnet18", num_classes=7, fpn_channels=32,
                                      head_convs=1, min_size=64, max_size=64)
    # the student comes back in eval mode; the teacher as it came
    assert not any(m.training for m in student.modules())
    assert teacher.training and not teacher.backbone.body.bn1.training
    assert [n for n, p in teacher.named_parameters() if not p.requires_grad] == ["backbone.body.conv1.weight"]

    detkd.distill(teacher, student, data=tmp_path / "coco", methods=[{"method": "hint", "weight": 2}],
                  output_dir=str(tmp_path), name="d2")
    assert runs[1].distill.losses[0].weight == 2.0 and runs[1].data.root == str(tmp_path / "coco")
    (tmp_path / "yolo").mkdir()
    (tmp_path / "yolo" / "data.yaml").write_text("names: [a]\n")
    yolo = api._data_config(tmp_path / "yolo" / "data.yaml", None)
    assert (yolo.format, yolo.root) == ("yolo", str(tmp_path / "yolo"))
    as_path = api._data_config(DataConfig(format="coco", root=tmp_path / "coco"), None)  # a Path, as Python has it
    assert as_path.root == str(tmp_path / "coco")
    shutil.copy(tmp_path / "coco" / "annotations_train.json", tmp_path / "coco" / "labels.json")
    with pytest.raises(ValueError, match="names neither split"):
        api._data_config(tmp_path / "coco" / "labels.json", None)


def test_student_classes_must_be_the_datas(tmp_path):
    with pytest.raises(ConfigError, match="the student has num_classes=8 but the dataset has 7 classes"):
        detkd.train_student(_build(num_classes=8), data=_data(tmp_path), epochs=1, output_dir=str(tmp_path))
