"""ATSS on a hand-made case: two levels (four 10x10 anchors, one 20x20 anchor), topk=2.

Anchor centres: a0 (5,5), a1 (15,5), a2 (5,15), a3 (15,15) on level 0; a4 (10,10) on level 1.
"""

from statistics import mean, stdev

import pytest
import torch

from detkd.regions.atss import atss_assign, atss_candidates, atss_threshold

ANCHORS = torch.tensor(
    [[0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20], [10, 10, 20, 20], [0, 0, 20, 20]], dtype=torch.float32
)
LEVELS = [4, 1]
# g: centre (7, 6.5); h: centre (14, 8); g2: centre (6, 5.5). None of them has a distance tie at the top-k border.
G = [2.0, 2.0, 12.0, 11.0]
H = [8.0, 3.0, 20.0, 13.0]
G2 = [1.0, 1.0, 11.0, 10.0]


def test_candidates_are_nearest_centres_per_level():
    cand, ious = atss_candidates(ANCHORS, LEVELS, torch.tensor([G, H, G2]), topk=2)
    # g: level 0 distances a0 2.9, a1 8.1, a2 8.7, a3 11.5 -> {a0, a1}; level 1 has one anchor -> {a4}
    # h: a1 3.2, a3 7.1, a0 9.5, a2 11.4 -> {a1, a3}; g2: a0 1.1, a1 9.0, a2 9.6 -> {a0, a1}
    assert cand.T.tolist() == [[0, 1, 4], [1, 3, 4], [0, 1, 4]]
    # IoU(a0, g): inter 8x8 = 64, union 100 + 90 - 64 = 126
    assert ious[0, 0].item() == pytest.approx(64 / 126)
    assert ious.shape == (5, 3)


def test_threshold_is_mean_plus_unbiased_std():
    thr, _ = atss_threshold(ANCHORS, LEVELS, torch.tensor([G, H, G2]), topk=2)
    g_ious = [64 / 126, 16 / 174, 90 / 400]  # a0, a1, a4 with g (area 90)
    h_ious = [70 / 150, 30 / 190, 120 / 400]  # a1, a3, a4 with h (area 120)
    g2_ious = [81 / 109, 9 / 181, 90 / 400]  # a0, a1, a4 with g2 (area 90)
    expected = [mean(v) + stdev(v) for v in (g_ious, h_ious, g2_ious)]  # stdev: n - 1 in the denominator
    assert thr.tolist() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx([0.48741, 0.46274, 0.69983], abs=1e-4)


def test_assignment_resolves_conflicts_by_max_iou():
    matched = atss_assign(ANCHORS, LEVELS, torch.tensor([G, H, G2]), topk=2)
    # a0 passes for g (0.508 >= 0.487) and g2 (0.743 >= 0.700): it takes g2, the larger IoU.
    # a1 passes for h (0.467 >= 0.463, centre (15,5) inside h). a4 (0.225 / 0.3) is below every threshold.
    assert matched.tolist() == [2, 1, -1, -1, -1]
    assert matched.dtype == torch.int64


def test_single_box_assignment():
    assert atss_assign(ANCHORS, LEVELS, torch.tensor([G]), topk=2).tolist() == [0, -1, -1, -1, -1]


def test_centre_on_the_box_edge_is_not_positive():
    # box [5,1,14,9]: IoUs a0 40/132 = 0.303, a1 32/140 = 0.229, a4 72/400 = 0.18 -> thr 0.299, so a0 passes the
    # IoU test, but its centre x = 5 lies on the box's left edge (distance 0 <= 0.01): no positive at all.
    box = torch.tensor([[5.0, 1.0, 14.0, 9.0]])
    thr, _ = atss_threshold(ANCHORS, LEVELS, box, topk=2)
    assert 40 / 132 >= thr.item()
    assert atss_assign(ANCHORS, LEVELS, box, topk=2).tolist() == [-1] * 5


def test_no_boxes_all_background():
    matched = atss_assign(ANCHORS, LEVELS, torch.zeros(0, 4), topk=9)
    assert matched.tolist() == [-1] * 5


def test_level_sizes_must_cover_anchors():
    with pytest.raises(ValueError, match="num_anchors_per_level"):
        atss_candidates(ANCHORS, [4], torch.tensor([G]))
