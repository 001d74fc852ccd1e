"""The embedded synthetic detection dataset: coloured shapes on cluttered backgrounds, written as COCO json + PNG.

Seven classes, ``<colour>_<shape>``, chosen so that neither cue alone is enough: red_circle / green_circle share a
shape, red_circle / red_square share a colour, and so on (see ``CLASSES``). Object colours are jittered per object.
What makes it hard for a small detector at a short schedule:

* sizes drawn log-uniformly from 8 px to half the image side, so many objects are small;
* textured backgrounds (base colour + linear gradient + low-frequency noise + pixel noise);
* distractors in non-class but nearby colours (orange, cyan, purple, brown, grey...): lines and ellipse blobs under
  the objects, and thin lines over them;
* occlusion: objects are painted in order and may overlap. An object with more than ``MAX_HIDDEN`` (60%) of its
  pixels hidden is removed from the annotations (its pixels stay in the image, like an ignored heavily occluded
  object); the others get the tight box of their *visible* pixels (COCO's convention: box of the visible segment);
* 0..``max_objects`` objects per image, so some images are empty.

Everything is drawn from ``numpy.random.default_rng([seed, split, index])``: the same config gives byte-identical
json and PNG files. ``ensure`` regenerates only when ``meta.json`` (config + ``FORMAT_VERSION``) differs, under an
exclusive lock on ``.generate.lock`` in the folder, so that processes started together (a study split over seeds)
generate it once and read it only when it is complete.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from detkd.config import SynthConfig

try:
    import fcntl
except ImportError:  # not POSIX: no lock (one process at a time must generate the set)
    fcntl = None  # type: ignore[assignment]

FORMAT_VERSION = 1
MAX_HIDDEN = 0.6
MIN_SIZE = 8
SPLITS = ("train", "val")
LOCK_NAME = ".generate.lock"
_IMAGE_NAME = re.compile(r"^(train|val)_[0-9]{6,}\.png$")  # what _coco_split writes

COLOURS = {
    "red": (215, 45, 40),
    "green": (45, 170, 65),
    "blue": (45, 85, 215),
    "yellow": (225, 200, 35),
    "magenta": (200, 50, 190),
}
#: distractor colours: not class colours, but several sit close to one (orange~red/yellow, purple~magenta/blue).
DISTRACTOR_COLOURS = [
    (235, 135, 40),
    (40, 190, 200),
    (125, 70, 165),
    (130, 85, 50),
    (128, 128, 128),
    (235, 235, 235),
    (30, 30, 30),
    (135, 135, 45),
]
CLASSES = ["red_circle", "green_circle", "red_square", "blue_square", "blue_triangle", "yellow_cross", "magenta_ring"]


_POLYGONS = {
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)],
    # a plus sign with arms of half-thickness 1/3
    "cross": [
        (-1 / 3, -1),
        (1 / 3, -1),
        (1 / 3, -1 / 3),
        (1, -1 / 3),
        (1, 1 / 3),
        (1 / 3, 1 / 3),
        (1 / 3, 1),
        (-1 / 3, 1),
        (-1 / 3, 1 / 3),
        (-1, 1 / 3),
        (-1, -1 / 3),
        (-1 / 3, -1 / 3),
    ],
}


def _shape_mask(shape: str, cx: float, cy: float, size: float, angle: float, canvas: int) -> np.ndarray:
    """(canvas, canvas) bool mask of one shape of extent ~``size`` px centred at (cx, cy), rotated by ``angle``."""
    img = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(img)
    r = size / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=max(2, round(size / 5)))
    else:
        c, s = math.cos(angle), math.sin(angle)
        pts = _POLYGONS[shape]
        # scale so that the rotated shape's horizontal extent is `size`
        scale = r / max(abs(x * c - y * s) for x, y in pts)
        draw.polygon([(cx + scale * (x * c - y * s), cy + scale * (x * s + y * c)) for x, y in pts], fill=255)
    return np.asarray(img) > 0


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, n, 3) float background: muted base colour + gradient + low-frequency noise."""
    base = rng.uniform(70, 180, size=3) * 0.6 + rng.uniform(70, 180) * 0.4  # pulled towards grey
    ramp = np.linspace(-1, 1, n, dtype=np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    grad = math.cos(theta) * ramp[None, :] + math.sin(theta) * ramp[:, None]
    coarse = rng.integers(0, 256, size=(int(rng.integers(4, 12)),) * 2 + (3,), dtype=np.uint8)
    low = np.asarray(Image.fromarray(coarse).resize((n, n), Image.BILINEAR), dtype=np.float32)
    amp = rng.uniform(10, 35) / 127.5
    offset = (base - 127.5 * amp).astype(np.float32)
    return grad[..., None] * rng.uniform(10, 45, size=3).astype(np.float32) + low * np.float32(amp) + offset


def _distractor(rng: np.random.Generator, draw: ImageDraw.ImageDraw, n: int) -> None:
    """A line or an ellipse blob in a non-class colour, anywhere (partly outside the image too)."""
    colour = DISTRACTOR_COLOURS[int(rng.integers(len(DISTRACTOR_COLOURS)))]
    x0, y0, x1, y1 = (float(v) for v in rng.uniform(-0.1 * n, 1.1 * n, size=4))
    if rng.random() < 0.5:
        draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, 4)))
    else:
        ax, ay = rng.uniform(2, n / 6, size=2)
        draw.ellipse([x0 - ax, y0 - ay, x0 + ax, y0 + ay], fill=colour)


