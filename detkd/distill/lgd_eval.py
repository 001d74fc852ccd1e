"""Evaluating LGD's label-guided branch (the reference's EVAL_TEACHER): the instructive pyramid, built from the
labels and the student's own features, through the student's own heads."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from detkd.distill.distiller import Distiller
from detkd.eval import evaluate
from detkd.losses.lgd import LGDLoss


class LabelGuidedDetector(nn.Module):
    """A detector whose input includes the ground truth: ``forward(images, targets) -> detections`` (original image
    coordinates). Its AP measures what the student's head reads from the label-guided pyramid, LGD's "teacher"; it
    reads the labels, yet it can trail the student when the branch is weak. The deployable model remains the student
    alone."""

    def __init__(self, distiller: Distiller, lgd: LGDLoss):
        super().__init__()
        self.distiller = distiller
        self.lgd = lgd

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        adapter = self.distiller.student_adapter
        batch = adapter.preprocess(images, targets)
        out = adapter.run(batch, stage="features")
        return adapter.detect_from_features(batch, self.lgd.instructive_pyramid(out))


def label_guided_modules(trainable: nn.Module) -> list[LGDLoss]:
    """The LGD loss modules of a trainable that asked for ``eval_teacher``."""
    losses = getattr(trainable, "losses", [])
    return [sl.module for sl in losses if isinstance(sl.module, LGDLoss) and sl.module.eval_teacher]


@torch.no_grad()
def evaluate_label_guided(distiller: Distiller, lgd: LGDLoss, dataset: Any, **kwargs: Any) -> dict[str, float]:
    """COCO metrics of the label-guided branch on ``dataset`` (keyword arguments as :func:`detkd.eval.evaluate`)."""
    return evaluate(LabelGuidedDetector(distiller, lgd), dataset, with_targets=True, **kwargs)
