"""LD — Localization Distillation (Zheng et al., CVPR'22, arXiv 2102.12252): Main LD, Main KD and VLR LD.

Default numerics follow the official repository (HikariTJU/LD, ``LDHead.loss_single`` and
``KnowledgeDistillationKLDivLoss``; docs/methods.md §1):

* the KL kernel is τ² · *mean* over bins (or classes) of p_T (log p_T − log q_S), teacher detached;
* every term is computed per FPN level over the whole batch and normalised by a constant (Main LD: 4, VLR LD: 16) or
  by the level's number of positives (Main KD), so the terms grow with batch size and object count (LD issue #57);
* a level without rows contributes ``x.sum() * 0`` (keeps the graph, as the official head does).

The terms come back unweighted as ``{level: scalar}``; the Distiller multiplies them by the configured weight.
``LD_DEFAULTS`` lists the official weights and temperatures per detector so recipes can cite them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from detkd.losses.base import DistillLoss
from detkd.regions.vlr import vlr_region
from detkd.structures import DetOutputs, FeatureSpec

#: Official loss weights / temperatures (methods.md §1.6). "retinanet" and "fcos" are the repo's GFL-ized heads (with
#: an edge-distribution branch); a torchvision RetinaNet/FCOS head has no ``bbox_dist``, so only ``kd`` applies there.
#: RetinaNet's VLR term is hard-coded in ``ld_retina.py`` as 0.03 × loss_ld (weight 5, avg_factor 4) on non-positive
#: locations: 0.03 · 5 · 16 / 4 = 0.6 in VLRLD's Σ/16 normalisation, with ``exclude_positives=True`` (its region comes
#: from ``LDRetinaHead.assign_neg``, taken here to follow the same VLR rule; not re-derived line by line).
LD_DEFAULTS: dict[str, dict[str, dict]] = {
    "gfl": {
        "ld": {"weight": 0.25, "tau": 10.0},
        "vlr_ld": {"weight": 0.25, "tau": 10.0},
        "kd": {"weight": 10.0, "tau": 2.0},
    },
    "retinanet": {
        "ld": {"weight": 5.0, "tau": 10.0},
        "vlr_ld": {"weight": 0.6, "tau": 10.0, "exclude_positives": True},
        "kd": {"weight": 10.0, "tau": 8.0},
    },
    "fcos": {
        "ld": {"weight": 0.25, "tau": 10.0},
        "kd": {"weight": 10.0, "tau": 2.0},
    },
}


def kd_kl_rows(s_logits: Tensor, t_logits: Tensor, tau: float) -> Tensor:
    """Row-wise distillation KL of the official ``KnowledgeDistillationKLDivLoss``.

    s_logits, t_logits: (R, K) logits (K = 17 bins of one box edge, or K classes for Main KD).
    Returns (R,): τ² · (1/K) Σ_k p_T,k (log p_T,k − log q_S,k) with p_T = softmax(z_T/τ) (teacher detached) and
    q_S = softmax(z_S/τ). Note the *mean* over the K entries, not the sum of a textbook KL.
    """
    if s_logits.shape != t_logits.shape:
        raise ValueError(f"kd_kl_rows: student logits {tuple(s_logits.shape)} != teacher {tuple(t_logits.shape)}")
    p_t = F.softmax(t_logits.detach().float() / tau, dim=-1)
    log_q = F.log_softmax(s_logits.float() / tau, dim=-1)
    # kl_div(input=log q, target=p) = p · (log p − log q), with 0 · log 0 = 0 where the teacher puts no mass
    return F.kl_div(log_q, p_t, reduction="none").mean(dim=-1) * (tau * tau)


def head_level_slices(outputs: DetOutputs, levels: list[str], who: str) -> list[tuple[str, slice]]:
    """``(level name, slice of the concatenated location axis L)`` for each requested level (all when empty)."""
    names = outputs.level_names
    if len(names) != len(outputs.level_sizes):
        raise ValueError(f"{who}: {len(names)} feature levels but {len(outputs.level_sizes)} level_sizes")
    starts = [0]
    for size in outputs.level_sizes:
        starts.append(starts[-1] + size)
    out = []
    for name in levels or names:
        if name not in names:
            raise ValueError(f"{who}: level {name!r} is not one of the student's head levels {names}")
        i = names.index(name)
        out.append((name, slice(starts[i], starts[i + 1])))
    return out


def head_pair(student: DetOutputs, teacher: DetOutputs | None, key: str, who: str) -> tuple[Tensor, Tensor]:
    """``head[key]`` of student and teacher, checked to exist and to have the same shape."""
    if teacher is None:
        raise ValueError(f"{who}: needs a teacher (teacher_stage='head')")
    for side, out in (("student", student), ("teacher", teacher)):
        if key not in out.head:
            raise ValueError(f"{who}: the {side} ({out.family}) head has no {key!r} output; have {sorted(out.head)}")
    s, t = student.head[key], teacher.head[key]
    if s.shape != t.shape:
        raise ValueError(
            f"{who}: head[{key!r}] shapes differ: student {tuple(s.shape)} vs teacher {tuple(t.shape)}; "
            "teacher and student need the same head (classes, anchors, strides)"
        )
    return s, t


def positive_mask(student: DetOutputs, who: str) -> Tensor:
    """(N, L) bool positives of the student's label assignment."""
    if student.assignment is None:
        raise ValueError(f"{who}: the student outputs carry no label assignment (positives)")
    return student.assignment.positive_mask