def render_image(rng: np.random.Generator, n: int, max_objects: int) -> tuple[np.ndarray, list[tuple[list[int], int]]]:
    """One (n, n, 3) uint8 image and its annotations ``[(xyxy int box of visible pixels, label 1..K), ...]``."""
    img = Image.fromarray(_background(rng, n).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 9))):
        _distractor(rng, draw, n)
    pixels = np.asarray(img, dtype=np.float32)
    owner = np.full((n, n), -1, dtype=np.int16)  # which object each pixel shows, -1 for background
    objects = []
    for k in range(int(rng.integers(0, max_objects + 1))):
        label = int(rng.integers(len(CLASSES))) + 1
        colour_name, shape = CLASSES[label - 1].split("_")
        size = math.exp(rng.uniform(math.log(MIN_SIZE), math.log(n / 2)))
        cx, cy = rng.uniform(size / 2, n - size / 2, size=2)
        mask = _shape_mask(shape, cx, cy, size, rng.uniform(0, 2 * math.pi), n)
        colour = np.array(COLOURS[colour_name]) * rng.uniform(0.75, 1.15) + rng.uniform(-20, 20, size=3)
        pixels[mask] = colour
        owner[mask] = k
        objects.append((label, int(mask.sum())))
    overlay = Image.new("L", (n, n), 0)
    over_draw = ImageDraw.Draw(overlay)
    for _ in range(int(rng.integers(0, 3))):  # thin clutter lines over the objects
        over_draw.line([float(v) for v in rng.uniform(0, n, size=4)], fill=255, width=1)
    lines = np.asarray(overlay) > 0
    pixels[lines] = rng.uniform(30, 230)
    owner[lines] = -1
    pixels += rng.standard_normal(size=pixels.shape, dtype=np.float32) * np.float32(rng.uniform(4, 14))
    return pixels.clip(0, 255).astype(np.uint8), _visible_boxes(owner, objects)


def _visible_boxes(owner: np.ndarray, objects: list[tuple[int, int]]) -> list[tuple[list[int], int]]:
    annotations = []
    for k, (label, area) in enumerate(objects):
        ys, xs = np.nonzero(owner == k)
        if area == 0 or len(xs) < (1 - MAX_HIDDEN) * area:
            continue  # more than MAX_HIDDEN hidden: not annotated
        annotations.append(([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1], label))
    return annotations


