"""Loading weights without ever downloading them.

A weights spec is either a local checkpoint path (a plain state_dict, or a dict holding one under ``"model"`` or
``"student"``) or a torchvision weights name such as ``"ResNet50_Weights.IMAGENET1K_V1"``, whose file must already
be in ``torch.hub.get_dir()/checkpoints/`` (the place torchvision itself would cache it). Mismatches raise a
``ValueError`` naming the first offending key, instead of torch's multi-page RuntimeError or a silent partial load.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from detkd.engine.checkpoint import load_checkpoint

#: a torchvision weights name such as "ResNet50_Weights.IMAGENET1K_V1" (not a file path)
WEIGHTS_NAME = re.compile(r"^[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+$")
# keys a classification checkpoint has and a detection backbone never uses
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")


def weights_file(name: str) -> Path:
    """Where the torch hub cache keeps torchvision weights ``name``; FileNotFoundError if the file is absent."""
    try:
        enum = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"unknown torchvision weights name {name!r}: {e}") from e
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights {name!r} are not in the local torch cache: expected the file {path} "
            f"(detkd never downloads; copy the file from {enum.url} there, or set TORCH_HOME)"
        )
    return path


def read_state_dict(spec: str | os.PathLike) -> Mapping[str, Tensor]:
    """The state_dict named by ``spec`` (checkpoint path or torchvision weights name), loaded on the CPU."""
    path = Path(spec).expanduser()
    if not path.is_file():
        if isinstance(spec, str) and WEIGHTS_NAME.match(spec):
            path = weights_file(spec)
        else:
            raise FileNotFoundError(
                f"checkpoint {str(spec)!r} not found: not a file, nor a torchvision weights name "
                "like 'ResNet50_Weights.IMAGENET1K_V1'"
            )
    obj = load_checkpoint(path)
    if isinstance(obj, Mapping):
        for key in ("model", "student"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state_dict (or a dict with 'model'/'student'), got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):  # saved from a DDP wrapper
        return {k[len("module.") :]: v for k, v in obj.items()}
    # keep the mapping itself: its ``_metadata`` carries module versions that load hooks use (RetinaNet v1 heads)
    return obj


def load_checked(
    module: nn.Module, state: Mapping[str, Tensor], *, source: str, ignore_missing: tuple[str, ...] = ()
) -> None:
    """Load ``state`` into ``module``; ValueError naming the first key whose shape differs, is missing or unexpected.

    Keys starting with ``ignore_missing`` prefixes may be absent from ``state``. Module load hooks (torchvision's
    FrozenBatchNorm2d, the RetinaNet v1->v2 head renaming) still run, because loading goes through
    ``load_state_dict``.
    """
    own = module.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"{source}: key {key!r} has shape {tuple(value.shape)} in the checkpoint "
                f"but {tuple(own[key].shape)} in the model"
            )
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{source}: {e}") from e
    # BatchNorm's step counter is absent from FrozenBatchNorm2d checkpoints and unused in training: never required
    missing = [
        k for k in result.missing_keys if not k.startswith(ignore_missing) and not k.endswith("num_batches_tracked")
    ]
    if missing:
        raise ValueError(f"{source}: key {missing[0]!r} is missing from the checkpoint ({len(missing)} missing)")
    if result.unexpected_keys:
        unexpected = result.unexpected_keys
        raise ValueError(f"{source}: unexpected key {unexpected[0]!r} in the checkpoint ({len(unexpected)} unexpected)")


def load_weights(model: nn.Module, spec: str | os.PathLike) -> None:
    """Load a whole-detector checkpoint (path or torchvision weights name) into ``model``, strictly."""
    load_checked(model, read_state_dict(spec), source=f"weights {str(spec)!r}")


def load_backbone_weights(net: nn.Module, spec: str | os.PathLike) -> None:
    """Load classification-network weights into ``net`` (a torchvision ResNet / MobileNetV3 before FPN wrapping).

    Accepts an ImageNet state_dict (the classifier keys may be absent), or a detector checkpoint, whose
    ``backbone.body.*`` keys are used. For MobileNet, a body state_dict keyed ``"0.0.weight"`` maps to ``features``.
    """
    state = read_state_dict(spec)
    if any(k.startswith("backbone.body.") for k in state):
        state = {k[len("backbone.body.") :]: v for k, v in state.items() if k.startswith("backbone.body.")}
    if hasattr(net, "features") and state and not any(k.startswith(("features.", "classifier.")) for k in state):
        state = {f"features.{k}": v for k, v in state.items()}
    load_checked(net, state, source=f"backbone weights {str(spec)!r}", ignore_missing=_CLASSIFIER_PREFIXES)
