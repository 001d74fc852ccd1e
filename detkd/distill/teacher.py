"""The frozen teacher: eval mode pinned, no gradients, never in DDP, runs only as far as the losses need."""

from __future__ import annotations

import torch
from torch import nn

from detkd.models.adapters import build_adapter
from detkd.models.adapters.base import PreparedBatch
from detkd.structures import DetOutputs

# how far each stage runs, so the teacher can stop as early as the configured losses allow
STAGE_ORDER = {"features": 0, "head": 1, "roi": 2}


class FrozenTeacher:
    """Wraps a detector so that it can only ever be used as a constant.

    It is deliberately *not* an ``nn.Module``: the Distiller holds it as a plain attribute, so the teacher's weights
    are not in the trainable's ``state_dict``, not in the optimizer, and never wrapped by DDP.
    """

    def __init__(self, model: nn.Module, *, bf16: bool = False):
        self.model = model
        self.adapter = build_adapter(model)
        self.bf16 = bf16
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()

    def to(self, device: torch.device | str) -> FrozenTeacher:
        self.model.to(device)
        return self

    def _autocast(self, device_type: str):
        # explicit either way: an fp32 teacher must stay fp32 inside the training loop's own bf16 autocast
        if not self.bf16:
            return torch.autocast(device_type=device_type, enabled=False)
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)

    @torch.no_grad()
    def run(self, batch: PreparedBatch, stage: str, student: DetOutputs | None = None) -> DetOutputs:
        """Run the teacher on the student's preprocessed batch up to ``stage`` ("features", "head" or "roi").

        "roi" (Faster R-CNN) additionally runs the teacher's RPN head at every anchor and its RoI head on the
        student's sampled proposals, filling ``extras["rpn"]`` and ``extras["roi"]``.
        """
        self.model.eval()  # pinned: a parent's .train() must never switch BN/dropout of the teacher
        device_type = batch.images.tensors.device.type
        with self._autocast(device_type):
            out = self.adapter.run(batch, stage="features" if stage == "roi" else stage)
            if stage == "roi":
                if student is None or "roi" not in student.extras:
                    raise ValueError("teacher stage 'roi' needs a Faster R-CNN student output with sampled proposals")
                proposals = student.extras["roi"]["proposals"]
                logits, deltas = self.adapter.roi_outputs(out.features, proposals, batch.images.image_sizes)
                obj, rpn_deltas = self.adapter.rpn_head_outputs(out.features, batch)
                out.extras["roi"] = {"class_logits": logits.float(), "box_regression": deltas.float()}
                out.extras["rpn"] = {"objectness": obj.float(), "deltas": rpn_deltas.float()}
        if self.bf16:
            out.features = {k: v.float() for k, v in out.features.items()}
            out.head = {k: v.float() for k, v in out.head.items()}
        return out
