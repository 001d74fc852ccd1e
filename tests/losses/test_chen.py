"""Chen et al. 2017: weighted soft CE, teacher-bounded regression, the Faster R-CNN and dense-head modules."""

from __future__ import annotations

import math

import pytest
import torch

from detkd.losses.chen import ChenDenseLoss, ChenLoss, bounded_regression, weighted_soft_ce
from detkd.structures import Assignment, DetOutputs, FeatureSpec

LN2, LN3 = math.log(2.0), math.log(3.0)
SPECS = {"p3": FeatureSpec(8, 8), "p4": FeatureSpec(8, 16)}


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# ---------------------------------------------------------------- weighted_soft_ce


def test_weighted_soft_ce_hand_values():
    s = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
    t = torch.tensor([[0.0, LN3], [0.0, 0.0]])
    # row 0: p_T = [1/4, 3/4], p_S = [1/2, 1/2]  -> -(1.5 * 1/4 * ln 1/2 + 3/4 * ln 1/2) = 1.125 ln 2
    # row 1: p_T = [1/2, 1/2], p_S = [3/4, 1/4]  -> -(1.5 * 1/2 * ln 3/4 + 1/2 * ln 1/4)
    row0 = 1.125 * LN2
    row1 = -(0.75 * math.log(0.75) + 0.5 * math.log(0.25))
    got = weighted_soft_ce(s, t, bg_weight=1.5, bg_index=0)
    assert got.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # bg_weight 1 is the plain soft cross-entropy
    plain = -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1).mean()
    assert weighted_soft_ce(s, t, bg_weight=1.0).item() == pytest.approx(plain.item(), rel=1e-6)


def test_weighted_soft_ce_temperature_has_no_t_squared():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[0.0, LN3]])
    # doubling both logits and T=2 gives the same distributions: same value (a T^2 factor would make it 4x)
    at_t1 = weighted_soft_ce(s, t, T=1.0)
    at_t2 = weighted_soft_ce(2 * s, 2 * t, T=2.0)
    assert at_t2.item() == pytest.approx(at_t1.item(), rel=1e-6)
    assert at_t1.item() == pytest.approx(1.125 * LN2, rel=1e-6)


def test_weighted_soft_ce_background_first_vs_last():
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    first = weighted_soft_ce(s, t, bg_weight=1.5, bg_index=0)
    last = weighted_soft_ce(s.roll(-1, dims=1), t.roll(-1, dims=1), bg_weight=1.5, bg_index=3)
    assert last.item() == pytest.approx(first.item(), rel=1e-6)
    # and the index matters: weighting a foreground column instead changes the value
    assert weighted_soft_ce(s, t, bg_weight=1.5, bg_index=2).item() != pytest.approx(first.item(), rel=1e-4)


def test_weighted_soft_ce_gradient_only_to_student_and_empty():
    s = torch.randn(3, 3, requires_grad=True)
    t = torch.randn(3, 3, requires_grad=True)
    weighted_soft_ce(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    empty = torch.zeros(0, 3, requires_grad=True)
    loss = weighted_soft_ce(empty, torch.zeros(0, 3))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad is not None


# ---------------------------------------------------------------- bounded_regression


def test_bounded_regression_hand_values_and_strict_inequality():
    y = torch.zeros(4, 4)
    s = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0.5, 0, 0, 0], [9.0, 9, 9, 9]], requires_grad=True)
    t = torch.tensor([[0.0, 0, 0, 0], [0.0, 1, 0, 0], [1.0, 0, 0, 0], [0.0, 0, 0, 0]], requires_grad=True)
    fg = torch.tensor([True, True, True, False])
    # row 0: d_s 1 > d_t 0 -> 1; row 1: d_s 1 == d_t 1, strict '>' fails -> 0; row 2: 0.25 < 1 -> 0; row 3 is bg
    loss = bounded_regression(s, t, y, fg)
    assert loss.item() == pytest.approx(1.0 / 3)
    # a margin of 0.5 switches the tie on: (1 + 0.5 > 1) -> rows 0 and 1 count
    assert bounded_regression(s, t, y, fg, margin=0.5).item() == pytest.approx(2.0 / 3)
    # a negative margin switches off row 0 as well (1 - 1.5 > 0 fails)
    assert bounded_regression(s, t, y, fg, margin=-1.5).item() == 0.0
    loss.backward()
    expected = torch.zeros(4, 4)
    expected[0, 0] = 2 * 1.0 / 3  # d(d_s)/ds = 2 (s - y), divided by #fg = 3; inactive rows get nothing
    assert torch.allclose(s.grad, expected)
    assert t.grad is None


