"""FGD box -> cell masks: hand-written expected arrays on a non-square map, and the vectorised build against the
per-box reference.

Geometry of the hand cases: a 64 x 128 (h x w) image on a 4 x 8 map (stride 16), so a coordinate maps to x / 16
exactly and the floor / ceil are easy to follow by hand.
"""

from __future__ import annotations

import pytest
import torch

from detkd.regions.fgd import fgd_masks, fgd_masks_levels, fgd_masks_loop

IMG = (64, 128)
HW = (4, 8)


def _boxes(*rows: tuple[float, float, float, float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def _both(boxes, sizes, hw, **kw):
    """Masks from the vectorised build, checked against the per-box reference."""
    fg, bg = fgd_masks(boxes, sizes, hw, **kw)
    fg_ref, bg_ref = fgd_masks_loop(boxes, sizes, hw, **kw)
    torch.testing.assert_close(fg, fg_ref, rtol=0, atol=0)
    torch.testing.assert_close(bg, bg_ref, rtol=0, atol=0)
    return fg, bg


def test_off_centre_box_on_non_square_map():
    # x: 20/16 = 1.25 -> floor 1, 40/16 = 2.5 -> ceil 3; y: 10/16 = 0.625 -> 0, 30/16 = 1.875 -> ceil 2
    # inclusive cells rows 0..2 x cols 1..3 = 9 cells, value 1/9; 32 - 9 = 23 background cells
    fg, bg = _both([_boxes((20, 10, 40, 30))], [IMG], HW)
    v = 1 / 9
    expected = torch.tensor(
        [
            [0, v, v, v, 0, 0, 0, 0],
            [0, v, v, v, 0, 0, 0, 0],
            [0, v, v, v, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
        ]
    )
    torch.testing.assert_close(fg[0], expected)
    torch.testing.assert_close(bg[0], (expected == 0).float() / 23)


def test_image_without_boxes_gives_uniform_background():
    fg, bg = _both([_boxes(), _boxes((0, 0, 16, 16))], [IMG, IMG], HW)
    assert fg.shape == bg.shape == (2, 4, 8)
    assert torch.all(fg[0] == 0)
    torch.testing.assert_close(bg[0], torch.full((4, 8), 1 / 32))
    assert fg[1].sum() > 0  # the other image is unaffected


def test_batch_without_any_box():
    fg, bg = _both([_boxes(), _boxes()], [IMG, IMG], HW)
    assert torch.all(fg == 0)
    torch.testing.assert_close(bg, torch.full((2, 4, 8), 1 / 32))


def test_whole_image_box_uses_unclipped_area_and_empties_background():
    # floor(0) = 0, ceil(128/16) = 8 -> cols 0..8 (clipped to 0..7), rows 0..4 (clipped to 0..3)
    # value from the unclipped extent: 1 / ((4 + 1) * (8 + 1)) = 1/45
    fg, bg = _both([_boxes((0, 0, 128, 64))], [IMG], HW)
    torch.testing.assert_close(fg[0], torch.full((4, 8), 1 / 45))
    assert torch.all(bg[0] == 0)  # no background cell: the sum is 0 and nothing is divided


def test_box_smaller_than_a_cell_covers_two_by_two():
    # x: 36/16 = 2.25 -> 2, 40/16 = 2.5 -> 3; y: 20/16 = 1.25 -> 1, 24/16 = 1.5 -> 2  => rows 1..2, cols 2..3
    fg, _ = _both([_boxes((36, 20, 40, 24))], [IMG], HW)
    expected = torch.zeros(4, 8)
    expected[1:3, 2:4] = 1 / 4
    torch.testing.assert_close(fg[0], expected)


def test_box_on_exact_cell_boundaries_covers_two_by_two():
    # the box is exactly cell (1, 1): floor(16/16) = 1, ceil(32/16) = 2 -> the inclusive rule takes rows/cols 1..2
    fg, _ = _both([_boxes((16, 16, 32, 32))], [IMG], HW)
    expected = torch.zeros(4, 8)
    expected[1:3, 1:3] = 1 / 4
    torch.testing.assert_close(fg[0], expected)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_overlapping_boxes_smaller_wins(order):
    big = (0, 0, 48, 32)  # cols 0..3, rows 0..2 -> 1/12
    small = (36, 20, 40, 24)  # cols 2..3, rows 1..2 -> 1/4
    pair = [big, small]
    fg, bg = _both([_boxes(*(pair[i] for i in order))], [IMG], HW)
    a, b = 1 / 12, 1 / 4
    expected = torch.tensor(
        [
            [a, a, a, a, 0, 0, 0, 0],
            [a, a, b, b, 0, 0, 0, 0],
            [a, a, b, b, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
        ]
    )
    torch.testing.assert_close(fg[0], expected)
    torch.testing.assert_close(bg[0], (expected == 0).float() / 20)


def test_padded_vs_unpadded_scaling():
    # image resized to 48 x 96 inside a 64 x 128 padded batch, map 4 x 8
    box = [_boxes((24, 12, 48, 36))]
    # official (unpadded): x 24/96*8 = 2 -> 2, 48/96*8 = 4 -> 4; y 12/48*4 = 1 -> 1, 36/48*4 = 3 -> 3 => 3 x 3 = 1/9
    fg, _ = _both(box, [(48, 96)], HW, batch_shape=IMG)
    expected = torch.zeros(4, 8)
    expected[1:4, 2:5] = 1 / 9
    torch.testing.assert_close(fg[0], expected)
    # padded: x 24/128*8 = 1.5 -> 1, 48/128*8 = 3 -> 3; y 12/64*4 = 0.75 -> 0, 36/64*4 = 2.25 -> 3 => 4 x 3 = 1/12
    fg, _ = _both(box, [(48, 96)], HW, batch_shape=IMG, use_padded=True)
    expected = torch.zeros(4, 8)
    expected[0:4, 1:4] = 1 / 12
    torch.testing.assert_close(fg[0], expected)


def test_box_left_of_the_image_is_clipped_not_wrapped():
    # x1 = -20 -> floor(-1.25) = -2: the official slice [-2:..] would wrap around; we clip to column 0.
    # cols -2..1 (unclipped 4 wide), rows 0..1 (y 0..16 -> 0..1): value 1 / (2 * 4) = 1/8 on rows 0..1, cols 0..1
    fg, _ = fgd_masks([_boxes((-20, 0, 16, 16))], [IMG], HW)
    expected = torch.zeros(4, 8)
    expected[0:2, 0:2] = 1 / 8
    torch.testing.assert_close(fg[0], expected)


def _random_boxes(gen: torch.Generator, m: int, h: int, w: int) -> torch.Tensor:
    xy = torch.rand(m, 2, generator=gen) * torch.tensor([w, h])
    wh = torch.rand(m, 2, generator=gen) * torch.tensor([w, h]) * 0.5
    return torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h]))], dim=1)


