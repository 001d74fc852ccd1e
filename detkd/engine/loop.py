"""The training loop: plain students (TaskModel) and distillers alike, one process or many (DDP under torchrun).

Read :func:`fit` top to bottom: per optimizer step, ``accumulate`` micro-batches go forward (autocast) and backward
(loss / micro-batches, grad-scaled for fp16); a non-finite loss skips the step; gradients are clipped; the optimizer
and the per-step LR schedule advance. Evaluation and checkpoints happen at epoch ends, at the end, every
``checkpoint_every`` steps and when a stop is requested (``stop_at_step`` or SIGINT/SIGTERM).

Exact resume: ``state.pt`` holds, besides the weights and optimizer, the counters, the RNG states at the stop and
those at the start of the interrupted epoch. Resuming mid-epoch restores the epoch-start states, rebuilds the epoch's
data iterator (same sampler permutation), skips the consumed batches by loading them, then restores the stop-time
states, so the resumed run follows the uninterrupted trajectory exactly (tested with ``num_workers=0``; workers'
seeds come from the replayed epoch-start draw, so their augmentations replay too).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detkd.config import Config, TrainConfig, dump_config, load_config, to_dict
from detkd.engine import checkpoint as ck
from detkd.engine import distributed as D
from detkd.engine.logging import RunLogger, WindowMean
from detkd.engine.optim import (
    amp_dtype,
    build_grad_scaler,
    build_optimizer,
    build_scheduler,
    default_param_groups,
    total_steps,
)

Evaluate = Callable[[nn.Module], dict[str, float]]


@dataclass
class FitResult:
    steps: int  # optimizer steps done (skipped non-finite steps included)
    epochs: int  # completed epochs
    last_metrics: dict[str, float]  # the last evaluation ({} when none ran)
    best_metric: float | None  # best AP seen (best.pt holds that student)
    wall_time: float  # seconds spent in this call
    skipped_steps: int  # steps skipped because a loss was not finite
    stopped: bool = False  # True when stopped early (stop_at_step or a signal); resume with resume=True


@dataclass
class Progress:
    """Counters saved in state.pt."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # micro-batches of ``epoch`` already consumed
    best_metric: float | None = None
    skipped_steps: int = 0
    nonfinite_in_row: int = 0


@dataclass
class _Run:
    trainable: nn.Module  # unwrapped: hooks, student, state_dict
    model: nn.Module  # what is called: DDP-wrapped under torchrun
    loader: Any
    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None
    total: int
    p: Progress = field(default_factory=Progress)
    resume_rng: dict | None = None
    resume_epoch_rng: dict | None = None
    epoch_rng: dict | None = None
    check_pending: bool = True
    last_metrics: dict[str, float] = field(default_factory=dict)
    window: WindowMean = field(default_factory=WindowMean)  # logged values since the last log line
    logger: RunLogger | None = None


def fit(
    trainable: nn.Module,
    train_loader: Any,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    evaluate: Evaluate | None = None,
    resume: bool | str | Path | None = None,
    seed: int = 0,
    config: Config | None = None,
    stop_at_step: int | None = None,
    checkpoint_every: int = 0,
    find_unused_parameters: bool = False,
) -> FitResult:
    """Train ``trainable`` (see detkd.engine.task for the contract) on ``train_loader`` and write ``run_dir``.

    ``evaluate(student) -> {"AP": ..., ...}`` runs every ``cfg.eval_every`` epochs and at the end (rank 0 only);
    the best AP is kept in ``best.pt``. ``resume``: True for ``run_dir/state.pt`` or a path. ``stop_at_step``: save
    the resume state after that step and return (``stopped=True``). ``checkpoint_every``: also save every N steps.
    """
    t0 = time.perf_counter()
    run = _setup(trainable, train_loader, cfg, Path(run_dir), resume, seed, config, find_unused_parameters)
    stopped = False
    end_run = getattr(trainable, "end_run", lambda: None)  # e.g. the Distiller releases LGD's frozen backbone
    with ck.StopRequest() as stop, contextlib.closing(run.logger), _finally(end_run):
        while run.p.step < run.total and not stopped:
            batches, epoch_done = _begin_epoch(run), False
            while not (epoch_done or stopped) and run.p.step < run.total:
                _optimizer_step(run, batches)
                epoch_done = run.p.batch >= len(run.loader)
                if epoch_done:
                    run.p.epoch, run.p.batch = run.p.epoch + 1, 0
                finished = run.p.step >= run.total
                stopped = D.any_rank(stop.requested or run.p.step == stop_at_step) and not finished
                do_eval = finished or (epoch_done and cfg.eval_every > 0 and run.p.epoch % cfg.eval_every == 0)
                periodic = checkpoint_every > 0 and run.p.step % checkpoint_every == 0
                if do_eval or finished or stopped or epoch_done or periodic:
                    rng = ck.capture_rng(run.loader)  # evaluation and saving must not move the trajectory
                    if do_eval and evaluate is not None:
                        _evaluate(run, evaluate)
                    _save(run, rng)
                    ck.restore_rng(rng, run.loader)
    return FitResult(run.p.step, run.p.epoch, run.last_metrics, run.p.best_metric, time.perf_counter() - t0,
                     run.p.skipped_steps, stopped)


