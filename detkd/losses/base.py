"""The thin module every distillation loss derives from.

A method is one file in ``detkd/losses/``: pure tensor functions (the math, documented with shapes and the paper)
plus one ``DistillLoss`` subclass that binds hyper-parameters, owns learnable parts (FGD's GcBlocks, align convs),
takes regions/masks from ``detkd.regions`` and returns a dict of *unweighted* terms. The Distiller applies the
configured weight and schedule.
"""

from __future__ import annotations

import inspect
from typing import ClassVar

from torch import Tensor, nn

from detkd.structures import DetOutputs, FeatureSpec


def check_params(owner: str, params: dict, known: tuple[str, ...] | list[str]) -> None:
    """Raise TypeError naming every parameter of ``params`` that ``owner`` does not take."""
    unknown = set(params) - set(known)
    if unknown:
        raise TypeError(f"{owner}: unknown param(s) {sorted(unknown)} (known: {', '.join(known)})")


class DistillLoss(nn.Module):
    #: registry name used in configs (``method: cwd``)
    name: ClassVar[str] = ""
    #: how far the teacher must run: "features" (transform+backbone+FPN), "head" (+ raw head outputs and anchors),
    #: "roi" (Faster R-CNN: + teacher RoI head on the student's sampled proposals). None: no teacher (LGD).
    teacher_stage: ClassVar[str | None] = "features"
    #: True when teacher and student must be the same family with the same classes, strides and anchors.
    needs_same_head: ClassVar[bool] = False
    #: the student families whose outputs the loss reads (None: any), checked when the loss is built, with
    #: ``family_hint`` added to the error (e.g. which method does the same on other families)
    families: ClassVar[tuple[str, ...] | None] = None
    family_hint: ClassVar[str] = ""
    #: terms whose name starts with one of these are added to the total without the configured weight
    #: (LGD's "tea/*" detection losses of the label-guided branch are plain task losses in the reference)
    unweighted_prefixes: ClassVar[tuple[str, ...]] = ()
    #: hyper-parameters taken through ``**params`` (checked with :func:`check_params`); named ones are read off
    #: ``__init__`` by :meth:`param_names`
    extra_params: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def param_names(cls) -> set[str]:
        """Every hyper-parameter a config may set for this loss (beyond the levels and feature specs)."""
        sig = inspect.signature(cls.__init__)
        named = {n for n, p in sig.parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        return (named - {"self", "levels", "student_specs", "teacher_specs"}) | set(cls.extra_params)

    def __init__(
        self,
        levels: list[str],
        student_specs: dict[str, FeatureSpec],
        teacher_specs: dict[str, FeatureSpec] | None,
    ):
        super().__init__()
        self.levels = list(levels)
        self.student_specs = dict(student_specs)
        self.teacher_specs = dict(teacher_specs) if teacher_specs is not None else None

    def forward(self, student: DetOutputs, teacher: DetOutputs | None) -> dict[str, Tensor]:
        """Return ``{term_name: scalar}`` (e.g. ``{"p3": ..., "p4": ...}`` or ``{"ld/p3": ...}``), unweighted."""
        raise NotImplementedError

    def first_step_notes(self) -> list[str]:
        """Warnings about the data this loss saw in its last forward, which the Distiller issues after the first
        step (e.g. FGD's teacher attention collapsing onto a few activations). Default: none."""
        return []
