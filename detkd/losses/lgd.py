"""LGD: label-guided self-distillation (Zhang et al., AAAI'22, arXiv 2109.11496; docs/methods.md §5).

No pretrained teacher: ``LGDTeacher`` (detkd/distill/lgd.py) builds an instructive pyramid from the labels and the
current student features. Two kinds of terms come out of ``LGDLoss.forward``:

* ``tea/<task loss>``: the instructive pyramid through the *student's own head* with the usual GT losses (official
  ``*.tea`` losses) -- the only signal the teacher modules learn from; the student head learns from both inputs;
* ``distill``: ``lgd_distill_loss`` between the adapted student pyramid and the detached instructive pyramid.

Schedule (official train.py): while step < ``pre_nondistill_steps`` the student features are detached in the
distill term (only the adapter learns; the value is still logged); while step < ``freeze_backbone_steps`` the
Distiller freezes the student's bottom-up backbone (``backbone_frozen``); after ``max_steps - post_nondistill_steps``
the official code sets the same "distill off" flag as in warm-up, i.e. detaches the student again
(``post_mode="detach"``, default); ``post_mode="off"`` returns a zero term instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd.distill.lgd import LGDTeacher
from detkd.losses.base import DistillLoss
from detkd.structures import DetOutputs, FeatureSpec

#: LGD's reference schedule (official configs): 180k iterations, the first 30k with the student detached in the
#: distill term, the first 20k with a frozen backbone
REFERENCE_STEPS, REFERENCE_PRE_NONDISTILL, REFERENCE_FREEZE_BACKBONE = 180_000, 30_000, 20_000


def scaled_warmup(total_steps: int) -> dict[str, int]:
    """The reference warm-up fractions (30k/180k = 1/6 detached, 20k/180k = 1/9 frozen backbone) of a run of
    ``total_steps``: ``{"pre_nondistill_steps", "freeze_backbone_steps"}``. Short runs keep the reference's shape
    instead of spending the whole run in the warm-up."""
    if total_steps < 0:
        raise ValueError(f"lgd: total_steps must be >= 0, got {total_steps}")
    return {"pre_nondistill_steps": round(total_steps * REFERENCE_PRE_NONDISTILL / REFERENCE_STEPS),
            "freeze_backbone_steps": round(total_steps * REFERENCE_FREEZE_BACKBONE / REFERENCE_STEPS)}

HeadLossFn = Callable[[dict[str, Tensor], DetOutputs], dict[str, Tensor]]


class SequentialConvs(nn.Module):
    """The LGD student adapter: 3 x (3x3 conv C -> C) with ReLU between, one module shared by all levels."""

    def __init__(self, channels: int):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.convs(x)


def lgd_distill_loss(
    student_adapted: list[Tensor], teacher: list[Tensor], *, lam: float = 1.0, eps: float = 1e-5
) -> Tensor:
    """LGD distillation term: lam * mean over all elements of all levels of (IN(sg(T)) - IN(S_adapted))^2.

    Args:
        student_adapted, teacher: per level (N, C, H_l, W_l), equal shapes level by level.
    Returns:
        float32 scalar. IN is InstanceNorm2d(affine=False, eps) per image and channel. A single mean over the
        concatenation of all levels (not a mean of per-level means), so larger levels weigh more. Levels with
        H_l * W_l == 1 are skipped in both the sum and the element count: instance statistics of one element are
        undefined (PyTorch raises) and would normalise both sides to 0 anyway. If every level is 1x1 the result is a
        graph-connected 0.
    """
    if len(student_adapted) != len(teacher) or not student_adapted:
        raise ValueError(f"lgd_distill_loss: {len(student_adapted)} student vs {len(teacher)} teacher levels")
    total, count = None, 0
    for i, (s, t) in enumerate(zip(student_adapted, teacher)):
        if s.shape != t.shape or s.dim() != 4:
            raise ValueError(f"lgd_distill_loss: level {i}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
        if s.shape[-2] * s.shape[-1] == 1:
            continue
        # float32 outside autocast: the statistics and the squared differences are precision-sensitive
        with torch.autocast(s.device.type, enabled=False):
            diff = F.instance_norm(t.detach().float(), eps=eps) - F.instance_norm(s.float(), eps=eps)
            sq = diff.pow(2).sum()
        total = sq if total is None else total + sq
        count += diff.numel()
    if total is None:
        return student_adapted[0].sum() * 0.0
    return lam * total / count


class LGDLoss(DistillLoss):
    """LGD as a distillation loss: owns the label-guided teacher and the student adapter.

    Before the first forward the Distiller must call ``bind_head(fn)``, ``fn(features, like) -> {name: loss}``
    running the student's head, assignment and task losses on another pyramid (with ``like``'s targets and anchors),
    and ``set_step(step)`` every step. Params follow the official config names (docs/methods.md §5.2);
    ``eval_teacher`` also evaluates the label-guided branch after training (the reference's EVAL_TEACHER), and
    ``relation`` (default ``"image"``, the reference) is passed to :class:`~detkd.distill.lgd.LGDTeacher`.
    """

    name = "lgd"
    unweighted_prefixes = ("tea/",)
    teacher_stage = None

    def __init__(
        self,
        levels: list[str],
        student_specs: dict[str, FeatureSpec],
        teacher_specs: dict[str, FeatureSpec] | None = None,
        *,
        num_classes: int,
        add_context: bool = True,
        detach_appearance: bool = False,
        lam: float = 1.0,
        pre_nondistill_steps: int = REFERENCE_PRE_NONDISTILL,
        freeze_backbone_steps: int = REFERENCE_FREEZE_BACKBONE,
        post_nondistill_steps: int = 0,
        max_steps: int | None = None,
        post_mode: str = "detach",
        eval_teacher: bool = False,
        num_heads: int = 8,
        relation: str = "image",
    ):
        super().__init__(levels, student_specs, None)
        unknown = [lvl for lvl in self.levels if lvl not in self.student_specs]
        channels = {spec.channels for spec in self.student_specs.values()}
        if unknown or not self.levels:
            raise ValueError(f"lgd: levels {self.levels} not all in the student's {list(self.student_specs)}")
        if len(channels) != 1:
            raise ValueError(f"lgd: every student FPN level needs the same width, got {self.student_specs}")
        if post_nondistill_steps > 0 and max_steps is None:
            raise ValueError("lgd: post_nondistill_steps > 0 needs max_steps")
        if post_mode not in ("detach", "off"):
            raise ValueError(f"lgd: post_mode must be 'detach' or 'off', got {post_mode!r}")
        (c,) = channels
        self.teacher = LGDTeacher(
            c, num_classes, add_context=add_context, detach_appearance=detach_appearance, num_heads=num_heads,
            relation=relation,
        )
        self.adapter = SequentialConvs(c)
        self.lam = lam
        self.pre_nondistill_steps = pre_nondistill_steps
        self.freeze_backbone_steps = freeze_backbone_steps
        self.post_nondistill_steps = post_nondistill_steps
        self.max_steps = max_steps
        self.post_mode = post_mode
        self.eval_teacher = eval_teacher
        self.step = 0
        self._head_loss: HeadLossFn | None = None

    def bind_head(self, fn: HeadLossFn) -> None:
        """Give LGD the student's head-loss function (not a submodule: the student owns its head)."""
        self._head_loss = fn

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def backbone_frozen(self, step: int) -> bool:
        """True while the Distiller must keep the student's bottom-up backbone frozen (official warm-up)."""
        return step < self.freeze_backbone_steps

    def distill_mode(self, step: int) -> str:
        """Distill-term mode at ``step``: on, detach (student detached: warm-up, and post phase by default) or off."""
        if step < self.pre_nondistill_steps:
            return "detach"
        if self.post_nondistill_steps > 0 and step > self.max_steps - self.post_nondistill_steps:
            return self.post_mode
        return "on"

    def param_groups(self) -> list[dict]:
        """Optimizer groups: the adapter (trains with the student) and the LGD teacher modules (own schedule)."""
        return [
            {"name": "lgd_adapter", "params": list(self.adapter.parameters())},
            {"name": "lgd_teacher", "params": list(self.teacher.parameters())},
        ]

    def instructive_pyramid(self, student: DetOutputs) -> dict[str, Tensor]:
        """The label-guided pyramid for ``student``'s batch (also what EVAL_TEACHER feeds to the student head)."""
        if student.targets is None:
            raise ValueError("lgd: the instructive pyramid needs targets; DetOutputs.targets is None")
        return self.teacher(student.features, student.targets, student.batch_shape)

    def forward(self, student: DetOutputs, teacher: DetOutputs | None = None) -> dict[str, Tensor]:
        """``{"distill": scalar, "tea/<task loss>": scalar, ...}`` (distill already multiplied by ``lam``)."""
        if self._head_loss is None:
            raise RuntimeError("lgd: call bind_head(fn) with the student's head-loss function before training")
        missing = [lvl for lvl in self.levels if lvl not in student.features]
        if missing:
            raise ValueError(f"lgd: student features lack levels {missing} (have {list(student.features)})")
        pyramid = self.instructive_pyramid(student)
        out = {f"tea/{k}": v for k, v in self._head_loss(pyramid, student).items()}
        out["distill"] = self._distill_term(student.features, pyramid)
        return out

    def _distill_term(self, features: dict[str, Tensor], pyramid: dict[str, Tensor]) -> Tensor:
        mode = self.distill_mode(self.step)
        if mode == "off":
            # zero that still touches the adapter, so DDP sees every parameter used
            return sum(p.sum() for p in self.adapter.parameters()) * 0.0
        stu = [features[lvl] for lvl in self.levels]
        if mode == "detach":
            stu = [f.detach() for f in stu]
        return lgd_distill_loss([self.adapter(f) for f in stu], [pyramid[lvl] for lvl in self.levels], lam=self.lam)
