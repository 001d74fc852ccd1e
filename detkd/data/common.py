"""What every reader shares: the record of one image, box cleaning, image decoding, the load report.

Readers (COCO, VOC, YOLO) only parse annotations into :class:`ImageRecord` s; :class:`DetectionDataset` does the rest
the same way for all of them, so the rules below hold whatever the source format:

* boxes are xyxy float32 in absolute pixels of the decoded image, continuous coordinates (pixel ``i`` covers
  ``[i, i + 1)``); labels are int64 in ``1..K`` (index ``i`` of ``class_names`` is label ``i + 1``);
* a box partly outside the image is clipped to it (counted in ``report.clipped``);
* a box whose width or height after clipping is ``<= degenerate_side`` pixels is dropped (counted in
  ``report.dropped_degenerate``). The default of 1 px catches the zero-extent VOC boxes (``xmin == xmax``) that the
  1-based inclusive convention turns into 1-px boxes, and their COCO conversions; 0 gives the strict ``w, h <= 0``
  rule. Non-finite coordinates are a :class:`DatasetError`;
* images are decoded lazily in ``__getitem__`` with PIL (EXIF orientation applied) to float32 ``[0, 1]``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

logger = logging.getLogger("detkd.data")

#: EXIF orientations that swap width and height (rotations by 90 or 270 degrees, with or without a mirror).
_EXIF_TRANSPOSED = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112

Transform = Callable[[Tensor, dict[str, Any]], tuple[Tensor, dict[str, Any]]]


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and the record (annotation id, line number, object index)."""


@dataclass
class LoadReport:
    """Counts gathered while reading annotations (and, for bad images, while decoding them)."""

    images: int = 0
    boxes: int = 0
    dropped_degenerate: int = 0
    clipped: int = 0
    ignored_crowd: int = 0
    missing_label_files: int = 0  # YOLO images without a label file (read as images without boxes)
    orphan_label_files: list[str] = field(default_factory=list)  # YOLO label files without an image (not read)
    skipped_images: list[str] = field(default_factory=list)  # "name (reason)"
    dropped_examples: list[str] = field(default_factory=list)  # where the first degenerate boxes were

    def summary(self) -> str:
        text = f"{self.images} images, {self.boxes} boxes"
        if self.clipped:
            text += f", clipped {self.clipped} boxes"
        if self.dropped_degenerate:
            text += f", dropped {self.dropped_degenerate} degenerate boxes ({', '.join(self.dropped_examples)})"
        if self.ignored_crowd:
            text += f", ignored {self.ignored_crowd} crowd annotations"
        if self.missing_label_files:
            text += f", {self.missing_label_files} images without a label file"
        if self.orphan_label_files:
            shown = ", ".join(self.orphan_label_files[:3]) + (", ..." if len(self.orphan_label_files) > 3 else "")
            text += f", {len(self.orphan_label_files)} label files without an image, not read ({shown})"
        if self.skipped_images:
            text += f", skipped {len(self.skipped_images)} bad images"
        return text


@dataclass
class ImageRecord:
    """One image's annotation, parsed once at construction; boxes (M, 4) xyxy float32, labels (M,) int64."""

    file: Path
    width: int
    height: int
    image_id: int
    boxes: np.ndarray
    labels: np.ndarray


