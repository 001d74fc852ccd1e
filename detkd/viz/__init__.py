"""Pictures of what is being distilled: masks, attention, regions, distributions, detections and training curves.

``render_report(cfg, out_dir, ...)`` draws them for a few images of a config's dataset; ``save_training_curves``
plots a run folder's metrics.jsonl. ``detkd.viz.maps`` holds the arrays behind the pictures (tested as data).
"""

from detkd.viz.curves import Curves, read_curves, save_training_curves
from detkd.viz.report import VizModels, build_viz_models, render_image, render_report

__all__ = ["Curves", "VizModels", "build_viz_models", "read_curves", "render_image", "render_report",
           "save_training_curves"]