@contextlib.contextmanager
def _finally(action: Callable[[], None]) -> Iterator[None]:
    try:
        yield
    finally:
        action()


# ----------------------------------------------------------------------------------------------------- setup


def _setup(trainable, loader, cfg, run_dir, resume, seed, config, find_unused) -> _Run:
    if cfg.accumulate < 1:
        raise ValueError(f"train.accumulate must be >= 1, got {cfg.accumulate}")
    if len(loader) == 0:
        raise ValueError("fit: the training loader is empty")
    device = D.resolve_device(cfg.device)
    if device.type == "cuda":
        if D.get_world_size() > 1 and device.index != torch.cuda.current_device():
            raise ValueError(f"train.device={cfg.device} under torchrun: each rank trains on its LOCAL_RANK GPU "
                             f"(cuda:{torch.cuda.current_device()} here); use train.device=cuda or auto")
        torch.cuda.set_device(device)  # the GPU whose RNG state checkpoints save and restore
    trainable.to(device).train()
    # Parameters that skip steps (LGD's frozen-backbone warm-up, a loss active only in a step window) make DDP fail
    # at the next step unless it looks for unused parameters: the trainable says whether it has any.
    find_unused = find_unused or bool(getattr(trainable, "leaves_parameters_unused", lambda: False)())
    model = D.wrap_ddp(trainable, device, find_unused_parameters=find_unused)
    groups = trainable.param_groups() if hasattr(trainable, "param_groups") else default_param_groups(trainable)
    optimizer = build_optimizer(groups, cfg)
    total = total_steps(cfg, len(loader))
    dtype = amp_dtype(cfg.amp, device)
    run = _Run(trainable, model, loader, cfg, run_dir, device, optimizer, build_scheduler(optimizer, cfg, total),
               build_grad_scaler(dtype, device), dtype, total)
    if resume:
        state_path = run_dir / "state.pt" if resume is True else Path(resume)
        if config is not None:
            _check_same_config(config, state_path.parent / "config.yaml")
        _load_state(run, state_path)
        if run.p.step >= total:
            raise ValueError(f"{state_path}: this run already finished ({run.p.step} of {total} steps); its metrics "
                             "are in result.json. Evaluate its last.pt, or start a new run (another name)")
    else:
        ck.seed_everything(seed + D.get_rank())  # ranks see different augmentations
    if D.is_main() and config is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, run_dir / ".config.yaml.tmp")
        os.replace(run_dir / ".config.yaml.tmp", run_dir / "config.yaml")
    run.logger = RunLogger(run_dir, total_steps=total, log_every=cfg.log_every, progress=cfg.progress,
                           enabled=D.is_main(), resume_step=run.p.step if resume else None)
    return run


#: settings a resumed run may change: how it reports and where it runs, not what it computes
RESUME_MAY_CHANGE = ("name", "output_dir", "train.progress", "train.log_every", "train.checkpoint_every",
                     "train.device", "data.num_workers", "eval.batch_size")


