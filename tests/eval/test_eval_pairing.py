"""Evaluation pairs each prediction with the ground truth of the image the model saw: a ``skip_bad_images`` dataset
serves another image in place of one it cannot decode, and that item must be left out, not scored against the wrong
ground truth (nor the substitute scored twice)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from detkd.data import CocoDetection
from detkd.eval import evaluate

# (width, height) of each good image -> its one box (xyxy) and label; the fake model recognises images by their size
TRUTH = {
    (64, 48): ([4.0, 6.0, 30.0, 40.0], 1),
    (80, 40): ([40.0, 5.0, 70.0, 35.0], 2),
    (96, 32): ([2.0, 2.0, 20.0, 30.0], 1),
}


class SizeOracle(nn.Module):
    """Predicts the true box of each (good) image, found through the image size."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        out = []
        for img in images:
            box, label = TRUTH[(img.shape[-1], img.shape[-2])]
            out.append({"boxes": torch.tensor([box]), "scores": torch.tensor([0.9]),
                        "labels": torch.tensor([label])})
        return out


def _coco_with_a_truncated_first_image(tmp_path):
    """cut.jpg (item 0, its own box) cannot be decoded; the dataset serves good0.png in its place."""
    root = tmp_path / "img"
    root.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, size=(192, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "cut.jpg")
    data = (root / "cut.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])  # header intact, scan data cut
    images = [{"id": 1, "file_name": "cut.jpg", "width": 256, "height": 192}]
    anns = [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [100.0, 100.0, 50.0, 50.0]}]
    for k, ((w, h), (box, label)) in enumerate(TRUTH.items()):
        Image.new("RGB", (w, h), (40 * k, 90, 200)).save(root / f"good{k}.png")
        images.append({"id": k + 2, "file_name": f"good{k}.png", "width": w, "height": h})
        x0, y0, x1, y1 = box
        anns.append({"id": k + 2, "image_id": k + 2, "category_id": label, "bbox": [x0, y0, x1 - x0, y1 - y0]})
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return ann_file, root


def test_an_image_that_cannot_be_decoded_is_left_out_with_a_warning(tmp_path):
    ds = CocoDetection(*_coco_with_a_truncated_first_image(tmp_path), skip_bad_images=True)
    assert ds[0][1]["image_id"] == 2 and ds.get_annotation(0)["image_id"] == 1  # the substitution being guarded
    with pytest.warns(UserWarning, match=r"evaluation: 1 image\(s\) could not be decoded .*cut\.jpg"):
        m = evaluate(SizeOracle(), ds, batch_size=2, device="cpu")
    # scored on the three decodable images, each once with its own ground truth: a perfect model scores 1
    assert m["AP"] == pytest.approx(1.0) and m["AR100"] == pytest.approx(1.0)


class _Swapped:
    """Item 0's sample is image 11 while its annotation is image 10, without skip_bad_images: an inconsistent
    dataset that must not be scored."""

    num_classes = 2
    skip_bad_images = False

    def __len__(self):
        return 2

    def get_annotation(self, i):
        return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 10 + i,
                "file": f"img{i}.png"}

    def __getitem__(self, i):
        return torch.zeros(3, 48, 64), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0), "image_id": 11}


def test_a_sample_of_another_image_without_skip_bad_images_is_an_error():
    with pytest.raises(ValueError, match=r"dataset item 0 \(img0\.png\): the sample is image 11 but its annotation "
                                         r"is image 10"):
        evaluate(SizeOracle(), _Swapped(), batch_size=2, device="cpu")