def clean_boxes(
    boxes: np.ndarray,
    labels: np.ndarray,
    width: int,
    height: int,
    report: LoadReport,
    where: list[str],
    degenerate_side: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Clip (M, 4) xyxy ``boxes`` to the image and drop degenerate ones; update ``report``.

    ``where[i]`` names box i's source record (e.g. ``"a.xml object 3"``) for errors and the drop summary.
    Returns the kept (M', 4) float32 boxes and (M',) int64 labels.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    bad = ~np.isfinite(boxes).all(axis=1)
    if bad.any():
        raise DatasetError(f"{where[int(np.argmax(bad))]}: non-finite box coordinates {boxes[bad][0].tolist()}")
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    side = np.minimum(clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1])
    keep = side > degenerate_side
    # Only boxes that survive count as clipped: a dropped box is counted once, as degenerate.
    report.clipped += int(((clipped != boxes).any(axis=1) & keep).sum())
    report.dropped_degenerate += int((~keep).sum())
    report.dropped_examples.extend(where[i] for i in np.flatnonzero(~keep)[: 5 - len(report.dropped_examples)])
    report.boxes += int(keep.sum())
    return clipped[keep].astype(np.float32), labels[keep]


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image as decoded (EXIF rotation applied), from the file header only."""
    with Image.open(path) as img:
        width, height = img.size
        orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    return (height, width) if orientation in _EXIF_TRANSPOSED else (width, height)


def decode_image(path: Path) -> Tensor:
    """Decode ``path`` to a float32 (3, H, W) tensor in [0, 1], EXIF orientation applied; errors name the file."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
            array = np.asarray(img, dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for missing, truncated or corrupt files
        raise DatasetError(f"{path}: cannot decode image: {e}") from e
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def check_image_files(records: list[ImageRecord], report: LoadReport, skip_bad: bool, header: bool) -> list[int]:
    """Indices of ``records`` whose image files are usable.

    Missing files are always detected; with ``header=True`` the header is opened too (cheap) to catch files that
    are not images. Without ``skip_bad`` a DatasetError lists up to five bad files; with it, bad images are
    skipped and listed in ``report.skipped_images`` (the dataset logs them in one line at the end of loading).
    """
    good, bad = [], []
    for i, rec in enumerate(records):
        reason = _file_problem(rec.file, header)
        if reason is None:
            good.append(i)
        else:
            bad.append(f"{rec.file.name} ({reason})")
    if bad and not skip_bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        folder = records[0].file.parent
        raise DatasetError(f"{len(bad)} bad images under {folder}: {shown} (pass skip_bad_images=True to skip them)")
    report.skipped_images.extend(bad)
    return good


def _file_problem(path: Path, header: bool) -> str | None:
    if not path.is_file():
        return "missing"
    if not os.access(path, os.R_OK):
        return "unreadable"
    if header:
        try:
            read_image_size(path)
        except (OSError, ValueError, SyntaxError) as e:
            return f"unreadable: {e}"
    return None


class DetectionDataset(Dataset):
    """Map-style dataset over parsed :class:`ImageRecord` s; readers subclass it and only parse annotations.

    Item ``i`` is ``(image, target)``: image (3, H, W) float32 in [0, 1]; target ``{"boxes": (M, 4) float32 xyxy,
    "labels": (M,) int64 in 1..K, "image_id": int}``, after ``transforms`` (when given).
    """

    def __init__(
        self,
        records: list[ImageRecord],
        class_names: list[str],
        report: LoadReport,
        *,
        transforms: Transform | None = None,
        skip_bad_images: bool = False,
    ):
        # Headers are only opened when skipping is asked for: a plain load stays one stat() per image.
        keep = check_image_files(records, report, skip_bad_images, header=skip_bad_images)
        if len(keep) < len(records):
            # Recount boxes over the images that remain, so report.boxes matches what the dataset yields.
            records = [records[i] for i in keep]
            report.boxes = sum(len(r.boxes) for r in records)
        self.records = records
        self.class_names = list(class_names)
        self.report = report
        self.report.images = len(records)
        if report.skipped_images:  # one line at the end of loading, whichever step found them
            logger.warning("skipped %d bad images: %s", len(report.skipped_images), ", ".join(report.skipped_images))
        self.transforms = transforms
        self.skip_bad_images = skip_bad_images
        # Dropped boxes change what the model learns from: say so loudly; a clean load is only info.
        level = logging.WARNING if report.dropped_degenerate or report.orphan_label_files else logging.INFO
        logger.log(level, "%s: %s", type(self).__name__, report.summary())

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)

    def get_annotation(self, idx: int) -> dict[str, Any]:
        """Annotation of item ``idx`` in original image pixels, without decoding the image."""
        rec = self.records[idx]
        return {
            "boxes": torch.from_numpy(rec.boxes.copy()),
            "labels": torch.from_numpy(rec.labels.copy()),
            "image_id": rec.image_id,
            "file": str(rec.file),
            "width": rec.width,
            "height": rec.height,
        }

    def __getitem__(self, idx: int) -> tuple[Tensor, dict[str, Any]]:
        for offset in range(len(self.records)):
            j = (idx + offset) % len(self.records)
            try:
                image = decode_image(self.records[j].file)
            except DatasetError as e:
                if not self.skip_bad_images:
                    raise
                # Passed the header check but fails to decode: count it once, serve the next image instead. (In a
                # DataLoader worker this counts in the worker's copy of the report: the warning is the record there.)
                entry = f"{self.records[j].file.name} (corrupt)"
                if entry not in self.report.skipped_images:
                    self.report.skipped_images.append(entry)
                    logger.warning("skipped bad image: %s", e)
                continue
            self._check_size(j, image)
            ann = self.get_annotation(j)
            target = {"boxes": ann["boxes"], "labels": ann["labels"], "image_id": ann["image_id"]}
            if self.transforms is not None:
                image, target = self.transforms(image, target)
            return image, target
        raise DatasetError(f"{type(self).__name__}: no image could be decoded")

    def _check_size(self, idx: int, image: Tensor) -> None:
        # A stale annotated size would silently misplace boxes (and their clipping): refuse it, even when skipping.
        rec = self.records[idx]
        h, w = image.shape[-2:]
        if (w, h) != (rec.width, rec.height):
            raise DatasetError(
                f"{rec.file}: decoded size {w}x{h} differs from the annotated {rec.width}x{rec.height} "
                "(EXIF-rotated image or stale annotation?)"
            )


def read_text(path: Path) -> str:
    """The text of ``path`` as UTF-8 (a leading byte-order mark is dropped), with a DatasetError naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text: {e}") from e


def check_unique_names(names: list[str], source: str) -> None:
    """DatasetError naming ``source`` when a class name is listed twice (per-class results are keyed by name)."""
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            raise DatasetError(f"{source}: class name {name!r} listed twice (classes {first[name]} and {i})")
        first[name] = i


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
