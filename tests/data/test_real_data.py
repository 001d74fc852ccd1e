"""Every folder of ../shared/data read through our readers, checked against the shipped stats.json files.

Counts in stats.json are those of the COCO conversion, which kept the two zero-size BCCD boxes as 1x1 boxes
(BloodImage_00343 in train, BloodImage_00338 in val). Our readers drop them (degenerate, see detkd/data/common.py),
so the expected BCCD box counts below are "stats.json minus the json's 1x1 boxes", computed from the raw json.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from detkd.data import BCCD_CLASSES, CocoDetection, VocDetection, YoloDetection, dataset_stats, open_dataset

SPLITS = ["train", "val", "test"]


def _expected(stats: dict, split: str, ann_file) -> dict:
    """stats.json counts for ``split`` minus the boxes with a side <= 1 px in the raw json (the ones we drop)."""
    data = json.loads(ann_file.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    tiny = Counter(names[a["category_id"]] for a in data["annotations"] if min(a["bbox"][2:]) <= 1)
    s = stats["splits"][split]
    return {
        "images": s["images"],
        "boxes": s["boxes"] - sum(tiny.values()),
        "images_without_boxes": s["images_without_boxes"],
        "boxes_per_class": {k: v - tiny[k] for k, v in s["boxes_per_class"].items()},
        "dropped_degenerate": sum(tiny.values()),
    }


def _check(stats: dict, expected: dict, class_names: list[str]) -> None:
    assert stats["classes"] == class_names
    for key, value in expected.items():
        assert stats[key] == value, key


@pytest.mark.parametrize("split", SPLITS)
def test_bccd_voc_and_coco_match_stats_and_each_other(shared_data, split):
    stats = json.loads((shared_data / "bccd/coco/stats.json").read_text())
    ann_file = shared_data / f"bccd/coco/annotations_{split}.json"
    expected = _expected(stats, split, ann_file)
    voc = VocDetection(shared_data / "bccd/voc", split, class_names=BCCD_CLASSES)
    coco = CocoDetection(ann_file, shared_data / "bccd/voc/JPEGImages")
    assert stats["classes"] == BCCD_CLASSES == coco.class_names
    _check(dataset_stats(voc), expected, BCCD_CLASSES)
    _check(dataset_stats(coco), expected, BCCD_CLASSES)
    # same split, same images, same boxes (within 1 px) and labels, whichever format it is read from
    by_file = {coco.get_annotation(i)["file"]: coco.get_annotation(i) for i in range(len(coco))}
    for i in range(len(voc)):
        a = voc.get_annotation(i)
        b = by_file[a["file"]]
        assert torch.equal(a["labels"], b["labels"]), a["file"]
        assert a["boxes"].shape == b["boxes"].shape and torch.allclose(a["boxes"], b["boxes"], atol=1.0, rtol=0), a[
            "file"
        ]


def test_bccd_zero_size_boxes_are_dropped_and_named(shared_data):
    train = VocDetection(shared_data / "bccd/voc", "train", class_names=BCCD_CLASSES)
    val = VocDetection(shared_data / "bccd/voc", "val", class_names=BCCD_CLASSES)
    examples = train.report.dropped_examples + val.report.dropped_examples
    assert (train.report.dropped_degenerate, val.report.dropped_degenerate) == (1, 1)
    assert any(e.startswith("BloodImage_00343.xml") for e in examples)
    assert any(e.startswith("BloodImage_00338.xml") for e in examples)


def test_bccd_voc_default_class_order_is_sorted_over_all_files(shared_data):
    # Documented: without class_names the order is sorted -- not BCCD's COCO order, hence BCCD_CLASSES.
    ds = VocDetection(shared_data / "bccd/voc", "test")
    assert ds.class_names == ["Platelets", "RBC", "WBC"]


@pytest.mark.parametrize("split", SPLITS)
def test_thermal_yolo_and_coco_match_stats_and_each_other(shared_data, split):
    stats = json.loads((shared_data / "thermal/coco/stats.json").read_text())
    ann_file = shared_data / f"thermal/coco/annotations_{split}.json"
    expected = _expected(stats, split, ann_file)
    assert expected["dropped_degenerate"] == 0
    yolo = YoloDetection(shared_data / "thermal/yolo", split)
    coco = CocoDetection(ann_file, shared_data / "thermal/coco/images")
    _check(dataset_stats(yolo), expected, stats["classes"])
    _check(dataset_stats(coco), expected, stats["classes"])
    by_name = {coco.get_annotation(i)["file"].rsplit("/", 1)[1]: coco.get_annotation(i) for i in range(len(coco))}
    for i in range(len(yolo)):
        a = yolo.get_annotation(i)
        b = by_name[a["file"].rsplit("/", 1)[1]]
        assert torch.equal(a["labels"], b["labels"])
        assert a["boxes"].shape == b["boxes"].shape and torch.allclose(a["boxes"], b["boxes"], atol=0.01, rtol=0)


def test_thermal_file_names_with_spaces_decode(shared_data):
    ds = YoloDetection(shared_data / "thermal/yolo", "test")
    idx = next(i for i in range(len(ds)) if " " in ds.get_annotation(i)["file"])
    image, target = ds[idx]
    assert image.shape == (3, 416, 416) and 0.0 <= image.min() and image.max() <= 1.0
    assert target["boxes"].shape[1] == 4


def test_open_dataset_guesses_every_shared_layout(shared_data):
    voc = open_dataset(shared_data / "bccd/voc", split="val", class_names=BCCD_CLASSES)
    coco = open_dataset(shared_data / "bccd/coco", split="val")  # images found in ../voc/JPEGImages
    yolo = open_dataset(shared_data / "thermal/yolo", split="val")
    tcoco = open_dataset(shared_data / "thermal/coco/annotations_val.json")
    assert (type(voc), type(coco), type(yolo), type(tcoco)) == (
        VocDetection,
        CocoDetection,
        YoloDetection,
        CocoDetection,
    )
    assert coco.get_annotation(0)["file"].startswith(str(shared_data / "bccd/voc/JPEGImages"))
    assert coco[0][0].shape == (3, 480, 640)
