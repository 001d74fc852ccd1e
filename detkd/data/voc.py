"""Pascal VOC xml reader: ``Annotations/<id>.xml``, ``JPEGImages/<id>.*``, ``ImageSets/Main/<split>.txt``.

The image of ``<id>.xml`` is ``JPEGImages/<id>.*``; the xml's ``<filename>`` is only used when no such file exists.

Box convention: VOC pixel coordinates are 1-based and inclusive (``xmin = 1`` is the first pixel column, a box with
``xmin == xmax`` covers one column). In continuous 0-based coordinates that box is ``[xmin - 1, ymin - 1, xmax, ymax]``
-- the usual ``x = xmin - 1`` conversion, which is also what ``bccd/coco`` used, so reading a split through VOC and
through its COCO conversion gives the same boxes.

Class order (label ``i + 1`` is ``class_names[i]``), first match wins:

1. ``class_names`` given by the caller (an unknown name in an xml is then a DatasetError);
2. a ``classes.txt`` or ``labels.txt`` file (one name per line) in ``root``;
3. sorted unique names over *all* xml files in ``Annotations/`` -- never per split, so that train and test agree
   even when a split lacks a class.

A name listed twice (in ``class_names`` or the names file) is a DatasetError.

Neither sorted nor first-appearance order reproduces BCCD's COCO conversion (RBC, WBC, Platelets); pass the list
explicitly for it, as ``BCCD_CLASSES`` below does. ``difficult`` objects are kept (torchvision-style training).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

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

#: Class order of the shared BCCD COCO conversion (``bccd/coco/annotations_*.json`` category ids 1, 2, 3).
BCCD_CLASSES = ["RBC", "WBC", "Platelets"]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG")
_NAME_FILES = ("classes.txt", "labels.txt")


def _parse_xml(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DatasetError(f"{path}: cannot parse VOC xml: {e}") from e


def _object_names(root: ET.Element) -> list[str]:
    return [(obj.findtext("name") or "").strip() for obj in root.iter("object")]


def voc_class_names(root: str | Path) -> list[str]:
    """Default class order of a VOC folder: a names file in ``root``, else sorted names over all annotations."""
    root = Path(root)
    for name in _NAME_FILES:
        if (root / name).is_file():
            names = [line.strip() for line in read_text(root / name).splitlines() if line.strip()]
            check_unique_names(names, str(root / name))
            return names
    found: set[str] = set()
    for xml_file in sorted((root / "Annotations").glob("*.xml")):
        found.update(_object_names(_parse_xml(xml_file)))
    found.discard("")
    if not found:
        raise DatasetError(f"{root / 'Annotations'}: no object names found")
    return sorted(found)


class VocDetection(DetectionDataset):
    """Pascal-VOC-layout detection dataset; see the module docstring for the conventions."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        class_names: list[str] | None = None,
        skip_bad_images: bool = False,
        transforms: Transform | None = None,
        degenerate_side: float = 1.0,
    ):
        self.root = Path(root)
        self.split = split
        if class_names is not None:
            names = list(class_names)
            check_unique_names(names, "class_names")
        else:
            names = voc_class_names(self.root)
        split_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise DatasetError(f"VOC split file not found: {split_file}")
        ids = [line.split()[0] for line in read_text(split_file).splitlines() if line.strip()]
        report = LoadReport()
        label_of = {n: i + 1 for i, n in enumerate(names)}
        records = [self._record(image_id, i + 1, label_of, report, degenerate_side) for i, image_id in enumerate(ids)]
        super().__init__(records, names, report, transforms=transforms, skip_bad_images=skip_bad_images)

    def _record(
        self, stem: str, image_id: int, label_of: dict[str, int], report: LoadReport, degenerate_side: float
    ) -> ImageRecord:
        xml_file = self.root / "Annotations" / f"{stem}.xml"
        if not xml_file.is_file():
            raise DatasetError(f"{xml_file}: annotation listed in {self.split}.txt not found")
        ann = _parse_xml(xml_file)
        boxes, labels, where = [], [], []
        for k, obj in enumerate(ann.iter("object")):
            tag = f"{xml_file.name} object {k}"
            name = (obj.findtext("name") or "").strip()
            if name not in label_of:
                raise DatasetError(f"{tag}: unknown class {name!r} (classes: {', '.join(label_of)})")
            boxes.append(self._box(obj, tag))
            labels.append(label_of[name])
            where.append(tag)
        width, height = self._size(ann, stem, xml_file)
        kept_boxes, kept_labels = clean_boxes(
            np.array(boxes, dtype=np.float64).reshape(-1, 4),
            np.array(labels),
            width,
            height,
            report,
            where,
            degenerate_side,
        )
        return ImageRecord(self._image_file(ann, stem), width, height, image_id, kept_boxes, kept_labels)

    @staticmethod
    def _box(obj: ET.Element, tag: str) -> list[float]:
        bnd = obj.find("bndbox")
        if bnd is None:
            raise DatasetError(f"{tag}: no <bndbox>")
        try:
            xmin, ymin, xmax, ymax = (float(bnd.findtext(k, "")) for k in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as e:
            raise DatasetError(f"{tag}: bad <bndbox> coordinate: {e}") from e
        # 1-based inclusive -> 0-based continuous: only the minimum corner moves.
        return [xmin - 1, ymin - 1, xmax, ymax]

    def _size(self, ann: ET.Element, stem: str, xml_file: Path) -> tuple[int, int]:
        try:
            width, height = int(ann.findtext("size/width", "0")), int(ann.findtext("size/height", "0"))
        except ValueError:
            width = height = 0
        if width > 0 and height > 0:
            return width, height
        # Some exporters leave <size> empty: read the header instead (cheap, no decode).
        image_file = self._image_file(ann, stem)
        if not image_file.is_file():
            raise DatasetError(f"{xml_file}: no <size> and image {image_file} not found")
        return read_image_size(image_file)

    def _image_file(self, ann: ET.Element, stem: str) -> Path:
        # The image of <id>.xml is JPEGImages/<id>.*; <filename> is only a fallback (exporters often leave a stale
        # one, copied from another image, which would pair these boxes with the wrong picture).
        folder = self.root / "JPEGImages"
        for suffix in _IMAGE_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
        name = (ann.findtext("filename") or "").strip()
        return folder / (name or f"{stem}.jpg")  # when missing too, the file check reports this name
