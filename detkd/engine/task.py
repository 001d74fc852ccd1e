"""The plain-student trainable: a torchvision detector trained on its own losses (the baseline of every table).

A *trainable* is what :func:`detkd.engine.loop.fit` trains: an ``nn.Module`` whose
``forward(images, targets) -> dict[str, Tensor]`` returns ``"loss"`` (the scalar to back-propagate) and other scalar
terms to log, with a ``student`` attribute (the deployable detector). Optional hooks: ``set_step(step)``,
``param_groups()``, ``step_check(losses)``. The Distiller implements the same contract.
"""

from __future__ import annotations

from torch import Tensor, nn

from detkd.models.precision import keep_geometry_fp32


class TaskModel(nn.Module):
    """Wraps a torchvision detector: ``loss`` = sum of the detector's loss dict, each term logged as ``task/<name>``.

    The detector must be in training mode when called (torchvision detectors return detections, not losses, in
    eval mode); :func:`fit` puts the trainable in training mode. Under autocast its anchors and head outputs stay
    fp32 (:func:`detkd.models.precision.keep_geometry_fp32`), as the distilled students' do.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.student = keep_geometry_fp32(model)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        losses = self.student(images, targets)
        if not isinstance(losses, dict) or not losses:
            raise TypeError(
                f"TaskModel: the detector returned {type(losses).__name__}, not a loss dict; "
                "is it in training mode and given targets?"
            )
        out = {f"task/{name}": value for name, value in losses.items()}
        out["loss"] = sum(losses.values())
        return out
