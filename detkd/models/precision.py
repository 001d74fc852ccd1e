"""Mixed precision without low-precision box geometry.

Under ``torch.autocast`` (``train.amp``: bf16 by default on recent GPUs, fp16 on older ones) a detector's
convolutions run in bf16 or fp16, and torchvision lets the box geometry follow: ``AnchorGenerator`` builds its
anchors in the feature maps' dtype (and keeps its cell anchors rounded to it), and the box coder decodes in the dtype
of the head's outputs. bf16 keeps 8 significant bits, so an anchor at x = 1000 px is rounded to a multiple of 4 px
(of 8 px above 1024): anchors, IoU-based assignments, regression targets, decoded boxes, GIoU and LD's VLR regions
would all move with the precision setting, and Faster R-CNN's bf16 proposals reach an fp32 teacher's ``roi_align`` as
a dtype mismatch.

:func:`keep_geometry_fp32` makes the anchors fp32 and casts the heads' raw outputs (RetinaNet/FCOS/GFL head, RPN head,
RoI box predictor) to fp32, so that everything from the head outputs on (decoding, assignment, losses, distillation
regions) computes in fp32 while the backbone, the FPN and the head towers keep running in the autocast dtype. In
fp32 it changes nothing (``.float()`` of an fp32 tensor is the tensor itself).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_MARK = "_detkd_fp32_geometry"


def _to_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, dict):
        return {k: _to_fp32(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple takes its fields as arguments
        return type(value)(*(_to_fp32(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_to_fp32(v) for v in value)
    return value


def _fp32_outputs(module: nn.Module, args: Any, output: Any) -> Any:
    return _to_fp32(output)


def _fp32_anchor_inputs(module: nn.Module, args: tuple) -> tuple | None:
    # An anchor generator reads only each map's size, dtype and device: fp32 placeholders of the same sizes.
    image_list, feature_maps = args[0], args[1]
    if all(f.dtype == torch.float32 for f in feature_maps):
        return None
    shells = [torch.empty((0, 0, *f.shape[-2:]), dtype=torch.float32, device=f.device) for f in feature_maps]
    return (image_list, shells, *args[2:])


def geometry_modules(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(anchor generators, modules whose outputs are box/score predictions) of a torchvision-style detector."""
    anchors: list[nn.Module] = []
    heads: list[nn.Module] = []
    if isinstance(getattr(model, "anchor_generator", None), nn.Module):
        anchors.append(model.anchor_generator)
    if isinstance(getattr(model, "head", None), nn.Module):
        heads.append(model.head)
    rpn = getattr(model, "rpn", None)
    if isinstance(rpn, nn.Module):
        anchors += [rpn.anchor_generator] if isinstance(getattr(rpn, "anchor_generator", None), nn.Module) else []
        heads += [rpn.head] if isinstance(getattr(rpn, "head", None), nn.Module) else []
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    if isinstance(predictor, nn.Module):
        heads.append(predictor)
    return anchors, heads


def keep_geometry_fp32(model: nn.Module) -> nn.Module:
    """Register the fp32 hooks on ``model`` (once; idempotent) and return it."""
    if getattr(model, _MARK, False):
        return model
    anchors, heads = geometry_modules(model)
    for gen in anchors:
        gen.register_forward_pre_hook(_fp32_anchor_inputs)
    for head in heads:
        head.register_forward_hook(_fp32_outputs)
    setattr(model, _MARK, True)
    return model
