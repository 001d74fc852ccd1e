"""COCO evaluation and latency of detectors."""

from detkd.eval.coco import coco_metrics, evaluate, predict, to_coco_dets, to_coco_gt
from detkd.eval.latency import measure_latency

__all__ = ["coco_metrics", "evaluate", "measure_latency", "predict", "to_coco_dets", "to_coco_gt"]
