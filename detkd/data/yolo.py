"""YOLO txt reader: ``data.yaml`` (``names``, split paths) + ``images/`` and ``labels/`` folders.

A label file ``labels/<stem>.txt`` holds one object per line, ``class cx cy w h`` normalised to [0, 1] (class is
0-based; label = class + 1). Polygon lines (``class x1 y1 x2 y2 ...``, the segmentation export) are read as their
bounding box. A missing or empty label file is an image without boxes (missing ones are counted in
``report.missing_label_files``; label files without an image, whose boxes are not read, in
``report.orphan_label_files``), but a missing ``labels/`` folder is a DatasetError: a misnamed folder would otherwise
turn every image into a negative. Image sizes are read from the file headers at construction (no decode). File names
may contain spaces (paths are never split on whitespace). Two images with one stem (``a.jpg``, ``a.png``) would
share ``a.txt``: a DatasetError.

``names`` is a list or an ultralytics-style mapping ``{0: name, 1: name}`` whose keys (ints or digit strings) must
be exactly ``0..n-1``; a name listed twice is a DatasetError.

Split folders: the ``data.yaml`` key for the split (``val`` also tries ``valid``), resolved against the yaml's
``path`` key or the dataset root; Roboflow exports write ``../train/images`` relative to a parent folder, so a path
that does not exist is retried with its leading ``../`` removed. Without a key, ``<root>/<split>/images`` is used
(``valid`` for ``val``). A split key or ``path`` that is not one folder path (a list, a number) is a DatasetError.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from detkd.config import load_yaml
from detkd.data.common import (
    DatasetError,
    DetectionDataset,
    ImageRecord,
    LoadReport,
    Transform,
    check_unique_names,
    clean_boxes,
    read_image_size,
    read_text,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
_SPLIT_ALIASES = {"val": ("val", "valid"), "valid": ("valid", "val")}


def read_data_yaml(root: Path) -> dict[str, Any]:
    """Parse ``root/data.yaml`` (or ``data.yml``) with errors naming the file."""
    for name in ("data.yaml", "data.yml"):
        path = root / name
        if path.is_file():
            try:
                data = load_yaml(read_text(path)) or {}
            except yaml.YAMLError as e:
                raise DatasetError(f"{path}: not valid YAML: {e}") from e
            if not isinstance(data, dict) or "names" not in data:
                raise DatasetError(f"{path}: expected a mapping with 'names'")
            return data
    raise DatasetError(f"no data.yaml in YOLO folder {root}")


def yolo_class_names(data: dict[str, Any], path: Path) -> list[str]:
    names = data["names"]
    if isinstance(names, dict):  # ultralytics style {0: name, 1: name}
        names = _names_from_mapping(names, path)
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{path}: 'names' must be a non-empty list or mapping")
    if "nc" in data and data["nc"] != len(names):
        raise DatasetError(f"{path}: nc={data['nc']} but {len(names)} names")
    names = [str(n) for n in names]
    check_unique_names(names, f"{path}: names")
    return names


def _names_from_mapping(names: dict[Any, Any], path: Path) -> list[Any]:
    # Keys are class indices: sorted as numbers ('10' after '2'), and with no gap (a gap would shift every label).
    try:
        by_index = {int(str(k)): v for k, v in names.items()}
    except ValueError:
        by_index = None
    if by_index is None or sorted(by_index) != list(range(len(names))):
        raise DatasetError(f"{path}: 'names' keys must be the class indices 0..{len(names) - 1}, got {list(names)}")
    return [by_index[i] for i in range(len(names))]


def resolve_split_dir(root: Path, data: dict[str, Any], split: str) -> Path:
    """The image folder of ``split``; see the module docstring for the search order."""
    for key in ("path", *_SPLIT_ALIASES.get(split, (split,))):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise DatasetError(f"{root / 'data.yaml'}: {key}: expected one folder path, got {data[key]!r}")
    base = root / data["path"] if isinstance(data.get("path"), str) else root
    for key in _SPLIT_ALIASES.get(split, (split,)):
        value = data.get(key)
        if isinstance(value, str):
            rel = Path(value)
            stripped = Path(*[p for p in rel.parts if p != ".."]) if rel.parts else rel
            for candidate in (base / rel, root / rel, root / stripped):
                if candidate.is_dir():
                    return candidate
            raise DatasetError(f"{root / 'data.yaml'}: {key}: {value!r} is not a folder (tried {base / rel})")
    for key in _SPLIT_ALIASES.get(split, (split,)):
        if (root / key / "images").is_dir():
            return root / key / "images"
    raise DatasetError(f"YOLO folder {root}: no split {split!r} in data.yaml and no {root / split / 'images'}")


def _labels_dir(images_dir: Path) -> Path:
    # YOLO convention: the last "images" component of the path becomes "labels".
    parts = list(images_dir.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts)
    return images_dir


def parse_label_file(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Normalised (M, 4) cxcywh -> (M, 4) xyxy in [0, 1] units, (M,) labels 1..K, and ``file:line`` tags."""
    boxes, labels, where = [], [], []
    if not path.is_file():
        return np.zeros((0, 4)), np.zeros((0,), dtype=np.int64), []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        tag = f"{path.name} line {lineno}"  # short, for the summary of dropped boxes
        at = f"{path} line {lineno}"  # errors name the whole path: train/ and valid/ hold files of the same name
        try:
            values = [float(t) for t in tokens]
        except ValueError as e:
            raise DatasetError(f"{at}: not numbers: {line.strip()!r}") from e
        if len(values) != 5 and (len(values) < 7 or len(values) % 2 == 0):
            raise DatasetError(f"{at}: expected 'class cx cy w h' (or a polygon), got {len(values)} values")
        cls = values[0]
        if not (math.isfinite(cls) and cls == int(cls) and 0 <= cls < num_classes):
            raise DatasetError(f"{at}: class index {tokens[0]} out of range 0..{num_classes - 1}")
        if len(values) == 5:
            cx, cy, w, h = values[1:]
            boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        else:
            xs, ys = values[1::2], values[2::2]
            boxes.append([min(xs), min(ys), max(xs), max(ys)])
        labels.append(int(cls) + 1)
        where.append(tag)
    return np.array(boxes, dtype=np.float64).reshape(-1, 4), np.array(labels, dtype=np.int64), where