def test_bounded_regression_no_foreground_keeps_graph():
    s = torch.randn(3, 4, requires_grad=True)
    loss = bounded_regression(s, torch.randn(3, 4), torch.randn(3, 4), torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros(3, 4))


# ---------------------------------------------------------------- ChenLoss (Faster R-CNN)


def _frcnn(rpn: dict, roi: dict) -> DetOutputs:
    return DetOutputs("faster_rcnn", (32, 48), [(32, 48)], None, {}, {}, extras={"rpn": rpn, "roi": roi})


def _rpn_pair(requires_grad: bool = True):
    s_obj = torch.tensor([0.0, LN3, -LN3], requires_grad=requires_grad)
    t_obj = torch.tensor([LN3, 9.0, -LN3, 7.0, 0.0], requires_grad=True)
    student = {
        "objectness": s_obj,
        "deltas": torch.tensor([[1.0, 0, 0, 0], [0.0, 2, 0, 0], [5.0, 5, 5, 5]], requires_grad=requires_grad),
        "labels": torch.tensor([1, 1, 0]),
        "regression_targets": torch.zeros(3, 4),
        "sampled_index": torch.tensor([4, 0, 2]),
    }
    t_deltas = torch.zeros(5, 4)
    t_deltas[4] = torch.tensor([0.0, 0, 0, 0.5])  # teacher for sample 0: d_t = 0.25 < 1 -> active
    t_deltas[0] = torch.tensor([0.0, 0, 3, 0])  # teacher for sample 1: d_t = 9 > 4 -> bounded, no loss
    teacher = {"objectness": t_obj, "deltas": t_deltas.requires_grad_()}
    return student, teacher


def _roi_pair():
    student = {
        "class_logits": torch.tensor([[LN3, 0.0, 0.0], [0.0, 0.0, LN2], [0.0, LN2, 0.0]], requires_grad=True),
        "box_regression": torch.arange(36, dtype=torch.float32).reshape(3, 12).div(10).requires_grad_(),
        "labels": torch.tensor([0, 2, 1]),
        "regression_targets": torch.zeros(3, 4),
    }
    t_box = torch.zeros(3, 12)
    t_box[1, 8:12] = 100.0  # teacher far worse than the student for RoI 1 (class 2): the bound switches L_b off
    t_box[2, 4:8] = 0.0  # teacher perfect for RoI 2 (class 1): the student is worse, L_b = d_s
    teacher = {
        "class_logits": torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, LN2], [LN2, 0.0, 0.0]], requires_grad=True),
        "box_regression": t_box.requires_grad_(),
    }
    return student, teacher


def _rpn_soft_by_hand() -> float:
    # (student z, teacher z) per sampled anchor: sample 0 -> teacher anchor 4, 1 -> 0, 2 -> 2
    pairs = [(0.0, 0.0), (LN3, LN3), (-LN3, -LN3)]
    rows = []
    for zs, zt in pairs:
        ps, pt = sigmoid(zs), sigmoid(zt)
        rows.append(-(1.5 * (1 - pt) * math.log(1 - ps) + pt * math.log(ps)))
    return sum(rows) / 3


def _rcn_soft_by_hand() -> float:
    s = [[3 / 5, 1 / 5, 1 / 5], [1 / 4, 1 / 4, 1 / 2], [1 / 4, 1 / 2, 1 / 4]]
    t = [[1 / 3, 1 / 3, 1 / 3], [1 / 4, 1 / 4, 1 / 2], [1 / 2, 1 / 4, 1 / 4]]
    w = [1.5, 1.0, 1.0]
    return sum(-sum(w[c] * t[r][c] * math.log(s[r][c]) for c in range(3)) for r in range(3)) / 3


