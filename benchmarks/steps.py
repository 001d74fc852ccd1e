"""How ``cost.py`` builds the steps it times: the ``Setup`` of one method (models, distillation config, fixed
batch), the ``StageTeacher`` that forces how far the teacher runs, and the timed callables: one optimizer step as the
training loop does it (``make_step``), the four variants plain / a / b / c of a method (``step_variants``), the loss
modules alone on fixed outputs (``losses_only``) and the teacher's forward alone (``teacher_forward_only``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from detkd.config import Config
from detkd.distill.distiller import Distiller
from detkd.distill.teacher import STAGE_ORDER, FrozenTeacher
from detkd.models.adapters import build_adapter


class StageTeacher(FrozenTeacher):
    """A FrozenTeacher that always runs to ``stage`` (measures a "full" teacher forward for a feature method)."""

    def __init__(self, model: nn.Module, *, bf16: bool, stage: str | None):
        super().__init__(model, bf16=bf16)
        self.forced_stage = stage

    def run(self, batch, stage, student=None):
        return super().run(batch, self.forced_stage or stage, student=student)


@dataclasses.dataclass
class Setup:
    """One method's models, distillation config and a fixed batch."""

    method: str
    family: str
    cfg: Config
    student: nn.Module
    teacher_model: nn.Module | None
    images: list[Tensor]
    targets: list[dict[str, Tensor]]


def teacher_stage(distiller: Distiller) -> str | None:
    """The deepest teacher stage the distiller's losses need (what Distiller.forward runs), None without teacher."""
    stages = [sl.module.teacher_stage for sl in distiller.losses if sl.module.teacher_stage is not None]
    return max(stages, key=STAGE_ORDER.__getitem__) if stages else None


def make_step(groups: list[dict], forward: Callable[[], Tensor], clip: float | None, amp: torch.dtype | None,
              device: torch.device) -> Callable[[], None]:
    """One optimizer step as the training loop does it: zero_grad, forward (autocast), backward, clip, AdamW."""
    optimizer = torch.optim.AdamW(groups, lr=1e-6)  # tiny: random models must stay finite over many steps
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = forward()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()

    return step


def step_variants(setup: Setup, distiller: Distiller, amp: torch.dtype | None) -> dict[str, Callable[[], None]]:
    """The four timed steps of one method (see the docstring of ``cost.py``)."""
    student, images, targets = setup.student, setup.images, setup.targets
    adapter = build_adapter(student)
    stage = teacher_stage(distiller)
    teacher = distiller.teacher
    device = images[0].device
    clip = setup.cfg.train.grad_clip

    def plain() -> Tensor:
        return sum(student(images, targets).values())

    def via_adapter(with_teacher: bool) -> Tensor:
        batch = adapter.preprocess(images, targets)
        s_out = adapter.run(batch, "loss")
        if with_teacher and stage is not None:
            teacher.run(batch, stage, student=s_out)
        return sum(s_out.losses.values())

    student_groups = [{"params": [p for p in student.parameters() if p.requires_grad]}]
    return {
        "plain": make_step(student_groups, plain, clip, amp, device),
        "a": make_step(student_groups, lambda: via_adapter(False), clip, amp, device),
        "b": make_step(student_groups, lambda: via_adapter(True), clip, amp, device),
        "c": make_step(distiller.param_groups(), lambda: distiller(images, targets)["loss"], clip, amp, device),
    }


def _leaf(x: Any) -> Any:
    """Detached copy of a nested output; floating-point tensors become leaves that take gradients."""
    if isinstance(x, Tensor):
        return x.detach().requires_grad_(x.is_floating_point())
    if isinstance(x, dict):
        return {k: _leaf(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_leaf(v) for v in x)
    return x


def losses_only(setup: Setup, distiller: Distiller, amp: torch.dtype | None) -> Callable[[], None]:
    """Forward + backward of the distiller's loss modules alone on fixed student/teacher outputs: the loss part of
    the machinery, timed without the detector around it (short calls, so far less exposed to a noisy machine)."""
    adapter, device = distiller.student_adapter, setup.images[0].device
    stage = teacher_stage(distiller)
    with torch.no_grad():
        batch = adapter.preprocess(setup.images, setup.targets)
        s_out = adapter.run(batch, "loss")
        t_out = distiller.teacher.run(batch, stage, student=s_out) if stage is not None else None
    s_out = dataclasses.replace(s_out, features=_leaf(s_out.features), head=_leaf(s_out.head),
                                extras=_leaf(s_out.extras))
    modules = [sl.module for sl in distiller.losses]

    def step() -> None:
        for m in modules:
            m.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            total = sum(sum(m(s_out, t_out).values()) for m in modules)
        total.backward()

    return step


def teacher_forward_only(setup: Setup, distiller: Distiller, stage: str) -> Callable[[], None]:
    adapter = build_adapter(setup.student)
    batch = adapter.preprocess(setup.images, setup.targets)
    return lambda: distiller.teacher.run(batch, stage)
