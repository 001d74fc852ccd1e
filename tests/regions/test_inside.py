import pytest
import torch

from detkd.regions.inside import inside_masks


def _naive(box, batch_shape, feat_hw):
    """Point-by-point reading of the rule: scale, integer grid points, |coord - centre| / size <= 0.5."""
    h, w = batch_shape
    fh, fw = feat_hw
    x1, y1, x2, y2 = box[0] * fw / w, box[1] * fh / h, box[2] * fw / w, box[3] * fh / h
    out = torch.zeros(fh, fw, dtype=torch.bool)
    for i in range(fh):
        for j in range(fw):
            dy = abs(i - (y1 + y2) / 2) / (y2 - y1)
            dx = abs(j - (x1 + x2) / 2) / (x2 - x1)
            out[i, j] = dy <= 0.5 and dx <= 0.5
    return out


def test_hand_case_non_square_map_off_centre_box():
    # padded batch (h, w) = (64, 96), level (4, 12): x scales by 12/96 = 1/8, y by 4/64 = 1/16
    # box [16, 8, 56, 40] -> x [2, 7] (cx 4.5, w 5): |j - 4.5| <= 2.5 -> j = 2..7
    #                        y [0.5, 2.5] (cy 1.5, h 2): |i - 1.5| <= 1 -> i = 1, 2
    m = inside_masks(torch.tensor([[16.0, 8.0, 56.0, 40.0]]), (64, 96), (4, 12))
    expected = torch.zeros(1, 4, 12, dtype=torch.bool)
    expected[0, 1:3, 2:8] = True
    assert m.shape == (1, 4, 12) and m.dtype == torch.bool
    assert torch.equal(m, expected)


def test_boundary_is_inclusive_and_has_no_half_pixel_offset():
    # LGD's dummy box [0, 0, 1, 1] on a 64 -> 8 level: [0, 0, 0.125, 0.125], centre 0.0625, size 0.125
    # grid point 0: |0 - 0.0625| / 0.125 = 0.5 <= 0.5 -> inside; point 1: 7.5 -> outside
    m = inside_masks(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), (64, 64), (8, 8))
    assert m[0, 0, 0] and m.sum() == 1


def test_box_covering_no_grid_point():
    # 64 -> 2 (stride 32): [10, 10, 20, 20] -> [0.3125, 0.3125, 0.625, 0.625], centre 0.46875, size 0.3125
    # |0 - 0.46875| / 0.3125 = 1.5 and |1 - 0.46875| / 0.3125 = 1.7: both > 0.5
    m = inside_masks(torch.tensor([[10.0, 10.0, 20.0, 20.0]]), (64, 64), (2, 2))
    assert not m.any()


def test_degenerate_box_covers_nothing():
    m = inside_masks(torch.tensor([[30.0, 10.0, 30.0, 50.0], [8.0, 8.0, 8.0, 8.0]]), (64, 64), (8, 8))
    assert not m.any()


def test_whole_image_box_covers_every_point():
    # clamped context box [0, 0, w - 1, h - 1] = [0, 0, 95, 63] on (4, 6): x [0, 5.9375] (cx 2.97, w 5.94) covers
    # j = 0..5; y [0, 3.9375] covers i = 0..3
    m = inside_masks(torch.tensor([[0.0, 0.0, 95.0, 63.0], [0.0, 0.0, 96.0, 64.0]]), (64, 96), (4, 6))
    assert m.all()


def test_matches_naive_loop_on_many_boxes():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(30, 2, generator=g) * torch.tensor([90.0, 50.0])
    wh = torch.rand(30, 2, generator=g) * 40 + 1
    boxes = torch.cat([xy, xy + wh], dim=1)
    for feat_hw in [(7, 12), (4, 6), (2, 3), (1, 1)]:
        m = inside_masks(boxes, (56, 96), feat_hw)
        for b in range(len(boxes)):
            assert torch.equal(m[b], _naive(boxes[b].tolist(), (56, 96), feat_hw)), (feat_hw, b)


def test_empty_box_tensor_and_bad_shape():
    assert inside_masks(torch.zeros(0, 4), (32, 32), (4, 4)).shape == (0, 4, 4)
    with pytest.raises(ValueError, match="boxes must be"):
        inside_masks(torch.zeros(4), (32, 32), (4, 4))
