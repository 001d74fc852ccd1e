"""Learning-rate factors worked out by hand; optimizer and AMP choices."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detkd.config import TrainConfig
from detkd.engine.optim import (
    LRFactor,
    amp_dtype,
    build_optimizer,
    build_scheduler,
    default_param_groups,
    total_steps,
)


def test_warmup_then_cosine():
    f = LRFactor(TrainConfig(schedule="cosine", warmup_steps=4, warmup_factor=0.1), total_steps=10)
    # warm-up: 0.1 * (1 - s/4) + s/4, times the cosine over the whole run 0.5 * (1 + cos(pi * s / 10))
    assert f(0) == pytest.approx(0.1)
    assert f(2) == pytest.approx(0.55 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert f(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.4)))
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(0.0, abs=1e-12)


def test_step_milestones_are_fractions_of_the_total():
    f = LRFactor(TrainConfig(schedule="step", warmup_steps=0, milestones=[0.5, 0.8], gamma=0.1), total_steps=10)
    assert [f(s) for s in (0, 4, 5, 7, 8, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_constant_and_bad_names():
    assert LRFactor(TrainConfig(schedule="constant", warmup_steps=0), 7)(6) == 1.0
    with pytest.raises(ValueError, match="train.schedule"):
        LRFactor(TrainConfig(schedule="poly"), 7)
    with pytest.raises(ValueError, match="train.optimizer"):
        build_optimizer(default_param_groups(nn.Linear(2, 2)), TrainConfig(optimizer="lion"))
    with pytest.raises(ValueError, match="train.amp"):
        amp_dtype("int8", torch.device("cpu"))


def test_scheduler_drives_each_group_from_its_own_base_lr():
    a, b = nn.Linear(1, 1), nn.Linear(1, 1)
    cfg = TrainConfig(lr=0.1, schedule="step", warmup_steps=0, milestones=[0.5], gamma=0.5)
    opt = build_optimizer([{"params": a.parameters()}, {"params": b.parameters(), "lr": 1.0}], cfg)
    sched = build_scheduler(opt, cfg, total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.extend(g["lr"] for g in opt.param_groups)
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 1.0, 0.1, 1.0, 0.05, 0.5, 0.05, 0.5])  # (group a, group b) per step
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9


def test_frozen_model_is_an_error_and_adamw_is_available():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        build_optimizer(default_param_groups(frozen), TrainConfig())
    opt = build_optimizer(default_param_groups(nn.Linear(2, 2)), TrainConfig(optimizer="adamw", weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.05


def test_amp_auto_is_bf16_on_recent_gpus_fp16_on_older_ones_off_on_cpu(monkeypatch):
    assert amp_dtype("auto", torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100
    assert amp_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # T4: bf16 only emulated
    assert amp_dtype("auto", torch.device("cuda", 0)) is torch.float16
    assert amp_dtype("fp16", torch.device("cpu")) is torch.float16
    assert amp_dtype("off", torch.device("cuda", 0)) is None


def test_total_steps_keeps_the_tail_micro_batches():
    assert total_steps(TrainConfig(epochs=3, accumulate=2), batches_per_epoch=5) == 9  # 3 x ceil(5 / 2)
    assert total_steps(TrainConfig(epochs=3, accumulate=1), batches_per_epoch=5) == 15
    assert total_steps(TrainConfig(epochs=3, max_steps=7), batches_per_epoch=5) == 7
