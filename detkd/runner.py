"""Run a whole experiment from a Config: data -> models -> trainable -> fit -> evaluation."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from detkd.build import build_distiller, build_model
from detkd.config import Config, ConfigError, DataConfig, TrainConfig
from detkd.data import build_dataset
from detkd.data.loader import build_loader
from detkd.distill.lgd_eval import evaluate_label_guided, label_guided_modules
from detkd.distill.teacher import FrozenTeacher
from detkd.engine.checkpoint import seed_everything
from detkd.engine.distributed import barrier, init_distributed, is_main, resolve_device
from detkd.engine.loop import fit
from detkd.engine.optim import total_steps
from detkd.engine.task import TaskModel
from detkd.eval import evaluate
from detkd.models.weights import load_checked, read_state_dict

#: files of a run folder that mean a run was already trained there (``detkd train`` and the Python API refuse to
#: train into it again without --resume / --overwrite)
RUN_FILES = ("state.pt", "last.pt", "result.json")


def earlier_run(run_dir: Path) -> list[str]:
    """The ``RUN_FILES`` that ``run_dir`` already holds (empty: no run was trained there)."""
    return [f for f in RUN_FILES if (run_dir / f).exists()]


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, float]
    steps: int
    wall_time: float
    skipped_steps: int = 0
    extra: dict = field(default_factory=dict)
    #: stopped before the end of its schedule (a signal, or ``stop_at_step``): ``state.pt`` holds the resume state and
    #: the metrics are those of a partly trained model; flows of several runs must not go on as if it had finished
    stopped: bool = False


def planned_steps(data: DataConfig, train: TrainConfig) -> int:
    """Optimizer steps a single-process run with ``data`` and ``train`` takes, as :func:`train_models` counts them
    (reads the training annotations; generates synthetic data if needed). Under DDP each rank steps fewer times."""
    n = len(build_dataset(data, data.train_split, train=True))
    return total_steps(train, math.ceil(n / data.batch_size))


def load_student_weights(model: torch.nn.Module, path: str | Path) -> None:
    """A student checkpoint (``last.pt``/``best.pt``, or a dict with ``model``) into ``model``, strictly: a checkpoint
    of another detector (family, widths, classes) is a one-line error naming the file and the first key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    load_checked(model, read_state_dict(path), source=f"checkpoint {str(path)!r}")


def train_from_config(cfg: Config, *, resume: bool | str = False) -> RunResult:
    """Train the configured student (plain or distilled) and evaluate it; DDP when launched by torchrun.

    ``cfg.seed`` fixes the student's initial weights as well as the data order: the global RNG is seeded right
    before the model is built (the process's RNG state at start differs from run to run)."""
    resolve_device(cfg.train.device)  # a device this machine lacks fails now, not after data and models are built
    num_classes = _num_classes(cfg)
    seed_everything(cfg.seed)
    student = build_model(cfg.model, num_classes)
    teacher = build_model(cfg.teacher, num_classes) if cfg.teacher is not None else None
    if teacher is not None and not cfg.teacher.weights:
        raise ConfigError("teacher.weights is required: a teacher must be trained first (give its last.pt)")
    return train_models(cfg, student, teacher, resume=resume)


def _num_classes(cfg: Config) -> int:
    dist = init_distributed(cfg.train.device)
    if dist.is_main:
        build_dataset(cfg.data, cfg.data.train_split, train=False)  # rank 0 generates/caches synthetic data first
    barrier()
    return build_dataset(cfg.data, cfg.data.train_split, train=False).num_classes


def train_models(cfg: Config, student: torch.nn.Module, teacher: torch.nn.Module | None, *,
                 resume: bool | str = False) -> RunResult:
    """Train already-built models with ``cfg``'s data, distillation and schedule; evaluate the student."""
    dist = init_distributed(cfg.train.device)
    torch.manual_seed(cfg.seed)
    train_set = build_dataset(cfg.data, cfg.data.train_split, train=True)
    spec = getattr(student, "detkd_spec", None)
    if spec is not None and spec.num_classes != train_set.num_classes:  # fewer fail at the first label; more, never
        raise ConfigError(f"the student has num_classes={spec.num_classes} but the dataset has "
                          f"{train_set.num_classes} classes; build it with num_classes={train_set.num_classes} "
                          "or fix the data")
    val_set = build_dataset(cfg.data, cfg.data.val_split, train=False)
    device = dist.device if dist.world_size > 1 else resolve_device(cfg.train.device)
    loader = build_loader(train_set, cfg.data.batch_size, train=True, num_workers=cfg.data.num_workers,
                          seed=cfg.seed, distributed=dist.world_size > 1, pin_memory=device.type == "cuda")
    if cfg.distill is not None:
        frozen = FrozenTeacher(teacher, bf16=cfg.distill.teacher_bf16) if teacher is not None else None
        max_steps = total_steps(cfg.train, len(loader))
        trainable = build_distiller(student, frozen, cfg.distill, num_classes=train_set.num_classes,
                                    max_steps=max_steps)
        if trainable.inherit_report is not None and dist.is_main:
            print(f"distill.inherit: {trainable.inherit_report.summary()}", flush=True)
    else:
        if teacher is not None:
            raise ConfigError("a teacher is configured but no distill section: add distill.losses or drop the teacher")
        trainable = TaskModel(student)

    def _evaluate(model: torch.nn.Module) -> dict[str, float]:
        return evaluate(model, val_set, batch_size=cfg.eval.batch_size, device=device,
                        max_detections=cfg.eval.max_detections)

    run_dir = cfg.run_dir
    start = time.perf_counter()
    result = fit(trainable, loader, cfg.train, run_dir, evaluate=_evaluate, resume=resume or None, seed=cfg.seed,
                 config=cfg, checkpoint_every=cfg.train.checkpoint_every,
                 find_unused_parameters=cfg.train.find_unused_parameters)
    wall = time.perf_counter() - start
    metrics = dict(result.last_metrics or {})
    for lgd in label_guided_modules(trainable) if is_main() else []:  # LGD's eval_teacher option
        branch = evaluate_label_guided(trainable, lgd, val_set, batch_size=cfg.eval.batch_size, device=device,
                                       max_detections=cfg.eval.max_detections)
        metrics.update({f"lgd_branch/{k}": v for k, v in branch.items()})
    if is_main():
        summary = {"metrics": metrics, "steps": result.steps, "wall_time": wall, "skipped_steps": result.skipped_steps,
                   "stopped": result.stopped}
        (run_dir / "result.json").write_text(json.dumps(summary, indent=2))
    return RunResult(run_dir, metrics, result.steps, wall, result.skipped_steps, stopped=result.stopped)


def eval_from_config(cfg: Config, checkpoint: str | Path, *, split: str | None = None) -> dict[str, float]:
    """Evaluate a plain student checkpoint (``last.pt``/``best.pt``) with the config's model and data."""
    device = resolve_device(cfg.train.device)
    val_set = build_dataset(cfg.data, split or cfg.data.val_split, train=False)
    model = build_model(cfg.model, val_set.num_classes)
    load_student_weights(model, checkpoint)
    return evaluate(model, val_set, batch_size=cfg.eval.batch_size, device=device,
                    max_detections=cfg.eval.max_detections, progress=cfg.train.progress and sys.stdout.isatty())