class _LDBase(DistillLoss):
    teacher_stage = "head"
    needs_same_head = True

    def __init__(
        self,
        levels: list[str],
        student_specs: dict[str, FeatureSpec],
        teacher_specs: dict[str, FeatureSpec] | None,
        *,
        tau: float,
    ):
        super().__init__(levels, student_specs, teacher_specs)
        if not tau > 0:  # NaN too
            raise ValueError(f"{self.name}: tau must be > 0, got {tau}")
        self.tau = float(tau)

    def _edge_terms(self, s_dist: Tensor, t_dist: Tensor, mask: Tensor, weight: Tensor, denom: float) -> Tensor:
        """Σ over the 4 edges of the masked locations of weight · ℓ_row, divided by ``denom``.

        s_dist, t_dist: (N, L_l, 4·B) edge logits; mask: (N, L_l) bool; weight: (N, L_l), repeated over the 4 edges.
        """
        bins = s_dist.shape[-1] // 4
        rows = kd_kl_rows(s_dist[mask].reshape(-1, bins), t_dist[mask].reshape(-1, bins), self.tau)
        return (weight[mask].repeat_interleave(4) * rows).sum() / denom


class MainLD(_LDBase):
    """Main LD: KL between the teacher's and the student's edge distributions at the ATSS positives.

    Rows: the 4 edges (l, t, r, b) of each positive location, B = reg_max + 1 bins. Weight: max_c sigmoid of the
    *student's* class logits (detached), the weight GFL uses for its box losses, repeated over the edges.
    ``normalize="official"``: Σ w·ℓ / 4.0 (the repo's constant avg_factor); ``"positives"``: Σ w·ℓ / (4 · #pos).
    """

    name = "ld"
    families = ("gfl",)  # box-edge distributions: only the GFL head predicts them
    family_hint = "LD needs a GFL teacher and student (detkd.models.build('gfl', ...), the ld_gfl_* recipes)"

    def __init__(
        self,
        levels: list[str],
        student_specs: dict[str, FeatureSpec],
        teacher_specs: dict[str, FeatureSpec] | None = None,
        *,
        tau: float = 10.0,
        normalize: str = "official",
    ):
        super().__init__(levels, student_specs, teacher_specs, tau=tau)
        if normalize not in ("official", "positives"):
            raise ValueError(f"ld: normalize must be 'official' or 'positives', got {normalize!r}")
        self.normalize = normalize

    def forward(self, student: DetOutputs, teacher: DetOutputs | None) -> dict[str, Tensor]:
        s_dist, t_dist = head_pair(student, teacher, "bbox_dist", self.name)
        pos = positive_mask(student, self.name)
        score = student.head["cls_logits"].detach().sigmoid().amax(dim=-1)  # (N, L)
        out = {}
        for level, sl in head_level_slices(student, self.levels, self.name):
            num_pos = int(pos[:, sl].sum())
            if num_pos == 0:
                out[level] = s_dist[:, sl].sum() * 0
                continue
            denom = 4.0 if self.normalize == "official" else 4.0 * num_pos
            out[level] = self._edge_terms(s_dist[:, sl], t_dist[:, sl], pos[:, sl], score[:, sl], denom)
        return out


