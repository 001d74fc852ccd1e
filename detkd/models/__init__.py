"""Detector zoo (torchvision families + GFL) and weight loading."""

from detkd.models.zoo import BACKBONES, FAMILIES, ModelSpec, build, build_backbone, count_parameters

__all__ = ["BACKBONES", "FAMILIES", "ModelSpec", "build", "build_backbone", "count_parameters"]
