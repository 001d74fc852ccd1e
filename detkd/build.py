"""The only place where a config becomes objects: models, teacher, loss modules, trainable."""

from __future__ import annotations

import logging

from torch import nn

from detkd.config import ConfigError, DistillConfig, LossConfig, ModelConfig, loss_key
from detkd.distill.distiller import Distiller, ScheduledLoss
from detkd.distill.teacher import FrozenTeacher
from detkd.losses import LOSSES
from detkd.models import build as build_detector
from detkd.models.adapters import DetectorAdapter, build_adapter
from detkd.models.pairs import check_pair, head_signature

log = logging.getLogger(__name__)


def build_model(mc: ModelConfig, num_classes: int) -> nn.Module:
    """A detector from its config; ``num_classes`` (real classes) comes from the dataset unless the config pins it."""
    if mc.num_classes is not None and mc.num_classes != num_classes:
        raise ConfigError(
            f"model.num_classes is {mc.num_classes} but the dataset has {num_classes} classes; "
            "remove model.num_classes or fix the data"
        )
    return build_detector(
        mc.family,
        backbone=mc.backbone,
        num_classes=num_classes,
        fpn_channels=mc.fpn_channels,
        head_convs=mc.head_convs,
        min_size=mc.min_size,
        max_size=mc.max_size,
        backbone_norm=mc.backbone_norm,
        weights=mc.weights,
        backbone_weights=mc.backbone_weights,
        **mc.options,
    )


def _default_levels(cls: type, student: DetectorAdapter, teacher: DetectorAdapter | None) -> list[str]:
    levels = list(student.feature_specs())
    if teacher is not None and cls.teacher_stage is not None:
        t_levels = teacher.feature_specs()
        levels = [lv for lv in levels if lv in t_levels]
    return levels


def build_loss(
    lc: LossConfig,
    student: DetectorAdapter,
    teacher: DetectorAdapter | None,
    *,
    num_classes: int,
    max_steps: int | None,
    allow_resize: bool = False,
    key: str | None = None,
) -> ScheduledLoss:
    """The loss module of one ``distill.losses`` entry; ``key`` names the entry in errors (default: the method)."""
    if lc.method not in LOSSES:
        raise ConfigError(f"unknown distillation method {lc.method!r} (known: {', '.join(sorted(LOSSES))})")
    key = key or lc.method
    cls = LOSSES[lc.method]
    known = cls.param_names()
    unknown = sorted(set(lc.params) - known)
    if unknown:  # before constructing: a misspelt name would otherwise be a TypeError from inside the module
        raise ConfigError(f"{key}: unknown param(s) {unknown} (known: {', '.join(sorted(known))})")
    if cls.families is not None and student.family not in cls.families:  # else a ValueError at the first step
        raise ConfigError(f"{key}: needs a {' or '.join(cls.families)} student, this one is {student.family}; "
                          f"{cls.family_hint}")
    levels = lc.levels or _default_levels(cls, student, teacher)
    s_specs = student.feature_specs()
    t_specs = teacher.feature_specs() if teacher is not None else None
    if cls.teacher_stage is not None and teacher is None:
        raise ConfigError(f"distillation method {lc.method!r} needs a teacher: add a `teacher:` section")
    if cls.teacher_stage is not None:  # levels the models lack: a PairError here, not a KeyError from the module
        check_pair(key, "features", s_specs, t_specs, levels, allow_resize=allow_resize)
    params = dict(lc.params)
    if lc.method == "lgd":
        params.setdefault("num_classes", num_classes)
        params.setdefault("max_steps", max_steps)
    try:
        module = cls(levels, s_specs, t_specs, **params)
    except ValueError as e:  # a value out of range (e.g. tau <= 0): name the config entry it came from
        raise ConfigError(f"{key}: {e}") from e
    # the instance decides what it consumes (e.g. CWD on class logits needs the same head)
    if module.teacher_stage is not None and module.needs_same_head:
        check_pair(key, "same_head", s_specs, t_specs, levels,
                   student_head=head_signature(student), teacher_head=head_signature(teacher))
    return ScheduledLoss(lc.method, module, lc.weight, lc.start_step, lc.stop_step)


def build_distiller(
    student: nn.Module,
    teacher: FrozenTeacher | None,
    dc: DistillConfig,
    *,
    num_classes: int,
    max_steps: int | None = None,
) -> Distiller:
    s_adapter = build_adapter(student)
    t_adapter = teacher.adapter if teacher is not None else None
    report = None
    if dc.inherit:
        if teacher is None:
            raise ConfigError("distill.inherit needs a teacher")
        from detkd.distill.inherit import inherit_from_teacher

        report = inherit_from_teacher(student, teacher.model)
        state = student.state_dict()
        if not any(state[k].dim() > 1 for k in report.copied):  # biases alone: a narrower student inherits nothing
            key = report.mismatched[0] if report.mismatched else "(none)"
            why = dict(report.skipped)[key] if report.mismatched else "no neck/head keys"
            raise ConfigError(f"distill.inherit: no weight of the teacher's neck or head fits the student (e.g. {key}: "
                              f"{why}); give the student the teacher's model.fpn_channels and model.head_convs")
    keys: dict[str, int] = {}
    losses = []
    for i, lc in enumerate(dc.losses):
        if lc.weight < 0:
            raise ConfigError(f"distill.losses: {lc.method!r} has a negative weight ({lc.weight})")
        if lc.weight == 0:  # an off switch (e.g. `--set` or a sweep): not built, so the step-1 check skips it
            log.info("distillation method %r has weight 0: left out", lc.method)
            continue
        sl = build_loss(
            lc, s_adapter, t_adapter, num_classes=num_classes, max_steps=max_steps, allow_resize=dc.allow_resize,
            key=loss_key(i, lc),
        )
        keys[lc.method] = keys.get(lc.method, 0) + 1
        if keys[lc.method] > 1:  # the same method twice (e.g. on different levels) logs under distinct keys
            sl.key = f"{lc.method}{keys[lc.method]}"
        losses.append(sl)
    if not losses:
        raise ConfigError("distill.losses has no term to train (empty, or every weight is 0): name at least one "
                          "method, or remove the distill section")
    return Distiller(
        student, losses, teacher, task_weights=dc.task_weights, check_first_step=dc.check_first_step,
        inherit_report=report,
    )
