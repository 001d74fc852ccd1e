"""Detector zoo: ``build(family, backbone, num_classes)`` -> a plain torchvision-style detector.

Families: ``retinanet``, ``fcos``, ``faster_rcnn`` (torchvision classes assembled from parts) and ``gfl``
(:class:`detkd.models.gfl.GFL`). Every model carries ``model.detkd_spec`` (a :class:`ModelSpec`, a plain Python
attribute, so state_dicts stay those of the plain model) describing its FPN levels.

Level layouts (the same for every backbone, so teacher and student of one family always line up):

* dense families (retinanet, fcos, gfl): P3-P7, strides 8..128; P6/P7 come from P5's FPN output.
* faster_rcnn: P2-P5 plus a max-pooled P6 (strides 4..64), as in torchvision's ``*_fpn`` models.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torchvision
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import Conv2dNormActivation, FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from detkd.models.gfl_head import group_norm_groups
from detkd.models.weights import load_backbone_weights, load_weights
from detkd.structures import FeatureSpec

FAMILIES = ("retinanet", "fcos", "faster_rcnn", "gfl")
#: initial bias of FCOS's box branch: each side starts at one anchor size (BoxLinearCoder normalises by it)
FCOS_BOX_BIAS = 1.0
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large")
NORMS = ("bn", "frozen_bn", "gn")

DENSE_LEVELS = ("p3", "p4", "p5", "p6", "p7")
RCNN_LEVELS = ("p2", "p3", "p4", "p5", "p6")
# options the builder sets itself; passing them through ``options`` would silently fight the builder
_RESERVED = {
    "self",
    "backbone",
    "num_classes",
    "min_size",
    "max_size",
    "head",
    "kwargs",
    "head_convs",
    "rpn_head",
    "box_head",
    "box_predictor",
}
# GeneralizedRCNNTransform extras every family forwards through **kwargs
_TRANSFORM_OPTIONS = {"size_divisible", "fixed_size"}


@dataclass(frozen=True)
class ModelSpec:
    """What distillation code needs to know about a built detector, without a dummy forward pass.

    ``level_names`` are in the order of the backbone's output dict (stride order); ``strides[i]`` is the nominal
    stride of ``level_names[i]``. ``num_classes`` is the number of real classes K (labels 1..K). ``build_args``: the
    other arguments :func:`build` got (``head_convs``, ``min_size``, ``max_size``, ``backbone_norm``, ``weights``,
    ``backbone_weights``, ``options``), so that a run's ``config.yaml`` can name the model it trained.
    """

    family: str
    backbone: str
    num_classes: int
    level_names: tuple[str, ...]
    strides: tuple[int, ...]
    fpn_channels: int
    build_args: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def feature_specs(self) -> dict[str, FeatureSpec]:
        """``{level_name: FeatureSpec(fpn_channels, stride)}`` for connectors and losses."""
        return {n: FeatureSpec(self.fpn_channels, s) for n, s in zip(self.level_names, self.strides)}


class LastLevelMaxPoolP6(LastLevelMaxPool):
    """torchvision's ``LastLevelMaxPool`` (stride-2 subsampling of P5), named ``p6`` instead of ``pool``.

    It has no parameters, so state_dicts are unchanged; the name only keeps level names uniform (``p2``..``p6``).
    """

    def forward(self, x, y, names):
        x, names = super().forward(x, y, names)
        names[-1] = "p6"
        return x, names


def _norm_layer(kind: str, eps: float = 1e-5) -> Callable[[int], nn.Module] | None:
    """Backbone norm factory; None means "the network's own BatchNorm default"."""
    if kind == "bn":
        return None
    if kind == "frozen_bn":
        return partial(FrozenBatchNorm2d, eps=eps)
    if kind == "gn":
        # 32 groups where possible; narrow MobileNet stages (16, 24, 40 ... channels) get fewer
        return lambda c: nn.GroupNorm(group_norm_groups(c), c)
    raise ValueError(f"unknown backbone_norm {kind!r}; choose one of {NORMS}")


def _classification_net(name: str, norm: str, backbone_weights: str | None) -> nn.Module:
    """The full torchvision classification network (random init), with backbone weights loaded if given."""
    if name.startswith("resnet"):
        # from scratch, each residual block starts as the identity (last norm's gamma = 0, Goyal et al. 2017): deep
        # ResNets then train from random init at short schedules; loaded weights overwrite it
        net = getattr(torchvision.models, name)(weights=None, norm_layer=_norm_layer(norm) or nn.BatchNorm2d,
                                                zero_init_residual=norm != "frozen_bn")
    else:
        # MobileNetV3 trains its BatchNorm with eps 1e-3; frozen statistics must use the same eps
        net = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=_norm_layer(norm, eps=1e-3))
    if backbone_weights is not None:
        load_backbone_weights(net, backbone_weights)
    return net


def _mobilenet_stages(features: nn.Sequential) -> dict[int, tuple[int, int]]:
    """``{stride: (index of the last block at that stride, its out_channels)}`` for mobilenet ``features``."""
    stages: dict[int, tuple[int, int]] = {}
    stride = 1
    for i, block in enumerate(features):
        # features[0] is the stride-2 stem; inverted residuals mark their stride-2 blocks with ``_is_cn``
        if i == 0 or getattr(block, "_is_cn", False):
            stride *= 2
        stages[stride] = (i, block.out_channels)
    return stages


def build_backbone(
    name: str, *, dense: bool, fpn_channels: int, norm: str = "bn", backbone_weights: str | None = None
) -> tuple[BackboneWithFPN, tuple[str, ...], tuple[int, ...]]:
    """Backbone + FPN with the detkd level layout; returns ``(backbone, level_names, strides)``."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
    net = _classification_net(name, norm, backbone_weights)
    # dense heads start at stride 8 (C3..C5), Faster R-CNN at stride 4 (C2..C5)
    in_strides = (8, 16, 32) if dense else (4, 8, 16, 32)
    names = DENSE_LEVELS if dense else RCNN_LEVELS
    if name.startswith("resnet"):
        base = net.inplanes // 8  # layer1's output channels (64 for basic blocks, 256 for bottlenecks)
        layer = {4: "layer1", 8: "layer2", 16: "layer3", 32: "layer4"}
        return_layers = {layer[s]: n for s, n in zip(in_strides, names)}
        in_channels = [base * s // 4 for s in in_strides]
        body: nn.Module = net
    else:
        stages = _mobilenet_stages(net.features)
        return_layers = {str(stages[s][0]): n for s, n in zip(in_strides, names)}
        in_channels = [stages[s][1] for s in in_strides]
        body = net.features
    extra = LastLevelP6P7(fpn_channels, fpn_channels) if dense else LastLevelMaxPoolP6()
    backbone = BackboneWithFPN(body, return_layers, in_channels, fpn_channels, extra_blocks=extra)
    strides = (8, 16, 32, 64, 128) if dense else (4, 8, 16, 32, 64)
    return backbone, names, strides


def _retina_tower(channels: int, depth: int) -> nn.Sequential:
    """RetinaNet's conv tower (3x3 conv + ReLU, std 0.01 init) with ``depth`` layers instead of 4."""
    tower = nn.Sequential(*[Conv2dNormActivation(channels, channels, norm_layer=None) for _ in range(depth)])
    for m in tower.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
    return tower


def _check_options(family: str, cls: type, options: dict, extra: set[str] = frozenset()) -> None:
    allowed = (set(inspect.signature(cls.__init__).parameters) - _RESERVED) | _TRANSFORM_OPTIONS | set(extra)
    for key in options:
        if key not in allowed:
            raise TypeError(f"build({family!r}): unknown option {key!r}; allowed: {sorted(allowed)}")


def _build_retinanet(backbone: BackboneWithFPN, k: int, head_convs: int, common: dict, options: dict) -> nn.Module:
    _check_options("retinanet", RetinaNet, options)
    # torchvision's default: 3 scales x 3 aspect ratios, base sizes 32..512 on P3..P7
    anchor_generator = options.pop("anchor_generator", None) or AnchorGenerator(
        tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in (32, 64, 128, 256, 512)),
        ((0.5, 1.0, 2.0),) * 5,
    )
    c = backbone.out_channels
    head = RetinaNetHead(c, anchor_generator.num_anchors_per_location()[0], k + 1)
    head.classification_head.conv = _retina_tower(c, head_convs)
    head.regression_head.conv = _retina_tower(c, head_convs)
    return RetinaNet(backbone, k + 1, anchor_generator=anchor_generator, head=head, **common, **options)