def test_vectorised_equals_loop_on_random_boxes():
    gen = torch.Generator().manual_seed(3)
    sizes = [(100, 150), (90, 160), (100, 160)]
    # 0 boxes, 7 boxes, and 130 boxes (more than one 62-box bit plane)
    boxes = [_random_boxes(gen, m, h, w) for m, (h, w) in zip([0, 7, 130], sizes)]
    boxes[1] = torch.cat([boxes[1], (boxes[1] / 10).round() * 10])  # boxes on cell boundaries of some levels
    levels = [(13, 20), (7, 10), (4, 5), (2, 3)]
    for use_padded in (False, True):
        kw = {"batch_shape": (100, 160), "use_padded": use_padded}
        together = fgd_masks_levels(boxes, sizes, levels, **kw)
        for (h, w), (fg, bg) in zip(levels, together):
            fg_ref, bg_ref = fgd_masks_loop(boxes, sizes, (h, w), **kw)
            torch.testing.assert_close(fg, fg_ref, rtol=0, atol=0)
            torch.testing.assert_close(bg, bg_ref, rtol=0, atol=0)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="batch_shape"):
        fgd_masks([_boxes((0, 0, 8, 8))], [IMG], HW, use_padded=True)
    with pytest.raises(ValueError, match="image 0 .* \\(3,\\)"):
        fgd_masks([torch.zeros(3)], [IMG], HW)
    with pytest.raises(ValueError, match="2 box tensors but 1 image sizes"):
        fgd_masks([_boxes(), _boxes()], [IMG], HW)


def test_inverted_box_paints_nothing_like_the_reference():
    fg, bg = _both([_boxes((100, 60, 20, 10), (0, 0, 16, 16))], [IMG], HW)
    expected = torch.zeros(4, 8)
    expected[0:2, 0:2] = 1 / 4
    torch.testing.assert_close(fg[0], expected)
