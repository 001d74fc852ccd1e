"""Hint learning (FitNets) as used by Chen et al., "Learning Efficient Object Detection Models with Knowledge
Distillation" (NeurIPS'17), docs/methods.md §4.1.

The student's intermediate feature goes through an adaptation layer (a 1x1 conv, an FC for FC features) that is
used *even when the channel counts match* (the paper found it helps), and is pulled towards the teacher's feature:
``L_hint = ||A(S) - T||_2^2`` (L1 also studied). Default reduction: the sum over all elements divided by the batch
size N ("sum per image").
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from detkd.losses.base import DistillLoss, check_params
from detkd.models.connectors import make_connector
from detkd.structures import DetOutputs, FeatureSpec

_NORMS = ("l2", "l1")
_REDUCTIONS = ("sum_per_image", "mean")


def hint_loss(s_adapted: Tensor, t: Tensor, *, norm: str = "l2", reduction: str = "sum_per_image") -> Tensor:
    """Hint loss between the adapted student feature and the teacher feature, both (N, ...) of the same shape.

    Args:
        s_adapted: A(student feature), e.g. (N, C, H, W) or (N, D).
        t: teacher feature of the same shape; a constant (detached here).
        norm: "l2" (squared error, the paper's default) or "l1" (absolute error).
        reduction: "sum_per_image" (sum over all elements / N, default) or "mean" (over all elements).

    Returns:
        scalar loss.
    """
    if norm not in _NORMS:
        raise ValueError(f"hint_loss: norm must be one of {_NORMS}, got {norm!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"hint_loss: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if s_adapted.shape != t.shape:
        raise ValueError(f"hint_loss: shapes differ: student {tuple(s_adapted.shape)} vs teacher {tuple(t.shape)}")
    diff = s_adapted - t.detach()
    err = diff.square() if norm == "l2" else diff.abs()
    return err.sum() / t.shape[0] if reduction == "sum_per_image" else err.mean()


def _lookup(outputs: DetOutputs, key: str, who: str) -> Tensor:
    """A feature by name: an FPN level of ``outputs.features`` or a tapped module of ``outputs.extras["taps"]``."""
    if key in outputs.features:
        return outputs.features[key]
    taps = outputs.extras.get("taps", {})
    if key in taps:
        return taps[key]
    raise KeyError(
        f"HintLoss: {who} has no feature {key!r} (features: {sorted(outputs.features)}, taps: {sorted(taps)})"
    )


class HintLoss(DistillLoss):
    """Per level ``{level: hint_loss(A_level(S_level), T_level)}``, unweighted (Chen et al. weight it by γ = 0.5).

    Levels are FPN level names or tapped module names (``extras["taps"]``); their specs come in ``student_specs``
    / ``teacher_specs``. Every level owns a 1x1 adaptation conv (also for equal channels); (N, D) features go
    through it as (N, D, 1, 1), i.e. as an FC layer.

    Params: norm ("l2" | "l1"), reduction ("sum_per_image" | "mean").
    """

    name = "hint"
    extra_params = ("norm", "reduction")

    def __init__(
        self,
        levels: list[str],
        student_specs: dict[str, FeatureSpec],
        teacher_specs: dict[str, FeatureSpec] | None,
        **params: Any,
    ):
        super().__init__(levels, student_specs, teacher_specs)
        check_params("HintLoss", params, self.extra_params)
        self.norm = params.get("norm", "l2")
        self.reduction = params.get("reduction", "sum_per_image")
        if self.norm not in _NORMS or self.reduction not in _REDUCTIONS:
            raise ValueError(
                f"HintLoss: norm in {_NORMS}, reduction in {_REDUCTIONS}; got {self.norm!r}, {self.reduction!r}"
            )
        if teacher_specs is None:
            raise ValueError("HintLoss needs teacher feature specs")
        self.adapt = nn.ModuleDict()
        for level in self.levels:
            if level not in self.student_specs or level not in teacher_specs:
                raise KeyError(f"HintLoss: level {level!r} missing from the student or teacher feature specs")
            self.adapt[self._module_key(level)] = make_connector(
                self.student_specs[level], teacher_specs[level], always=True
            )

    @staticmethod
    def _module_key(level: str) -> str:
        # tap names are dotted module paths, which nn.ModuleDict does not accept as keys
        return level.replace(".", "__")

    def forward(self, student: DetOutputs, teacher: DetOutputs | None) -> dict[str, Tensor]:
        if teacher is None:
            raise ValueError("HintLoss needs teacher outputs")
        out = {}
        for level in self.levels:
            s, t = _lookup(student, level, "student"), _lookup(teacher, level, "teacher").detach()
            if s.ndim == 2:  # FC feature: a 1x1 conv on a 1x1 map is an FC layer
                s_adapted = self.adapt[self._module_key(level)](s[:, :, None, None]).flatten(1)
            else:
                s_adapted = self.adapt[self._module_key(level)](s)
            if s_adapted.shape != t.shape:
                raise ValueError(
                    f"HintLoss: level {level!r}: adapted student {tuple(s_adapted.shape)} vs teacher {tuple(t.shape)}"
                )
            out[level] = hint_loss(s_adapted, t, norm=self.norm, reduction=self.reduction)
        return out