def _coco_split(out_dir: Path, cfg: SynthConfig, split_index: int, count: int) -> dict[str, Any]:
    split = SPLITS[split_index]
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng([cfg.seed, split_index, i])
        pixels, anns = render_image(rng, cfg.image_size, cfg.max_objects)
        name = f"{split}_{i + 1:06d}.png"
        Image.fromarray(pixels).save(out_dir / "images" / name, compress_level=1)
        images.append({"id": i + 1, "file_name": name, "width": cfg.image_size, "height": cfg.image_size})
        for (x0, y0, x1, y1), label in anns:
            w, h = x1 - x0, y1 - y0
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": label,
                    "bbox": [x0, y0, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name, "supercategory": name.split("_")[1]} for i, name in enumerate(CLASSES)]
    info = {"description": "detkd synthetic shapes", "version": FORMAT_VERSION, "seed": cfg.seed}
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def generate(out_dir: str | Path, cfg: SynthConfig) -> Path:
    """Write ``annotations_{train,val}.json`` and ``images/*.png`` under ``out_dir``; return ``out_dir``."""
    _validate(cfg)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for old in (out_dir / "images").glob("*_[0-9][0-9][0-9][0-9][0-9][0-9].png"):  # only files we wrote
        old.unlink()
    for split_index, count in enumerate((cfg.num_train, cfg.num_val)):
        data = _coco_split(out_dir, cfg, split_index, count)
        _write_atomic(out_dir / f"annotations_{SPLITS[split_index]}.json", json.dumps(data))
    _write_atomic(out_dir / "meta.json", json.dumps(_meta(cfg), indent=1))  # written last: marks completion
    return out_dir


def ensure(out_dir: str | Path, cfg: SynthConfig) -> Path:
    """Generate the dataset under ``out_dir`` unless ``meta.json`` says it is already there for this config.

    Under DDP call it on rank 0 and barrier before the other ranks read the files.
    """
    out_dir = Path(out_dir)
    foreign = _foreign_entries(out_dir)
    if foreign:
        raise ValueError(f"data.format is 'synthetic' (the default) but {out_dir} holds files the synthetic set never "
                         f"writes ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): set data.format "
                         "(coco, voc, yolo) for a dataset of yours, or point data.root at a folder of its own")
    out_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir / LOCK_NAME):  # another process may be writing it: wait, then find it complete
        meta_file = out_dir / "meta.json"
        try:
            current = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            current = None
        complete = all((out_dir / f"annotations_{s}.json").is_file() for s in SPLITS)
        if current == _meta(cfg) and complete:
            return out_dir
        return generate(out_dir, cfg)


def _foreign_entries(out_dir: Path) -> list[str]:
    """Names under ``out_dir`` that ``generate`` does not write: regenerating there would mix (or, for images, delete
    and rewrite) a user's files; typically a real dataset's folder given as ``data.root`` without ``data.format``."""
    if not out_dir.is_dir():
        return []
    ours = {"images", "meta.json", LOCK_NAME, *(f"annotations_{s}.json" for s in SPLITS)}
    foreign = [p.name for p in sorted(out_dir.iterdir()) if p.name not in ours and not p.name.endswith(".tmp")]
    images = out_dir / "images"
    if images.is_dir():
        foreign += [f"images/{p.name}" for p in sorted(images.iterdir()) if not _IMAGE_NAME.match(p.name)]
    return foreign


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block; released when the file closes,
    also when the process dies."""
    with path.open("a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _validate(cfg: SynthConfig) -> None:
    if cfg.image_size < 4 * MIN_SIZE:
        raise ValueError(f"data.synthetic.image_size must be >= {4 * MIN_SIZE} (objects span {MIN_SIZE} px to half)")
    for key in ("num_train", "num_val", "max_objects"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"data.synthetic.{key} must be >= 0, got {getattr(cfg, key)}")


def _meta(cfg: SynthConfig) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "config": dataclasses.asdict(cfg)}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