def _build_fcos(backbone: BackboneWithFPN, k: int, head_convs: int, common: dict, options: dict) -> nn.Module:
    _check_options("fcos", FCOS, options)
    c = backbone.out_channels
    if c % 32 == 0:
        head = FCOSHead(c, 1, k + 1, num_convs=head_convs)
    else:  # FCOSHead hard-codes GroupNorm(32, C) in its towers; narrow heads get fewer groups
        norm = partial(nn.GroupNorm, group_norm_groups(c))
        head = FCOSHead(c, 1, k + 1, num_convs=0)
        head.classification_head = FCOSClassificationHead(c, 1, k + 1, head_convs, norm_layer=norm)
        head.regression_head = FCOSRegressionHead(c, 1, head_convs, norm_layer=norm)
    # torchvision starts the ReLU'd box branch at 0: every box degenerate (GIoU loss 1) with half its units off. From
    # scratch under AdamW that branch can die for good in the first steps (seen: a ResNet-50 teacher whose box loss
    # stayed at 1.0000 from step 20 on). Starting each side at one anchor size keeps it alive; weights loaded later
    # overwrite it.
    nn.init.constant_(head.regression_head.bbox_reg.bias, FCOS_BOX_BIAS)
    return FCOS(backbone, k + 1, head=head, **common, **options)


