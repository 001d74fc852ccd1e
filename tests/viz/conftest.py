"""Fixtures of the viz tests: tiny GFL student/teacher outputs on a non-square batch, and a PNG checker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from detkd.models import build
from detkd.models.adapters import build_adapter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_model(family: str = "gfl", fpn: int = 16, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build(family, backbone="resnet18", num_classes=3, fpn_channels=fpn, head_convs=1, min_size=64,
                 max_size=96).eval()


@pytest.fixture(scope="module")
def gfl_pair():
    """Student (FPN 16) and teacher (FPN 32) outputs on one padded batch: image 0 is 64x96 (no resize, no padding)
    with two off-centre boxes, image 1 is 48x64 (resized to 64x85, padded to 64x96) without boxes."""
    student, teacher = tiny_model(fpn=16, seed=0), tiny_model(fpn=32, seed=1)
    s_ad, t_ad = build_adapter(student), build_adapter(teacher)
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 96, generator=gen), torch.rand(3, 48, 64, generator=gen)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [50.0, 10.0, 90.0, 30.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    with torch.no_grad():
        batch = s_ad.preprocess(images, targets)
        s_out, t_out = s_ad.run(batch, "loss"), t_ad.run(batch, "head")
    return {"student": s_out, "teacher": t_out, "s_specs": s_ad.feature_specs(), "t_specs": t_ad.feature_specs()}


def assert_png(path: Path, min_bytes: int = 10_000) -> np.ndarray:
    """A real, non-trivial PNG: the signature, a size, and pixels that are not all one colour. Returns the pixels."""
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    assert path.stat().st_size > min_bytes, (path, path.stat().st_size)
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200, pixels.shape
    assert float(pixels[..., :3].std()) > 0.05, path
    return pixels


@pytest.fixture
def png_ok():
    """``png_ok(path)`` asserts a valid, non-trivial PNG (see ``assert_png``)."""
    return assert_png
