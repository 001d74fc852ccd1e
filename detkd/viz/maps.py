"""The arrays behind the distillation pictures, computed with the loss modules' own pieces (no plotting here).

Every function takes the :class:`DetOutputs` of the student and teacher for one batch (the same padded batch, see
:mod:`detkd.structures`) and returns plain tensors on the CPU, so that tests check the data and
:mod:`detkd.viz.draw` only draws it:

* FGD (Yang et al., CVPR'22): per level the foreground / background masks (``detkd.regions.fgd``), the teacher's
  spatial attention and the per-cell distillation error as the focal loss weights it;
* LD (Zheng et al., CVPR'22): per level the Main region (ATSS positives) and the VLR values, and for one positive
  location the teacher's and student's edge distributions;
* CWD (Shu et al., ICCV'21): a few channels' spatial softmax distributions, teacher vs student;
* LGD (Zhang et al., AAAI'22): per level the inside-masks of the boxes and the channel means of the student pyramid
  and of the instructive (label-guided) pyramid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from detkd.distill.lgd_modules import label_boxes
from detkd.losses.cwd import CWDLoss
from detkd.losses.fgd import FGDLoss, fgd_attention
from detkd.losses.ld import VLRLD, kd_kl_rows
from detkd.losses.lgd import LGDLoss
from detkd.regions.fgd import fgd_masks_levels
from detkd.regions.inside import inside_masks
from detkd.structures import DetOutputs


def _level_or_raise(outputs: DetOutputs, level: str, who: str) -> Tensor:
    if level not in outputs.features:
        raise KeyError(f"{who}: level {level!r} not in the {outputs.family} features {outputs.level_names}")
    return outputs.features[level]


# --------------------------------------------------------------------------------------------------- FGD
@dataclass
class FGDLevelMaps:
    """FGD arrays of one level, each (N, H, W) float32 on the CPU.

    fg, bg: the masks of ``fgd_masks_levels`` (with the loss's ``use_padded`` choice).
    attention: the teacher's spatial attention A_S^T = H W softmax_hw(mean_c |T| / temp) (mean 1 per image).
    weighted: per cell sum_c A_C^T (S - T)^2 * A_S^T * (alpha M_fg + beta M_bg), S after the align conv; summed
        over cells and images and divided by N this equals the loss's ``<level>/fg + <level>/bg`` terms.
    """

    fg: Tensor
    bg: Tensor
    attention: Tensor
    weighted: Tensor


@torch.no_grad()
def fgd_maps(loss: FGDLoss, student: DetOutputs, teacher: DetOutputs) -> dict[str, FGDLevelMaps]:
    """``{level: FGDLevelMaps}`` for the levels of ``loss``; masks from ``student.targets`` as the loss builds them."""
    if student.targets is None:
        raise ValueError("fgd_maps: the student outputs carry no targets (boxes) to build the masks from")
    pairs = {}
    for level in loss.levels:
        s = loss.per_level[level].align(_level_or_raise(student, level, "fgd_maps"))
        pairs[level] = (s.float(), _level_or_raise(teacher, level, "fgd_maps").float())
    masks = fgd_masks_levels(
        [t["boxes"] for t in student.targets],
        student.image_sizes,
        [tuple(t.shape[-2:]) for _, t in pairs.values()],
        batch_shape=student.batch_shape,
        use_padded=loss.use_padded,
        device=next(iter(pairs.values()))[1].device if pairs else None,
    )
    out = {}
    for (level, (s, t)), (fg, bg) in zip(pairs.items(), masks):
        spatial_t, channel_t = fgd_attention(t, loss.temp)
        per_cell = ((s - t).square() * channel_t[:, :, None, None]).sum(dim=1) * spatial_t
        weighted = per_cell * (loss.weights["fg"] * fg + loss.weights["bg"] * bg)
        out[level] = FGDLevelMaps(fg.cpu(), bg.cpu(), spatial_t.cpu(), weighted.cpu())
    return out


# ---------------------------------------------------------------------------------------------------- LD
@dataclass
class LDLevelRegions:
    """LD regions of one level. positives, vlr: (N, H, W, A) (bool, float); centres: (H, W, A, 2) anchor centres
    (x, y) in network-input pixels (A anchors per location, 1 for GFL)."""

    positives: Tensor
    vlr: Tensor
    centres: Tensor


def _per_level(flat: Tensor, outputs: DetOutputs) -> dict[str, Tensor]:
    """(N, L, ...) over concatenated locations -> {level: (N, H, W, A, ...)}."""
    a = outputs.num_anchors_per_location
    out = {}
    for name, part in zip(outputs.level_names, flat.split(outputs.level_sizes, dim=1)):
        h, w = outputs.features[name].shape[-2:]
        out[name] = part.reshape(part.shape[0], h, w, a, *part.shape[2:])
    return out


@torch.no_grad()
def ld_regions(student: DetOutputs, vlr_loss: VLRLD | None = None) -> dict[str, LDLevelRegions]:
    """``{level: LDLevelRegions}``: the ATSS positives (Main LD / Main KD region) and ``vlr_loss.region`` values.

    ``vlr_loss`` supplies the VLR parameters (alpha, topk, diou, exclude_positives); without one the LD defaults
    are used. ``student`` must come from ``run(batch, "loss")`` (anchors, targets and the label assignment).
    """
    if student.assignment is None or student.anchors is None:
        raise ValueError("ld_regions: the student outputs need the label assignment and anchors (stage 'loss')")
    vlr_loss = vlr_loss if vlr_loss is not None else VLRLD(student.level_names, {})
    vlr = vlr_loss.region(student).float()
    pos = student.assignment.positive_mask
    centres = (student.anchors[:, :2] + student.anchors[:, 2:]).float()[None] / 2  # (1, L, 2)
    pos_l, vlr_l, ctr_l = (_per_level(x, student) for x in (pos, vlr, centres))
    return {n: LDLevelRegions(pos_l[n].cpu(), vlr_l[n].cpu(), ctr_l[n][0].cpu()) for n in student.level_names}


@dataclass
class EdgeDistributions:
    """Edge distributions (l, t, r, b) of one positive location of one image.

    level, cell: the FPN level and its (y, x, anchor) cell; location: index into the concatenated L axis.
    teacher, student: (4, B) softmax(z) at temperature 1 (what each model predicts);
    teacher_soft, student_soft: (4, B) softmax(z / tau) (what Main LD compares);
    kl: (4,) ``kd_kl_rows`` per edge at tau (the Main LD rows before the score weight and avg_factor).
    """

    level: str
    cell: tuple[int, int, int]
    location: int
    teacher: Tensor
    student: Tensor
    teacher_soft: Tensor
    student_soft: Tensor
    kl: Tensor
    tau: float


def locate(outputs: DetOutputs, loc: int) -> tuple[str, tuple[int, int, int]]:
    """Level name and (y, x, anchor) cell of index ``loc`` of the concatenated location axis L."""
    start = 0
    for name, size in zip(outputs.level_names, outputs.level_sizes):
        if loc < start + size:
            w, a = outputs.features[name].shape[-1], outputs.num_anchors_per_location
            r = loc - start
            return name, (r // (w * a), r // a % w, r % a)
        start += size
    raise IndexError(f"location {loc} is beyond the {start} locations of the {outputs.family} head")


@torch.no_grad()
def edge_distributions(
    student: DetOutputs, teacher: DetOutputs, image: int, *, tau: float = 10.0
) -> EdgeDistributions | None:
    """The positive location of ``image`` whose edges the teacher and student disagree on most (largest sum of the
    4 per-edge KLs at ``tau``); None when the image has no positives or the heads have no ``bbox_dist`` (GFL)."""
    if "bbox_dist" not in student.head or "bbox_dist" not in teacher.head or student.assignment is None:
        return None
    pos = student.assignment.positive_mask[image].nonzero().squeeze(1)
    if pos.numel() == 0:
        return None
    s, t = student.head["bbox_dist"][image].float(), teacher.head["bbox_dist"][image].float()
    bins = s.shape[-1] // 4
    kl = kd_kl_rows(s[pos].reshape(-1, bins), t[pos].reshape(-1, bins), tau).reshape(-1, 4)
    best = int(kl.sum(dim=1).argmax())
    loc = int(pos[best])
    name, (y, x, k) = locate(student, loc)
    s_edges, t_edges = s[loc].reshape(4, bins), t[loc].reshape(4, bins)
    return EdgeDistributions(
        name, (y, x, k), loc,
        F.softmax(t_edges, -1).cpu(), F.softmax(s_edges, -1).cpu(),
        F.softmax(t_edges / tau, -1).cpu(), F.softmax(s_edges / tau, -1).cpu(),
        kl[best].cpu(), float(tau),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------- CWD
@dataclass
class CWDChannelMaps:
    """CWD on one level of one image. channels: the k shown; teacher, student: (k, H, W) spatial softmax(map / tau)
    (each sums to 1); kl: (k,) tau^2 KL(teacher || student) of each shown channel; kl_all: (C,) of every channel
    (their mean is the image's ``cwd_loss`` in the "kl" form)."""

    level: str
    channels: list[int]
    teacher: Tensor
    student: Tensor
    kl: Tensor
    kl_all: Tensor
    tau: float


@torch.no_grad()
def cwd_maps(
    loss: CWDLoss, student: DetOutputs, teacher: DetOutputs, image: int, *, level: str | None = None, k: int = 4
) -> CWDChannelMaps:
    """The ``k`` channels of ``level`` (default: the loss's first level) with the largest KL, as the loss sees them
    (student after its align conv; ``source="cls_logits"`` uses the class-logit maps)."""
    level = level or loss.levels[0]
    if loss.source == "features":
        s = loss.align[level](_level_or_raise(student, level, "cwd_maps")[image : image + 1])[0]
        t = _level_or_raise(teacher, level, "cwd_maps")[image]
    else:
        s, t = student.as_maps("cls_logits")[level][image], teacher.as_maps("cls_logits")[level][image]
    c, h, w = t.shape
    log_t = F.log_softmax(t.float().reshape(c, -1) / loss.tau, dim=1)
    log_s = F.log_softmax(s.float().reshape(c, -1) / loss.tau, dim=1)
    kl_all = (log_t.exp() * (log_t - log_s)).sum(dim=1) * loss.tau**2
    top = kl_all.topk(min(k, c)).indices.tolist()
    return CWDChannelMaps(
        level, top, log_t[top].exp().reshape(-1, h, w).cpu(), log_s[top].exp().reshape(-1, h, w).cpu(),
        kl_all[top].cpu(), kl_all.cpu(), float(loss.tau),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------- LGD
@dataclass
class LGDLevelMaps:
    """LGD arrays of one level of one image. inside: (B, H, W) bool inside-masks of the image's B GT boxes, as LGD
    clamps and scales them (grid point (i, j) sits at input pixel (j * w / W, i * h / H)); student_mean: (H, W)
    channel mean of the student's FPN map; instructive_mean: (H, W) of the instructive pyramid, or None."""

    inside: Tensor
    student_mean: Tensor
    instructive_mean: Tensor | None


@torch.no_grad()
def lgd_maps(student: DetOutputs, image: int, num_classes: int, loss: LGDLoss | None = None) -> dict[str, LGDLevelMaps]:
    """``{level: LGDLevelMaps}`` for every level of ``student``; the instructive pyramid needs ``loss``."""
    if student.targets is None:
        raise ValueError("lgd_maps: the student outputs carry no targets (boxes)")
    boxes, labels, _, _ = label_boxes(student.targets[image : image + 1], student.batch_shape, num_classes,
                                      add_context=False)
    boxes = boxes[labels > 0]  # drop the dummy row LGD encodes for an image without boxes
    pyramid = loss.instructive_pyramid(student) if loss is not None else None
    out = {}
    for name, feat in student.features.items():
        masks = inside_masks(boxes, student.batch_shape, tuple(feat.shape[-2:]))
        inst = pyramid[name][image].float().mean(dim=0).cpu() if pyramid is not None else None
        out[name] = LGDLevelMaps(masks.cpu(), feat[image].float().mean(dim=0).cpu(), inst)
    return out
