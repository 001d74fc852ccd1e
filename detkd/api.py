"""Python entry points: ``detkd.distill(teacher, student, data=..., methods=[...])`` and ``detkd.train_student``."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detkd.config import (
    Config,
    ConfigError,
    DataConfig,
    DistillConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
    check_ranges,
    from_dict,
    to_dict,
)
from detkd.losses import LOSSES
from detkd.losses.fgd import FGD_DEFAULTS
from detkd.losses.lgd import scaled_warmup
from detkd.runner import RunResult, earlier_run, planned_steps, train_models

#: the values of ``epochs``, ``batch_size``, ``lr`` and ``optimizer`` when they are not given
DEFAULTS = {"epochs": 12, "batch_size": 4, "lr": 1e-3, "optimizer": "adamw"}


def default_losses(method: str, family: str, total_steps: int | None = None) -> list[LossConfig]:
    """The loss list a method name stands for, with the official weights for ``family``.

    LGD's warm-up phases are step counts of a 180k-iteration schedule: given ``total_steps``, they keep their
    fractions of it (:func:`detkd.losses.lgd.scaled_warmup`); without it, the reference counts.
    """
    if method == "fgd":
        return [LossConfig("fgd", params=dict(FGD_DEFAULTS[family]))]  # official per detector
    if method == "cwd":
        return [LossConfig("cwd", weight=10.0, params={"tau": 1.0})]
    if method == "hint":
        return [LossConfig("hint", weight=0.5)]
    if method == "ld":
        return [LossConfig("ld", weight=0.25, params={"tau": 10.0}), LossConfig("kd", weight=10.0, params={"tau": 2.0}),
                LossConfig("vlr_ld", weight=0.25, params={"tau": 10.0})]
    if method == "chen":
        return [LossConfig("chen", params={"mu": 0.5, "nu": 0.5}), LossConfig("hint", weight=0.5, levels=["p3"])]
    if method == "lgd":
        return [LossConfig("lgd", params=scaled_warmup(total_steps) if total_steps is not None else {})]
    return [LossConfig(method)]


def distill(
    teacher: nn.Module | None,
    student: nn.Module,
    *,
    data: str | Path | DataConfig,
    methods: str | list[str | LossConfig | dict] = ("fgd",),
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    output_dir: str | Path = "runs",
    name: str = "distill",
    seed: int = 0,
    train: TrainConfig | None = None,
    overwrite: bool = False,
) -> RunResult:
    """Distil ``teacher`` into ``student`` (both built with ``detkd.models.build``, float32) and evaluate the student.

    ``data``: a dataset folder (COCO, VOC or YOLO), a YOLO ``data.yaml``, a COCO json whose name holds the split
    (``annotations_train.json``: ``annotations_val.json`` is the validation split) or a ``DataConfig``.
    ``methods`` are names (official defaults for the student's family; ``"lgd"`` with its warm-up scaled to this
    run's length), full ``LossConfig`` entries or their dicts; ``teacher`` is None for LGD (which uses none).
    ``epochs`` (default 12), ``lr`` (1e-3) and ``optimizer`` ("adamw") build the ``TrainConfig``, or ``train`` gives
    all of it; ``batch_size`` (4) goes with a path, a ``DataConfig`` holds its own. The run goes to
    ``output_dir / name``; a folder that already holds a run is an error unless ``overwrite``.

    The student is trained in place and returned in eval mode, on the training device. The teacher is frozen (eval
    mode, no gradients) for the run; its device, training mode and ``requires_grad`` flags are restored afterwards.
    Returns the run's metrics; the plain student weights are in ``run_dir / "last.pt"``, and ``run_dir /
    "config.yaml"`` records both models, so that ``detkd eval run_dir/config.yaml --checkpoint run_dir/last.pt``
    evaluates the student again.
    """
    _check_model(student, "student")
    if teacher is not None:
        _check_model(teacher, "teacher")
        if teacher is student:
            raise ValueError("teacher and student are the same object: the student must be a detector of its own "
                             "(detkd.models.build), or a copy (copy.deepcopy(teacher))")
    methods = [methods] if isinstance(methods, str) else list(methods)
    cfg = _config(student, teacher, data=_data_config(data, batch_size), name=name, seed=seed, output_dir=output_dir,
                  train=_train_config(train, epochs=epochs, lr=lr, optimizer=optimizer), overwrite=overwrite)
    steps = planned_steps(cfg.data, cfg.train) if "lgd" in methods else None
    losses = _losses(methods, student.detkd_spec.family, steps)
    if teacher is not None and losses and not any(_uses_teacher(lc.method) for lc in losses):
        raise ValueError(f"no method of {[lc.method for lc in losses]} uses a teacher: it would be ignored; pass "
                         "teacher=None")
    cfg.distill = DistillConfig(losses=losses)
    return _run(check_ranges(cfg), student, teacher)


def train_student(student: nn.Module, *, data: str | Path | DataConfig, epochs: int | None = None,
                  batch_size: int | None = None, lr: float | None = None, output_dir: str | Path = "runs",
                  name: str = "student", seed: int = 0, overwrite: bool = False) -> RunResult:
    """Train a detector alone (the baseline, or a teacher); returned in eval mode. ``data``, the defaults and
    ``overwrite`` as in :func:`distill` (the optimizer is AdamW)."""
    _check_model(student, "student")
    cfg = _config(student, None, data=_data_config(data, batch_size), name=name, seed=seed, output_dir=output_dir,
                  train=_train_config(None, epochs=epochs, lr=lr, optimizer=None), overwrite=overwrite)
    return _run(cfg, student, None)


def _check_model(model: Any, role: str) -> None:
    if getattr(model, "detkd_spec", None) is None:
        raise TypeError(f"{role}: a {type(model).__name__} without detkd_spec; build detectors with "
                        "detkd.models.build(family, backbone, num_classes, ...) (weights= loads a checkpoint)")
    dtypes = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()} - {torch.float32}
    if dtypes:
        raise ValueError(f"{role} has {', '.join(sorted(map(str, dtypes)))} weights: pass {role}.float() (detkd "
                         "keeps float32 weights and applies mixed precision itself, TrainConfig.amp)")


def _train_config(train: TrainConfig | None, **given: Any) -> TrainConfig:
    passed = [k for k, v in given.items() if v is not None]
    if train is not None:
        if passed:
            raise ValueError(f"{', '.join(passed)} would be ignored next to train=TrainConfig(...): set "
                             f"{'them' if len(passed) > 1 else 'it'} in the TrainConfig instead")
        return train
    return TrainConfig(**{k: DEFAULTS[k] if v is None else v for k, v in given.items()})


def _data_config(data: str | Path | DataConfig, batch_size: int | None) -> DataConfig:
    if isinstance(data, DataConfig):
        if batch_size is not None:
            raise ValueError("batch_size would be ignored next to data=DataConfig(...): set DataConfig.batch_size "
                             "instead")
        paths = {k: str(v) for k in ("root", "image_root", "ann_file") if isinstance(v := getattr(data, k), Path)}
        return dataclasses.replace(data, **paths)  # DataConfig(root=Path(...)) is natural in Python
    from detkd.data.stats import guess_format

    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"data: {path} not found")
    batch = DEFAULTS["batch_size"] if batch_size is None else batch_size
    fmt = guess_format(path)
    if path.is_dir() or fmt == "yolo":  # a YOLO data.yaml stands for its folder
        return DataConfig(format=fmt, root=str(path if path.is_dir() else path.parent), batch_size=batch)
    # a COCO json: the split its name holds becomes DataConfig.ann_file's "{split}"
    splits = (DataConfig.train_split, DataConfig.val_split)
    split = next((s for s in splits if s in path.name), None)
    if split is None:
        raise ValueError(f"data: {path} names neither split ({' nor '.join(splits)}), so the other split's json is "
                         "unknown: pass the folder of annotations_train.json and annotations_val.json, or "
                         "DataConfig(format='coco', ann_file='.../name_{split}.json')")
    ann_file = str(path.parent / path.name.replace(split, "{split}"))
    for s in splits:
        if not Path(ann_file.format(split=s)).is_file():
            raise FileNotFoundError(f"data: {ann_file.format(split=s)} (the {s} split beside {path.name}) not found")
    return DataConfig(format="coco", root=str(path.parent), ann_file=ann_file, batch_size=batch)


def _model_config(model: nn.Module) -> ModelConfig:
    """The ``ModelConfig`` that rebuilds ``model`` from what ``detkd.models.build`` recorded in its spec."""
    spec = model.detkd_spec
    args = dict(spec.build_args)
    options = args.pop("options", {})
    plain = {k: v for k, v in options.items() if _plain(v)}
    if len(plain) < len(options):
        warnings.warn(f"config.yaml leaves out {spec.family} options that are objects "
                      f"({', '.join(sorted(set(options) - set(plain)))}): it does not rebuild this model exactly",
                      stacklevel=4)
    return ModelConfig(family=spec.family, backbone=spec.backbone, num_classes=spec.num_classes,
                       fpn_channels=spec.fpn_channels, options=plain, **args)


def _plain(value: Any) -> bool:
    """A value YAML writes and reads back as it is (numbers, strings, lists and dicts of them)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


def _config(student: nn.Module, teacher: nn.Module | None, *, data: DataConfig, train: TrainConfig, name: str,
            seed: int, output_dir: str | Path, overwrite: bool) -> Config:
    """The run's Config, with the checks ``load_config`` applies to a recipe (types, ranges) and those of
    ``detkd train`` on the run folder."""
    cfg = Config(name=name, seed=seed, output_dir=str(output_dir), data=data, model=_model_config(student),
                 teacher=_model_config(teacher) if teacher is not None else None, train=train)
    cfg = check_ranges(from_dict(Config, to_dict(cfg)))
    earlier = earlier_run(cfg.run_dir)
    if earlier and not overwrite:
        raise ValueError(f"{cfg.run_dir} already holds a run ({', '.join(earlier)}): pass overwrite=True to replace "
                         "it, or another name")
    return cfg


def _losses(methods: list[str | LossConfig | dict], family: str, steps: int | None) -> list[LossConfig]:
    losses: list[LossConfig] = []
    for i, m in enumerate(methods):
        if isinstance(m, str):
            losses += default_losses(m, family, steps)
        elif isinstance(m, (LossConfig, dict)):  # a copy, type-checked as a recipe's entry
            losses.append(from_dict(LossConfig, dataclasses.asdict(m) if isinstance(m, LossConfig) else m,
                                    prefix=f"methods[{i}]."))
        else:
            raise ConfigError(f"methods[{i}]: expected a method name, a LossConfig or a dict, got {m!r}")
    return losses


def _uses_teacher(method: str) -> bool:
    return method not in LOSSES or LOSSES[method].teacher_stage is not None  # an unknown name fails later


def _run(cfg: Config, student: nn.Module, teacher: nn.Module | None) -> RunResult:
    """``train_models``; then the student in eval mode and the teacher as it came (device, mode, ``requires_grad``)."""
    modes = [(m, m.training) for m in teacher.modules()] if teacher is not None else []
    flags = [(p, p.requires_grad) for p in teacher.parameters()] if teacher is not None else []
    devices = {t.device for t in [*teacher.parameters(), *teacher.buffers()]} if teacher is not None else set()
    try:
        return train_models(cfg, student, teacher)
    finally:
        student.eval()
        if len(devices) == 1:  # the run moved it to the training device (e.g. a GPU the caller needs back)
            teacher.to(next(iter(devices)))
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)
