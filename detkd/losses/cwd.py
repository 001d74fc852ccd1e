"""CWD: Channel-wise Knowledge Distillation for Dense Prediction (Shu et al., ICCV'21, arXiv 2011.13256).

Every channel of a map is turned into a distribution over its H*W positions (softmax with temperature tau) and
the student's distribution is pulled towards the teacher's (docs/methods.md §2):

    L = tau^2 / (N * C) * sum_{n, c} sum_i p^T_{n,c,i} * (log p^T_{n,c,i} - log p^S_{n,c,i})

The sum runs over positions; only N * C divides (not H * W). ``form="kl"`` (default) is mmrazor's
``ChannelWiseDivergence``; ``form="ce"`` is mmdetection-distiller's cross-entropy ``sum -p^T log p^S``, which is the
KL plus the teacher's entropy * tau^2 / (N C): same gradient, a different logged value.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from detkd.losses.base import DistillLoss, check_params
from detkd.models.connectors import make_connector
from detkd.structures import DetOutputs, FeatureSpec

_FORMS = ("kl", "ce")
_SOURCES = ("features", "cls_logits")


def cwd_loss(s: Tensor, t: Tensor, *, tau: float = 1.0, form: str = "kl") -> Tensor:
    """Channel-wise distillation loss between two (N, C, H, W) maps of the same shape.

    Args:
        s: student map (after any align conv), (N, C, H, W).
        t: teacher map, (N, C, H, W); treated as a constant (detached here).
        tau: softmax temperature over the H*W positions of each (n, c).
        form: "kl" (mmrazor, 0 when s == t) or "ce" (mmdetection-distiller: KL + teacher entropy).

    Returns:
        scalar: tau^2 / (N * C) * sum over n, c and positions. C is the teacher's channel count; note that
        mmdetection-distiller read C before its align conv, i.e. used the student's channel count.
    """
    if form not in _FORMS:
        raise ValueError(f"cwd_loss: form must be one of {_FORMS}, got {form!r}")
    if s.shape != t.shape or s.ndim != 4:
        raise ValueError(
            f"cwd_loss: need equal (N, C, H, W) shapes, got student {tuple(s.shape)}, teacher {tuple(t.shape)}"
        )
    n, c, h, w = t.shape
    s_logits = s.reshape(n * c, h * w) / tau
    t_logits = t.detach().reshape(n * c, h * w) / tau
    p_t = F.softmax(t_logits, dim=1)
    log_p_s = F.log_softmax(s_logits, dim=1)
    if form == "kl":
        total = (p_t * (F.log_softmax(t_logits, dim=1) - log_p_s)).sum()
    else:
        total = -(p_t * log_p_s).sum()
    return total * tau**2 / (n * c)


class CWDLoss(DistillLoss):
    """Per level ``{level: cwd_loss(align(S_l), T_l)}``, unweighted (the paper's configs use weight 5-10, τ = 1).

    Params:
        tau (1.0), form ("kl" | "ce").
        source: "features" (FPN maps, default) or "cls_logits" (the dense head's class-logit maps from
            ``DetOutputs.as_maps("cls_logits")``; needs the teacher's head and equal class/anchor layout).
        align (True): with "features", a 1x1 connector from student to teacher channels where they differ
            (mmdetection-distiller); False requires equal channels (mmrazor) and raises otherwise.
    """

    name = "cwd"
    extra_params = ("tau", "form", "source", "align")

    def __init__(
        self,
        levels: list[str],
        student_specs: dict[str, FeatureSpec],
        teacher_specs: dict[str, FeatureSpec] | None,
        **params: Any,
    ):
        super().__init__(levels, student_specs, teacher_specs)
        check_params("CWDLoss", params, self.extra_params)
        self.tau = float(params.get("tau", 1.0))
        self.form = params.get("form", "kl")
        self.source = params.get("source", "features")
        if not self.tau > 0:  # tau = 0 divides by zero: NaN terms at the first step
            raise ValueError(f"CWDLoss: tau must be > 0, got {self.tau}")
        if self.form not in _FORMS:
            raise ValueError(f"CWDLoss: form must be one of {_FORMS}, got {self.form!r}")
        if self.source not in _SOURCES:
            raise ValueError(f"CWDLoss: source must be one of {_SOURCES}, got {self.source!r}")
        if self.source == "cls_logits":
            # instance attributes shadow the class defaults: the distiller must run the teacher's head too
            self.teacher_stage = "head"
            self.needs_same_head = True
        self.align = nn.ModuleDict()
        if self.source == "features":
            self._build_align(bool(params.get("align", True)))

    def _build_align(self, allowed: bool) -> None:
        if self.teacher_specs is None:
            raise ValueError("CWDLoss needs teacher feature specs")
        for level in self.levels:
            if level not in self.student_specs or level not in self.teacher_specs:
                raise KeyError(f"CWDLoss: level {level!r} missing from the student or teacher feature specs")
            s_spec, t_spec = self.student_specs[level], self.teacher_specs[level]
            if s_spec.channels != t_spec.channels and not allowed:
                raise ValueError(
                    f"CWDLoss: level {level!r} has {s_spec.channels} student vs {t_spec.channels} teacher channels "
                    "and align=False"
                )
            self.align[level] = make_connector(s_spec, t_spec)

    def forward(self, student: DetOutputs, teacher: DetOutputs | None) -> dict[str, Tensor]:
        if teacher is None:
            raise ValueError("CWDLoss needs teacher outputs")
        if self.source == "features":
            s_maps, t_maps = student.features, teacher.features
        else:
            s_maps, t_maps = student.as_maps("cls_logits"), teacher.as_maps("cls_logits")
        out = {}
        for level in self.levels:
            if level not in s_maps or level not in t_maps:
                raise KeyError(f"CWDLoss: level {level!r} not in the student's or teacher's {self.source}")
            s, t = s_maps[level], t_maps[level].detach()
            if s.shape[-2:] != t.shape[-2:]:
                raise ValueError(
                    f"CWDLoss: level {level!r} spatial sizes differ: student {tuple(s.shape)} vs teacher "
                    f"{tuple(t.shape)} (teacher and student must see the same padded batch with equal strides)"
                )
            if self.source == "features":
                s = self.align[level](s)
            elif s.shape[1] != t.shape[1]:
                raise ValueError(
                    f"CWDLoss: cls_logits of level {level!r} need equal channels: student {tuple(s.shape)} vs "
                    f"teacher {tuple(t.shape)}"
                )
            out[level] = cwd_loss(s, t, tau=self.tau, form=self.form)
        return out
