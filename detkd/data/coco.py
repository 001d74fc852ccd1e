"""COCO json reader.

Categories are remapped to contiguous labels ``1..K`` in category-id order (COCO's own ids have gaps: 1..90 for 80
classes); ``class_names`` come from the json. ``bbox`` ``[x, y, w, h]`` becomes xyxy ``[x, y, x + w, y + h]``.
``iscrowd=1`` annotations are ignored (counted in ``report.ignored_crowd``), as detection training usually does.
Image sizes come from the json's ``width``/``height`` (checked against the decoded image in ``__getitem__``).
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
)


def load_coco_json(ann_file: str | Path) -> dict[str, Any]:
    """Parse a COCO json file, with errors naming it."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DatasetError(f"COCO annotation file not found: {ann_file}")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{ann_file}: not valid json: {e}") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{ann_file}: missing list '{key}' (is this a COCO detection file?)")
    return data


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
        self.category_ids = [int(c["id"]) for c in categories]
        report = LoadReport()
        records = self._parse(data, {cid: i + 1 for i, cid in enumerate(self.category_ids)}, report, degenerate_side)
        super().__init__(
            records,
            [str(c["name"]) for c in categories],
            report,
            transforms=transforms,
            skip_bad_images=skip_bad_images,
        )

    def _parse(
        self, data: dict[str, Any], label_of: dict[int, int], report: LoadReport, degenerate_side: float
    ) -> list[ImageRecord]:
        per_image: dict[int, list[dict[str, Any]]] = {int(img["id"]): [] for img in data["images"]}
        for ann in data["annotations"]:
            image_id = ann.get("image_id")
            if image_id not in per_image:
                raise DatasetError(f"{self.ann_file}: annotation id {ann.get('id')} refers to unknown image {image_id}")
            if ann.get("iscrowd", 0):
                report.ignored_crowd += 1
                continue
            per_image[image_id].append(ann)
        return [
            self._record(img, per_image[int(img["id"])], label_of, report, degenerate_side) for img in data["images"]
        ]

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
            if ann.get("category_id") not in label_of:
                raise DatasetError(
                    f"{self.ann_file}: annotation id {ann.get('id')}: unknown category_id {ann.get('category_id')!r} "
                    f"(categories: {sorted(label_of)})"
                )
            x, y, w, h = bbox
            boxes.append([x, y, x + w, y + h])
            labels.append(label_of[ann["category_id"]])
            where.append(f"{self.ann_file.name} annotation id {ann.get('id')} ({img.get('file_name')})")
        kept_boxes, kept_labels = clean_boxes(
            np.array(boxes).reshape(-1, 4), np.array(labels), width, height, report, where, degenerate_side
        )
        return ImageRecord(self.image_root / img["file_name"], width, height, int(img["id"]), kept_boxes, kept_labels)


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
