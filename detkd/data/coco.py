"""COCO json reader.

Categories are remapped to contiguous labels ``1..K`` in category-id order (COCO's own ids have gaps: 1..90 for 80
classes); ``class_names`` come from the json. ``bbox`` ``[x, y, w, h]`` becomes xyxy ``[x, y, x + w, y + h]``.
``iscrowd=1`` annotations are ignored (counted in ``report.ignored_crowd``), as detection training usually does.
Image sizes come from the json's ``width``/``height`` (checked against the decoded image in ``__getitem__``).
Image ids and category ids must be unique integers, category names unique strings and ``iscrowd`` 0 or 1: anything
else is a DatasetError naming the file and the entry, never a silent merge or relabelling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from detkd.data.common import (
    DatasetError,
    DetectionDataset,
    ImageRecord,
    LoadReport,
    Transform,
    clean_boxes,
    is_finite_number,
    read_text,
)


def load_coco_json(ann_file: str | Path) -> dict[str, Any]:
    """Parse a COCO json file and check its images and categories, with errors naming it."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DatasetError(f"COCO annotation file not found: {ann_file}")
    try:
        data = json.loads(read_text(ann_file))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{ann_file}: not valid json: {e}") from e
    if not isinstance(data, dict):
        raise DatasetError(
            f"{ann_file}: top level is a json {type(data).__name__}, not an object (COCO detection file?)"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{ann_file}: missing list '{key}' (is this a COCO detection file?)")
    _check_entries(ann_file, data["images"], "images", "image", "file_name")
    _check_entries(ann_file, data["categories"], "categories", "category", "name")
    id_of_name: dict[str, int] = {}
    for cat in data["categories"]:
        if cat["name"] in id_of_name:
            raise DatasetError(
                f"{ann_file}: category name {cat['name']!r} used twice (ids {id_of_name[cat['name']]} and {cat['id']})"
            )
        id_of_name[cat["name"]] = cat["id"]
    return data


def _check_entries(ann_file: Path, entries: list[Any], key: str, what: str, name_key: str) -> None:
    """Every entry is an object with an int ``id`` (unique) and a str ``name_key``; errors name the list index."""
    first: dict[int, str] = {}  # id -> name_key of its first entry
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DatasetError(f"{ann_file}: {key}[{i}] is a json {type(entry).__name__}, not an object")
        entry_id, name = entry.get("id"), entry.get(name_key)
        if not isinstance(entry_id, int) or isinstance(entry_id, bool):
            raise DatasetError(f"{ann_file}: {key}[{i}]: 'id' must be an integer, got {entry_id!r}")
        if not isinstance(name, str):
            raise DatasetError(
                f"{ann_file}: {key}[{i}] ({what} id {entry_id}): '{name_key}' must be a string, got {name!r}"
            )
        if entry_id in first:
            raise DatasetError(f"{ann_file}: {what} id {entry_id} used twice ({first[entry_id]!r} and {name!r})")
        first[entry_id] = name


class CocoDetection(DetectionDataset):
    """COCO-format detection dataset; see the module docstring for the conventions."""

    def __init__(
        self,
        ann_file: str | Path,
        image_root: str | Path,
        *,
        skip_bad_images: bool = False,
        transforms: Transform | None = None,
        degenerate_side: float = 1.0,
    ):
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root)
        data = load_coco_json(self.ann_file)
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in categories]
        report = LoadReport()
        records = self._parse(data, {cid: i + 1 for i, cid in enumerate(self.category_ids)}, report, degenerate_side)
        super().__init__(
            records,
            [c["name"] for c in categories],
            report,
            transforms=transforms,
            skip_bad_images=skip_bad_images,
        )

    def _parse(
        self, data: dict[str, Any], label_of: dict[int, int], report: LoadReport, degenerate_side: float
    ) -> list[ImageRecord]:
        per_image: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in data["images"]}
        for k, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict):
                raise DatasetError(f"{self.ann_file}: annotations[{k}] is a json {type(ann).__name__}, not an object")
            image_id = ann.get("image_id")
            if not isinstance(image_id, int) or image_id not in per_image:
                raise DatasetError(
                    f"{self.ann_file}: annotation id {ann.get('id')} refers to unknown image {image_id!r}"
                )
            crowd = ann.get("iscrowd", 0)
            if not (isinstance(crowd, int) and crowd in (0, 1)):  # a string "0" would be truthy: dropped as crowd
                raise DatasetError(
                    f"{self.ann_file}: annotation id {ann.get('id')}: iscrowd must be 0 or 1, got {crowd!r}"
                )
            if crowd:
                report.ignored_crowd += 1
                continue
            per_image[image_id].append(ann)
        return [self._record(img, per_image[img["id"]], label_of, report, degenerate_side) for img in data["images"]]

    def _record(
        self,
        img: dict[str, Any],
        anns: list[dict[str, Any]],
        label_of: dict[int, int],
        report: LoadReport,
        degenerate_side: float,
    ) -> ImageRecord:
        width, height = img.get("width"), img.get("height")
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            raise DatasetError(f"{self.ann_file}: image id {img['id']} ({img.get('file_name')}) has no valid size")
        boxes, labels, where = [], [], []
        for ann in anns:
            bbox = ann.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_finite_number(v) for v in bbox)):
                raise DatasetError(f"{self.ann_file}: annotation id {ann.get('id')}: bad bbox {bbox!r}")
            category_id = ann.get("category_id")
            if not isinstance(category_id, int) or category_id not in label_of:
                raise DatasetError(
                    f"{self.ann_file}: annotation id {ann.get('id')}: unknown category_id {category_id!r} "
                    f"(categories: {sorted(label_of)})"
                )
            x, y, w, h = bbox
            boxes.append([x, y, x + w, y + h])
            labels.append(label_of[category_id])
            where.append(f"{self.ann_file.name} annotation id {ann.get('id')} ({img.get('file_name')})")
        kept_boxes, kept_labels = clean_boxes(
            np.array(boxes).reshape(-1, 4), np.array(labels), width, height, report, where, degenerate_side
        )
        return ImageRecord(self.image_root / img["file_name"], width, height, img["id"], kept_boxes, kept_labels)


def guess_image_root(ann_file: str | Path, data: dict[str, Any] | None = None) -> Path:
    """Folder holding the images of ``ann_file``: the first candidate under which its first images exist.

    Candidates, in order: ``<ann dir>/images``, ``<ann dir>``, ``<ann dir>/JPEGImages``, then every sibling folder
    of ``<ann dir>`` and its ``images/`` / ``JPEGImages/`` (this finds BCCD's ``coco/../voc/JPEGImages``).
    """
    ann_file = Path(ann_file)
    data = data if data is not None else load_coco_json(ann_file)
    names = [img["file_name"] for img in data["images"][:3]]
    folder = ann_file.parent
    candidates = [folder / "images", folder, folder / "JPEGImages"]
    for sibling in sorted(p for p in folder.parent.iterdir() if p.is_dir() and p != folder):
        candidates += [sibling, sibling / "images", sibling / "JPEGImages"]
    for root in candidates:
        if names and all((root / n).is_file() for n in names):
            return root
    if not names:
        return folder / "images"
    tried = ", ".join(str(c) for c in candidates[:6])
    raise DatasetError(f"{ann_file}: cannot find image {names[0]!r} under {tried}, ...; pass image_root")
