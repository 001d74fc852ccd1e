"""GFL: loss kernels by hand, box coding, head layout, loss normalisers, and a tiny detector end to end."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou

from detkd.models import build
from detkd.models.gfl import (
    GFLHead,
    StrideAnchorGenerator,
    bbox2distance,
    distance2bbox,
    distribution_focal_loss,
    integral,
    quality_focal_loss,
)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_quality_focal_loss_by_hand():
    # one location, two classes; class 1 is the positive's class with soft label (IoU) 0.6
    loss = quality_focal_loss(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 0.6]]), beta=2.0)
    neg = -math.log(1 - _sigmoid(0.0)) * _sigmoid(0.0) ** 2  # BCE(0, y=0) * sigma^2 = log 2 * 0.25
    s = _sigmoid(1.0)
    pos = -(0.6 * math.log(s) + 0.4 * math.log(1 - s)) * abs(s - 0.6) ** 2
    assert loss.flatten().tolist() == pytest.approx([neg, pos], rel=1e-5)
    assert neg == pytest.approx(0.173287, rel=1e-5) and pos == pytest.approx(0.012251, rel=1e-3)


def test_quality_focal_loss_is_zero_when_score_equals_target_extremes():
    # sigmoid(-30) ~ 0 for a negative: both the BCE and the modulating factor vanish
    assert quality_focal_loss(torch.tensor([-30.0]), torch.tensor([0.0])).item() < 1e-20


def test_distribution_focal_loss_by_hand():
    logits = [0.1, 0.5, 2.0, 1.0, -1.0]
    lse = math.log(sum(math.exp(v) for v in logits))
    ce = [lse - v for v in logits]  # cross-entropy of each bin
    loss = distribution_focal_loss(torch.tensor([logits]), torch.tensor([2.3]))
    assert loss.item() == pytest.approx(0.7 * ce[2] + 0.3 * ce[3], rel=1e-5)
    # an integer target puts all the weight on its own bin
    assert distribution_focal_loss(torch.tensor([logits]), torch.tensor([1.0])).item() == pytest.approx(ce[1])


def test_integral_is_the_expected_bin():
    reg_max = 4
    uniform = torch.zeros(1, 4 * (reg_max + 1))  # uniform over 0..4 -> 2.0 per edge
    assert integral(uniform, reg_max).tolist() == [[2.0, 2.0, 2.0, 2.0]]
    two_bins = torch.full((4, reg_max + 1), -50.0)
    two_bins[:, 2] = two_bins[:, 3] = 5.0  # half on bin 2, half on bin 3
    assert integral(two_bins.reshape(1, -1), reg_max)[0].tolist() == pytest.approx([2.5] * 4)
    with pytest.raises(ValueError, match="reg_max"):
        integral(torch.zeros(1, 17), reg_max)


def test_box_coding_round_trip_and_clamp():
    points = torch.tensor([[10.0, 20.0], [3.0, 4.0]])
    boxes = torch.tensor([[4.0, 15.0, 13.0, 22.0], [0.0, 0.0, 40.0, 5.0]])
    d = bbox2distance(points, boxes)
    assert d.tolist() == [[6.0, 5.0, 3.0, 2.0], [3.0, 4.0, 37.0, 1.0]]
    assert torch.equal(distance2bbox(points, d), boxes)
    # with reg_max the distances are clamped to [0, reg_max - 0.1] (mmdet v2's eps)
    assert bbox2distance(points, boxes, reg_max=16)[1].tolist() == pytest.approx([3.0, 4.0, 15.9, 1.0])
    outside = torch.tensor([[12.0, 21.0, 13.0, 22.0]])  # point left of / above the box: negative distances -> 0
    assert bbox2distance(points[:1], outside, reg_max=16).tolist() == [[0.0, 0.0, 3.0, 2.0]]


def test_head_layout_is_level_then_row_major():
    head = GFLHead(in_channels=8, num_classes=3, num_levels=2, num_convs=1, reg_max=4)
    feats = [torch.randn(2, 8, 3, 5), torch.randn(2, 8, 2, 1)]  # non-square maps
    out = head(feats)
    assert out["cls_logits"].shape == (2, 15 + 2, 3)
    assert out["bbox_dist"].shape == (2, 17, 4 * 5)
    cls_map = head.gfl_cls(head.cls_convs(feats[0]))  # (2, 3, 3, 5)
    reg_map = head.scales[1](head.gfl_reg(head.reg_convs(feats[1])))  # (2, 20, 2, 1)
    y, x = 2, 3
    assert torch.allclose(out["cls_logits"][1, y * 5 + x], cls_map[1, :, y, x])
    assert torch.allclose(out["bbox_dist"][0, 15 + 1], reg_map[0, :, 1, 0])
    # prior-probability bias: every initial score is about 0.01
    assert torch.sigmoid(head.gfl_cls.bias).tolist() == pytest.approx([0.01] * 3)


def test_anchor_generator_uses_nominal_strides():
    gen = StrideAnchorGenerator((8, 64))
    images = torch.zeros(1, 3, 96, 160)
    from torchvision.models.detection.image_list import ImageList

    feats = [torch.zeros(1, 1, 12, 20), torch.zeros(1, 1, 2, 3)]  # 96 // 2 = 48 would be torchvision's stride
    (anchors,) = gen(ImageList(images, [(96, 160)]), feats)
    assert anchors.shape == (12 * 20 + 2 * 3, 4)
    assert anchors[1].tolist() == [8 - 32, -32, 8 + 32, 32]  # side 8 * 8 centred at (x * s, y * s) = (8, 0)
    assert anchors[240 + 4].tolist() == [64 - 256, 64 - 256, 64 + 256, 64 + 256]  # level 2, (y, x) = (1, 1)


# ------------------------------------------------------------------------------- head loss vs a naive loop

REG_MAX = 4
STRIDE = 8.0


def _loss_case(cls_shift: float):
    """One level, 2x3 map (stride 8, anchors 64x64); image 0 has two boxes and 3 positives, image 1 none."""
    head = GFLHead(in_channels=8, num_classes=2, num_levels=1, num_convs=1, reg_max=REG_MAX)
    centres = torch.tensor([[x * STRIDE, y * STRIDE] for y in range(2) for x in range(3)])
    anchors = torch.cat([centres - 32, centres + 32], dim=1)
    targets = [
        {"boxes": torch.tensor([[2.0, 1.0, 20.0, 12.0], [4.0, 3.0, 14.0, 15.0]]), "labels": torch.tensor([2, 1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    matched = [torch.tensor([-1, 0, 0, -1, 1, -1]), torch.full((6,), -1)]
    outputs = {
        "cls_logits": (torch.randn(2, 6, 2) + cls_shift).requires_grad_(),
        "bbox_dist": torch.randn(2, 6, 4 * (REG_MAX + 1)).requires_grad_(),
    }
    return head, targets, outputs, [anchors, anchors], matched


def _naive_losses(targets, outputs, anchors, matched):
    cls, dist = outputs["cls_logits"].detach(), outputs["bbox_dist"].detach()
    soft = torch.zeros_like(cls)
    weights, gious, dfls = [], [], []
    for i in range(2):
        for loc in range(6):
            j = int(matched[i][loc])
            if j < 0:
                continue
            point = (anchors[i][loc, :2] + anchors[i][loc, 2:]) / 2 / STRIDE
            gt = targets[i]["boxes"][j] / STRIDE
            probs = dist[i, loc].reshape(4, REG_MAX + 1).softmax(-1)
            d = [sum(k * probs[e, k].item() for k in range(REG_MAX + 1)) for e in range(4)]
            pred = torch.tensor([[point[0] - d[0], point[1] - d[1], point[0] + d[2], point[1] + d[3]]])
            soft[i, loc, int(targets[i]["labels"][j]) - 1] = box_iou(pred, gt[None]).item()
            weights.append(torch.sigmoid(cls[i, loc]).max().item())
            gious.append(1 - generalized_box_iou(pred, gt[None]).item())
            target_d = [point[0] - gt[0], point[1] - gt[1], gt[2] - point[0], gt[3] - point[1]]
            dfl = 0.0
            for e in range(4):
                y = min(max(float(target_d[e]), 0.0), REG_MAX - 0.1)
                lo = int(y)
                logp = dist[i, loc].reshape(4, REG_MAX + 1)[e].log_softmax(-1)
                dfl += -(lo + 1 - y) * logp[lo].item() - (y - lo) * logp[lo + 1].item()
            dfls.append(dfl)
    qfl = (F.binary_cross_entropy_with_logits(cls, soft, reduction="none") * (cls.sigmoid() - soft).abs() ** 2).sum()
    norm = max(sum(weights), 1.0)
    return {
        "classification": qfl.item() / len(weights),
        "bbox_regression": 2.0 * sum(w * g for w, g in zip(weights, gious)) / norm,
        "bbox_dfl": 0.25 * sum(w * d for w, d in zip(weights, dfls)) / 4 / norm,
        "sum_w": sum(weights),
    }


@pytest.mark.parametrize("cls_shift", [-3.0, 6.0])  # sum of weights below 1 (clamped) / about 3 (divides)
def test_head_loss_matches_naive_loop(cls_shift):
    head, targets, outputs, anchors, matched = _loss_case(cls_shift)
    losses = head.compute_loss(targets, outputs, anchors, matched)
    expected = _naive_losses(targets, outputs, anchors, matched)
    assert (expected["sum_w"] > 1.0) == (cls_shift > 0)
    for key in ("classification", "bbox_regression", "bbox_dfl"):
        assert losses[key].item() == pytest.approx(expected[key], rel=1e-4), key


def test_quality_target_and_box_weights_are_detached():
    head, targets, outputs, anchors, matched = _loss_case(0.0)
    losses = head.compute_loss(targets, outputs, anchors, matched)
    box_loss = losses["bbox_regression"] + losses["bbox_dfl"]
    g_cls_from_box = torch.autograd.grad(box_loss, outputs["cls_logits"], retain_graph=True, allow_unused=True)[0]
    assert g_cls_from_box is None or torch.count_nonzero(g_cls_from_box) == 0  # the score weight w is a constant
    g_dist_from_cls = torch.autograd.grad(
        losses["classification"], outputs["bbox_dist"], retain_graph=True, allow_unused=True
    )[0]
    assert g_dist_from_cls is None or torch.count_nonzero(g_dist_from_cls) == 0  # IoU soft label is a constant
    g_dist = torch.autograd.grad(losses["bbox_dfl"], outputs["bbox_dist"])[0]
    assert torch.count_nonzero(g_dist[0, [1, 2, 4]]) > 0 and torch.count_nonzero(g_dist[0, [0, 3, 5]]) == 0


def test_no_positives_gives_zero_box_losses_with_graph():
    head, targets, outputs, anchors, _ = _loss_case(0.0)
    losses = head.compute_loss(targets, outputs, anchors, [torch.full((6,), -1)] * 2)
    assert losses["bbox_regression"].item() == 0 and losses["bbox_dfl"].item() == 0
    assert losses["bbox_dfl"].requires_grad
    # negatives only: QFL = sum of BCE(x, 0) * sigmoid(x)^2 over every element, divided by max(0, 1)
    x = outputs["cls_logits"].detach()
    expected = (F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none") * x.sigmoid() ** 2).sum()
    assert losses["classification"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_every_rank_makes_the_same_reductions_with_or_without_positives(monkeypatch):
    """Under DDP a rank whose batch has no positive makes the same all-reduces as the others (one per call), and the
    normalisers it reduces are the official ones: the positive count and the sum of the box weights (0 here)."""
    import detkd.models.gfl_head as gfl_head

    calls = []
    monkeypatch.setattr(gfl_head, "_reduce_mean", lambda x: calls.append(x.clone()) or x)
    head, targets, outputs, anchors, matched = _loss_case(0.0)
    head.compute_loss(targets, outputs, anchors, matched)
    head.compute_loss(targets, outputs, anchors, [torch.full((6,), -1)] * 2)
    assert len(calls) == 2 and calls[0].shape == calls[1].shape == (2,)
    n_pos = sum(int((m >= 0).sum()) for m in matched)
    assert calls[0][0].item() == n_pos and calls[0][1].item() > 0
    assert calls[1].tolist() == [0.0, 0.0]


# ------------------------------------------------------------------------------------ the tiny detector


def _tiny_gfl(**kw):
    return build("gfl", "resnet18", num_classes=2, fpn_channels=16, head_convs=1, min_size=64, max_size=64, **kw)


def _scene():
    img = torch.rand(3, 64, 64) * 0.2
    img[:, 12:44, 20:52] += 0.7
    return img, {"boxes": torch.tensor([[20.0, 12.0, 52.0, 44.0]]), "labels": torch.tensor([2])}


def test_eval_returns_well_formed_detections_in_original_coordinates():
    model = _tiny_gfl().eval()
    model.score_thresh = 0.0  # keep everything so the output is not empty at random init
    model.nms_thresh = 1.0  # near-identical random-init boxes would otherwise collapse under NMS
    model.detections_per_img = 7
    with torch.no_grad():
        dets = model([torch.rand(3, 80, 120), torch.rand(3, 64, 64)])
    assert len(dets) == 2
    for det, (h, w) in zip(dets, [(80, 120), (64, 64)]):
        assert det["boxes"].shape == (7, 4) and det["scores"].shape == (7,) and det["labels"].dtype == torch.int64
        assert (det["boxes"][:, 2:] >= det["boxes"][:, :2]).all()
        assert det["boxes"][:, [0, 2]].max() <= w and det["boxes"][:, [1, 3]].max() <= h
        assert det["labels"].min() >= 1 and det["labels"].max() <= 2
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])


def test_image_without_boxes_trains():
    model = _tiny_gfl().train()
    img, target = _scene()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model([img, img], [target, empty])
    assert set(losses) == {"classification", "bbox_regression", "bbox_dfl"}
    assert all(torch.isfinite(v) for v in losses.values())
    only_empty = model([img], [empty])
    assert only_empty["bbox_regression"].item() == 0
    sum(only_empty.values()).backward()
    assert model.head.gfl_cls.weight.grad.abs().sum() > 0


def test_bad_targets_name_the_image():
    model = _tiny_gfl().train()
    img, target = _scene()
    flat = {"boxes": torch.tensor([[5.0, 5.0, 5.0, 9.0]]), "labels": torch.tensor([1])}
    with pytest.raises(ValueError, match=r"targets\[1\] box 0"):
        model([img, img], [target, flat])
    with pytest.raises(ValueError, match=r"targets\[0\] has label 3; labels must be in 1..2"):
        model([img], [{"boxes": target["boxes"], "labels": torch.tensor([3])}])


@pytest.mark.slow
def test_tiny_gfl_overfits_one_image():
    torch.manual_seed(0)
    model = _tiny_gfl(backbone_norm="frozen_bn")  # frozen (identity) BN: eval behaves like train
    img, target = _scene()
    model.eval()
    with torch.no_grad():
        assert model([img])[0]["scores"].numel() == 0  # nothing above 0.05 at init (prior 0.01)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(30):
        losses = model([img], [target])
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        det = model([img])[0]
    assert det["scores"][0] > 0.3 and det["labels"][0] == 2
    assert box_iou(det["boxes"][:1], target["boxes"]).item() > 0.6
