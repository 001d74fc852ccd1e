"""Malformed annotations: duplicate ids and names, wrong types, stale file names, misnamed folders, non-UTF-8 text.

Each is a DatasetError naming the file and the record (never a silent merge, relabelling or empty dataset).
"""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from detkd.data import (
    CocoDetection,
    DatasetError,
    VocDetection,
    YoloDetection,
    dataset_stats,
    format_stats_table,
)

CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


def _image(file_name="a.png", image_id=1):
    return {"id": image_id, "file_name": file_name, "width": 40, "height": 30}


def _coco(tmp_path, files, images, annotations=(), categories=CATS):
    for img in images:
        if isinstance(img, dict) and isinstance(img.get("file_name"), str):
            files.image(tmp_path / "img" / img["file_name"], 40, 30)
    return files.coco(tmp_path / "ann.json", images, list(annotations), categories)


# --- COCO ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("second", ["b.png", "a.png"])  # another image with the same id; the same entry twice
def test_coco_duplicate_image_id(tmp_path, files, second):
    anns = [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]}]
    ann_file = _coco(tmp_path, files, [_image("a.png"), _image(second)], anns)
    with pytest.raises(DatasetError, match=rf"ann\.json: image id 1 used twice \('a\.png' and '{second}'\)"):
        CocoDetection(ann_file, tmp_path / "img")


@pytest.mark.parametrize(
    ("categories", "message"),
    [
        (CATS + [{"id": 2, "name": "wolf"}], r"ann\.json: category id 2 used twice \('dog' and 'wolf'\)"),
        (
            [{"id": 1, "name": "cat"}, {"id": 2, "name": "cat"}],
            r"ann\.json: category name 'cat' used twice \(ids 1 and 2\)",
        ),
    ],
)
def test_coco_duplicate_category_id_or_name(tmp_path, files, categories, message):
    anns = [{"id": 7, "image_id": 1, "category_id": 2, "bbox": [2, 2, 10, 10]}]
    with pytest.raises(DatasetError, match=message):
        CocoDetection(_coco(tmp_path, files, [_image()], anns, categories), tmp_path / "img")


@pytest.mark.parametrize(
    ("images", "categories", "message"),
    [
        ([_image()], [{"id": 1}], r"categories\[0\] \(category id 1\): 'name' must be a string, got None"),
        ([_image()], [{"id": 1, "name": "cat"}, {"id": "2", "name": "dog"}], r"categories\[1\]: 'id' must be an int"),
        ([_image(), _image("b.png", "2")], CATS, r"images\[1\]: 'id' must be an integer, got '2'"),
        ([{"id": 1, "width": 40, "height": 30}], CATS, r"images\[0\] \(image id 1\): 'file_name' must be a string"),
        ([["a.png", 1]], CATS, r"images\[0\] is a json list, not an object"),
    ],
)
def test_coco_malformed_entries_name_file_and_index(tmp_path, files, images, categories, message):
    with pytest.raises(DatasetError, match=r"ann\.json: " + message):
        CocoDetection(_coco(tmp_path, files, images, [], categories), tmp_path / "img")


def test_coco_malformed_top_level_and_annotation(tmp_path, files):
    (tmp_path / "list.json").write_text(json.dumps([_image()]))
    with pytest.raises(DatasetError, match=r"list\.json: top level is a json list, not an object"):
        CocoDetection(tmp_path / "list.json", tmp_path)
    with pytest.raises(DatasetError, match=r"ann\.json: annotations\[0\] is a json str, not an object"):
        CocoDetection(_coco(tmp_path, files, [_image()], ["oops"]), tmp_path / "img")


@pytest.mark.parametrize("crowd", ["0", 2, 0.5, None])
def test_coco_iscrowd_must_be_0_or_1(tmp_path, files, crowd):
    anns = [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "iscrowd": crowd}]
    with pytest.raises(DatasetError, match=rf"ann\.json: annotation id 7: iscrowd must be 0 or 1, got {crowd!r}"):
        CocoDetection(_coco(tmp_path, files, [_image()], anns), tmp_path / "img")


def test_coco_iscrowd_bool_accepted(tmp_path, files):
    anns = [
        {"id": 7, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "iscrowd": False},
        {"id": 8, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "iscrowd": True},
    ]
    ds = CocoDetection(_coco(tmp_path, files, [_image()], anns), tmp_path / "img")
    assert (ds.report.boxes, ds.report.ignored_crowd) == (1, 1)


