"""The arrays behind the pictures: equal to the regions/loss pieces they claim to show, and to hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from detkd.losses.cwd import CWDLoss, cwd_loss
from detkd.losses.fgd import FGDLoss
from detkd.losses.ld import VLRLD
from detkd.losses.lgd import LGDLoss
from detkd.regions.fgd import fgd_masks
from detkd.regions.inside import inside_masks
from detkd.regions.vlr import vlr_region
from detkd.structures import DetOutputs, FeatureSpec
from detkd.viz.draw import first_box, wrap_title
from detkd.viz.maps import cwd_maps, edge_distributions, fgd_maps, ld_regions, lgd_maps, locate

LEVELS = ["p3", "p4", "p5", "p6", "p7"]


def _outputs(features: dict, boxes: list, image_sizes: list, batch_shape: tuple, **kw) -> DetOutputs:
    targets = [{"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.ones(len(b), dtype=torch.int64)} for b in boxes]
    strides = {name: 8 * 2**i for i, name in enumerate(features)}
    return DetOutputs("gfl", batch_shape, image_sizes, targets, features, strides, **kw)


# ------------------------------------------------------------------------------------------------------ FGD
def test_fgd_maps_are_the_loss_masks_and_sum_to_the_focal_terms(gfl_pair):
    s, t = gfl_pair["student"], gfl_pair["teacher"]
    loss = FGDLoss(LEVELS, gfl_pair["s_specs"], gfl_pair["t_specs"], use_padded=False)
    maps = fgd_maps(loss, s, t)
    terms = loss(s, t)
    assert s.image_sizes == [(64, 96), (64, 85)] and s.batch_shape == (64, 96)  # image 1 is padded on the right
    for level in LEVELS:
        hw = tuple(s.features[level].shape[-2:])
        fg, bg = fgd_masks([tg["boxes"] for tg in s.targets], s.image_sizes, hw, batch_shape=s.batch_shape)
        assert torch.equal(maps[level].fg, fg) and torch.equal(maps[level].bg, bg), level
        # the weighted error is the focal loss per cell: its sum over cells and images / N is L_fg + L_bg
        total = maps[level].weighted.sum() / 2
        assert torch.allclose(total, terms[f"{level}/fg"] + terms[f"{level}/bg"], rtol=1e-4), level
        assert torch.allclose(maps[level].attention.sum(dim=(1, 2)), torch.full((2,), float(hw[0] * hw[1])))
    # the image without boxes: no foreground, a uniform background
    p3 = maps["p3"]
    assert p3.fg[1].sum() == 0 and torch.allclose(p3.bg[1], torch.full_like(p3.bg[1], 1 / p3.bg[1].numel()))


def test_fgd_weighted_error_by_hand():
    # student 0, teacher 1: |F| is uniform, so both attentions are 1 everywhere and sum_c (S - T)^2 = C = 2
    s, t = torch.zeros(1, 2, 2, 3), torch.ones(1, 2, 2, 3)
    student = _outputs({"p3": s}, [[[0.0, 0.0, 8.0, 8.0]]], [(16, 24)], (16, 24))
    teacher = _outputs({"p3": t}, [[[0.0, 0.0, 8.0, 8.0]]], [(16, 24)], (16, 24))
    spec = {"p3": FeatureSpec(2, 8)}
    loss = FGDLoss(["p3"], spec, spec, alpha_fgd=1.0, beta_fgd=2.0)
    m = fgd_maps(loss, student, teacher)["p3"]
    # box -> cells: x 0..8 / 24 * 3 = 0..1, y 0..8 / 16 * 2 = 0..1 -> inclusive rows 0..1, cols 0..1: 4 cells, 1/4
    fg = torch.tensor([[[0.25, 0.25, 0.0], [0.25, 0.25, 0.0]]])
    bg = torch.tensor([[[0.0, 0.0, 0.5], [0.0, 0.0, 0.5]]])  # the 2 uncovered cells share 1
    assert torch.equal(m.fg, fg) and torch.equal(m.bg, bg)
    assert torch.allclose(m.attention, torch.ones(1, 2, 3))
    # weighted = 2 * (1.0 * fg + 2.0 * bg): 0.5 on the box cells, 2.0 on the background cells
    assert torch.allclose(m.weighted, torch.tensor([[[0.5, 0.5, 2.0], [0.5, 0.5, 2.0]]]))


# ------------------------------------------------------------------------------------------------------- LD
def test_ld_regions_are_the_assignment_and_the_vlr(gfl_pair):
    s = gfl_pair["student"]
    regions = ld_regions(s)
    pos = s.assignment.positive_mask
    expected_vlr = torch.stack([vlr_region(s.anchors, s.level_sizes, tg["boxes"]) for tg in s.targets])
    start = 0
    for level, size in zip(LEVELS, s.level_sizes):
        r = regions[level]
        h, w = s.features[level].shape[-2:]
        assert r.positives.shape == (2, h, w, 1) and r.vlr.shape == (2, h, w, 1)
        assert torch.equal(r.positives.reshape(2, -1), pos[:, start : start + size])
        assert torch.equal(r.vlr.reshape(2, -1), expected_vlr[:, start : start + size])
        anchors = s.anchors[start : start + size]
        assert torch.allclose(r.centres.reshape(-1, 2), (anchors[:, :2] + anchors[:, 2:]) / 2)
        start += size
    assert int(pos[0].sum()) > 0 and float(expected_vlr[0].max()) > 0  # the check above is not vacuous
    assert not regions["p3"].positives[1].any() and not regions["p3"].vlr[1].any()  # image without boxes
    # a VLR that excludes the positives (RetinaNet-LD) is zero there
    excl = ld_regions(s, VLRLD(LEVELS, {}, exclude_positives=True))
    assert not any(bool((excl[lv].vlr > 0)[regions[lv].positives].any()) for lv in LEVELS)


def _kl_by_hand(s_logits: list[float], t_logits: list[float], tau: float) -> float:
    """tau^2 * mean over bins of p_T (log p_T - log q_S), with plain floats."""
    def softmax(z):
        e = [math.exp(v / tau) for v in z]
        return [v / sum(e) for v in e]

    p, q = softmax(t_logits), softmax(s_logits)
    return tau * tau * sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q)) / len(p)


def test_edge_distributions_pick_the_positive_with_the_largest_kl(gfl_pair):
    s, t = gfl_pair["student"], gfl_pair["teacher"]
    e = edge_distributions(s, t, 0, tau=10.0)
    best, best_kl, best_edges = None, -1.0, None
    for loc in s.assignment.positive_mask[0].nonzero().squeeze(1).tolist():
        sd, td = s.head["bbox_dist"][0, loc].reshape(4, 17), t.head["bbox_dist"][0, loc].reshape(4, 17)
        edges = [_kl_by_hand(sd[k].tolist(), td[k].tolist(), 10.0) for k in range(4)]
        if sum(edges) > best_kl:
            best, best_kl, best_edges = loc, sum(edges), edges
    assert e.location == best
    assert torch.allclose(e.kl, torch.tensor(best_edges), rtol=1e-3, atol=2e-6)  # float32 vs float64
    for dist in (e.teacher, e.student, e.teacher_soft, e.student_soft):
        assert dist.shape == (4, 17) and torch.allclose(dist.sum(1), torch.ones(4))
    assert torch.allclose(e.teacher, torch.softmax(t.head["bbox_dist"][0, best].reshape(4, 17), -1))
    # the cell maps back to the location: start of the level + (y * W + x) * A + anchor
    starts = dict(zip(LEVELS, [sum(s.level_sizes[:i]) for i in range(5)]))
    y, x, k = e.cell
    assert starts[e.level] + y * s.features[e.level].shape[-1] + x + k == best
    assert edge_distributions(s, t, 1) is None  # no boxes, no positives


def test_locate_by_hand():
    feats = {"p3": torch.zeros(1, 1, 2, 3), "p4": torch.zeros(1, 1, 1, 2)}
    out = _outputs(feats, [[]], [(16, 24)], (16, 24), level_sizes=[12, 4], num_anchors_per_location=2)
    # index 7 = p3 (y 1, x 0, anchor 1): 7 // (3 * 2) = 1, 7 // 2 % 3 = 0, 7 % 2 = 1
    assert locate(out, 7) == ("p3", (1, 0, 1))
    assert locate(out, 13) == ("p4", (0, 0, 1))  # 13 - 12 = 1: first location, second anchor
    with pytest.raises(IndexError, match="16 locations"):
        locate(out, 16)


# ------------------------------------------------------------------------------------------------------ CWD
def test_cwd_maps_match_the_loss_and_rank_channels(gfl_pair):
    s, t = gfl_pair["student"], gfl_pair["teacher"]
    loss = CWDLoss(["p3", "p4"], gfl_pair["s_specs"], gfl_pair["t_specs"], tau=2.0)
    m = cwd_maps(loss, s, t, 0, k=3)
    assert m.level == "p3" and len(m.channels) == 3 and m.kl_all.shape == (32,)  # teacher channels (after align)
    with torch.no_grad():
        expected = cwd_loss(loss.align["p3"](s.features["p3"][:1]), t.features["p3"][:1], tau=2.0)
    assert torch.allclose(m.kl_all.mean(), expected, rtol=1e-4)
    assert m.kl.tolist() == sorted(m.kl_all.tolist(), reverse=True)[:3]
    assert torch.allclose(m.teacher.sum(dim=(1, 2)), torch.ones(3))
    assert torch.allclose(m.student.sum(dim=(1, 2)), torch.ones(3))


def test_cwd_maps_by_hand():
    # channel 0: teacher logits (0, ln 3) -> p_T = (1/4, 3/4), student (0, 0) -> (1/2, 1/2); channel 1: equal maps
    t = torch.tensor([[[[0.0, math.log(3.0)]], [[1.0, 2.0]]]])
    s = torch.tensor([[[[0.0, 0.0]], [[1.0, 2.0]]]])
    spec = {"p3": FeatureSpec(2, 8)}
    loss = CWDLoss(["p3"], spec, spec, tau=1.0)
    m = cwd_maps(loss, _outputs({"p3": s}, [[]], [(8, 16)], (8, 16)), _outputs({"p3": t}, [[]], [(8, 16)], (8, 16)),
                 0, k=2)
    kl0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert m.channels == [0, 1]
    assert torch.allclose(m.kl, torch.tensor([kl0, 0.0]), atol=1e-6)
    assert torch.allclose(m.teacher[0], torch.tensor([[0.25, 0.75]]))
    assert torch.allclose(m.student[0], torch.tensor([[0.5, 0.5]]))


# ------------------------------------------------------------------------------------------------------ LGD
def test_lgd_inside_masks_by_hand_and_pyramid_means(gfl_pair):
    s = gfl_pair["student"]
    maps = lgd_maps(s, 0, 3)
    # p5 of the 64x96 batch is 2x3: scale 1/32. Box 1 (4, 6, 40, 50) -> centre (0.6875, 0.875), size (1.125, 1.375):
    # only grid point (1, 1) is within half a size on both axes. Box 2 (50, 10, 90, 30) -> centre (2.1875, 0.625),
    # size (1.25, 0.625): column 2 fits (0.15) but no row does (|0 - 0.625| / 0.625 = 1, |1 - 0.625| / 0.625 = 0.6).
    expected = torch.zeros(2, 2, 3, dtype=torch.bool)
    expected[0, 1, 1] = True
    assert torch.equal(maps["p5"].inside, expected)
    boxes = s.targets[0]["boxes"]
    for level in LEVELS:
        hw = tuple(s.features[level].shape[-2:])
        assert torch.equal(maps[level].inside, inside_masks(boxes, s.batch_shape, hw))  # boxes already inside
        assert torch.allclose(maps[level].student_mean, s.features[level][0].mean(0))
        assert maps[level].instructive_mean is None
    empty = lgd_maps(s, 1, 3)  # no boxes: no masks (LGD's dummy row is not a box)
    assert empty["p3"].inside.shape == (0, 8, 12)
    loss = LGDLoss(LEVELS, gfl_pair["s_specs"], num_classes=3, num_heads=2)
    with_pyramid = lgd_maps(s, 0, 3, loss)
    with torch.no_grad():
        pyramid = loss.instructive_pyramid(s)
    assert torch.allclose(with_pyramid["p4"].instructive_mean, pyramid["p4"][0].mean(0))


def test_first_box_and_title_wrapping_by_hand():
    inside = torch.tensor([[[1, 1, 0]], [[0, 1, 1]]], dtype=torch.bool)  # two boxes on a 1x3 map, overlapping at x=1
    assert first_box(inside).tolist() == [[1.0, 1.0, 2.0]]
    assert first_box(torch.zeros(0, 1, 2, dtype=torch.bool)).tolist() == [[0.0, 0.0]]
    assert wrap_title("aaaa | bbbb | cc", 11) == ["aaaa | bbbb", "cc"]
    assert wrap_title("a long segment here", 8) == ["a long", "segment", "here"]