def _check_same_config(config: Config, saved: Path) -> None:
    """Resuming restores the optimizer, the schedule and the step from ``state.pt``: a changed recipe (another lr,
    schedule, length, model, loss) would go on silently with the old ones while ``config.yaml`` claimed the new.
    ValueError listing the keys that differ (``RESUME_MAY_CHANGE`` excepted)."""
    if not saved.is_file():
        return  # a state saved without its config (the library's own fit calls): nothing to compare

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            return {k: v for key, sub in d.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix[:-1]: d}

    old, new = flat(to_dict(load_config(saved))), flat(to_dict(config))
    changed = [k for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and k not in RESUME_MAY_CHANGE]
    if changed:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
        more = f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""
        raise ValueError(f"cannot resume {saved.parent}: the config differs from the one it was started with "
                         f"({saved}): {shown}{more}. Resume with the same recipe and overrides, or start a new run")


def _load_state(run: _Run, path: Path) -> None:
    state = ck.load_checkpoint(path)
    if state.get("format") != ck.STATE_FORMAT:
        raise ValueError(f"{path}: not a detkd resume state (format {state.get('format')!r}, want {ck.STATE_FORMAT})")
    try:
        run.trainable.load_state_dict(state["trainable"])
    except RuntimeError as e:
        raise ValueError(f"{path}: written by another model or distillation set-up than this config builds: "
                         f"{str(e).splitlines()[0]}") from e
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.p = Progress(**state["progress"])
    before, now = state.get("precision"), _precision(run.dtype)
    if before is not None and before != now:  # train.device may change on resume, and train.amp=auto follows it
        warnings.warn(f"{path}: the run trained in {before} until step {run.p.step} and goes on in {now} "
                      f"(train.device={run.cfg.device}, train.amp={run.cfg.amp}); set train.amp to keep {before}",
                      stacklevel=2)
    rank = D.get_rank()
    run.resume_rng = state["rng"][rank % len(state["rng"])]
    run.resume_epoch_rng = state["epoch_rng"][rank % len(state["epoch_rng"])]


def _begin_epoch(run: _Run) -> Iterator:
    """The epoch's batch iterator; on resume, positioned after the consumed batches with the stop-time RNG."""
    mid_epoch = run.resume_rng is not None and run.p.batch > 0
    if run.resume_rng is not None:
        ck.restore_rng(run.resume_epoch_rng if mid_epoch else run.resume_rng, run.loader)
    run.epoch_rng = ck.capture_rng(run.loader)
    # detkd.data's loader has set_epoch (it reseeds its generator / DistributedSampler); else the sampler may have it
    target = run.loader if hasattr(run.loader, "set_epoch") else getattr(run.loader, "sampler", None)
    if hasattr(target, "set_epoch"):
        target.set_epoch(run.p.epoch)
    batches = iter(run.loader)
    if mid_epoch:
        for _ in range(run.p.batch):  # same data (and data RNG) as the interrupted run; results discarded
            next(batches)
        ck.restore_rng(run.resume_rng, run.loader)
    run.resume_rng = run.resume_epoch_rng = None
    return batches


# -------------------------------------------------------------------------------------------------- one step


def _to_device(batch: Any, device: torch.device) -> tuple[list[Tensor], list[dict[str, Any]]]:
    images, targets = batch
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def _scalars(out: dict[str, Any]) -> dict[str, float]:
    """Every scalar tensor of the trainable's output as floats (one device sync)."""
    if "loss" not in out:
        raise KeyError(f"the trainable returned no 'loss' key (keys: {sorted(out)})")
    keys = [k for k, v in out.items() if isinstance(v, Tensor) and v.numel() == 1]
    device = out["loss"].device
    values = torch.stack([out[k].detach().float().reshape(()).to(device) for k in keys]).cpu().tolist()
    return dict(zip(keys, values))


def _micro_step(run: _Run, batch: Any, n_micro: int, last: bool) -> tuple[dict[str, float], list[str]]:
    """Forward + backward of one micro-batch; returns its scalars and the names of non-finite ones (then no
    backward: every rank skips together)."""
    images, targets = _to_device(batch, run.device)
    if hasattr(run.trainable, "set_step"):
        run.trainable.set_step(run.p.step)
    defer_sync = not last and isinstance(run.model, nn.parallel.DistributedDataParallel)
    with run.model.no_sync() if defer_sync else contextlib.nullcontext():
        with torch.autocast(run.device.type, dtype=run.dtype, enabled=run.dtype is not None):
            out = run.model(images, targets)
        if run.check_pending and hasattr(run.trainable, "step_check"):
            run.trainable.step_check(out)
        run.check_pending = False
        values = _scalars(out)
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if D.any_rank(bool(bad)):
            return values, bad or ["(on another rank)"]
        run.scaler.scale(out["loss"] / n_micro).backward()
    return values, []


