"""COCO box metrics of a detector: faster-coco-eval (same numbers as pycocotools, faster), pycocotools as fallback.

Ground truth and predictions are plain tensors in original image coordinates (xyxy pixels, labels 1..K). They are
turned into COCO json structures in memory (xywh boxes, category ids 1..K) and scored with the official COCO
protocol: AP averaged over IoU 0.50:0.05:0.95 and 101 recall points, area ranges small < 32² <= medium < 96² <= large
(box area), at most ``max_detections`` detections per image.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

#: summary keys in the order of COCOeval.stats[:6] plus the recall at max_detections
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what}: expected one integer, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    return int(value)


def _xywh(boxes: Tensor) -> list[list[float]]:
    b = boxes.detach().to("cpu", torch.float64).reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], dim=1).tolist()


def to_coco_gt(gts: Sequence[dict[str, Any]], num_classes: int) -> dict[str, Any]:
    """COCO ground-truth json (dict) from ``gts``: {image_id, boxes (M,4) xyxy, labels (M,) 1..K, [width, height],
    [iscrowd (M,)], [area (M,)]}. Area defaults to the box area (there are no masks)."""
    images, anns, seen = [], [], set()
    for rec in gts:
        image_id = _as_int(rec["image_id"], "gt image_id")
        if image_id in seen:
            raise ValueError(f"ground truth: image_id {image_id} appears twice")
        seen.add(image_id)
        images.append({"id": image_id, "width": int(rec.get("width", 0)), "height": int(rec.get("height", 0))})
        labels = torch.as_tensor(rec["labels"]).reshape(-1).tolist()
        boxes = _xywh(torch.as_tensor(rec["boxes"]))
        if len(labels) != len(boxes):
            raise ValueError(f"ground truth of image {image_id}: {len(boxes)} boxes but {len(labels)} labels")
        crowd = torch.as_tensor(rec.get("iscrowd", torch.zeros(len(labels)))).reshape(-1).tolist()
        areas = rec.get("area")
        areas = torch.as_tensor(areas).reshape(-1).tolist() if areas is not None else [w * h for _, _, w, h in boxes]
        for box, label, c, area in zip(boxes, labels, crowd, areas):
            if not 1 <= int(label) <= num_classes:
                raise ValueError(f"ground truth of image {image_id}: label {label} outside 1..{num_classes}")
            anns.append(
                {"id": len(anns) + 1, "image_id": image_id, "category_id": int(label), "bbox": box,
                 "area": float(area), "iscrowd": int(c)}
            )
    categories = [{"id": k, "name": str(k)} for k in range(1, num_classes + 1)]
    return {"info": {}, "images": images, "annotations": anns, "categories": categories}


def to_coco_dets(preds: Sequence[dict[str, Any]], image_ids: set[int]) -> list[dict[str, Any]]:
    """COCO results list from ``preds``: {image_id, boxes (D,4) xyxy, scores (D,), labels (D,)}."""
    dets = []
    for rec in preds:
        image_id = _as_int(rec["image_id"], "prediction image_id")
        if image_id not in image_ids:
            raise ValueError(f"prediction for image_id {image_id}, which has no ground-truth record")
        boxes = _xywh(torch.as_tensor(rec["boxes"]))
        scores = torch.as_tensor(rec["scores"]).reshape(-1).tolist()
        labels = torch.as_tensor(rec["labels"]).reshape(-1).tolist()
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"prediction for image {image_id}: {len(boxes)} boxes, {len(scores)} scores, "
                             f"{len(labels)} labels")
        for box, score, label in zip(boxes, scores, labels):
            dets.append({"image_id": image_id, "category_id": int(label), "bbox": box, "score": float(score)})
    return dets


def _coco_api(backend: str):
    """(COCO, COCOeval) classes of the chosen backend ("auto": faster-coco-eval, else pycocotools)."""
    if backend in ("auto", "faster"):
        try:
            from faster_coco_eval import COCO, COCOeval_faster

            return COCO, COCOeval_faster
        except ImportError:
            if backend == "faster":
                raise
    if backend not in ("auto", "faster", "pycocotools"):
        raise ValueError(f"unknown COCO backend {backend!r} (auto | faster | pycocotools)")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


def _metric(value: float) -> float:
    # COCOeval reports -1 where a metric is undefined (e.g. APs with no small ground-truth box): report NaN there,
    # as detectron2 does, rather than a misleading 0.
    return float(value) if value >= 0 else math.nan


def coco_metrics(
    gts: Sequence[dict[str, Any]],
    preds: Sequence[dict[str, Any]],
    num_classes: int,
    *,
    max_detections: int = 100,
    backend: str = "auto",
) -> dict[str, float]:
    """COCO box metrics: AP, AP50, AP75, APs, APm, APl and AR@max_detections (key ``f"AR{max_detections}"``).

    Values are in [0, 1]; a metric with no ground truth in its range is NaN. No predictions at all gives zeros.
    """
    keys = (*METRIC_KEYS, f"AR{max_detections}")
    gt_json = to_coco_gt(gts, num_classes)
    dets = to_coco_dets(preds, {img["id"] for img in gt_json["images"]})
    if not dets:
        # pycocotools cannot load an empty result list; with nothing predicted every defined metric is 0.
        return _empty_metrics(gt_json, keys)
    coco_cls, eval_cls = _coco_api(backend)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and summary
        gt = coco_cls()
        gt.dataset = gt_json
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = eval_cls(gt, dt, "bbox")
        # three ascending limits ending at max_detections (pycocotools' summary reads exactly three)
        ev.params.maxDets = [min(1, max_detections), min(10, max_detections), max_detections]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(s) for s in ev.stats]
    # stats layout (default area ranges): 0 AP, 1 AP50, 2 AP75, 3-5 APs/m/l, 6-8 AR@1/10/max
    return {k: _metric(v) for k, v in zip(keys, [*stats[:6], stats[8]])}


def _empty_metrics(gt_json: dict[str, Any], keys: Sequence[str]) -> dict[str, float]:
    """Metrics with no detection: 0 where ground truth exists in the area range, NaN where it does not."""
    areas = [a["area"] for a in gt_json["annotations"] if not a["iscrowd"]]
    present = {
        "APs": any(a < 32**2 for a in areas),
        "APm": any(32**2 <= a < 96**2 for a in areas),
        "APl": any(a >= 96**2 for a in areas),
    }
    return {k: (0.0 if present.get(k, bool(areas)) else math.nan) for k in keys}


def _ground_truth(dataset: Any, index: int, sample: Any) -> dict[str, Any]:
    if hasattr(dataset, "get_annotation"):
        return dataset.get_annotation(index)
    return sample[1]


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int,
    device: str | torch.device,
    max_detections: int = 100,
    progress: bool = False,
    with_targets: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run ``model`` over ``dataset``; return (gts, preds) in original image coordinates.

    A prediction is paired with the ground truth of item ``i`` only when the sample is that image (its target's
    ``image_id``). A dataset with ``skip_bad_images`` serves another image in place of one it cannot decode: that item
    is left out (with a warning giving the count), so no image is scored twice or against another's ground truth.

    ``with_targets``: call ``model(images, targets)`` (a detector whose input includes the labels, such as LGD's
    label-guided branch) instead of ``model(images)``."""
    gts, preds, left_out = [], [], []
    starts = range(0, len(dataset), batch_size)
    bar = _progress(progress, len(starts))
    for start in starts:
        indices = range(start, min(start + batch_size, len(dataset)))
        samples = [dataset[i] for i in indices]
        images = [s[0].to(device) for s in samples]
        if with_targets:
            targets = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in s[1].items()} for s in samples]
            outputs = model(images, targets)
        else:
            outputs = model(images)
        for i, sample, out in zip(indices, samples, outputs):
            gt = _ground_truth(dataset, i, sample)
            keep = out["scores"].argsort(descending=True)[:max_detections]
            image_id = _as_int(gt["image_id"], f"image_id of dataset item {i}")
            served = _as_int(sample[1].get("image_id", image_id), f"target image_id of dataset item {i}")
            if served != image_id:
                if not getattr(dataset, "skip_bad_images", False):
                    raise ValueError(f"dataset item {i} ({gt.get('file', 'no file')}): the sample is image {served} "
                                     f"but its annotation is image {image_id}: predictions cannot be paired with it")
                left_out.append(str(gt.get("file", image_id)))  # it could not be decoded; ``served`` stands in
                continue
            gts.append({**gt, "image_id": image_id})
            preds.append({"image_id": image_id, **{k: out[k][keep].cpu() for k in ("boxes", "scores", "labels")}})
        if bar is not None:
            bar.advance(bar.task_ids[0])
    if bar is not None:
        bar.stop()
    if left_out:
        warnings.warn(f"evaluation: {len(left_out)} image(s) could not be decoded and are left out of the metrics "
                      f"(skip_bad_images): {', '.join(left_out)}", UserWarning, stacklevel=2)
    return gts, preds


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.add_task("eval", total=total)
    bar.start()
    return bar


def evaluate(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int,
    device: str | torch.device,
    max_detections: int = 100,
    progress: bool = False,
    num_classes: int | None = None,
    with_targets: bool = False,
) -> dict[str, float]:
    """COCO metrics of ``model`` on ``dataset`` (see :func:`coco_metrics`).

    The model runs in eval mode (its previous mode is restored afterwards). Ground truth comes from
    ``dataset.get_annotation(i)`` when the dataset has it (no image decoding), else from ``dataset[i][1]``; images
    a ``skip_bad_images`` dataset cannot decode are left out (see :func:`predict`).
    ``num_classes`` defaults to ``dataset.num_classes``.
    """
    num_classes = num_classes if num_classes is not None else getattr(dataset, "num_classes", None)
    if num_classes is None:
        raise ValueError("evaluate: pass num_classes= or use a dataset with a num_classes attribute")
    was_training = model.training
    model.to(device).eval()
    try:
        gts, preds = predict(
            model, dataset, batch_size=batch_size, device=device, max_detections=max_detections, progress=progress,
            with_targets=with_targets,
        )
    finally:
        model.train(was_training)
    return coco_metrics(gts, preds, num_classes, max_detections=max_detections)