def test_coco_latin1_json_names_file(tmp_path, files):
    files.image(tmp_path / "img" / "a.png", 40, 30)
    text = json.dumps({"images": [_image()], "annotations": [], "categories": [{"id": 1, "name": "café"}]})
    (tmp_path / "ann.json").write_bytes(text.replace("\\u00e9", "é").encode("latin-1"))
    with pytest.raises(DatasetError, match=r"ann\.json: not UTF-8 text"):
        CocoDetection(tmp_path / "ann.json", tmp_path / "img")


# --- VOC ----------------------------------------------------------------------------------------------------------


def test_voc_image_is_the_xml_stem_not_a_stale_filename(tmp_path, files):
    root = files.voc(tmp_path / "voc", "train", {"a": (40, 30, [("cat", (3, 3, 20, 20))]), "b": (40, 30, [])})
    xml = (root / "Annotations" / "a.xml").read_text()
    (root / "Annotations" / "a.xml").write_text(xml.replace("<filename>a.png", "<filename>b.png"))
    assert VocDetection(root, "train").get_annotation(0)["file"] == str(root / "JPEGImages" / "a.png")
    # <filename> is still the fallback when no JPEGImages/<id>.* exists
    (root / "JPEGImages" / "a.png").rename(root / "JPEGImages" / "renamed.png")
    (root / "Annotations" / "a.xml").write_text(xml.replace("<filename>a.png", "<filename>renamed.png"))
    assert VocDetection(root, "train").get_annotation(0)["file"] == str(root / "JPEGImages" / "renamed.png")


