"""Checks that a teacher/student pair can be distilled by a method, before any training step runs.

Feature methods (FitNet-style hints, CWD, FGD, ...) compare maps level by level: every requested level must exist on
both sides with the same stride (a connector fixes channels; a resize only when asked for). Head methods (LD, KD on
logits, Chen's RPN/RCN terms) compare outputs location by location, so both heads must be of the same family, with
the same classes, strides and anchors. Failures raise :class:`PairError` naming the method, the level or field, and
both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from detkd.structures import FeatureSpec

REQUIREMENTS = ("features", "same_head")


class PairError(ValueError):
    """A teacher/student pair that a method cannot use."""


@dataclass(frozen=True)
class HeadSignature:
    """What must agree for two heads' outputs to correspond one to one.

    ``anchor_sizes``/``aspect_ratios`` are the anchor generator's settings (empty when unknown); ``num_anchors`` is
    the number of anchors per location.
    """

    family: str
    num_classes: int
    strides: tuple[int, ...]
    num_anchors: int
    anchor_sizes: tuple = ()
    aspect_ratios: tuple = ()


def _anchor_generator(model: nn.Module):
    rpn = getattr(model, "rpn", None)
    return rpn.anchor_generator if rpn is not None else getattr(model, "anchor_generator", None)


def head_signature(adapter) -> HeadSignature:
    """The :class:`HeadSignature` of an adapter's model (from attributes only, no forward pass)."""
    gen = _anchor_generator(adapter.model)
    if gen is None:
        num, sizes, ratios = 1, (), ()
    else:
        num = int(gen.num_anchors_per_location()[0])
        sizes = tuple(tuple(s) for s in gen.sizes)
        ratios = tuple(tuple(r) for r in gen.aspect_ratios)
    return HeadSignature(adapter.family, adapter.num_classes, tuple(adapter.strides.values()), num, sizes, ratios)


def check_pair(
    method: str,
    requirement: str,
    student_specs: dict[str, FeatureSpec],
    teacher_specs: dict[str, FeatureSpec],
    levels: list[str],
    *,
    allow_resize: bool = False,
    student_head: HeadSignature | None = None,
    teacher_head: HeadSignature | None = None,
) -> None:
    """Raise :class:`PairError` unless ``method`` can pair the two models at ``levels``.

    requirement "features": each level exists in both specs with equal strides (unless ``allow_resize``);
    channels may differ (a connector maps them). "same_head": that, plus equal head signatures.
    """
    if requirement not in REQUIREMENTS:
        raise ValueError(f"{method}: unknown pair requirement {requirement!r}; choose one of {REQUIREMENTS}")
    if not levels:
        raise PairError(f"{method}: no levels requested")
    for level in levels:
        _check_level(method, level, student_specs, teacher_specs, allow_resize)
    if requirement == "same_head":
        _check_heads(method, student_head, teacher_head)


def _check_level(method: str, level: str, student: dict, teacher: dict, allow_resize: bool) -> None:
    for side, specs in (("student", student), ("teacher", teacher)):
        if level not in specs:
            raise PairError(f"{method}: level {level!r} is missing in the {side} (its levels: {sorted(specs)})")
    s, t = student[level], teacher[level]
    if s.stride != t.stride and not allow_resize:
        raise PairError(
            f"{method}: level {level!r} has student {s} but teacher {t}; strides must be equal "
            "(or allow the connector to resize)"
        )


def _check_heads(method: str, student: HeadSignature | None, teacher: HeadSignature | None) -> None:
    if student is None or teacher is None:
        raise PairError(f"{method}: needs the same head on both sides; pass student_head and teacher_head")
    fields = ("family", "num_classes", "strides", "num_anchors", "anchor_sizes", "aspect_ratios")
    for name in fields:
        a, b = getattr(student, name), getattr(teacher, name)
        if name in ("anchor_sizes", "aspect_ratios") and (not a or not b):
            continue  # unknown on one side: num_anchors already checked
        if a != b:
            raise PairError(f"{method}: needs the same head, but {name} differs: student {a!r} vs teacher {b!r}")


def check_shared_input(method: str, student_model: nn.Module, teacher_model: nn.Module) -> None:
    """The teacher runs on the student's preprocessed batch, so both transforms must normalise and pad alike."""
    s, t = student_model.transform, teacher_model.transform
    for name in ("image_mean", "image_std", "size_divisible"):
        a, b = _plain(getattr(s, name)), _plain(getattr(t, name))
        if a != b:
            raise PairError(
                f"{method}: teacher and student share one preprocessed batch, but transform.{name} differs: "
                f"student {a!r} vs teacher {b!r}"
            )


def _plain(value):
    """Lists and tuples compare equal when their items do (torchvision stores mean/std as either)."""
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else value
