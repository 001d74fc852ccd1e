"""COCO / VOC / YOLO readers on tiny hand-written files: boxes, labels, clipping, degenerate boxes, negatives."""

from __future__ import annotations

import pytest
import torch

from detkd.data import CocoDetection, DatasetError, VocDetection, YoloDetection


def _coco(tmp_path, files, anns, extra_images=()):
    # Category ids 7 and 3 (out of order, with gaps): sorted by id -> "a" (id 3) is label 1, "b" (id 7) label 2.
    cats = [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]
    images = [{"id": 10, "file_name": "x y.png", "width": 40, "height": 30}, *extra_images]
    files.image(tmp_path / "img" / "x y.png", 40, 30)
    return files.coco(tmp_path / "ann.json", images, anns, cats)


def test_coco_boxes_labels_clip_drop_crowd(tmp_path, files):
    anns = [
        {"id": 11, "image_id": 10, "category_id": 7, "bbox": [5, 6, 10, 8], "iscrowd": 0},  # -> [5, 6, 15, 14]
        {"id": 12, "image_id": 10, "category_id": 3, "bbox": [30, 20, 20, 20]},  # [30,20,50,40] clipped to 40x30
        {"id": 13, "image_id": 10, "category_id": 3, "bbox": [10, 10, 0, 5]},  # zero width: dropped
        {"id": 14, "image_id": 10, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 1},  # crowd: ignored
    ]
    files.image(tmp_path / "img" / "empty.png", 20, 10)
    empty = {"id": 11, "file_name": "empty.png", "width": 20, "height": 10}
    ds = CocoDetection(_coco(tmp_path, files, anns, [empty]), tmp_path / "img")
    assert ds.class_names == ["a", "b"] and ds.num_classes == 2 and len(ds) == 2
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert torch.allclose(image, torch.full_like(image, 51 / 255))
    assert torch.equal(target["boxes"], torch.tensor([[5.0, 6, 15, 14], [30, 20, 40, 30]]))
    assert torch.equal(target["labels"], torch.tensor([2, 1]))
    assert target["labels"].dtype == torch.int64 and target["image_id"] == 10
    assert (ds.report.images, ds.report.boxes, ds.report.clipped) == (2, 2, 1)
    assert (ds.report.dropped_degenerate, ds.report.ignored_crowd) == (1, 1)
    assert "annotation id 13" in ds.report.dropped_examples[0]
    # the image without boxes is kept as a negative
    _, neg = ds[1]
    assert neg["boxes"].shape == (0, 4) and neg["labels"].shape == (0,)
    ann = ds.get_annotation(0)
    assert ann["file"].endswith("x y.png") and (ann["width"], ann["height"]) == (40, 30)


def test_coco_unknown_category_names_file_and_annotation(tmp_path, files):
    anns = [{"id": 99, "image_id": 10, "category_id": 5, "bbox": [1, 1, 5, 5]}]
    with pytest.raises(DatasetError, match=r"ann\.json: annotation id 99: unknown category_id 5"):
        CocoDetection(_coco(tmp_path, files, anns), tmp_path / "img")


def test_coco_bad_bbox_and_unknown_image(tmp_path, files):
    with pytest.raises(DatasetError, match="annotation id 4: bad bbox"):
        CocoDetection(_coco(tmp_path, files, [{"id": 4, "image_id": 10, "category_id": 3, "bbox": [1, 2]}]), tmp_path)
    with pytest.raises(DatasetError, match="annotation id 5 refers to unknown image 77"):
        CocoDetection(_coco(tmp_path, files, [{"id": 5, "image_id": 77, "category_id": 3, "bbox": [1, 2, 3, 4]}]), ".")


def test_voc_inclusive_convention_and_degenerate(tmp_path, files):
    objects = [
        ("cat", (6, 7, 15, 14)),  # 1-based inclusive -> [xmin - 1, ymin - 1, xmax, ymax] = [5, 6, 15, 14]
        ("dog", (31, 21, 45, 30)),  # right edge beyond the 40 px image -> clipped to 40
        ("cat", (20, 10, 20, 10)),  # xmin == xmax, ymin == ymax: zero extent -> dropped (1 px after conversion)
    ]
    root = files.voc(tmp_path / "voc", "train", {"im1": (40, 30, objects), "im2": (40, 30, [])})
    ds = VocDetection(root, "train")
    assert ds.class_names == ["cat", "dog"]  # default: sorted names over all Annotations/*.xml
    _, target = ds[0]
    assert torch.equal(target["boxes"], torch.tensor([[5.0, 6, 15, 14], [30, 20, 40, 30]]))
    assert torch.equal(target["labels"], torch.tensor([1, 2]))
    assert (ds.report.clipped, ds.report.dropped_degenerate) == (1, 1)
    assert ds.report.dropped_examples == ["im1.xml object 2"]
    assert ds[1][1]["boxes"].shape == (0, 4)
    # strict rule (w, h <= 0 only) keeps the 1-px box
    assert VocDetection(root, "train", degenerate_side=0).report.boxes == 3


