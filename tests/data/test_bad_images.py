"""Missing, unreadable and corrupt images: clear errors naming the file, or counted skips with one summary line."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from detkd.data import CocoDetection, DatasetError, VocDetection, YoloDetection


def _coco_three(tmp_path, files):
    """good.png (valid), gone.png (missing), junk.png (not an image), each with one box."""
    files.image(tmp_path / "img" / "good.png", 16, 12)
    (tmp_path / "img" / "junk.png").write_bytes(b"this is not a png")
    images = [
        {"id": i + 1, "file_name": n, "width": 16, "height": 12}
        for i, n in enumerate(["good.png", "gone.png", "junk.png"])
    ]
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [1, 1, 4, 4]} for i in range(3)]
    return files.coco(tmp_path / "ann.json", images, anns, [{"id": 1, "name": "a"}])


def test_missing_image_raises_at_construction_naming_file(tmp_path, files):
    with pytest.raises(DatasetError, match=r"gone\.png \(missing\)"):
        CocoDetection(_coco_three(tmp_path, files), tmp_path / "img")


def test_skip_bad_images_counts_and_logs_one_line(tmp_path, files, caplog):
    with caplog.at_level(logging.WARNING, logger="detkd.data"):
        ds = CocoDetection(_coco_three(tmp_path, files), tmp_path / "img", skip_bad_images=True)
    assert len(ds) == 1 and ds.report.images == 1 and ds.report.boxes == 1
    assert ds.report.skipped_images[0] == "gone.png (missing)"
    assert ds.report.skipped_images[1].startswith("junk.png (unreadable")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert len(lines) == 1 and lines[0].startswith("skipped 2 bad images: gone.png (missing), junk.png (unreadable")
    assert ds[0][0].shape == (3, 12, 16)


def test_corrupt_image_raises_at_getitem_naming_file(tmp_path, files):
    files.image(tmp_path / "img" / "good.png", 16, 12)
    (tmp_path / "img" / "junk.png").write_bytes(b"this is not a png")
    images = [{"id": 1, "file_name": "junk.png", "width": 16, "height": 12}]
    ds = CocoDetection(files.coco(tmp_path / "a.json", images, [], [{"id": 1, "name": "a"}]), tmp_path / "img")
    with pytest.raises(DatasetError, match=r"junk\.png: cannot decode image"):
        ds[0]


def test_truncated_image_skipped_at_getitem_when_asked(tmp_path, files):
    good = files.image(tmp_path / "img" / "good.png", 16, 12)
    noise = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "img" / "cut.jpg")  # noise: the scan data dwarfs the header
    data = (tmp_path / "img" / "cut.jpg").read_bytes()
    (tmp_path / "img" / "cut.jpg").write_bytes(data[: len(data) // 2])  # header intact, scan data cut
    images = [
        {"id": 1, "file_name": "cut.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": good.name, "width": 16, "height": 12},
    ]
    ann = files.coco(tmp_path / "a.json", images, [], [{"id": 1, "name": "a"}])
    with pytest.raises(DatasetError, match=r"cut\.jpg: cannot decode"):
        CocoDetection(ann, tmp_path / "img")[0]
    ds = CocoDetection(ann, tmp_path / "img", skip_bad_images=True)
    assert len(ds) == 2  # the header check passes; the decode fails later
    image, target = ds[0]  # served the next good image instead
    assert target["image_id"] == 2 and image.shape == (3, 12, 16)
    assert ds.report.skipped_images == ["cut.jpg (corrupt)"]


def test_annotated_size_must_match_decoded(tmp_path, files):
    files.image(tmp_path / "img" / "a.png", 20, 20)
    images = [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}]
    ds = CocoDetection(files.coco(tmp_path / "a.json", images, [], [{"id": 1, "name": "a"}]), tmp_path / "img")
    with pytest.raises(DatasetError, match=r"a\.png: decoded size 20x20 differs from the annotated 40x30"):
        ds[0]
    skipping = CocoDetection(tmp_path / "a.json", tmp_path / "img", skip_bad_images=True)
    with pytest.raises(DatasetError, match="differs from the annotated"):  # an annotation problem: never skipped
        skipping[0]


def test_voc_missing_image_and_skip(tmp_path, files):
    root = files.voc(tmp_path / "voc", "train", {"a": (16, 12, [("x", (1, 1, 5, 5))]), "b": (16, 12, [])})
    (root / "JPEGImages" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"b\.png \(missing\)"):
        VocDetection(root, "train")
    ds = VocDetection(root, "train", skip_bad_images=True)
    assert len(ds) == 1 and ds.report.skipped_images == ["b.png (missing)"]


def test_yolo_unreadable_image_raises_or_is_skipped(tmp_path, files):
    root = files.yolo(tmp_path / "y", ["a"], {"ok.png": (8, 8, "0 0.5 0.5 0.5 0.5\n")})
    (root / "train" / "images" / "bad.jpg").write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(DatasetError, match=r"bad\.jpg: unreadable image"):
        YoloDetection(root, "train")
    ds = YoloDetection(root, "train", skip_bad_images=True)
    assert len(ds) == 1 and ds.report.skipped_images[0].startswith("bad.jpg (unreadable")
