"""Box-aware transforms: boxes follow the pixels, randomness is reproducible from a seed."""

from __future__ import annotations

import torch

from detkd.config import DataConfig
from detkd.data.transforms import IMAGENET_MEAN, Compose, HorizontalFlip, Resize, ScaleJitter, build_transforms


def _painted(h: int, w: int, boxes: list[list[int]]) -> tuple[torch.Tensor, dict]:
    """Zero image with each integer box painted 1 (so the box can be recovered from the pixels)."""
    image = torch.zeros(3, h, w)
    for x0, y0, x1, y1 in boxes:
        image[:, y0:y1, x0:x1] = 1.0
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.arange(1, len(boxes) + 1),
    }
    target["image_id"] = 7
    return image, target


def _pixel_box(image: torch.Tensor) -> torch.Tensor:
    """xyxy box of the pixels brighter than 0.5 in channel 0 (continuous coordinates)."""
    ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_flip_moves_boxes_with_pixels():
    image, target = _painted(4, 6, [[1, 0, 3, 2]])  # off-centre box on a non-square image
    out, t = HorizontalFlip(p=1.0)(image, target)
    assert torch.equal(out, image.flip(-1))
    assert torch.equal(t["boxes"], torch.tensor([[3.0, 0, 5, 2]]))  # x1' = 6 - 3, x2' = 6 - 1
    assert torch.equal(_pixel_box(out), t["boxes"][0])
    assert t["labels"].tolist() == [1] and t["image_id"] == 7
    same, t0 = HorizontalFlip(p=0.0)(image, target)
    assert same is image and torch.equal(t0["boxes"], target["boxes"])


def test_resize_keeps_aspect_and_scales_boxes():
    image, target = _painted(20, 40, [[10, 4, 20, 16]])
    out, t = Resize(10)(image, target)  # shorter side 20 -> 10: scale 0.5
    assert out.shape == (3, 10, 20)
    assert torch.allclose(t["boxes"], torch.tensor([[5.0, 2, 10, 8]]))
    assert torch.allclose(_pixel_box(out), t["boxes"][0], atol=1)
    out, t = Resize(30, max_size=50)(image, target)  # 30 / 20 = 1.5 would make 60 > 50: capped at 50 / 40
    assert out.shape == (3, 25, 50)
    assert torch.allclose(t["boxes"], torch.tensor([[12.5, 5, 25, 20]]))


def test_scale_jitter_up_crops_and_boxes_follow():
    image, target = _painted(10, 12, [[3, 2, 7, 6]])
    for seed in range(5):
        out, t = ScaleJitter((2.0, 2.0), generator=torch.Generator().manual_seed(seed))(image, target)
        assert out.shape == (3, 10, 12)  # canvas size kept
        # scaled to [6, 4, 14, 12] on a 20x24 canvas, then cropped at (dx, dy) in [0, 12] x [0, 10]
        box = t["boxes"][0]
        assert torch.allclose(_pixel_box(out), box, atol=1)
        dx, dy = 6 - box[0], 4 - box[1]
        if box[0] > 0 and box[1] > 0 and box[2] < 12 and box[3] < 10:  # not clipped: full 8x8 size
            assert torch.allclose(box, torch.tensor([6 - dx, 4 - dy, 14 - dx, 12 - dy]))


def test_scale_jitter_down_pads_with_mean_and_shifts_boxes():
    image, target = _painted(10, 10, [[2, 2, 6, 6]])
    out, t = ScaleJitter((0.5, 0.5), generator=torch.Generator().manual_seed(0))(image, target)
    assert out.shape == (3, 10, 10)
    # content 5x5 at a random offset, the other 75 pixels are the ImageNet-mean fill
    assert int((out == torch.tensor(IMAGENET_MEAN)[:, None, None]).all(0).sum()) == 75
    box = t["boxes"][0]
    assert torch.allclose(box[2:] - box[:2], torch.tensor([2.0, 2.0]))  # 4 px -> 2 px
    assert torch.allclose(_pixel_box(out), box)


def test_scale_jitter_drops_cropped_out_boxes_with_their_labels():
    image, target = _painted(10, 10, [[0, 0, 1, 1], [8, 8, 10, 10]])
    kept = []
    for seed in range(20):
        _, t = ScaleJitter((3.0, 3.0), generator=torch.Generator().manual_seed(seed))(image, target)
        assert len(t["boxes"]) == len(t["labels"])
        w = t["boxes"][:, 2] - t["boxes"][:, 0]
        assert (w > 1).all()
        kept.append(len(t["boxes"]))
    assert min(kept) < 2  # a 30x30 canvas cropped to 10x10 cannot keep both corners


def test_same_seed_same_output_different_seed_differs():
    image, target = _painted(16, 24, [[3, 4, 9, 12]])

    def run(seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        t = Compose([ScaleJitter((0.6, 1.5), generator=g), HorizontalFlip(0.5, generator=g)])
        return [t(image, target)[1]["boxes"] for _ in range(6)]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))


def test_build_transforms_from_config():
    assert build_transforms(DataConfig(), train=False) is None
    assert build_transforms(DataConfig(hflip=0.0), train=True) is None
    t = build_transforms(DataConfig(hflip=0.5, scale_jitter=[0.8, 1.2]), train=True)
    assert [type(s) for s in t.transforms] == [ScaleJitter, HorizontalFlip]
