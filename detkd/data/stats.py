"""Dataset statistics for ``detkd data stats``: counts, class balance, COCO size buckets, what loading dropped.

``open_dataset`` guesses the format of a path: ``data.yaml`` -> YOLO, ``Annotations/`` -> VOC, a ``*.json`` file or a
folder with ``annotations_<split>.json`` -> COCO (images found with :func:`detkd.data.coco.guess_image_root` unless
``image_root`` is given).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from rich.table import Table

from detkd.data.coco import CocoDetection, guess_image_root, load_coco_json
from detkd.data.common import DatasetError, DetectionDataset
from detkd.data.voc import VocDetection
from detkd.data.yolo import YoloDetection

#: COCO size buckets by box area: small < 32^2 <= medium < 96^2 <= large.
SMALL_AREA, LARGE_AREA = 32**2, 96**2


def guess_format(path: str | Path, split: str = "train") -> str:
    """'coco', 'voc' or 'yolo' for ``path``; DatasetError when none fits."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".json":
            return "coco"
        if path.name in ("data.yaml", "data.yml"):
            return "yolo"
    elif path.is_dir():
        if (path / "data.yaml").is_file() or (path / "data.yml").is_file():
            return "yolo"
        if (path / "Annotations").is_dir():
            return "voc"
        if (path / f"annotations_{split}.json").is_file() or any(path.glob("*.json")):
            return "coco"
    raise DatasetError(f"cannot tell the dataset format of {path} (no data.yaml, Annotations/ or *.json); pass format")


def open_dataset(
    path: str | Path,
    format: str | None = None,
    split: str = "train",
    *,
    image_root: str | Path | None = None,
    class_names: list[str] | None = None,
    skip_bad_images: bool = False,
) -> DetectionDataset:
    """Open the ``split`` of the dataset at ``path`` (format guessed when not given), without transforms."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset path not found: {path}")
    format = format or guess_format(path, split)
    if format == "yolo":
        return YoloDetection(path.parent if path.is_file() else path, split, skip_bad_images=skip_bad_images)
    if format == "voc":
        return VocDetection(path, split, class_names=class_names, skip_bad_images=skip_bad_images)
    if format == "coco":
        ann_file = path if path.is_file() else _coco_ann_file(path, split)
        root = Path(image_root) if image_root is not None else guess_image_root(ann_file, load_coco_json(ann_file))
        return CocoDetection(ann_file, root, skip_bad_images=skip_bad_images)
    raise DatasetError(f"unknown dataset format {format!r} (coco, voc or yolo)")


def _coco_ann_file(folder: Path, split: str) -> Path:
    for candidate in (folder / f"annotations_{split}.json", folder / "annotations" / f"instances_{split}.json"):
        if candidate.is_file():
            return candidate
    jsons = sorted(folder.glob("*.json"))
    if len(jsons) == 1:
        return jsons[0]
    raise DatasetError(f"{folder}: no annotations_{split}.json (found: {', '.join(p.name for p in jsons) or 'none'})")


def dataset_stats(dataset: DetectionDataset) -> dict[str, Any]:
    """Counts over ``dataset.get_annotation`` (no image decoding); counts are after dropping degenerate boxes."""
    per_class: Counter[int] = Counter()
    areas, sizes, empty = [], Counter(), 0
    for i in range(len(dataset)):
        ann = dataset.get_annotation(i)
        boxes = ann["boxes"]
        per_class.update(ann["labels"].tolist())
        areas.append((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        sizes[(ann["width"], ann["height"])] += 1
        empty += len(boxes) == 0
    area = torch.cat(areas) if areas else torch.zeros(0)
    report = dataset.report
    return {
        "images": len(dataset),
        "boxes": int(area.numel()),
        "classes": list(dataset.class_names),
        "boxes_per_class": {name: per_class.get(i + 1, 0) for i, name in enumerate(dataset.class_names)},
        "images_without_boxes": int(empty),
        "box_size_histogram": {
            "small": int((area < SMALL_AREA).sum()),
            "medium": int(((area >= SMALL_AREA) & (area < LARGE_AREA)).sum()),
            "large": int((area >= LARGE_AREA).sum()),
        },
        "median_box_area": float(area.median()) if area.numel() else 0.0,
        "image_sizes": {f"{w}x{h}": n for (w, h), n in sizes.most_common(5)},
        "dropped_degenerate": report.dropped_degenerate,
        "clipped": report.clipped,
        "ignored_crowd": report.ignored_crowd,
        "missing_label_files": report.missing_label_files,
        "orphan_label_files": list(report.orphan_label_files),
        "skipped_images": list(report.skipped_images),
    }


def format_stats_table(stats: dict[str, Any], title: str | None = None) -> Table:
    """A two-column rich table of :func:`dataset_stats` output (per-class counts indented under ``boxes``)."""
    table = Table(title=title, show_header=True)
    table.add_column("statistic")
    table.add_column("value", justify="right")
    table.add_row("images", str(stats["images"]))
    table.add_row("images without boxes", str(stats["images_without_boxes"]))
    if stats.get("missing_label_files"):
        table.add_row("  without a label file", str(stats["missing_label_files"]))
    if stats.get("orphan_label_files"):
        table.add_row("label files without an image (not read)", str(len(stats["orphan_label_files"])))
    table.add_row("boxes", str(stats["boxes"]))
    for name, count in stats["boxes_per_class"].items():
        table.add_row(f"  {escape(name)}", str(count))  # dataset text: "[bg]" is not rich markup
    for bucket, count in stats["box_size_histogram"].items():
        table.add_row(f"  {bucket}", str(count))
    table.add_row("median box area", f"{stats['median_box_area']:.0f}")
    table.add_row("image sizes", ", ".join(f"{k} ({v})" for k, v in stats["image_sizes"].items()))
    table.add_row("dropped degenerate boxes", str(stats["dropped_degenerate"]))
    table.add_row("clipped boxes", str(stats["clipped"]))
    if stats.get("ignored_crowd"):
        table.add_row("ignored crowd annotations", str(stats["ignored_crowd"]))
    table.add_row("skipped images", str(len(stats["skipped_images"])))
    return table