def test_chen_loss_hand_values():
    s_rpn, t_rpn = _rpn_pair()
    s_roi, t_roi = _roi_pair()
    loss = ChenLoss(["p3"], SPECS, SPECS, mu=0.25, nu=0.5)
    out = loss(_frcnn(s_rpn, s_roi), _frcnn(t_rpn, t_roi))
    assert set(out) == {"rpn/soft", "rpn/bound", "rcn/soft", "rcn/bound"}
    assert out["rpn/soft"].item() == pytest.approx(0.75 * _rpn_soft_by_hand(), rel=1e-5)
    # rpn fg = samples 0, 1: only sample 0 active with d_s = 1 -> (1 + 0) / 2, times nu
    assert out["rpn/bound"].item() == pytest.approx(0.5 * 0.5, rel=1e-6)
    assert out["rcn/soft"].item() == pytest.approx(0.75 * _rcn_soft_by_hand(), rel=1e-5)
    # RoI 1 (class 2) is better than its teacher -> 0; RoI 2, class 1 -> columns 4..7 = [2.8, 2.9, 3.0, 3.1] vs a
    # perfect teacher -> d_s; mean over the 2 fg RoIs, times nu
    d_s = 2.8**2 + 2.9**2 + 3.0**2 + 3.1**2
    assert out["rcn/bound"].item() == pytest.approx(0.5 * d_s / 2, rel=1e-5)


def test_chen_loss_sigmoid_equals_two_way_softmax():
    z = torch.linspace(-4, 4, 9)
    two_way = torch.softmax(torch.stack([torch.zeros_like(z), z], -1), -1)[:, 1]
    assert torch.allclose(two_way, torch.sigmoid(z), atol=1e-7)


def test_chen_loss_background_last_matches_first_on_permuted_inputs():
    s_rpn, t_rpn = _rpn_pair()
    s_roi, t_roi = _roi_pair()
    first = ChenLoss([], SPECS, SPECS)(_frcnn(s_rpn, s_roi), _frcnn(t_rpn, t_roi))

    def to_last(d: dict) -> dict:  # background column 0 -> column C-1; labels relabelled the same way
        out = dict(d)
        out["class_logits"] = d["class_logits"].roll(-1, dims=1)
        out["box_regression"] = d["box_regression"].reshape(3, 3, 4).roll(-1, dims=1).reshape(3, 12)
        if "labels" in d:
            out["labels"] = (d["labels"] - 1) % 3
        return out

    last = ChenLoss([], SPECS, SPECS, bg_index="last")(_frcnn(s_rpn, to_last(s_roi)), _frcnn(t_rpn, to_last(t_roi)))
    for key in first:
        assert last[key].item() == pytest.approx(first[key].item(), rel=1e-6), key


def test_chen_loss_gradients_reach_only_the_student_and_heads_option():
    s_rpn, t_rpn = _rpn_pair()
    s_roi, t_roi = _roi_pair()
    out = ChenLoss([], SPECS, SPECS)(_frcnn(s_rpn, s_roi), _frcnn(t_rpn, t_roi))
    sum(out.values()).backward()
    for name in ("objectness", "deltas"):
        assert s_rpn[name].grad is not None and t_rpn[name].grad is None
    for name in ("class_logits", "box_regression"):
        assert s_roi[name].grad is not None and t_roi[name].grad is None
    only_rcn = ChenLoss([], SPECS, SPECS, heads=["rcn"])(_frcnn(s_rpn, s_roi), _frcnn(t_rpn, t_roi))
    assert set(only_rcn) == {"rcn/soft", "rcn/bound"}