def test_voc_duplicate_class_names(tmp_path, files):
    root = files.voc(tmp_path / "voc", "train", {"a": (40, 30, [("cat", (3, 3, 20, 20))])})
    with pytest.raises(DatasetError, match=r"class_names: class name 'cat' listed twice \(classes 0 and 2\)"):
        VocDetection(root, "train", class_names=["cat", "dog", "cat"])
    (root / "classes.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(DatasetError, match=r"classes\.txt: class name 'cat' listed twice \(classes 0 and 2\)"):
        VocDetection(root, "train")


@pytest.mark.parametrize("name", ["classes.txt", "ImageSets/Main/train.txt"])
def test_voc_latin1_text_files_name_file(tmp_path, files, name):
    root = files.voc(tmp_path / "voc", "train", {"a": (40, 30, [("cat", (3, 3, 20, 20))])})
    (root / name).write_bytes("cat\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=rf"{name.split('/')[-1]}: not UTF-8 text"):
        VocDetection(root, "train")


# --- YOLO ---------------------------------------------------------------------------------------------------------


def _yolo(tmp_path, files, yaml_text, label="2 0.5 0.5 0.5 0.5\n"):
    root = files.yolo(tmp_path / "y", ["x"], {"a.png": (40, 20, label)})
    (root / "data.yaml").write_text(yaml_text)
    return root


def test_yolo_names_mapping_sorted_numerically(tmp_path, files):
    yaml_text = "names:\n" + "".join(f"  '{i}': c{i}\n" for i in range(11))
    ds = YoloDetection(_yolo(tmp_path, files, yaml_text), "train")
    assert ds.class_names == [f"c{i}" for i in range(11)]
    assert ds.class_names[ds.get_annotation(0)["labels"].item() - 1] == "c2"


def test_yolo_names_that_yaml_1_1_would_read_as_booleans_stay_names(tmp_path, files):
    ds = YoloDetection(_yolo(tmp_path, files, "names: [no, yes, off]\n"), "train")
    assert ds.class_names == ["no", "yes", "off"]


@pytest.mark.parametrize("names", ["{0: cat, 2: dog}", "{1: cat, 2: dog}", "{a: cat, b: dog}", "{0: cat, 1.5: dog}"])
def test_yolo_names_mapping_keys_must_be_0_to_n_minus_1(tmp_path, files, names):
    with pytest.raises(DatasetError, match=r"data\.yaml: 'names' keys must be the class indices 0\.\.1"):
        YoloDetection(_yolo(tmp_path, files, f"names: {names}\n"), "train")


@pytest.mark.parametrize("names", ["[cat, dog, cat]", "{0: cat, 1: dog, 2: cat}"])
def test_yolo_duplicate_names(tmp_path, files, names):
    with pytest.raises(DatasetError, match=r"data\.yaml: names: class name 'cat' listed twice \(classes 0 and 2\)"):
        YoloDetection(_yolo(tmp_path, files, f"names: {names}\n"), "train")


@pytest.mark.parametrize(("key", "value"), [("train", "[../elsewhere/images]"), ("train", "3"), ("path", "[a, b]")])
def test_yolo_split_path_must_be_a_string(tmp_path, files, key, value):
    with pytest.raises(DatasetError, match=rf"data\.yaml: {key}: expected one folder path"):
        YoloDetection(_yolo(tmp_path, files, f"{key}: {value}\nnames: [a, b, c]\n"), "train")


def test_yolo_missing_labels_folder_is_an_error(tmp_path, files):
    root = files.yolo(tmp_path / "y", ["a"], {"a.png": (40, 20, "0 0.5 0.5 0.5 0.5\n")})
    (root / "train" / "labels").rename(root / "train" / "Labels")
    with pytest.raises(DatasetError, match=r"train/images: labels folder .*train/labels not found"):
        YoloDetection(root, "train")


def test_yolo_missing_label_files_are_counted(tmp_path, files):
    items = {"a.png": (40, 20, "0 0.5 0.5 0.5 0.5\n"), "b.png": (40, 20, None), "c.png": (40, 20, "")}
    ds = YoloDetection(files.yolo(tmp_path / "y", ["a"], items), "train")
    assert ds.report.missing_label_files == 1 and "1 images without a label file" in ds.report.summary()
    stats = dataset_stats(ds)
    assert stats["images_without_boxes"] == 2 and stats["missing_label_files"] == 1
    out = io.StringIO()
    Console(file=out, width=100).print(format_stats_table(stats))
    assert "without a label file" in out.getvalue()


def test_yolo_label_files_without_an_image_are_reported_and_shared_stems_refused(tmp_path, files, caplog):
    root = files.yolo(tmp_path / "y", ["a"], {"a.png": (40, 20, "0 0.5 0.5 0.5 0.5\n")})
    (root / "train" / "labels" / "gone.txt").write_text("0 0.5 0.5 0.2 0.2\n")  # its image was deleted
    with caplog.at_level("WARNING", logger="detkd.data"):
        ds = YoloDetection(root, "train")
    assert ds.report.orphan_label_files == ["gone.txt"]
    assert "1 label files without an image, not read (gone.txt)" in caplog.text  # a warning, not an info line
    stats = dataset_stats(ds)
    assert stats["orphan_label_files"] == ["gone.txt"]
    out = io.StringIO()
    Console(file=out, width=100).print(format_stats_table(stats))
    assert "label files without an image" in out.getvalue()
    files.image(root / "train" / "images" / "a.jpg", 40, 20)  # a.png and a.jpg would both read a.txt
    with pytest.raises(DatasetError, match=r"a\.jpg and a\.png share the label file .*a\.txt"):
        YoloDetection(root, "train")


def test_yolo_non_utf8_files_name_file(tmp_path, files):
    root = _yolo(tmp_path, files, "names: [a, b, c]\n")
    (root / "train" / "labels" / "a.txt").write_bytes(b"0 0.5 0.5 0.2 0.2 \xe9\n")
    with pytest.raises(DatasetError, match=r"train/labels/a\.txt: not UTF-8 text"):
        YoloDetection(root, "train")
    (root / "data.yaml").write_bytes("names: [caf\xe9]\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"data\.yaml: not UTF-8 text"):
        YoloDetection(root, "train")


# --- stats --------------------------------------------------------------------------------------------------------


def test_stats_table_shows_class_names_with_brackets(tmp_path, files):
    anns = [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]}]
    cats = [{"id": 1, "name": "[bg]"}, {"id": 2, "name": "[bold]x"}]
    ds = CocoDetection(_coco(tmp_path, files, [_image()], anns, cats), tmp_path / "img")
    out = io.StringIO()
    Console(file=out, width=100).print(format_stats_table(dataset_stats(ds)))
    assert "[bg]" in out.getvalue() and "[bold]x" in out.getvalue()
