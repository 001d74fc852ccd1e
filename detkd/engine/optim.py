"""Optimizer, learning-rate schedule and mixed-precision settings from a TrainConfig.

The schedule is per optimizer step (iteration-based, as in detectron2/mmdet): a linear warm-up from
``warmup_factor`` to 1 over ``warmup_steps``, multiplied by the main schedule evaluated over the whole run:
cosine (1 -> 0), step (x ``gamma`` at each milestone, milestones given as fractions of the total steps) or constant.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from detkd.config import TrainConfig


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of a run: ``max_steps``, else epochs x ceil(batches / accumulate) (an epoch's last step may
    have fewer micro-batches: no batch is dropped)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return cfg.epochs * math.ceil(batches_per_epoch / max(cfg.accumulate, 1))


def default_param_groups(module: nn.Module) -> list[dict[str, Any]]:
    """One group with every parameter that requires grad."""
    return [{"params": [p for p in module.parameters() if p.requires_grad]}]


def build_optimizer(groups: Iterable[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay) or AdamW over ``groups``; a group may override ``lr``/``weight_decay``."""
    groups = [{**g, "params": list(g["params"])} for g in groups]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("build_optimizer: no parameter requires grad (is everything frozen?)")
    name = cfg.optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optimizer: unknown optimizer {cfg.optimizer!r} (sgd | adamw)")


class LRFactor:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based); a plain object so that
    ``LambdaLR.state_dict()`` can save it."""

    def __init__(self, cfg: TrainConfig, total_steps: int):
        if cfg.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"train.schedule: unknown schedule {cfg.schedule!r} (cosine | step | constant)")
        self.schedule = cfg.schedule
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = int(cfg.warmup_steps)
        self.warmup_factor = float(cfg.warmup_factor)
        self.milestones = sorted(int(round(f * self.total_steps)) for f in cfg.milestones)
        self.gamma = float(cfg.gamma)

    def main(self, step: int) -> float:
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))
        if self.schedule == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        return 1.0

    def warmup(self, step: int) -> float:
        if step >= self.warmup_steps:
            return 1.0
        alpha = step / self.warmup_steps
        return self.warmup_factor * (1.0 - alpha) + alpha

    def __call__(self, step: int) -> float:
        return self.warmup(step) * self.main(step)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR: ``lr_g(step) = base_lr_g * warmup(step) * main(step)``; call ``.step()`` per optimizer
    step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor(cfg, total_steps))


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``train.amp``: "auto" = bf16 on a CUDA GPU that computes it natively (compute capability
    8+: Ampere, Hopper, ...), fp16 with loss scaling on older ones (bf16 is emulated there, and slow), off elsewhere;
    "bf16"/"fp16" explicit; "off"."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    raise ValueError(f"train.amp: unknown value {amp!r} (auto | off | bf16 | fp16)")


def build_grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 has fp32's range and needs no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
