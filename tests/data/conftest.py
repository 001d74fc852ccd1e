"""Tiny on-disk datasets for the data tests (written into pytest's tmp_path); use through the ``files`` fixture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image(path: Path, width: int, height: int, value: int = 51) -> Path:
    """A flat RGB PNG/JPEG of one grey ``value`` (51 -> 0.2 after decoding)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(path)
    return path


def write_coco(path: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def voc_xml(filename: str, width: int, height: int, objects: list[tuple[str, tuple[int, int, int, int]]]) -> str:
    objs = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for name, (x0, y0, x1, y1) in objects
    )
    return (
        f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>{height}</height>"
        f"<depth>3</depth></size>{objs}</annotation>"
    )


def write_voc(root: Path, split: str, items: dict[str, tuple[int, int, list]]) -> Path:
    """``items``: stem -> (width, height, [(name, (xmin, ymin, xmax, ymax)), ...]) -- VOC 1-based inclusive."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for stem, (w, h, objects) in items.items():
        write_image(root / "JPEGImages" / f"{stem}.png", w, h)
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(f"{stem}.png", w, h, objects))
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(items) + "\n")
    return root


def write_yolo(root: Path, names: list[str], items: dict[str, tuple[int, int, str | None]], folder: str = "train"):
    """``items``: image file name -> (width, height, label text or None for no label file)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.yaml").write_text(f"train: ../train/images\nval: ../valid/images\nnc: {len(names)}\nnames: {names}\n")
    for name, (w, h, text) in items.items():
        write_image(root / folder / "images" / name, w, h)
        if text is not None:
            label = root / folder / "labels" / (Path(name).stem + ".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(text)
    return root


class Files:
    """The writers above, as one fixture (tests cannot import this conftest under --import-mode=importlib)."""

    image = staticmethod(write_image)
    coco = staticmethod(write_coco)
    voc = staticmethod(write_voc)
    yolo = staticmethod(write_yolo)


@pytest.fixture
def files() -> type[Files]:
    return Files