def _optimizer_step(run: _Run, batches: Iterator) -> None:
    cfg, p = run.cfg, run.p
    n = min(cfg.accumulate, len(run.loader) - p.batch)  # the epoch's last step may have fewer micro-batches
    micro, bad = WindowMean(), []
    for i in range(n):
        batch = next(batches)
        if not bad:  # after a non-finite micro-batch the rest of the group is consumed but not used
            values, bad = _micro_step(run, batch, n, last=i == n - 1)
            micro.add(values)
    lr = run.optimizer.param_groups[0]["lr"]
    if bad:
        _skip_step(run, bad)
    else:
        if cfg.grad_clip:
            run.scaler.unscale_(run.optimizer)
            params = [q for g in run.optimizer.param_groups for q in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        p.nonfinite_in_row = 0
    run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped first step (ours or the fp16 scaler's) is not an ordering mistake
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        run.scheduler.step()
    p.step, p.batch = p.step + 1, p.batch + n
    _log_step(run, None if bad else micro.pop(), lr)


def _skip_step(run: _Run, bad: list[str]) -> None:
    p = run.p
    p.skipped_steps += 1
    p.nonfinite_in_row += 1
    run.logger.log("nonfinite", p.step + 1, p.epoch, {"skipped_steps": float(p.skipped_steps)},
                   extra={"terms": bad})
    if p.nonfinite_in_row >= run.cfg.max_nonfinite:
        raise FloatingPointError(
            f"{p.nonfinite_in_row} optimizer steps in a row had a non-finite loss (up to step {p.step + 1}); "
            f"non-finite terms: {', '.join(bad)}. Lower train.lr, set train.grad_clip, or check the data."
        )


def _log_step(run: _Run, values: dict[str, float] | None, lr: float) -> None:
    p, cfg = run.p, run.cfg
    if values is not None:
        run.window.add(values)
    run.logger.step(p.step, values)
    if p.step % max(cfg.log_every, 1) == 0 or p.step == run.total:
        mean = D.all_reduce_mean(run.window.pop())  # every rank calls it: skip decisions are shared
        run.logger.log("train", p.step, p.epoch, {**mean, "lr": lr, "skipped_steps": float(p.skipped_steps)})


# ------------------------------------------------------------------------------------------ evaluate and save


def _evaluate(run: _Run, evaluate: Evaluate) -> None:
    student = run.trainable.student
    metrics = None
    if D.is_main():
        was_training = student.training
        metrics = {k: float(v) for k, v in evaluate(student).items()}
        student.train(was_training)
        if "AP" not in metrics:
            raise KeyError(f"evaluate() must return an 'AP' key (got {sorted(metrics)})")
        ap, best = metrics["AP"], run.p.best_metric
        if math.isfinite(ap) and (best is None or ap > best):
            run.p.best_metric = ap
            ck.save_student(student, run.run_dir / "best.pt")
        run.logger.log("eval", run.p.step, run.p.epoch, metrics)
    run.last_metrics = D.broadcast_object(metrics) or {}
    run.p.best_metric = D.broadcast_object(run.p.best_metric)


def _save(run: _Run, rng: dict) -> None:
    """last.pt (plain student) and state.pt (everything to resume); RNG states gathered from every rank."""
    rngs, epoch_rngs = D.all_gather_object(rng), D.all_gather_object(run.epoch_rng)
    if not D.is_main():
        return
    ck.save_student(run.trainable.student, run.run_dir / "last.pt")
    state = {
        "format": ck.STATE_FORMAT,
        "trainable": run.trainable.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "progress": asdict(run.p),
        "rng": rngs,
        "epoch_rng": epoch_rngs,
        "precision": _precision(run.dtype),
    }
    ck.atomic_save(state, run.run_dir / "state.pt")


def _precision(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
