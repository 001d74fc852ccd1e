"""COCO metrics on hand-made cases whose values are worked out in the comments (both backends)."""

from __future__ import annotations

import math

import pytest
import torch

from detkd.eval import coco_metrics, to_coco_gt

BACKENDS = ["faster", "pycocotools"]


def gt(image_id, boxes, labels, **extra):
    return {"image_id": image_id, "boxes": torch.tensor(boxes, dtype=torch.float32),
            "labels": torch.tensor(labels), **extra}


def pred(image_id, boxes, scores, labels):
    return {"image_id": image_id, "boxes": torch.tensor(boxes, dtype=torch.float32),
            "scores": torch.tensor(scores), "labels": torch.tensor(labels)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_predictions_give_ap_one(backend):
    gts = [gt(1, [[10, 20, 60, 90], [100, 100, 300, 250]], [1, 2]), gt(7, [[0, 0, 40, 30]], [3])]
    preds = [pred(g["image_id"], g["boxes"].tolist(), [0.9] * len(g["labels"]), g["labels"].tolist()) for g in gts]
    m = coco_metrics(gts, preds, num_classes=3, backend=backend)
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert m[key] == pytest.approx(1.0)
    # areas: 50*70 = 3500 (medium), 200*150 = 30000 (large), 40*30 = 1200 (medium); no small box -> undefined
    assert m["APm"] == pytest.approx(1.0) and m["APl"] == pytest.approx(1.0)
    assert math.isnan(m["APs"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_box_iou_two_thirds(backend):
    # GT [0,0,10,10]; prediction shifted right by 2 -> intersection 8*10 = 80, union 100 + 100 - 80 = 120,
    # IoU = 2/3. It matches at thresholds 0.50, 0.55, 0.60, 0.65 (4 of the 10 in 0.50:0.05:0.95), so
    # AP = 4/10 = 0.4, AP50 = 1, AP75 = 0; recall is averaged the same way: AR100 = 0.4.
    gts = [gt(3, [[0, 0, 10, 10]], [1])]
    preds = [pred(3, [[2, 0, 12, 10]], [0.8], [1])]
    m = coco_metrics(gts, preds, num_classes=2, backend=backend)
    assert m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] == pytest.approx(0.0)
    assert m["AP"] == pytest.approx(0.4)
    assert m["AR100"] == pytest.approx(0.4)
    assert m["APs"] == pytest.approx(0.4)  # area 100 < 32^2: a small object
    assert math.isnan(m["APm"]) and math.isnan(m["APl"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_false_positive_ranked_above_true_positive(backend):
    # One GT; detections sorted by score: FP (0.9, elsewhere), TP (0.8, exact). Precision/recall along the ranking:
    # (p=0, r=0), (p=1/2, r=1). The interpolated precision max_{r' >= r} p(r') is 1/2 at all 101 recall points,
    # so AP = 0.5 at every IoU threshold.
    gts = [gt(1, [[50, 50, 100, 100]], [1])]
    preds = [pred(1, [[0, 0, 20, 20], [50, 50, 100, 100]], [0.9, 0.8], [1, 1])]
    m = coco_metrics(gts, preds, num_classes=1, backend=backend)
    assert m["AP"] == pytest.approx(0.5)
    assert m["AP50"] == pytest.approx(0.5)
    assert m["AR100"] == pytest.approx(1.0)  # recall does not care about the ranking


@pytest.mark.parametrize("backend", BACKENDS)
def test_tp_fp_tp_uses_101_point_interpolation(backend):
    # Two GTs in two images; ranking TP (0.9), FP (0.8), TP (0.7):
    # (p=1, r=1/2), (p=1/2, r=1/2), (p=2/3, r=1). Interpolated precision: 1 for r <= 0.5 (51 of the 101 recall
    # points 0.00..0.50), 2/3 for r in 0.51..1.00 (50 points): AP = (51 * 1 + 50 * 2/3) / 101.
    gts = [gt(1, [[0, 0, 50, 50]], [2]), gt(2, [[10, 10, 70, 70]], [2])]
    preds = [
        pred(1, [[0, 0, 50, 50], [200, 200, 250, 250]], [0.9, 0.8], [2, 2]),
        pred(2, [[10, 10, 70, 70]], [0.7], [2]),
    ]
    m = coco_metrics(gts, preds, num_classes=2, backend=backend)
    assert m["AP"] == pytest.approx((51 + 50 * 2 / 3) / 101)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_class_is_a_miss_and_image_without_boxes_counts(backend):
    # Image 1: a GT of class 1 predicted exactly but as class 2 -> class 1 has recall 0, class 2 has only an FP
    # (no GT: excluded from the mean). Image 2 has no GT box; its detection of class 1 is a false positive
    # ranked above nothing useful. Class 1: AP 0 (no TP at all).
    gts = [gt(1, [[0, 0, 50, 50]], [1]), gt(2, torch.zeros(0, 4).tolist(), [])]
    preds = [pred(1, [[0, 0, 50, 50]], [0.9], [2]), pred(2, [[5, 5, 30, 30]], [0.95], [1])]
    m = coco_metrics(gts, preds, num_classes=2, backend=backend)
    assert m["AP"] == pytest.approx(0.0) and m["AR100"] == pytest.approx(0.0)


def test_no_predictions_gives_zeros_not_a_crash():
    gts = [gt(1, [[0, 0, 10, 10], [0, 0, 200, 200]], [1, 1])]
    m = coco_metrics(gts, [pred(1, torch.zeros(0, 4).tolist(), [], [])], num_classes=1)
    assert m["AP"] == 0.0 and m["AP50"] == 0.0 and m["AR100"] == 0.0
    assert m["APs"] == 0.0 and m["APl"] == 0.0  # 100 px² small, 40000 px² large
    assert math.isnan(m["APm"])  # no medium GT: undefined
    assert coco_metrics(gts, [], num_classes=1)["AP"] == 0.0


def test_max_detections_limits_what_counts():
    # The TP is the 3rd detection by score; with max_detections=2 it is cut off.
    gts = [gt(1, [[0, 0, 50, 50]], [1])]
    preds = [pred(1, [[100, 100, 120, 120], [200, 200, 220, 220], [0, 0, 50, 50]], [0.9, 0.8, 0.7], [1, 1, 1])]
    assert coco_metrics(gts, preds, 1)["AP50"] == pytest.approx(1 / 3)
    limited = coco_metrics(gts, preds, 1, max_detections=2)
    assert limited["AP50"] == pytest.approx(0.0) and "AR2" in limited


def test_gt_conversion_is_xywh_with_box_area_and_checks_labels():
    coco = to_coco_gt([gt(5, [[10, 20, 40, 60]], [2], width=100, height=80)], num_classes=2)
    (ann,) = coco["annotations"]
    assert ann["bbox"] == [10, 20, 30, 40] and ann["area"] == 1200 and ann["category_id"] == 2
    assert coco["images"] == [{"id": 5, "width": 100, "height": 80}]
    with pytest.raises(ValueError, match="image 5: label 3 outside 1..2"):
        to_coco_gt([gt(5, [[0, 0, 1, 1]], [3])], num_classes=2)
    with pytest.raises(ValueError, match="prediction for image_id 9"):
        coco_metrics([gt(5, [[0, 0, 1, 1]], [1])], [pred(9, [[0, 0, 1, 1]], [1.0], [1])], 1)
