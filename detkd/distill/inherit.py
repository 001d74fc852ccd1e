"""FGD's "inheriting strategy" (Yang et al., CVPR'22; official ``init_student=True``, docs/methods.md §3.2): before
distillation, copy the teacher's neck and head weights into the student wherever they fit, so that the student
starts from the teacher's detection head and only its backbone body differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

#: torchvision names: FPN (``backbone.fpn``), dense heads (``head``), Faster R-CNN's RPN and RoI heads.
DEFAULT_PREFIXES = ("backbone.fpn.", "head.", "rpn.", "roi_heads.")


@dataclass
class InheritReport:
    """What :func:`inherit_from_teacher` did: the copied state-dict keys, and ``(key, reason)`` for every key under
    the prefixes that was not copied (missing on one side, or a shape mismatch); ``mismatched`` names the skipped
    keys that exist on both sides with different shapes."""

    copied: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"inherited {len(self.copied)} tensors from the teacher, skipped {len(self.skipped)}"


def inherit_from_teacher(
    student_model: nn.Module, teacher_model: nn.Module, *, prefixes: tuple[str, ...] = DEFAULT_PREFIXES
) -> InheritReport:
    """Copy every teacher parameter / buffer whose key starts with one of ``prefixes`` into the student, where the
    student has the same key with the same shape (in place, no autograd). Keys outside the prefixes (the backbone
    body, whose architecture differs by design) are neither copied nor reported.

    Returns an :class:`InheritReport`; skipped reasons are "not in student", "not in teacher" (a student key under
    the prefixes that keeps its own init) or "shape: teacher (..) vs student (..)".
    """
    teacher_state = teacher_model.state_dict()
    student_state = student_model.state_dict()
    report = InheritReport()
    to_load = {}
    for key, value in teacher_state.items():
        if not key.startswith(prefixes):
            continue
        if key not in student_state:
            report.skipped.append((key, "not in student"))
        elif student_state[key].shape != value.shape:
            shapes = f"teacher {tuple(value.shape)} vs student {tuple(student_state[key].shape)}"
            report.skipped.append((key, f"shape: {shapes}"))
            report.mismatched.append(key)
        else:
            to_load[key] = value
            report.copied.append(key)
    for key in student_state:
        if key.startswith(prefixes) and key not in teacher_state:
            report.skipped.append((key, "not in teacher"))
    with torch.no_grad():  # strict=False: only the checked subset is loaded, every key exists with its shape
        student_model.load_state_dict(to_load, strict=False)
    return report
