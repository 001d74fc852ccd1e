"""The Distiller: student + connectors + loss modules as one trainable module (one optimizer, one DDP wrap).

Data flow of one step::

    batch  = student_adapter.preprocess(images, targets)      # the student's transform, once
    s_out  = student_adapter.run(batch, "loss")               # features, head outputs, assignment, task losses
    t_out  = teacher.run(batch, deepest stage needed)         # same padded batch, no grad, eval mode
    terms  = {method: module(s_out, t_out)}                   # unweighted terms from each loss module
    loss   = sum(task_weight * task) + sum(weight * term)     # weights and schedules from the config
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from detkd.config import ConfigError
from detkd.distill.inherit import InheritReport
from detkd.distill.teacher import STAGE_ORDER, FrozenTeacher
from detkd.losses.base import DistillLoss
from detkd.models.adapters import build_adapter
from detkd.models.connectors import Connector
from detkd.structures import DetOutputs


class WiringError(RuntimeError):
    """A configured distillation term that cannot teach the student (zero, non-finite or no gradient path)."""


class ScheduledLoss(nn.Module):
    """A loss module with its weight, active step range and log name."""

    def __init__(self, key: str, module: DistillLoss, weight: float, start_step: int = 0, stop_step: int | None = None):
        super().__init__()
        self.key = key
        self.module = module
        self.weight = float(weight)
        self.start_step = start_step
        self.stop_step = stop_step

    def active(self, step: int) -> bool:
        return step >= self.start_step and (self.stop_step is None or step < self.stop_step)


#: a distillation method above this multiple of the task loss at step 1 gets a warning (see Distiller._warn_if_loud)
LOUD_RATIO = 100.0


class Distiller(nn.Module):
    """Trainable module for the engine: ``forward(images, targets) -> {"loss", "task/*", "distill/*", "raw/*"}``."""

    def __init__(
        self,
        student: nn.Module,
        losses: list[ScheduledLoss],
        teacher: FrozenTeacher | None = None,
        *,
        task_weights: dict[str, float] | None = None,
        check_first_step: bool = True,
        inherit_report: InheritReport | None = None,
    ):
        super().__init__()
        self.student = student
        self.student_adapter = build_adapter(student)
        self.losses = nn.ModuleList(losses)
        self._teacher = [teacher] if teacher is not None else []  # a list keeps it out of state_dict / DDP
        self.task_weights = dict(task_weights or {})
        self._task_weights_checked = False  # the task-loss names are known at the first step only
        self.check_first_step = check_first_step
        self.inherit_report = inherit_report  # what distill.inherit copied from the teacher (the runner prints it)
        self.step = 0
        # the backbone parameters LGD's warm-up may freeze and release: those trainable now (a layer the user froze
        # stays frozen); a list keeps them out of the module's attributes
        body = getattr(getattr(student, "backbone", None), "body", None)
        self._body_trainable = [p for p in body.parameters() if p.requires_grad] if body is not None else []
        for sl in losses:
            if hasattr(sl.module, "bind_head"):
                sl.module.bind_head(self.student_adapter.head_losses)
            if sl.module.teacher_stage is not None and teacher is None:
                raise ValueError(f"distillation method {sl.key!r} needs a teacher, but none is configured")

    @property
    def teacher(self) -> FrozenTeacher | None:
        return self._teacher[0] if self._teacher else None

    def _apply(self, fn, recurse=True):  # .to(device) / .float() reach the teacher too
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher.model._apply(fn)
        return self

    def set_step(self, step: int) -> None:
        self.step = step
        for sl in self.losses:
            if hasattr(sl.module, "set_step"):
                sl.module.set_step(step)
        self._freeze_backbone(any(getattr(sl.module, "backbone_frozen", lambda s: False)(step) for sl in self.losses))

    def _freeze_backbone(self, frozen: bool) -> None:
        # LGD warm-up: the student's bottom-up backbone takes no update (its grads stay None, as in the reference)
        for p in self._body_trainable:
            p.requires_grad_(not frozen)

    def leaves_parameters_unused(self) -> bool:
        """True when some steps leave trainable parameters without a gradient, so that DDP must look for unused
        parameters (:func:`detkd.engine.loop.fit` asks): LGD's frozen-backbone warm-up, or a loss with parameters
        (connector, GcBlocks, adapters) that is active only in a step window."""
        frozen = any(getattr(sl.module, "backbone_frozen", lambda s: False)(0) for sl in self.losses)
        windowed = any((sl.start_step > 0 or sl.stop_step is not None) and any(p.requires_grad for p in sl.parameters())
                       for sl in self.losses)
        return frozen or windowed

    def end_run(self) -> None:
        """Give the student back as it came (the training loop calls this when a run ends, also on an error): a
        warm-up that lasted to the end of a short run must not leave its backbone frozen for the next user."""
        self._freeze_backbone(False)

    def param_groups(self) -> list[dict]:
        """Student + connectors + loss modules; modules may split off their own groups (LGD's teacher modules)."""
        seen: set[int] = set()
        groups: list[dict] = []
        for sl in self.losses:
            for g in getattr(sl.module, "param_groups", lambda: [])()[1:]:
                params = [p for p in g["params"] if id(p) not in seen]
                seen.update(id(p) for p in params)
                groups.append({**g, "params": params})
        rest = [p for p in self.parameters() if id(p) not in seen]
        return [{"params": rest}] + groups

    def _teacher_stage(self, active: list[ScheduledLoss]) -> str | None:
        stages = [sl.module.teacher_stage for sl in active if sl.module.teacher_stage is not None]
        return max(stages, key=STAGE_ORDER.__getitem__) if stages else None

    def forward(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        batch = self.student_adapter.preprocess(images, targets)
        s_out = self.student_adapter.run(batch, stage="loss")
        active = [sl for sl in self.losses if sl.active(self.step)]
        stage = self._teacher_stage(active)
        t_out = self.teacher.run(batch, stage, student=s_out) if stage is not None else None
        return self.combine(s_out, t_out, active)

    def combine(self, s_out: DetOutputs, t_out: DetOutputs | None, active: list[ScheduledLoss]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        total = s_out.features[next(iter(s_out.features))].new_zeros(())
        if not self._task_weights_checked:
            self._check_task_weights(list(s_out.losses))
            self._task_weights_checked = True
        for name, value in s_out.losses.items():
            w = self.task_weights.get(name, 1.0)
            out[f"task/{name}"] = value.detach()
            total = total + w * value
        for sl in active:
            for term, value in sl.module(s_out, t_out).items():
                out[f"raw/{sl.key}/{term}"] = value.detach()
                weighted = value if term.startswith(sl.module.unweighted_prefixes) else sl.weight * value
                out[f"distill/{sl.key}/{term}"] = weighted
                total = total + weighted
        out["loss"] = total
        return out

    def _check_task_weights(self, names: list[str]) -> None:
        """A task_weights key that is no task loss of the student (a typo, another family's name) would be ignored."""
        unknown = sorted(set(self.task_weights) - set(names))
        if unknown:
            raise ConfigError(
                f"distill.task_weights: {unknown} are not task losses of the student "
                f"({self.student_adapter.family}); its task losses are {sorted(names)}"
            )

    # ------------------------------------------------------------------------------------------ safety rail
    def step_check(self, losses: dict[str, Tensor]) -> None:
        """At step 1 every configured method must be finite, non-zero and reach the student (or a connector)."""
        if not self.check_first_step:
            return
        targets = [p for p in self.student.parameters() if p.requires_grad]
        for sl in self.losses:
            targets += [p for m in sl.module.modules() if isinstance(m, Connector) for p in m.parameters()]
            targets += list(getattr(sl.module, "student_side_parameters", lambda: [])())
        for sl in self.losses:
            if not sl.active(self.step):
                continue
            terms = [v for k, v in losses.items() if k.startswith(f"distill/{sl.key}/")]
            if not terms:
                raise WiringError(f"distillation method {sl.key!r} produced no loss term at step {self.step}")
            total = sum(terms)
            value = float(total.detach())
            if not math.isfinite(value):
                raise WiringError(f"distillation method {sl.key!r} is not finite at the first step ({value})")
            if value == 0.0:
                raise WiringError(
                    f"distillation method {sl.key!r} is exactly zero at the first step: check its levels, regions "
                    "and that the teacher and student are wired to different tensors"
                )
            if not total.requires_grad:
                raise WiringError(f"distillation method {sl.key!r} has no gradient path (it is a constant)")
            grads = torch.autograd.grad(total, targets, retain_graph=True, allow_unused=True)
            if not any(g is not None and bool(g.abs().sum() > 0) for g in grads):
                raise WiringError(
                    f"distillation method {sl.key!r} has no gradient path to the student or its connectors"
                )
            self._warn_if_loud(sl.key, value, losses)
            for note in sl.module.first_step_notes():
                warnings.warn(f"distillation method {sl.key!r}: {note}", UserWarning, stacklevel=2)

    def _warn_if_loud(self, key: str, value: float, losses: dict[str, Tensor]) -> None:
        """Official weights assume the paper's features (pretrained backbones, COCO images); on other data a term can
        start orders of magnitude above the task loss (FGD at its official weights on the from-scratch synthetic
        features: ~300x). Say so at step 1. Size alone is no verdict: CWD helps at 57x on thermal (README)."""
        task = sum(self.task_weights.get(k[5:], 1.0) * float(v) for k, v in losses.items() if k.startswith("task/"))
        if task > 0 and value > LOUD_RATIO * task:
            warnings.warn(
                f"distillation method {key!r} is {value / task:.0f}x the task loss at the first step ({value:.4g} vs "
                f"{task:.4g}): the task may barely train. Its weights are the official ones for the paper's setting; "
                f"on this data lower its weight (distill.losses[].weight) until the two are comparable",
                UserWarning,
                stacklevel=3,
            )
