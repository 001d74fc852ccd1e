"""dataset_stats counts by hand, format guessing, the rich table, and build_dataset's dispatch on DataConfig."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from detkd.config import DataConfig, SynthConfig
from detkd.data import (
    CocoDetection,
    DatasetError,
    VocDetection,
    YoloDetection,
    build_dataset,
    dataset_stats,
    format_stats_table,
    open_dataset,
)
from detkd.data.stats import guess_format
from detkd.data.transforms import HorizontalFlip


def _sized_coco(tmp_path, files):
    """Image 1 (120x100): boxes of area 10*10 (small), 40*40 (medium), 100*100 (large); image 2: none."""
    images = [
        {"id": 1, "file_name": "a.png", "width": 120, "height": 100},
        {"id": 2, "file_name": "b.png", "width": 50, "height": 40},
    ]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [10, 10, 40, 40]},
        {"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 0, 100, 100]},
        {"id": 4, "image_id": 1, "category_id": 2, "bbox": [5, 5, 0.5, 9]},  # degenerate
    ]
    files.image(tmp_path / "coco" / "images" / "a.png", 120, 100)
    files.image(tmp_path / "coco" / "images" / "b.png", 50, 40)
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    return files.coco(tmp_path / "coco" / "annotations_train.json", images, anns, cats)


def test_dataset_stats_hand_counts(tmp_path, files):
    ds = CocoDetection(_sized_coco(tmp_path, files), tmp_path / "coco" / "images")
    stats = dataset_stats(ds)
    assert stats["images"] == 2 and stats["boxes"] == 3 and stats["classes"] == ["cat", "dog"]
    assert stats["boxes_per_class"] == {"cat": 1, "dog": 2}
    assert stats["images_without_boxes"] == 1
    assert stats["box_size_histogram"] == {"small": 1, "medium": 1, "large": 1}
    assert stats["median_box_area"] == 1600.0 and stats["dropped_degenerate"] == 1
    assert stats["image_sizes"] == {"120x100": 1, "50x40": 1}
    out = io.StringIO()
    Console(file=out, width=100).print(format_stats_table(stats, title="tiny"))
    text = out.getvalue()
    for needle in ("tiny", "cat", "dog", "small", "dropped degenerate boxes", "120x100 (1)"):
        assert needle in text


def test_guess_format_and_open_dataset(tmp_path, files):
    ann = _sized_coco(tmp_path, files)
    voc = files.voc(tmp_path / "voc", "train", {"im": (20, 10, [("x", (1, 1, 5, 5))])})
    yolo = files.yolo(tmp_path / "yolo", ["a"], {"i.png": (8, 8, "0 0.5 0.5 0.5 0.5\n")})
    assert [guess_format(p) for p in (ann, tmp_path / "coco", voc, yolo, yolo / "data.yaml")] == [
        "coco",
        "coco",
        "voc",
        "yolo",
        "yolo",
    ]
    assert isinstance(open_dataset(tmp_path / "coco"), CocoDetection)
    assert isinstance(open_dataset(voc), VocDetection) and isinstance(open_dataset(yolo), YoloDetection)
    with pytest.raises(DatasetError, match="cannot tell the dataset format"):
        open_dataset(tmp_path / "coco" / "images")
    with pytest.raises(DatasetError, match="not found"):
        open_dataset(tmp_path / "nowhere")


def test_coco_image_root_guessed_in_a_sibling_folder(tmp_path, files):
    # BCCD layout: coco/annotations_val.json with its images in ../voc/JPEGImages
    files.image(tmp_path / "voc" / "JPEGImages" / "p.png", 8, 8)
    images = [{"id": 1, "file_name": "p.png", "width": 8, "height": 8}]
    files.coco(tmp_path / "coco" / "annotations_val.json", images, [], [{"id": 1, "name": "a"}])
    ds = open_dataset(tmp_path / "coco", split="val")
    assert ds.get_annotation(0)["file"] == str(tmp_path / "voc" / "JPEGImages" / "p.png")
    (tmp_path / "voc" / "JPEGImages" / "p.png").unlink()
    with pytest.raises(DatasetError, match="cannot find image 'p.png'.*pass image_root"):
        open_dataset(tmp_path / "coco", split="val")


def test_build_dataset_dispatch(tmp_path, files):
    synth = DataConfig(root=str(tmp_path / "syn"), synthetic=SynthConfig(num_train=3, num_val=2, image_size=64))
    train = build_dataset(synth, "train", train=True)
    val = build_dataset(synth, "val", train=False)
    assert (len(train), len(val)) == (3, 2) and (tmp_path / "syn" / "meta.json").is_file()
    assert isinstance(train.transforms.transforms[0], HorizontalFlip) and val.transforms is None
    _sized_coco(tmp_path, files)
    coco = DataConfig(
        format="coco", root=str(tmp_path / "coco"), ann_file=str(tmp_path / "coco" / "annotations_{split}.json")
    )
    assert build_dataset(coco, "train", train=False).num_classes == 2
    voc = files.voc(tmp_path / "voc", "val", {"im": (20, 10, [("x", (1, 1, 5, 5))])})
    assert len(build_dataset(DataConfig(format="voc", root=str(voc)), "val", train=False)) == 1
    with pytest.raises(DatasetError, match="data.format: unknown format 'kitti'"):
        build_dataset(DataConfig(format="kitti"), "train", train=False)
