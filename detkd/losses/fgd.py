"""FGD: Focal and Global Knowledge Distillation for Detectors (Yang et al., CVPR'22, arXiv 2111.11837).

Per FPN level, with the student map S (after a 1x1 align conv when channels differ) and the teacher map T, both
(N, C, H, W), the numerics of the official ``FeatureLoss`` (yzd-v/FGD; docs/methods.md §3.1):

* attention with temperature t: A_S(F) = H W softmax_hw(mean_c |F| / t) (N, H, W) and
  A_C(F) = C softmax_c(mean_hw |F| / t) (N, C);
* focal loss with the *teacher's* attention only: L_fg = sum M_fg A_S^T A_C^T (S - T)^2 / N, L_bg the same with M_bg
  (the official code multiplies both maps by the square roots of the weights before an MSE sum; same value);
* attention loss: L_at = sum |A_C^S - A_C^T| / N + sum |A_S^S - A_S^T| / N (student attention not detached);
* global (relation) loss: L_rel = sum (R_s(S) - R_t(T))^2 / N with one GcBlock R per branch, both trained.

No H*W normalisation: fine levels dominate (FGD issue #72); keep α:β:γ:λ and scale them together when needed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd.losses.base import DistillLoss, check_params
from detkd.models.connectors import Connector, make_connector
from detkd.regions.fgd import fgd_masks_levels
from detkd.structures import DetOutputs, FeatureSpec

#: per-detector recipes of the official configs (docs/methods.md §3.2). The FeatureLoss class defaults (used by
#: FGDLoss when a param is not given) differ only in gamma_fgd = 1e-3.
FGD_DEFAULTS: dict[str, dict[str, float]] = {
    "retinanet": {"temp": 0.5, "alpha_fgd": 1e-3, "beta_fgd": 5e-4, "gamma_fgd": 5e-4, "lambda_fgd": 5e-6},
    "gfl": {"temp": 0.5, "alpha_fgd": 1e-3, "beta_fgd": 5e-4, "gamma_fgd": 5e-4, "lambda_fgd": 5e-6},
    "faster_rcnn": {"temp": 0.5, "alpha_fgd": 5e-5, "beta_fgd": 2.5e-5, "gamma_fgd": 5e-5, "lambda_fgd": 5e-7},
    "fcos": {"temp": 0.8, "alpha_fgd": 1.6e-3, "beta_fgd": 8e-4, "gamma_fgd": 8e-4, "lambda_fgd": 8e-6},
    "reppoints": {"temp": 0.5, "alpha_fgd": 1.6e-3, "beta_fgd": 8e-4, "gamma_fgd": 8e-4, "lambda_fgd": 8e-6},
}

#: a level whose teacher spatial attention covers less than this fraction of its cells (``attention_support``) gets
#: a first-step note. The studies' teachers at FCOS's temp 0.8: thermal P3 0.7% (FGD lost 10-20 AP there), BCCD
#: 12%, synthetic 23% (benchmarks/results/fgd_attention.md); BCCD's teacher trained with scale jitter 1.3% (FGD lost
#: 4.4 AP; at temp 4, 52%, it gained 2.8: benchmarks/results/accuracy_bccd_jitter_fgd_temp.md).
NARROW_SUPPORT = 0.02

_PARAMS = {"temp": 0.5, "alpha_fgd": 1e-3, "beta_fgd": 5e-4, "gamma_fgd": 1e-3, "lambda_fgd": 5e-6, "use_padded": False}


def fgd_attention(f: Tensor, temp: float) -> tuple[Tensor, Tensor]:
    """Spatial (N, H, W) = H W softmax_hw(mean_c |f| / temp) and channel (N, C) = C softmax_c(mean_hw |f| / temp)
    attention of an (N, C, H, W) map. Both sum to H W and C per image (mean 1)."""
    n, c, h, w = f.shape
    value = f.abs()
    spatial = h * w * F.softmax((value.mean(dim=1) / temp).reshape(n, -1), dim=1)
    channel = c * F.softmax(value.mean(dim=(2, 3)) / temp, dim=1)
    return spatial.reshape(n, h, w), channel


def attention_support(a: Tensor) -> Tensor:
    """Effective support of attention maps a (N, ...), per image (N,), as a fraction of the entries:
    (sum a)^2 / (K sum a^2) over the K entries of each map — 1 for uniform attention, 1/K for one-hot.

    For FGD's spatial (N, H, W) and channel (N, C) maps of :func:`fgd_attention`. The focal loss weights each
    (cell, channel) by A_S A_C: when both supports are a few percent, it imitates a handful of teacher activations
    with weights in the hundreds or more (a teacher whose ``mean_c |T|`` varies by many ``temp`` across the map)."""
    a = a.flatten(1).float()
    return a.sum(1).square() / (a.shape[1] * a.square().sum(1))


def fgd_focal_loss(
    s: Tensor, t: Tensor, fg: Tensor, bg: Tensor, spatial_t: Tensor, channel_t: Tensor
) -> tuple[Tensor, Tensor]:
    """(L_fg, L_bg): sums of M A_S^T A_C^T (s - t)^2 over (N, C, H, W), each divided by N.

    s, t: (N, C, H, W); fg, bg: (N, H, W) masks (regions.fgd); spatial_t (N, H, W), channel_t (N, C): the teacher's
    attention (constants).
    """
    n = s.shape[0]
    weighted = (s - t).square() * spatial_t[:, None] * channel_t[:, :, None, None]
    return (weighted * fg[:, None]).sum() / n, (weighted * bg[:, None]).sum() / n


def fgd_attention_loss(spatial_s: Tensor, channel_s: Tensor, spatial_t: Tensor, channel_t: Tensor) -> Tensor:
    """L_at = sum |A_C^S - A_C^T| / N + sum |A_S^S - A_S^T| / N (L1 sums; the student's attention gets gradient)."""
    n = spatial_s.shape[0]
    return (channel_s - channel_t).abs().sum() / n + (spatial_s - spatial_t).abs().sum() / n


class GcBlock(nn.Module):
    """Global context block as used by FGD: R(F) = F + transform(context(F)), (N, C, H, W) -> same.

    context = sum_hw softmax_hw(conv1x1_{C->1}(F)) F  (N, C, 1, 1);
    transform = conv1x1_{C/2->C}(ReLU(LayerNorm_[C/2,1,1](conv1x1_{C->C/2}(context)))).
    Init (official): conv_mask Kaiming-normal fan_in with bias 0; the last conv zero weight and bias, so R(F) = F
    at the start; LayerNorm weight 1, bias 0; the first transform conv keeps PyTorch's default init.
    """

    def __init__(self, channels: int):
        super().__init__()
        hidden = channels // 2
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add[-1].weight)
        nn.init.zeros_(self.channel_add[-1].bias)

    def context(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C, 1, 1) attention-pooled context."""
        n, c, h, w = x.shape
        weights = F.softmax(self.conv_mask(x).reshape(n, 1, h * w), dim=2)  # (N, 1, HW)
        return torch.einsum("ncp,nkp->nc", x.reshape(n, c, h * w), weights).reshape(n, c, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.channel_add(self.context(x))


def fgd_relation_loss(s: Tensor, t: Tensor, gc_s: GcBlock, gc_t: GcBlock) -> Tensor:
    """L_rel = sum (gc_s(s) - gc_t(t))^2 / N over (N, C, H, W); both blocks are trained, t is a constant."""
    return (gc_s(s) - gc_t(t)).square().sum() / s.shape[0]


class _FGDLevel(nn.Module):
    """The learnable parts of one level: optional align conv and the student / teacher GcBlocks."""

    def __init__(self, student: FeatureSpec, teacher: FeatureSpec):
        super().__init__()
        self.align = make_connector(student, teacher)
        if isinstance(self.align, Connector):
            self.align.conv.reset_parameters()  # the official align is a default-initialised nn.Conv2d
        self.gc_s = GcBlock(teacher.channels)
        self.gc_t = GcBlock(teacher.channels)


class FGDLoss(DistillLoss):
    """FGD on the configured FPN levels; each level has its own align conv and GcBlocks.

    Returns ``{"<level>/fg": α L_fg, "<level>/bg": β L_bg, "<level>/at": γ L_at, "<level>/rel": λ L_rel}``, i.e.
    the terms are **already multiplied** by alpha_fgd, beta_fgd, gamma_fgd, lambda_fgd (as in the official
    FeatureLoss, whose outer loss weight is 1), so the sum over all keys is the official FGD loss.

    Params (FeatureLoss class defaults; per-detector recipes in ``FGD_DEFAULTS``): temp 0.5, alpha_fgd 1e-3,
    beta_fgd 5e-4, gamma_fgd 1e-3, lambda_fgd 5e-6, use_padded False (scale boxes by the unpadded image size, as
    the official code; True scales by the padded batch shape).
    Masks come from ``student.targets`` boxes (network-input coordinates), ``student.image_sizes`` and
    ``student.batch_shape``.
    """

    name = "fgd"
    extra_params = tuple(_PARAMS)

    def __init__(
        self,
        levels: list[str],
        student_specs: dict[str, FeatureSpec],
        teacher_specs: dict[str, FeatureSpec] | None,
        **params: Any,
    ):
        super().__init__(levels, student_specs, teacher_specs)
        check_params("FGDLoss", params, self.extra_params)
        cfg = {**_PARAMS, **params}
        self.temp = float(cfg["temp"])
        if not self.temp > 0:  # the attention softmax divides by temp
            raise ValueError(f"FGDLoss: temp must be > 0, got {self.temp}")
        self.weights = {
            "fg": float(cfg["alpha_fgd"]),
            "bg": float(cfg["beta_fgd"]),
            "at": float(cfg["gamma_fgd"]),
            "rel": float(cfg["lambda_fgd"]),
        }
        self.use_padded = bool(cfg["use_padded"])
        #: per level, the teacher's spatial attention A_S (N, H, W) of the last batch (kept for first_step_notes)
        self.teacher_attention: dict[str, Tensor] = {}
        if teacher_specs is None:
            raise ValueError("FGDLoss needs teacher feature specs")
        self.per_level = nn.ModuleDict()
        for level in self.levels:
            if level not in self.student_specs or level not in teacher_specs:
                raise KeyError(f"FGDLoss: level {level!r} missing from the student or teacher feature specs")
            self.per_level[level] = _FGDLevel(self.student_specs[level], teacher_specs[level])

    def forward(self, student: DetOutputs, teacher: DetOutputs | None) -> dict[str, Tensor]:
        if teacher is None:
            raise ValueError("FGDLoss needs teacher outputs")
        if student.targets is None:
            raise ValueError("FGDLoss needs student.targets (ground-truth boxes) to build its masks")
        pairs = [self._pair(student, teacher, level) for level in self.levels]
        masks = fgd_masks_levels(
            [tgt["boxes"] for tgt in student.targets],
            student.image_sizes,
            [tuple(t.shape[-2:]) for _, t in pairs],
            batch_shape=student.batch_shape,
            use_padded=self.use_padded,
            device=pairs[0][1].device if pairs else None,
        )
        out = {}
        for level, (s, t), (fg, bg) in zip(self.levels, pairs, masks):
            out.update(self._level_terms(level, s, t, fg.to(t.dtype), bg.to(t.dtype)))
        return out

    def _pair(self, student: DetOutputs, teacher: DetOutputs, level: str) -> tuple[Tensor, Tensor]:
        if level not in student.features or level not in teacher.features:
            raise KeyError(f"FGDLoss: level {level!r} not in the student's or teacher's features")
        s, t = student.features[level], teacher.features[level].detach()
        if s.shape[-2:] != t.shape[-2:] or s.shape[0] != t.shape[0]:
            raise ValueError(
                f"FGDLoss: level {level!r} shapes differ: student {tuple(s.shape)} vs teacher {tuple(t.shape)} "
                "(teacher and student must see the same padded batch with equal strides)"
            )
        return self.per_level[level].align(s), t

    @property
    def teacher_support(self) -> dict[str, Tensor]:
        """Per level, the effective support (``attention_support``) of the last batch's A_S, per image (N,)."""
        return {lv: attention_support(a) for lv, a in self.teacher_attention.items()}

    def first_step_notes(self) -> list[str]:
        support = {lv: float(v.mean()) for lv, v in self.teacher_support.items()}
        narrow = {lv: v for lv, v in support.items() if v < NARROW_SUPPORT}
        if not narrow:
            return []
        where = ", ".join(f"{lv} {100 * v:.1f}%" for lv, v in narrow.items())
        return [f"the teacher's spatial attention at temp={self.temp:g} covers only {where} of the cells (near "
                "one-hot): the focal loss imitates a few teacher activations with weights up to H*W*C. The "
                "official temperatures were set for ImageNet-pretrained teachers. From teachers this peaked FGD "
                "lost AP in detkd's studies; on BCCD a larger temperature turned that around (temp 4 instead of "
                "0.8: -4.4 AP became +2.8; on thermal it only halved the loss). Set it in the fgd loss's params "
                "(e.g. temp: 4); benchmarks/fgd_attention.py measures the support per level and temperature"]

    def _level_terms(self, level: str, s: Tensor, t: Tensor, fg: Tensor, bg: Tensor) -> dict[str, Tensor]:
        spatial_t, channel_t = fgd_attention(t, self.temp)
        self.teacher_attention[level] = spatial_t  # (of the detached teacher map: no graph is kept)
        spatial_s, channel_s = fgd_attention(s, self.temp)
        fg_loss, bg_loss = fgd_focal_loss(s, t, fg, bg, spatial_t, channel_t)
        at_loss = fgd_attention_loss(spatial_s, channel_s, spatial_t, channel_t)
        parts = self.per_level[level]
        rel_loss = fgd_relation_loss(s, t, parts.gc_s, parts.gc_t)
        raw = {"fg": fg_loss, "bg": bg_loss, "at": at_loss, "rel": rel_loss}
        return {f"{level}/{k}": self.weights[k] * v for k, v in raw.items()}