def test_voc_explicit_class_order_and_unknown_name(tmp_path, files):
    root = files.voc(tmp_path / "voc", "val", {"im1": (40, 30, [("cat", (1, 1, 10, 10)), ("dog", (2, 2, 9, 9))])})
    ds = VocDetection(root, "val", class_names=["dog", "cat"])
    assert ds.get_annotation(0)["labels"].tolist() == [2, 1]
    with pytest.raises(DatasetError, match=r"im1\.xml object 1: unknown class 'dog'"):
        VocDetection(root, "val", class_names=["cat"])
    with pytest.raises(DatasetError, match="split file not found"):
        VocDetection(root, "test")


def test_voc_names_file_sets_order(tmp_path, files):
    root = files.voc(tmp_path / "voc", "train", {"im1": (40, 30, [("cat", (1, 1, 10, 10))])})
    (root / "classes.txt").write_text("zebra\ncat\n")
    assert VocDetection(root, "train").class_names == ["zebra", "cat"]


def test_yolo_normalised_boxes_spaces_and_missing_labels(tmp_path, files):
    items = {
        "img one.png": (40, 20, "1 0.5 0.5 0.25 0.5\n\n0 0.95 0.5 0.2 0.2\n"),
        "no labels.png": (40, 20, None),  # missing label file: a negative image
        "empty.png": (40, 20, ""),
    }
    ds = YoloDetection(files.yolo(tmp_path / "y", ["a", "b"], items), "train")
    assert ds.class_names == ["a", "b"] and len(ds) == 3
    names = [ds.get_annotation(i)["file"].rsplit("/", 1)[1] for i in range(3)]
    assert names == ["empty.png", "img one.png", "no labels.png"]
    # line 1: cx 20, cy 10, w 10, h 10 -> [15, 5, 25, 15]; line 3: cx 38, w 8 -> [34, 8, 42, 12] clipped at x = 40
    ann = ds.get_annotation(1)
    assert torch.allclose(ann["boxes"], torch.tensor([[15.0, 5, 25, 15], [34, 8, 40, 12]]))
    assert ann["labels"].tolist() == [2, 1]
    assert ds.report.clipped == 1 and ds.get_annotation(0)["boxes"].shape == (0, 4)
    assert ds.get_annotation(2)["boxes"].shape == (0, 4)
    assert ds[1][0].shape == (3, 20, 40)


def test_yolo_polygon_line_is_its_bounding_box(tmp_path, files):
    root = files.yolo(tmp_path / "y", ["a"], {"p.png": (40, 20, "0 0.1 0.2 0.5 0.1 0.3 0.9\n")})
    # x in {0.1, 0.5, 0.3} * 40, y in {0.2, 0.1, 0.9} * 20 -> [4, 2, 20, 18]
    assert torch.allclose(YoloDetection(root, "train").get_annotation(0)["boxes"], torch.tensor([[4.0, 2, 20, 18]]))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0 0.5 0.5 0.1 0.1\n2 0.5 0.5 0.1 0.1\n", r"train/labels/a\.txt line 2: class index 2 out of range 0\.\.1"),
        ("0 0.5 0.5 0.1\n", r"train/labels/a\.txt line 1: expected 'class cx cy w h'"),
        ("dog 0.5 0.5 0.1 0.1\n", r"train/labels/a\.txt line 1: not numbers"),
        ("0 nan 0.5 0.1 0.1\n", r"a\.txt line 1: non-finite"),
    ],
)
def test_yolo_bad_lines_name_file_and_line(tmp_path, files, text, message):
    root = files.yolo(tmp_path / "y", ["a", "b"], {"a.png": (40, 20, text)})
    with pytest.raises(DatasetError, match=message):
        YoloDetection(root, "train")


def test_yolo_split_resolution(tmp_path, files):
    # data.yaml says "../valid/images" for val (Roboflow style) and has no test key: both resolve under root
    root = files.yolo(tmp_path / "y", ["a"], {"v.png": (8, 8, "0 0.5 0.5 0.5 0.5\n")}, folder="valid")
    files.image(root / "test" / "images" / "t.png", 8, 8)
    (root / "test" / "labels").mkdir()  # no label file for t.png (a negative), but the folder must exist
    assert len(YoloDetection(root, "val")) == 1 and len(YoloDetection(root, "test")) == 1
    with pytest.raises(DatasetError, match="train"):
        YoloDetection(root, "train")