def test_chen_loss_no_foreground_and_bad_inputs():
    s_rpn, t_rpn = _rpn_pair()
    s_roi, t_roi = _roi_pair()
    s_rpn["labels"] = torch.zeros(3, dtype=torch.long)
    s_roi["labels"] = torch.zeros(3, dtype=torch.long)
    out = ChenLoss([], SPECS, SPECS)(_frcnn(s_rpn, s_roi), _frcnn(t_rpn, t_roi))
    assert out["rpn/bound"].item() == 0.0 and out["rcn/bound"].item() == 0.0
    sum(out.values()).backward()  # graph kept
    assert s_roi["box_regression"].grad is not None
    del t_roi["box_regression"]
    with pytest.raises(ValueError, match=r"teacher extras\['roi'\] lacks \['box_regression'\]"):
        ChenLoss([], SPECS, SPECS)(_frcnn(s_rpn, s_roi), _frcnn(t_rpn, t_roi))
    with pytest.raises(ValueError, match="bg_index"):
        ChenLoss([], SPECS, SPECS, bg_index=0)


# ---------------------------------------------------------------- ChenDenseLoss


def _dense(cls: torch.Tensor, labels: torch.Tensor, matched: list, dist=None, boxes=None) -> DetOutputs:
    """Two levels: p3 is 2x3 (stride 8), p4 is 1x2 (stride 16): L = 8 locations."""
    feats = {"p3": torch.zeros(labels.shape[0], 8, 2, 3), "p4": torch.zeros(labels.shape[0], 8, 1, 2)}
    head = {"cls_logits": cls}
    if dist is not None:
        head["bbox_dist"] = dist
    centres = [(x * 8.0, y * 8.0) for y in range(2) for x in range(3)] + [(x * 16.0, 0.0) for x in range(2)]
    anchors = torch.tensor([[cx - 8, cy - 8, cx + 8, cy + 8] for cx, cy in centres])
    targets = [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.long)} for b in boxes] if boxes else None
    return DetOutputs(
        "gfl",
        (16, 24),
        [(16, 24)] * labels.shape[0],
        targets,
        feats,
        {"p3": 8, "p4": 16},
        head=head,
        level_sizes=[6, 2],
        anchors=anchors,
        assignment=Assignment(matched, labels),
    )


def test_chen_dense_soft_term_matches_naive_loop():
    s_cls, t_cls = torch.randn(1, 8, 2), torch.randn(1, 8, 2)
    labels = torch.tensor([[0, 1, 0, 0, 0, 0, 2, 0]])
    matched = [torch.tensor([-1, 0, -2, -1, -1, -1, 1, -2])]  # locations 2 and 7 ignored
    out = ChenDenseLoss([], SPECS, SPECS, mu=0.5, bound=False)(
        _dense(s_cls, labels, matched), _dense(t_cls, labels, matched)
    )
    rows = []
    for i in [0, 1, 3, 4, 5, 6]:
        zs, zt = [0.0] + s_cls[0, i].tolist(), [0.0] + t_cls[0, i].tolist()
        ps = [math.exp(v) / sum(math.exp(u) for u in zs) for v in zs]
        pt = [math.exp(v) / sum(math.exp(u) for u in zt) for v in zt]
        rows.append(-sum((1.5 if c == 0 else 1.0) * pt[c] * math.log(ps[c]) for c in range(3)))
    assert set(out) == {"soft"}
    assert out["soft"].item() == pytest.approx(0.5 * sum(rows) / len(rows), rel=1e-5)
    # only p4: locations 6 (7 is ignored)
    p4 = ChenDenseLoss(["p4"], SPECS, SPECS, mu=0.5, bound=False)(
        _dense(s_cls, labels, matched), _dense(t_cls, labels, matched)
    )
    assert p4["soft"].item() == pytest.approx(0.5 * rows[-1], rel=1e-5)


