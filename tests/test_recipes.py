"""Every recipe in configs/ loads, and every CPU-sized distillation recipe wires up (pair checks, loss modules)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from detkd.build import build_distiller, build_model
from detkd.config import ConfigError, load_config
from detkd.distill.teacher import FrozenTeacher

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def test_there_are_recipes_for_every_method_and_family():
    names = {p.stem for p in CONFIGS}
    for method in ("cwd", "fgd", "hint", "lgd"):
        for family in ("retinanet", "fcos", "gfl", "faster_rcnn"):
            assert any(n.startswith(f"{method}_{family}_") and n.endswith("_synth") for n in names), (method, family)
            assert any(n.startswith(f"{method}_{family}_") and n.endswith("_coco") for n in names), (method, family)
    assert {"ld_gfl_r50_r18_synth", "ld_gfl_r50_r18_bccd", "chen_faster_rcnn_r50_r18_bccd"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    if cfg.distill is not None:
        assert cfg.distill.losses
        assert cfg.teacher is not None or [lc.method for lc in cfg.distill.losses] == ["lgd"]


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem.endswith("_synth") and not p.stem.startswith(
    ("baseline_", "teacher_"))], ids=lambda p: p.stem)
def test_synth_distillation_recipe_builds(path):
    cfg = load_config(path)
    small = {"min_size": 64, "max_size": 64}
    student = build_model(dataclasses.replace(cfg.model, **small), num_classes=7)
    teacher = None
    if cfg.teacher is not None:
        teacher = FrozenTeacher(build_model(dataclasses.replace(cfg.teacher, weights=None, **small), num_classes=7))
    d = build_distiller(student, teacher, cfg.distill, num_classes=7, max_steps=480)
    assert [sl.module.name for sl in d.losses] == [lc.method for lc in cfg.distill.losses]


def _small_pair(cfg):
    small = {"min_size": 64, "max_size": 64}
    student = build_model(dataclasses.replace(cfg.model, **small), num_classes=7)
    teacher = FrozenTeacher(build_model(dataclasses.replace(cfg.teacher, weights=None, **small), num_classes=7))
    return student, teacher


def test_a_zero_weight_switches_a_term_off_and_a_negative_one_is_refused():
    cfg = load_config(CONFIG_DIR / "ld_gfl_r50_r18_synth.yaml")
    student, teacher = _small_pair(cfg)

    def with_kd_weight(w):
        losses = [dataclasses.replace(lc, weight=w) if lc.method == "kd" else lc for lc in cfg.distill.losses]
        return dataclasses.replace(cfg.distill, losses=losses)

    d = build_distiller(student, teacher, with_kd_weight(0.0), num_classes=7, max_steps=480)
    assert [sl.key for sl in d.losses] == ["ld", "vlr_ld"]
    with pytest.raises(ConfigError, match="'kd' has a negative weight"):
        build_distiller(student, teacher, with_kd_weight(-1.0), num_classes=7, max_steps=480)
    off = [dataclasses.replace(lc, weight=0.0) for lc in cfg.distill.losses]
    all_off = dataclasses.replace(cfg.distill, losses=off)
    with pytest.raises(ConfigError, match="every weight is 0"):
        build_distiller(student, teacher, all_off, num_classes=7, max_steps=480)


@pytest.mark.parametrize("dataset", ["synth", "bccd"])
def test_ld_tau2_recipe_differs_from_the_official_ld_only_in_the_temperatures_and_main_kd(dataset):
    cfg = load_config(CONFIG_DIR / f"ld_tau2_gfl_r50_r18_{dataset}.yaml")
    official = load_config(CONFIG_DIR / f"ld_gfl_r50_r18_{dataset}.yaml")
    ours = {lc.method: (lc.weight, lc.params) for lc in cfg.distill.losses}
    theirs = {lc.method: (lc.weight, lc.params) for lc in official.distill.losses}
    assert theirs == {"ld": (0.25, {"tau": 10.0}), "kd": (10.0, {"tau": 2.0}),
                      "vlr_ld": (0.25, {"tau": 10.0, "alpha": 0.25})}  # methods.md §1.6
    assert ours == {"ld": (0.25, {"tau": 2.0}), "kd": (0.25, {"tau": 2.0}),
                    "vlr_ld": (0.25, {"tau": 2.0, "alpha": 0.25})}
    rest = {"name": None, "distill": None}
    assert dataclasses.replace(cfg, **rest) == dataclasses.replace(official, **rest)
    assert not (CONFIG_DIR / "ld_tau2_gfl_r101_r50_coco.yaml").exists()  # COCO keeps the official setting


@pytest.mark.parametrize("family", ["fcos", "faster_rcnn"])
def test_fgd_inherit_recipe_starts_from_the_teachers_neck_and_head(family):
    cfg = load_config(CONFIG_DIR / f"fgd_inherit_{family}_r50_r18_synth.yaml")
    plain = load_config(CONFIG_DIR / f"fgd_{family}_r50_r18_synth.yaml")
    assert cfg.distill.inherit and not plain.distill.inherit
    assert (cfg.model.fpn_channels, cfg.model.head_convs) == (cfg.teacher.fpn_channels, cfg.teacher.head_convs)
    assert cfg.model.backbone == plain.model.backbone == "resnet18"  # only the neck and head are widened
    assert cfg.distill.losses == plain.distill.losses
    student, teacher = _small_pair(cfg)
    d = build_distiller(student, teacher, cfg.distill, num_classes=7, max_steps=480)
    s_state, t_state = student.state_dict(), teacher.model.state_dict()
    assert d.inherit_report.copied and d.inherit_report.summary().startswith("inherited ")
    head = "head.classification_head.conv.9.weight" if family == "fcos" else "roi_heads.box_head.fc6.weight"
    assert torch.equal(s_state[head], t_state[head])
    # the FPN's output convs fit (same width); its lateral 1x1 convs take the backbone's channels and cannot
    out, lateral = "backbone.fpn.layer_blocks.0.0.weight", "backbone.fpn.inner_blocks.0.0.weight"
    assert torch.equal(s_state[out], t_state[out])
    assert s_state[lateral].shape != t_state[lateral].shape


def test_inherit_into_a_narrower_student_is_an_error():
    cfg = load_config(CONFIG_DIR / "fgd_fcos_r50_r18_synth.yaml")  # student FPN 64 wide, teacher 128
    student, teacher = _small_pair(cfg)
    with pytest.raises(ConfigError, match=r"no weight of the teacher's neck or head fits the student \(e\.g\. "
                       r"backbone\.fpn\.inner_blocks\.0\.0\.weight: shape: teacher \(128, "):
        build_distiller(student, teacher, dataclasses.replace(cfg.distill, inherit=True), num_classes=7,
                        max_steps=480)