class YoloDetection(DetectionDataset):
    """YOLO-layout detection dataset; see the module docstring for the conventions."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        skip_bad_images: bool = False,
        transforms: Transform | None = None,
        degenerate_side: float = 1.0,
    ):
        self.root = Path(root)
        self.split = split
        data = read_data_yaml(self.root)
        names = yolo_class_names(data, self.root / "data.yaml")
        self.images_dir = resolve_split_dir(self.root, data, split)
        self.labels_dir = _labels_dir(self.images_dir)
        if not self.labels_dir.is_dir():
            raise DatasetError(f"{self.images_dir}: labels folder {self.labels_dir} not found")
        files = sorted(p for p in self.images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(f"{self.images_dir}: no images")
        by_stem: dict[str, Path] = {}
        for file in files:  # a.jpg and a.png would both read labels/a.txt: whose boxes are they?
            if file.stem in by_stem:
                raise DatasetError(f"{self.images_dir}: {by_stem[file.stem].name} and {file.name} share the label "
                                   f"file {self.labels_dir / (file.stem + '.txt')}; rename or remove one")
            by_stem[file.stem] = file
        report = LoadReport()
        report.orphan_label_files = sorted(p.name for p in self.labels_dir.glob("*.txt") if p.stem not in by_stem)
        records = []
        for file in files:
            size = self._header_size(file, report, skip_bad_images)
            if size is not None:
                records.append(self._record(file, size, len(records) + 1, len(names), report, degenerate_side))
        super().__init__(records, names, report, transforms=transforms, skip_bad_images=skip_bad_images)

    @staticmethod
    def _header_size(file: Path, report: LoadReport, skip: bool) -> tuple[int, int] | None:
        try:
            return read_image_size(file)
        except (OSError, ValueError, SyntaxError) as e:
            if not skip:
                raise DatasetError(f"{file}: unreadable image: {e} (pass skip_bad_images=True to skip it)") from e
            report.skipped_images.append(f"{file.name} (unreadable: {e})")
            return None

    def _record(
        self, file: Path, size: tuple[int, int], image_id: int, num_classes: int, report: LoadReport, side: float
    ) -> ImageRecord:
        width, height = size
        label_file = self.labels_dir / f"{file.stem}.txt"
        if not label_file.is_file():
            report.missing_label_files += 1
        boxes, labels, where = parse_label_file(label_file, num_classes)
        boxes = boxes * np.array([width, height, width, height], dtype=np.float64)
        kept_boxes, kept_labels = clean_boxes(boxes, labels, width, height, report, where, side)
        return ImageRecord(file, width, height, image_id, kept_boxes, kept_labels)