def _build_faster_rcnn(backbone: BackboneWithFPN, k: int, head_convs: int, common: dict, options: dict) -> nn.Module:
    _check_options("faster_rcnn", FasterRCNN, options, extra={"representation_size"})
    rep = options.pop("representation_size", 1024)
    c = backbone.out_channels
    anchor_generator = options.pop("rpn_anchor_generator", None) or AnchorGenerator(
        ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5
    )
    roi_pool = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], output_size=7, sampling_ratio=2)
    return FasterRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchor_generator,
        rpn_head=RPNHead(c, anchor_generator.num_anchors_per_location()[0], conv_depth=head_convs),
        box_roi_pool=options.pop("box_roi_pool", roi_pool),
        box_head=TwoMLPHead(c * 7 * 7, rep),
        box_predictor=FastRCNNPredictor(rep, k + 1),
        **common,
        **options,
    )


def _build_gfl(backbone: BackboneWithFPN, k: int, head_convs: int, common: dict, options: dict) -> nn.Module:
    from detkd.models.gfl import GFL  # local import: gfl.py imports nothing from the zoo, but keeps startup light

    _check_options("gfl", GFL, options)
    return GFL(backbone, k, head_convs=head_convs, **common, **options)


_BUILDERS = {
    "retinanet": _build_retinanet,
    "fcos": _build_fcos,
    "faster_rcnn": _build_faster_rcnn,
    "gfl": _build_gfl,
}


def build(
    family: str,
    backbone: str = "resnet18",
    num_classes: int | None = None,
    *,
    fpn_channels: int = 256,
    head_convs: int = 4,
    min_size: int = 800,
    max_size: int = 1333,
    backbone_norm: str = "bn",
    weights: str | None = None,
    backbone_weights: str | None = None,
    **options,
) -> nn.Module:
    """Build a detector with random init (or local weights) and attach ``model.detkd_spec``.

    ``num_classes`` is the number of real classes K (labels 1..K): torchvision families get K+1 outputs (index 0
    unused/background), GFL gets K sigmoid outputs. ``head_convs`` is the depth of the dense heads' towers and of the
    RPN head's conv. ``weights``/``backbone_weights``: local checkpoint path or torchvision weights name already in
    the torch hub cache (never downloaded). Unknown ``options`` raise TypeError naming the option.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown detector family {family!r}; choose one of {FAMILIES}")
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"build({family!r}): num_classes must be the number of real classes (an int >= 1), got "
                         f"{num_classes!r}")
    if not _is_int(fpn_channels) or fpn_channels < 1:
        raise ValueError(f"build({family!r}): fpn_channels must be an int >= 1, got {fpn_channels!r}")
    if not _is_int(head_convs) or head_convs < 0:
        raise ValueError(f"build({family!r}): head_convs must be an int >= 0, got {head_convs!r}")
    body, level_names, strides = build_backbone(
        backbone,
        dense=family != "faster_rcnn",
        fpn_channels=int(fpn_channels),
        norm=backbone_norm,
        backbone_weights=backbone_weights,
    )
    common = {"min_size": min_size, "max_size": max_size}
    model = _BUILDERS[family](body, int(num_classes), int(head_convs), common, dict(options))
    if weights is not None:
        load_weights(model, weights)
    args = {"head_convs": int(head_convs), "min_size": min_size, "max_size": max_size, "backbone_norm": backbone_norm,
            "weights": None if weights is None else str(weights),
            "backbone_weights": None if backbone_weights is None else str(backbone_weights), "options": dict(options)}
    model.detkd_spec = ModelSpec(family, backbone, int(num_classes), level_names, strides, int(fpn_channels), args)
    return model


def _is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool, a float or a string."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
