"""Detector adapters: run a detector's own stages and return :class:`detkd.structures.DetOutputs`."""

from detkd.models.adapters.base import DetectorAdapter, PreparedBatch, build_adapter
from detkd.models.adapters.faster_rcnn import FasterRCNNAdapter
from detkd.models.adapters.fcos import FCOSAdapter
from detkd.models.adapters.gfl import GFLAdapter
from detkd.models.adapters.retinanet import RetinaNetAdapter

__all__ = [
    "DetectorAdapter",
    "FCOSAdapter",
    "FasterRCNNAdapter",
    "GFLAdapter",
    "PreparedBatch",
    "RetinaNetAdapter",
    "build_adapter",
]
