"""VLR region of LD: hand-made anchors/boxes for both DIoU variants, edge cases, vectorised == loop."""

from __future__ import annotations

import math

import pytest
import torch

from detkd.regions.vlr import vlr_region, vlr_region_loop


def gfl_anchors(h: int, w: int, strides: tuple[int, ...]) -> tuple[torch.Tensor, list[int]]:
    """mmdet v2 GFL anchors: squares of side 8·stride centred at (x·s, y·s), row-major per level."""
    out, sizes = [], []
    for s in strides:
        ys, xs = torch.meshgrid(torch.arange(math.ceil(h / s)), torch.arange(math.ceil(w / s)), indexing="ij")
        cx, cy = xs.flatten() * s, ys.flatten() * s
        out.append(torch.stack([cx - 4 * s, cy - 4 * s, cx + 4 * s, cy + 4 * s], dim=1))
        sizes.append(cx.numel())
    return torch.cat(out).double(), sizes


def random_boxes(g: torch.Generator, n: int, h: int, w: int) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([w * 0.8, h * 0.8], dtype=torch.float64)
    wh = 2 + torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([w * 0.5, h * 0.5], dtype=torch.float64)
    return torch.cat([xy, xy + wh], dim=1)


# One level, topk = 3: the ATSS candidates of box [0, 0, 40, 20] (centre (20, 10)) are a0, a1, a2 (centre distances
# 0, 10, 10; the next anchor is 11.2 away). Their IoUs are all 400/800 = 0.5, so thr = 0.5 + 0 and α·thr = 0.125.
BOX_A = [[0.0, 0.0, 40.0, 20.0]]
ANCHORS_A = [
    [10, 0, 30, 20],  # a0: inter/area(a) 1, IoU .5, ρ² 0                                       off X 1      true X .5
    [0, 0, 20, 20],  # a1: inter/area 1, IoU .5, ρ²/c² = 100/2000 = .05                        off .95      true .45
    [20, 0, 40, 20],  # a2: mirror of a1                                                       off .95      true .45
    [30, 5, 46, 15],  # a3: inter 100, area 160, IoU 100/860, ρ²/c² = 324/2516                  off .4962    true -.0125
    [20, 5, 44, 15],  # a4: inter 200, area 240, IoU 200/840, ρ²/c² = 144/2336                  off .7717    true .1764
    [0, 0, 40, 44],  # a5: box inside, inter/area = IoU = 800/1760, ρ²/c² = 144/3536            off .4138    true .4138
    [0, -5, 20, 15],  # a6: inter 300, area 400, IoU 300/900, ρ²/c² = 125/2225                  off .6938    true .2771
    [100, 100, 120, 120],  # a7: no overlap                                                   off < 0      true < 0
]
# region: .125 <= X < .5; value = IoU. "true" keeps a0 out only through the strict '<' (X == thr == .5).
EXPECTED_A = {
    "official": [0, 0, 0, 100 / 860, 0, 800 / 1760, 0, 0],
    "true": [0, 0.5, 0.5, 0, 200 / 840, 800 / 1760, 300 / 900, 0],
}

# Box [0, 0, 10, 10]; candidates (topk 3) b0, b1, b2 with IoUs 1, 1/3, 1/3:
# mean 5/9, unbiased variance (16 + 4 + 4)/81/2 = 12/81, std sqrt(12)/9:
# thr = (5 + sqrt 12)/9 = .94046, α·thr = .23511.
# (A biased std would give thr = (5 + sqrt 8)/9 = .86983 and drop b4.)
BOX_B = [[0.0, 0.0, 10.0, 10.0]]
ANCHORS_B = [
    [0, 0, 10, 10],  # b0: X = 1 in both variants (>= thr)
    [5, 0, 15, 10],  # b1: ρ²/c² = 25/325; off .5 - 1/13 = .4231, true 1/3 - 1/13 = .2564 -> 1/3 in both
    [0, 5, 10, 15],  # b2: mirror of b1
    [7, 0, 17, 10],  # b3: ρ²/c² = 49/389; off .3 - .1260 = .1740, true 3/17 - .1260 = .0505 -> out
    [8.2, 8.2, 9, 9],  # b4: tiny, inside, centre 5.09 away: off 1 - 25.92/200 = .8704 -> IoU .0064; true < 0
]
EXPECTED_B = {"official": [0, 1 / 3, 1 / 3, 0, 0.0064], "true": [0, 1 / 3, 1 / 3, 0, 0]}


@pytest.mark.parametrize("diou", ["official", "true"])
@pytest.mark.parametrize(
    "anchors, box, expected", [(ANCHORS_A, BOX_A, EXPECTED_A), (ANCHORS_B, BOX_B, EXPECTED_B)], ids=["A", "B"]
)
def test_vlr_hand_cases(diou, anchors, box, expected):
    a, g = torch.tensor(anchors, dtype=torch.float64), torch.tensor(box, dtype=torch.float64)
    want = torch.tensor(expected[diou], dtype=torch.float64)
    got = vlr_region(a, [len(anchors)], g, alpha=0.25, topk=3, diou=diou)
    assert torch.allclose(got, want, atol=1e-9), (got, want)
    assert torch.allclose(vlr_region_loop(a, [len(anchors)], g, topk=3, diou=diou), want, atol=1e-9)