def test_chen_dense_gfl_bound_hand_values():
    bins = 5  # reg_max 4
    labels = torch.tensor([[0, 1, 0, 0, 0, 0, 1, 0]])
    matched = [torch.tensor([-1, 0, -1, -1, -1, -1, 1, -1])]
    # p3 location 1: anchor centre (8, 0); box 0 = [0, -4, 32, 16] -> (l, t, r, b) = (8, 4, 24, 16) / 8 = (1, .5, 3, 2)
    # p4 location 6: anchor centre (0, 0); box 1 = [-16, -16, 16, 48] -> (16, 16, 16, 48) / 16 = (1, 1, 1, 3)
    boxes = [torch.tensor([[0.0, -4, 32, 16], [-16.0, -16, 16, 48]])]
    s_dist = torch.zeros(1, 8, 4 * bins, requires_grad=True)  # uniform -> integral 2 on every edge
    t_dist = torch.zeros(1, 8, 4, bins)
    t_dist[0, 1] = 40 * torch.nn.functional.one_hot(torch.tensor([1, 0, 3, 2]), bins)  # teacher (1, 0, 3, 2)
    t_dist[0, 6] = 40 * torch.nn.functional.one_hot(torch.tensor([4, 4, 4, 0]), bins)  # teacher worse: bounded
    t_dist = t_dist.reshape(1, 8, 4 * bins)
    cls = torch.zeros(1, 8, 2)
    student = _dense(cls, labels, matched, s_dist, boxes)
    teacher = _dense(cls, labels, matched, t_dist, boxes)
    out = ChenDenseLoss([], SPECS, SPECS, nu=0.5)(student, teacher)
    # location 1: d_s = (2-1)^2 + (2-.5)^2 + (2-3)^2 + 0 = 4.25 > d_t = 0.25 -> active;
    # location 6: d_s = 1 + 1 + 1 + 1 = 4 < d_t = 9 + 9 + 9 + 9 -> 0; mean over the 2 positives
    assert out["bound"].item() == pytest.approx(0.5 * 4.25 / 2, rel=1e-5)
    only_p3 = ChenDenseLoss(["p3"], SPECS, SPECS, nu=1.0)(student, teacher)
    assert only_p3["bound"].item() == pytest.approx(4.25, rel=1e-5)
    out["bound"].backward()
    assert s_dist.grad[0, 1].abs().sum() > 0 and s_dist.grad[0, 6].abs().sum() == 0


def test_chen_dense_bound_on_box_deltas_uses_encoded_targets():
    labels = torch.tensor([[0, 1, 0, 0, 0, 0, 2, 0]])
    matched = [torch.tensor([-1, 0, -1, -1, -1, -1, 1, -1])]
    s_reg = torch.zeros(1, 8, 4, requires_grad=True)
    student = _dense(torch.zeros(1, 8, 2), labels, matched)
    teacher = _dense(torch.zeros(1, 8, 2), labels, matched)
    student.head["bbox_regression"] = s_reg
    t_reg = torch.zeros(1, 8, 4)
    t_reg[0, 6] = torch.tensor([5.0, 5.0, 5.0, 5.0])  # teacher worse than the student at location 6
    teacher.head["bbox_regression"] = t_reg
    target = torch.zeros(1, 8, 4)
    target[0, 1] = torch.tensor([1.0, 2.0, 0.0, 0.0])  # ||s - y||^2 = 5 > ||t - y||^2 = 5 - m? only with m > 0
    target[0, 6] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # ||s - y||^2 = 1 < ||t - y||^2 = 16+25+25+25 -> 0
    student.extras["regression_targets"] = target
    strict = ChenDenseLoss([], SPECS, SPECS, nu=1.0)(student, teacher)
    assert strict["bound"].item() == 0.0  # location 1: 5 + 0 > 5 is false (strict), location 6 bounded
    margin = ChenDenseLoss([], SPECS, SPECS, nu=1.0, margin=0.1)(student, teacher)
    assert margin["bound"].item() == pytest.approx(5.0 / 2)  # location 1 counts, mean over the 2 positives
    margin["bound"].backward()
    assert s_reg.grad[0, 1].abs().sum() > 0 and s_reg.grad[0, 6].abs().sum() == 0


def test_chen_dense_bound_needs_regression_targets():
    labels = torch.tensor([[0, 1, 0, 0, 0, 0, 0, 0]])
    matched = [torch.tensor([-1, 0, -1, -1, -1, -1, -1, -1])]
    retina = _dense(torch.randn(1, 8, 2), labels, matched)
    with pytest.raises(ValueError, match="bound: false"):
        ChenDenseLoss([], SPECS, SPECS)(retina, retina)
