"""Python entry points: ``detkd.distill(teacher, student, data=..., methods=[...])`` and ``detkd.train_student``."""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from detkd.config import Config, DataConfig, DistillConfig, LossConfig, TrainConfig
from detkd.losses.fgd import FGD_DEFAULTS
from detkd.losses.lgd import scaled_warmup
from detkd.runner import RunResult, planned_steps, train_models


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


def _data_config(data: str | Path | DataConfig, batch_size: int) -> DataConfig:
    if isinstance(data, DataConfig):
        return data
    from detkd.data.stats import guess_format

    root = Path(data)
    return DataConfig(format=guess_format(root), root=str(root), batch_size=batch_size)


def distill(
    teacher: nn.Module | None,
    student: nn.Module,
    *,
    data: str | Path | DataConfig,
    methods: list[str | LossConfig] = ("fgd",),
    epochs: int = 12,
    batch_size: int = 4,
    lr: float = 1e-3,
    optimizer: str = "adamw",
    output_dir: str = "runs",
    name: str = "distill",
    seed: int = 0,
    train: TrainConfig | None = None,
) -> RunResult:
    """Distil ``teacher`` into ``student`` (both built with ``detkd.models.build``) and evaluate the student.

    ``methods`` are names (official defaults for the student's family; ``"lgd"`` with its warm-up scaled to this
    run's length) or full ``LossConfig`` entries; ``teacher`` may be None for LGD. Returns the run's metrics; the
    plain student weights are in ``run_dir / "last.pt"``.
    """
    family = student.detkd_spec.family
    tc = train or TrainConfig(epochs=epochs, lr=lr, optimizer=optimizer)
    data_cfg = _data_config(data, batch_size)
    steps = planned_steps(data_cfg, tc) if "lgd" in methods else None
    losses: list[LossConfig] = []
    for m in methods:
        losses += [copy.deepcopy(m)] if isinstance(m, LossConfig) else default_losses(m, family, steps)
    cfg = Config(name=name, seed=seed, output_dir=output_dir, data=data_cfg, distill=DistillConfig(losses=losses),
                 train=tc)
    return train_models(cfg, student, teacher)


def train_student(student: nn.Module, *, data: str | Path | DataConfig, epochs: int = 12, batch_size: int = 4,
                  lr: float = 1e-3, output_dir: str = "runs", name: str = "student", seed: int = 0) -> RunResult:
    """Train a detector alone (the baseline, or a teacher)."""
    cfg = Config(name=name, seed=seed, output_dir=output_dir, data=_data_config(data, batch_size),
                 train=TrainConfig(epochs=epochs, lr=lr, optimizer="adamw"))
    return train_models(cfg, student, None)