def test_vlr_alpha_moves_the_lower_bound():
    a, g = torch.tensor(ANCHORS_A, dtype=torch.float64), torch.tensor(BOX_A, dtype=torch.float64)
    # α = 0.9: region .45 <= X < .5; only a1/a2 (true X .45) stay; a4 (.176), a5 (.414), a6 (.277) drop out
    got = vlr_region(a, [8], g, alpha=0.9, topk=3, diou="true")
    assert torch.allclose(got, torch.tensor([0, 0.5, 0.5, 0, 0, 0, 0, 0], dtype=torch.float64))


def test_vlr_max_over_boxes():
    a = torch.tensor(ANCHORS_A, dtype=torch.float64)
    far = [[200.0, 200.0, 240.0, 220.0]]  # a second box that no anchor of A reaches
    both = torch.tensor(BOX_A + far, dtype=torch.float64)
    got = vlr_region(a, [8], both, topk=3, diou="official")
    # adding the far box changes no threshold of box A and adds no region
    assert torch.allclose(got, torch.tensor(EXPECTED_A["official"], dtype=torch.float64), atol=1e-9)


def test_vlr_no_boxes_zero_and_tiny_boxes():
    anchors, sizes = gfl_anchors(64, 96, (8, 16, 32))
    empty = vlr_region(anchors, sizes, torch.zeros(0, 4))
    assert empty.shape == (anchors.shape[0],) and empty.abs().sum() == 0
    degenerate = vlr_region(anchors, sizes, torch.tensor([[30.0, 20.0, 30.0, 20.0]], dtype=torch.float64))
    assert torch.equal(degenerate, torch.zeros(anchors.shape[0], dtype=torch.float64))  # IoU 0 -> thr 0 -> empty
    tiny = torch.tensor([[30.2, 20.1, 31.0, 21.5]], dtype=torch.float64)
    for diou in ("official", "true"):
        got = vlr_region(anchors, sizes, tiny, diou=diou)
        assert (
            torch.isfinite(got).all() and got.max() <= 1.12 / 4096 + 1e-12
        )  # IoU <= area(box) / area(smallest anchor)
        assert torch.allclose(got, vlr_region_loop(anchors, sizes, tiny, diou=diou), atol=1e-12)


def test_vlr_whole_image_box():
    h, w = 64, 96
    anchors, sizes = gfl_anchors(h, w, (8, 16, 32))
    box = torch.tensor([[0.0, 0.0, w, h]], dtype=torch.float64)
    off = vlr_region(anchors, sizes, box, diou="official")
    assert torch.allclose(off, vlr_region_loop(anchors, sizes, box, diou="official"), atol=1e-12)
    assert (off > 0).any()
    # official X of an anchor inside the box is 1 − ρ²/c² >= .75, above any threshold here: the official region of
    # a whole-image box holds only anchors that cross the image border
    inside = (anchors[:, :2] >= 0).all(1) & (anchors[:, 2] <= w) & (anchors[:, 3] <= h)
    assert inside.any() and off[inside].abs().sum() == 0
    true = vlr_region(anchors, sizes, box, diou="true")
    assert torch.allclose(true, vlr_region_loop(anchors, sizes, box, diou="true"), atol=1e-12)


def test_vlr_official_selects_more_than_true_on_a_typical_image():
    anchors, sizes = gfl_anchors(256, 256, (8, 16, 32, 64, 128))
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(g, 5, 256, 256)
    official = (vlr_region(anchors, sizes, boxes, diou="official") > 0).sum().item()
    true = (vlr_region(anchors, sizes, boxes, diou="true") > 0).sum().item()
    assert official > true > 0


@pytest.mark.parametrize("seed", range(6))
def test_vlr_vectorised_equals_loop(seed):
    g = torch.Generator().manual_seed(seed)
    anchors, sizes = gfl_anchors(64, 96, (8, 16, 32))
    boxes = random_boxes(g, 1 + seed % 4, 64, 96)
    for diou in ("official", "true"):
        fast = vlr_region(anchors, sizes, boxes, topk=9, diou=diou)
        slow = vlr_region_loop(anchors, sizes, boxes, topk=9, diou=diou)
        assert torch.allclose(fast, slow, atol=1e-12), diou
        assert (fast > 0).any()


def test_vlr_errors():
    anchors, sizes = gfl_anchors(32, 32, (8,))
    with pytest.raises(ValueError, match="diou"):
        vlr_region(anchors, sizes, torch.tensor([[0.0, 0, 8, 8]]), diou="ciou")
    with pytest.raises(ValueError, match="num_anchors_per_level"):
        vlr_region(anchors, [sizes[0] - 1], torch.tensor([[0.0, 0, 8, 8]]))