class MainKD(_LDBase):
    """Main KD ("logit mimicking"): softmax-KL over the K class logits at the positives, Σ ℓ / #pos of the level.

    The softmax over sigmoid-trained logits is what the official head does (methods.md §1.8); works for any dense
    family whose student and teacher share classes and anchors (GFL, RetinaNet, FCOS).
    """

    name = "kd"

    def __init__(
        self,
        levels: list[str],
        student_specs: dict[str, FeatureSpec],
        teacher_specs: dict[str, FeatureSpec] | None = None,
        *,
        tau: float = 2.0,
    ):
        super().__init__(levels, student_specs, teacher_specs, tau=tau)

    def forward(self, student: DetOutputs, teacher: DetOutputs | None) -> dict[str, Tensor]:
        s_cls, t_cls = head_pair(student, teacher, "cls_logits", self.name)
        pos = positive_mask(student, self.name)
        out = {}
        for level, sl in head_level_slices(student, self.levels, self.name):
            m = pos[:, sl]
            num_pos = int(m.sum())
            if num_pos == 0:
                out[level] = s_cls[:, sl].sum() * 0
                continue
            out[level] = kd_kl_rows(s_cls[:, sl][m], t_cls[:, sl][m], self.tau).sum() / num_pos
        return out


class VLRLD(_LDBase):
    """VLR LD: edge-distribution KL on the Valuable Localization Region (``detkd.regions.vlr.vlr_region``).

    The region is computed per image on the student's anchors and targets. Rows: the 4 edges of every location with
    vlr > 0; weight: the VLR value (an IoU) repeated over the edges; Σ w·ℓ / 16.0 (official constant avg_factor).
    As in the official code, ATSS positives are not excluded unless ``exclude_positives`` (RetinaNet-LD does).
    """

    name = "vlr_ld"
    families = ("gfl",)  # box-edge distributions: only the GFL head predicts them
    family_hint = "LD needs a GFL teacher and student (detkd.models.build('gfl', ...), the ld_gfl_* recipes)"

    def __init__(
        self,
        levels: list[str],
        student_specs: dict[str, FeatureSpec],
        teacher_specs: dict[str, FeatureSpec] | None = None,
        *,
        tau: float = 10.0,
        alpha: float = 0.25,
        topk: int = 9,
        diou: str = "official",
        exclude_positives: bool = False,
    ):
        super().__init__(levels, student_specs, teacher_specs, tau=tau)
        if diou is True:  # `diou: true` in YAML, or `--set ...diou=true`, reads the word as a bool
            diou = "true"
        if diou not in ("official", "true"):
            raise ValueError(f"vlr_ld: diou must be 'official' or 'true', got {diou!r}")
        self.alpha, self.topk, self.diou = float(alpha), int(topk), diou
        self.exclude_positives = bool(exclude_positives)

    @torch.no_grad()
    def region(self, student: DetOutputs) -> Tensor:
        """(N, L) VLR values of the batch (0 outside the region)."""
        if student.anchors is None or student.targets is None:
            raise ValueError("vlr_ld: the student outputs need anchors and targets to compute the VLR")
        regions = [
            vlr_region(
                student.anchors, student.level_sizes, t["boxes"], alpha=self.alpha, topk=self.topk, diou=self.diou
            )
            for t in student.targets
        ]
        vlr = torch.stack(regions)
        if self.exclude_positives:
            vlr = vlr * ~positive_mask(student, self.name)
        return vlr

    def forward(self, student: DetOutputs, teacher: DetOutputs | None) -> dict[str, Tensor]:
        s_dist, t_dist = head_pair(student, teacher, "bbox_dist", self.name)
        vlr = self.region(student).to(s_dist.dtype)
        out = {}
        for level, sl in head_level_slices(student, self.levels, self.name):
            m = vlr[:, sl] > 0
            if not bool(m.any()):
                out[level] = s_dist[:, sl].sum() * 0
                continue
            out[level] = self._edge_terms(s_dist[:, sl], t_dist[:, sl], m, vlr[:, sl], 16.0)
        return out
