"""Chen et al. 2017, "Learning Efficient Object Detection Models with Knowledge Distillation" (NeurIPS).

There is no official code; the numerics follow the paper's equations (docs/methods.md §4):

* soft classification: L_soft = mean over samples of −Σ_c w_c p_T,c log p_S,c, p = softmax(z/T), w = ``bg_weight``
  (1.5) on the background class and 1 elsewhere, no T² factor. The hard CE is the detector's own task loss; the
  (μ, 1 − μ) split is applied here as (1 − μ)·L_soft and by the recipe as μ on the task loss
  (``distill.task_weights``).
* teacher-bounded regression: per sample L_b = ‖R_s − y‖² if ‖R_s − y‖² + m > ‖R_t − y‖² (strict), else 0; the
  condition is not differentiated, the teacher is never a target; mean over the foreground samples; ×ν.
* the hint term (‖V − adapt(Z)‖² on an intermediate feature) is a feature loss and is not part of this file.

Background index: the paper's w_0 is "background". torchvision's Faster R-CNN puts it at column 0 (``"first"``),
mmdet at the last column (``"last"``); both are supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from detkd.losses.base import DistillLoss
from detkd.losses.ld import head_level_slices, head_pair, positive_mask
from detkd.structures import DetOutputs, FeatureSpec


def weighted_soft_ce(
    s_logits: Tensor, t_logits: Tensor, *, T: float = 1.0, bg_weight: float = 1.5, bg_index: int = 0
) -> Tensor:
    """Chen's class-weighted soft cross-entropy, mean over rows.

    s_logits, t_logits: (R, C) logits including the background column ``bg_index`` (0 or C − 1).
    Returns a scalar: (1/R) Σ_r −Σ_c w_c softmax(z_T/T)_c log softmax(z_S/T)_c, teacher detached, no T² factor.
    R = 0 returns ``s_logits.sum() * 0`` (graph kept).
    """
    if s_logits.shape != t_logits.shape:
        raise ValueError(f"weighted_soft_ce: student {tuple(s_logits.shape)} != teacher {tuple(t_logits.shape)}")
    if s_logits.shape[0] == 0:
        return s_logits.sum() * 0
    p_t = F.softmax(t_logits.detach().float() / T, dim=-1)
    log_p_s = F.log_softmax(s_logits.float() / T, dim=-1)
    w = torch.ones(s_logits.shape[-1], dtype=p_t.dtype, device=p_t.device)
    w[bg_index] = bg_weight
    return -(w * p_t * log_p_s).sum(dim=-1).mean()


def bounded_regression(s_reg: Tensor, t_reg: Tensor, target: Tensor, fg: Tensor, *, margin: float = 0.0) -> Tensor:
    """Teacher-bounded L2 regression of Chen et al., mean over the foreground samples.

    s_reg, t_reg, target: (R, 4) encoded boxes (student, teacher, ground truth); fg: (R,) bool.
    Per sample d_s = ‖R_s − y‖², d_t = ‖R_t − y‖²; L_b = d_s where d_s + margin > d_t (strict; the condition is not
    differentiated), else 0. Returns Σ_fg L_b / #fg, or ``s_reg.sum() * 0`` without foreground.
    """
    num_fg = int(fg.sum())
    if num_fg == 0:
        return s_reg.sum() * 0
    y = target[fg].detach()
    d_s = ((s_reg[fg] - y) ** 2).sum(dim=-1)
    d_t = ((t_reg[fg].detach() - y) ** 2).sum(dim=-1)
    active = (d_s.detach() + margin) > d_t
    return (d_s * active).sum() / num_fg


def _extras(outputs: DetOutputs | None, stage: str, keys: tuple[str, ...], side: str) -> dict[str, Tensor]:
    """``outputs.extras[stage]`` checked to hold ``keys``; errors name the side, stage and missing keys."""
    if outputs is None:
        raise ValueError(f"chen: needs a teacher (teacher_stage='roi'); the {side} outputs are missing")
    part = outputs.extras.get(stage)
    missing = [k for k in keys if part is None or k not in part]
    if missing:
        raise ValueError(f"chen: {side} extras[{stage!r}] lacks {missing} (family {outputs.family!r})")
    return part


class _ChenBase(DistillLoss):
    needs_same_head = True

    def _bind(self, T: float, bg_weight: float, mu: float, nu: float, margin: float) -> None:
        if not T > 0:  # NaN too
            raise ValueError(f"{self.name}: T must be > 0, got {T}")
        if not 0.0 <= mu <= 1.0:
            raise ValueError(f"{self.name}: mu must be in [0, 1], got {mu}")
        self.T, self.bg_weight, self.mu, self.nu, self.margin = float(T), float(bg_weight), float(mu), float(nu), margin


class ChenLoss(_ChenBase):
    """Chen et al. 2017 on a Faster R-CNN student: soft CE and bounded regression on the RPN and the RCN (RoI head).

    Inputs (filled by the Faster R-CNN adapter and the Distiller):
    ``student.extras["rpn"]``: objectness (S,), deltas (S, 4), labels (S,) in {0, 1}, regression_targets (S, 4),
    sampled_index (S,) into the teacher's flattened anchors; ``teacher.extras["rpn"]``: objectness (N·A,),
    deltas (N·A, 4). ``student.extras["roi"]``: class_logits (R, C), box_regression (R, C'·4), labels (R,),
    regression_targets (R, 4); ``teacher.extras["roi"]``: class_logits, box_regression of the teacher's RoI head on
    the *student's* sampled proposals.

    RPN adaptation: Chen's RPN is a 2-way softmax, torchvision's a sigmoid logit z. sigmoid(z) = softmax([0, z])[1]
    exactly, so the soft CE runs on the 2-way logits [0 (background), z (object)] of both nets.
    RCN regression: each foreground RoI uses the deltas of its ground-truth class (column = label, as torchvision's
    ``fastrcnn_loss`` selects them), and the teacher's deltas for the same class.
    Returns ``{"rpn/soft", "rpn/bound", "rcn/soft", "rcn/bound"}`` (for the selected ``heads``), already multiplied
    by (1 − μ) (soft) and ν (bound); the Distiller applies the config weight on top.
    """

    name = "chen"
    teacher_stage = "roi"
    families = ("faster_rcnn",)  # RPN + RoI head
    family_hint = "on a dense detector (RetinaNet, FCOS, GFL) use method 'chen_dense'"

    def __init__(
        self,
        levels: list[str],
        student_specs: dict[str, FeatureSpec],
        teacher_specs: dict[str, FeatureSpec] | None = None,
        *,
        T: float = 1.0,
        bg_weight: float = 1.5,
        bg_index: str = "first",
        mu: float = 0.5,
        nu: float = 0.5,
        margin: float = 0.0,
        heads: list[str] | tuple[str, ...] = ("rpn", "rcn"),
    ):
        super().__init__(levels, student_specs, teacher_specs)
        self._bind(T, bg_weight, mu, nu, margin)
        if bg_index not in ("first", "last"):
            raise ValueError(f"chen: bg_index must be 'first' or 'last', got {bg_index!r}")
        unknown = set(heads) - {"rpn", "rcn"}
        if unknown or not heads:
            raise ValueError(f"chen: heads must be a non-empty subset of ['rpn', 'rcn'], got {list(heads)}")
        self.bg_index, self.heads = bg_index, list(heads)

    def forward(self, student: DetOutputs, teacher: DetOutputs | None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if "rpn" in self.heads:
            soft, bound = self._rpn(student, teacher)
            out["rpn/soft"], out["rpn/bound"] = (1 - self.mu) * soft, self.nu * bound
        if "rcn" in self.heads:
            soft, bound = self._rcn(student, teacher)
            out["rcn/soft"], out["rcn/bound"] = (1 - self.mu) * soft, self.nu * bound
        return out

    def _rpn(self, student: DetOutputs, teacher: DetOutputs | None) -> tuple[Tensor, Tensor]:
        keys = ("objectness", "deltas", "labels", "regression_targets", "sampled_index")
        s = _extras(student, "rpn", keys, "student")
        t = _extras(teacher, "rpn", ("objectness", "deltas"), "teacher")
        idx = s["sampled_index"]
        s_obj, t_obj = s["objectness"].reshape(-1), t["objectness"].reshape(-1)[idx]
        s_two = torch.stack([torch.zeros_like(s_obj), s_obj], dim=-1)
        t_two = torch.stack([torch.zeros_like(t_obj), t_obj], dim=-1)
        soft = weighted_soft_ce(s_two, t_two, T=self.T, bg_weight=self.bg_weight, bg_index=0)
        t_deltas = t["deltas"].reshape(-1, 4)[idx]
        fg = s["labels"] == 1
        bound = bounded_regression(s["deltas"], t_deltas, s["regression_targets"], fg, margin=self.margin)
        return soft, bound

    def _rcn(self, student: DetOutputs, teacher: DetOutputs | None) -> tuple[Tensor, Tensor]:
        s = _extras(student, "roi", ("class_logits", "box_regression", "labels", "regression_targets"), "student")
        t = _extras(teacher, "roi", ("class_logits", "box_regression"), "teacher")
        s_cls, t_cls = s["class_logits"], t["class_logits"]
        bg = 0 if self.bg_index == "first" else s_cls.shape[-1] - 1
        soft = weighted_soft_ce(s_cls, t_cls, T=self.T, bg_weight=self.bg_weight, bg_index=bg)
        labels = s["labels"]
        fg = labels != bg
        rows = fg.nonzero().squeeze(1)
        cols = labels[rows]
        s_box = s["box_regression"].reshape(labels.shape[0], -1, 4)[rows, cols]
        t_box = t["box_regression"].reshape(labels.shape[0], -1, 4)[rows, cols]
        target = s["regression_targets"][rows]
        all_fg = torch.ones_like(cols, dtype=torch.bool)
        return soft, bounded_regression(s_box, t_box, target, all_fg, margin=self.margin)


class ChenDenseLoss(_ChenBase):
    """Chen et al.'s soft CE and bounded regression adapted to dense one-stage heads (RetinaNet, FCOS, GFL).

    Soft term: every non-ignored location of the selected levels is one sample. Sigmoid heads have K independent
    logits and no background logit; the K+1-way distribution is softmax([0 (background), z_1 .. z_K]), which is
    exact for K = 1 (as for the RPN) and the natural multi-class extension otherwise. bg_weight goes to column 0.
    Bound term (``bound=True``), foreground = the assignment's positives: on GFL the regression is the integral of the
    edge distributions (Σ_i i·p_i, in stride units) and the target the distances from the anchor centre to the
    matched box's edges divided by the stride, clamped to [0, reg_max − 0.01] (GFL's DFL target); on box-delta heads
    (RetinaNet, FCOS) it is ``bbox_regression`` against the family's own box-coder encoding of the matched box, which
    the adapter provides as ``extras["regression_targets"]``.
    Returns ``{"soft": (1 − μ)·L_soft, "bound": ν·L_b}`` over the selected levels together.
    """

    name = "chen_dense"
    teacher_stage = "head"
    families = ("retinanet", "fcos", "gfl")
    family_hint = "on Faster R-CNN use method 'chen' (RPN and RoI head)"

    def __init__(
        self,
        levels: list[str],
        student_specs: dict[str, FeatureSpec],
        teacher_specs: dict[str, FeatureSpec] | None = None,
        *,
        T: float = 1.0,
        bg_weight: float = 1.5,
        mu: float = 0.5,
        nu: float = 0.5,
        margin: float = 0.0,
        bound: bool = True,
    ):
        super().__init__(levels, student_specs, teacher_specs)
        self._bind(T, bg_weight, mu, nu, margin)
        self.bound = bool(bound)

    def forward(self, student: DetOutputs, teacher: DetOutputs | None) -> dict[str, Tensor]:
        s_cls, t_cls = head_pair(student, teacher, "cls_logits", self.name)
        slices = head_level_slices(student, self.levels, self.name)
        loc = torch.cat([torch.arange(sl.start, sl.stop, device=s_cls.device) for _, sl in slices])
        keep = self._not_ignored(student)[:, loc]
        s_rows, t_rows = s_cls[:, loc][keep], t_cls[:, loc][keep]
        zeros = s_rows.new_zeros(s_rows.shape[0], 1)
        soft = weighted_soft_ce(
            torch.cat([zeros, s_rows], dim=-1),
            torch.cat([zeros, t_rows], dim=-1),
            T=self.T,
            bg_weight=self.bg_weight,
            bg_index=0,
        )
        out = {"soft": (1 - self.mu) * soft}
        if self.bound:
            bound = self._gfl_bound if "bbox_dist" in student.head else self._delta_bound
            out["bound"] = self.nu * bound(student, teacher, slices)
        return out

    def _delta_bound(self, student: DetOutputs, teacher: DetOutputs | None, slices: list[tuple[str, slice]]) -> Tensor:
        """Box-delta heads (RetinaNet, FCOS): the regression targets are the family's own box-coder encoding of the
        matched boxes, which the adapter provides as ``extras["regression_targets"]`` (N, L, 4)."""
        if "regression_targets" not in student.extras:
            raise ValueError(
                f"chen_dense: bounded regression on the {student.family!r} head needs encoded regression targets "
                "(extras['regression_targets'] from the adapter's 'loss' stage); set params.bound: false otherwise"
            )
        s_reg, t_reg = head_pair(student, teacher, "bbox_regression", self.name)
        sel = torch.zeros(s_reg.shape[1], dtype=torch.bool, device=s_reg.device)
        for _, sl in slices:
            sel[sl] = True
        fg = positive_mask(student, self.name) & sel[None, :]
        target = student.extras["regression_targets"]
        return bounded_regression(
            s_reg.reshape(-1, 4), t_reg.reshape(-1, 4), target.reshape(-1, 4), fg.reshape(-1), margin=self.margin
        )

    def _not_ignored(self, student: DetOutputs) -> Tensor:
        """(N, L) bool: False at locations the assignment ignores (matched index −2)."""
        pos = positive_mask(student, self.name)
        matched = student.assignment.matched_idxs
        if not matched:
            return torch.ones_like(pos)
        return torch.stack(list(matched)) != -2

    def _gfl_bound(self, student: DetOutputs, teacher: DetOutputs | None, slices: list[tuple[str, slice]]) -> Tensor:
        s_dist, t_dist = head_pair(student, teacher, "bbox_dist", self.name)
        n, num_loc, d = s_dist.shape
        bins = d // 4
        pos = positive_mask(student, self.name)
        stride = s_dist.new_ones(num_loc)  # unselected levels: any non-zero value, their rows are never used
        sel = torch.zeros(num_loc, dtype=torch.bool, device=s_dist.device)
        for level, sl in slices:
            stride[sl], sel[sl] = float(student.strides[level]), True
        target = self._distance_targets(student, stride)  # (N, L, 4)
        proj = torch.arange(bins, dtype=s_dist.dtype, device=s_dist.device)
        s_d = (F.softmax(s_dist.reshape(n, num_loc, 4, bins), dim=-1) * proj).sum(-1)
        t_d = (F.softmax(t_dist.detach().reshape(n, num_loc, 4, bins), dim=-1) * proj).sum(-1)
        fg = pos & sel[None, :]
        return bounded_regression(
            s_d.reshape(-1, 4), t_d.reshape(-1, 4), target.reshape(-1, 4), fg.reshape(-1), margin=self.margin
        )

    @staticmethod
    def _distance_targets(student: DetOutputs, stride: Tensor) -> Tensor:
        """(N, L, 4) GFL targets: (l, t, r, b) distances from anchor centres to the matched boxes, in strides."""
        if student.anchors is None or student.targets is None or not student.assignment.matched_idxs:
            raise ValueError("chen_dense: GFL bounded regression needs anchors, targets and matched_idxs")
        centres = (student.anchors[:, :2] + student.anchors[:, 2:]) / 2
        bins = student.head["bbox_dist"].shape[-1] // 4
        out = []
        for tgt, matched in zip(student.targets, student.assignment.matched_idxs):
            boxes = tgt["boxes"].to(centres.dtype)
            if boxes.numel() == 0:
                out.append(centres.new_zeros(centres.shape[0], 4))
                continue
            box = boxes[matched.clamp(min=0)]
            dist = torch.cat([centres - box[:, :2], box[:, 2:] - centres], dim=-1) / stride[:, None]
            out.append(dist.clamp(min=0, max=bins - 1 - 0.01))
        return torch.stack(out)
