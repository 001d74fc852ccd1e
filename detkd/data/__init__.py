"""Detection data: COCO / VOC / YOLO readers to one contract, the synthetic default, transforms, loaders, stats.

Item contract: ``(image, target)`` with image (3, H, W) float32 in [0, 1] and target ``{"boxes": (M, 4) float32
xyxy pixels, "labels": (M,) int64 in 1..K, "image_id": int}``. Datasets expose ``class_names`` (label i+1 is
``class_names[i]``), ``num_classes``, ``get_annotation(idx)`` and a ``report`` of what loading counted or dropped.
"""

from __future__ import annotations

from pathlib import Path

from detkd.config import DataConfig
from detkd.data import synthetic
from detkd.data.coco import CocoDetection, guess_image_root, load_coco_json
from detkd.data.common import DatasetError, DetectionDataset, LoadReport
from detkd.data.loader import build_loader, collate, seed_worker
from detkd.data.stats import dataset_stats, format_stats_table, open_dataset
from detkd.data.transforms import build_transforms
from detkd.data.voc import BCCD_CLASSES, VocDetection
from detkd.data.yolo import YoloDetection

__all__ = [
    "BCCD_CLASSES",
    "CocoDetection",
    "DatasetError",
    "DetectionDataset",
    "LoadReport",
    "VocDetection",
    "YoloDetection",
    "build_dataset",
    "build_loader",
    "collate",
    "dataset_stats",
    "format_stats_table",
    "open_dataset",
    "seed_worker",
]


def build_dataset(cfg: DataConfig, split: str, *, train: bool) -> DetectionDataset:
    """The ``split`` of the dataset described by ``cfg``, with training transforms when ``train``.

    ``cfg.format``: ``coco`` (``cfg.ann_file`` pattern with ``{split}``, default ``root/annotations_{split}.json``;
    ``cfg.image_root``, default ``root/images`` when it exists, else guessed from the json's file names),
    ``voc`` and ``yolo`` (``cfg.root``), ``synthetic`` (generated under ``cfg.root`` if needed, read as COCO).
    """
    transforms = build_transforms(cfg, train=train)
    common = {"skip_bad_images": cfg.skip_bad_images, "transforms": transforms}
    root = Path(cfg.root)
    if cfg.format == "voc":
        return VocDetection(root, split, class_names=cfg.class_names, **common)
    if cfg.format == "yolo":
        return YoloDetection(root, split, **common)
    if cfg.format == "synthetic":
        synthetic.ensure(root, cfg.synthetic)
    elif cfg.format != "coco":
        raise DatasetError(f"data.format: unknown format {cfg.format!r} (coco, voc, yolo or synthetic)")
    ann_file = Path(cfg.ann_file.format(split=split)) if cfg.ann_file else root / f"annotations_{split}.json"
    if cfg.image_root:
        image_root = Path(cfg.image_root.format(split=split))  # "{split}" as in ann_file (COCO: train2017/val2017)
    elif (root / "images").is_dir():
        image_root = root / "images"
    else:
        image_root = guess_image_root(ann_file, load_coco_json(ann_file))
    return CocoDetection(ann_file, image_root, **common)
