"""Typed configuration: YAML recipes -> dataclasses, with strict key and type checks.

One recipe file is one complete experiment (no inheritance, no interpolation). ``--set a.b=c`` overrides are
parsed as YAML scalars and checked against the field's type. Unknown keys and wrong types are errors naming the key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema; the message names the key."""


@dataclass
class SynthConfig:
    num_train: int = 400
    num_val: int = 100
    image_size: int = 160
    max_objects: int = 6
    seed: int = 0


@dataclass
class DataConfig:
    format: str = "synthetic"  # coco | voc | yolo | synthetic
    root: str = ".cache/detkd/synthetic"
    train_split: str = "train"
    val_split: str = "val"
    ann_file: str | None = None  # COCO: json pattern, "{split}" is replaced; default root/annotations_{split}.json
    image_root: str | None = None  # COCO: image folder; default root/images
    skip_bad_images: bool = False
    class_names: list[str] | None = None  # VOC: class order (labels 1..K); default: sorted names over all xml files
    batch_size: int = 4
    num_workers: int = 0
    hflip: float = 0.5
    scale_jitter: list[float] | None = None  # e.g. [0.8, 1.2]: random rescale of the image before the model transform
    synthetic: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class ModelConfig:
    family: str = "retinanet"  # retinanet | fcos | faster_rcnn | gfl
    backbone: str = "resnet18"
    num_classes: int | None = None  # None: taken from the dataset
    fpn_channels: int = 256
    head_convs: int = 4
    min_size: int = 800
    max_size: int = 1333
    backbone_norm: str = "bn"  # bn | frozen_bn | gn
    weights: str | None = None  # local checkpoint path or torchvision weights name (already in the torch cache)
    backbone_weights: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # family-specific extras passed to the builder


@dataclass
class LossConfig:
    method: str = ""
    levels: list[str] | None = None  # None: every level the method supports
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    start_step: int = 0
    stop_step: int | None = None


@dataclass
class DistillConfig:
    losses: list[LossConfig] = field(default_factory=list)
    teacher_bf16: bool = False
    inherit: bool = False  # FGD "inheriting": copy teacher neck+head into the student where shapes match
    check_first_step: bool = True
    task_weights: dict[str, float] = field(default_factory=dict)  # e.g. Chen's mu on {"loss_classifier": 0.5}
    allow_resize: bool = False  # feature methods: resize student maps to the teacher's when strides differ


@dataclass
class TrainConfig:
    epochs: int = 12
    max_steps: int | None = None
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    warmup_factor: float = 0.001
    schedule: str = "cosine"  # cosine | step | constant
    milestones: list[float] = field(default_factory=lambda: [0.67, 0.89])  # fractions of the total steps
    gamma: float = 0.1
    grad_clip: float | None = None
    accumulate: int = 1
    amp: str = "auto"  # auto (bf16 on GPUs of compute capability 8+, fp16 below, off on CPU) | off | bf16 | fp16
    device: str = "auto"
    log_every: int = 10
    eval_every: int = 0  # epochs; 0: only at the end
    max_nonfinite: int = 5  # abort after this many non-finite steps in a row
    checkpoint_every: int = 0  # steps; 0: resume state saved at the end (and on SIGINT/SIGTERM) only
    find_unused_parameters: bool = False  # DDP: force it on (fit turns it on for LGD warm-up, windowed losses)
    progress: bool = True


@dataclass
class EvalConfig:
    batch_size: int = 8
    score_thresh: float = 0.05
    max_detections: int = 100


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig | None = None
    distill: DistillConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# --------------------------------------------------------------------------------------------- conversion


#: a number in exponent notation without a dot ("1e-3", "5E4"), which PyYAML's YAML 1.1 resolver leaves a string
_EXPONENT_NUMBER = re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:  # Optional[X]: X's own error names the nested key
            return _convert(value, real[0], key)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT_NUMBER.match(value):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; every other reader calls it a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (allowed: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_override(cfg: Config, assignment: str) -> Config:
    """Apply one ``a.b=c`` override; the value is parsed as YAML and type-checked.

    An optional section that is unset (``teacher``, ``distill``) is created with its defaults first, so that
    ``--set teacher.backbone=resnet50`` works on a recipe without a teacher. Keys under ``options`` and ``params``
    are free-form. An entry of a list of sections is named by its index: ``distill.losses.0.params.tau=2`` (an
    existing entry only; ``distill.losses=[...]`` replaces the whole list).
    """
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key=value")
    key, raw = assignment.split("=", 1)
    value = load_yaml(raw) if raw != "" else None
    data = to_dict(cfg)
    node: Any = data
    tp: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if isinstance(tp, _ListOf):  # node is the list; part must index an existing entry
            if not part.isdigit() or int(part) >= len(node):
                named = f", named by their index 0..{len(node) - 1}" if node else ""
                raise ConfigError(f"unknown key {path}: {'.'.join(parts[:i])} has {len(node)} entries{named}")
            if last:
                node[int(part)] = value
                break
            node, tp = node[int(part)], tp.item
            continue
        free = tp is dict
        if not free and part not in {f.name for f in dataclasses.fields(tp)}:
            raise ConfigError(f"unknown key {path}")
        if last:
            node[part] = value
            break
        sub_tp = dict if free else _dataclass_of(typing.get_type_hints(tp)[part])
        if sub_tp is None:
            raise ConfigError(f"unknown key {'.'.join(parts[: i + 2])} ({path} is not a section)")
        if node.get(part) is None:
            node[part] = {} if sub_tp is dict else ([] if isinstance(sub_tp, _ListOf) else to_dict(sub_tp()))
        node, tp = node[part], sub_tp
    return from_dict(Config, data)


@dataclass(frozen=True)
class _ListOf:
    """A ``list[Section]`` annotation while an override walks the config: its entries are named by index."""

    item: type


def _dataclass_of(tp: Any) -> Any:
    """The dataclass (or dict, or ``_ListOf`` a dataclass) inside an annotation such as ``ModelConfig | None``."""
    candidates = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    for arg in candidates:
        if dataclasses.is_dataclass(arg) or typing.get_origin(arg) is dict:
            return arg if dataclasses.is_dataclass(arg) else dict
        items = typing.get_args(arg) if typing.get_origin(arg) is list else ()
        if len(items) == 1 and dataclasses.is_dataclass(items[0]):
            return _ListOf(items[0])
    return None


class YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 booleans: only true/false are booleans. PyYAML follows YAML 1.1, where
    ``on``/``off``/``yes``/``no`` are booleans too, so ``train.amp: off`` (or ``--set train.amp=off``) reached the
    config as False, and a YOLO class named ``no`` as a boolean."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))


def load_yaml(text: str) -> Any:
    """One YAML document with :class:`YamlLoader` (YAML 1.2 booleans)."""
    return yaml.load(text, Loader=YamlLoader)


class _UniqueKeyLoader(YamlLoader):
    """:class:`YamlLoader` that refuses a key given twice in one mapping (plain YAML keeps the last one, so a second
    ``train:`` block would silently drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                first = seen[key].line + 1
                raise yaml.constructor.ConstructorError("while reading a mapping", node.start_mark,
                                                        f"found the key {key!r} a second time (first on line {first})",
                                                        key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        raise ConfigError(f"{path}: empty recipe (a recipe must set at least the data and model it trains)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    try:
        cfg = from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    for ov in overrides or []:
        cfg = apply_override(cfg, ov)
    try:
        return check_ranges(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def loss_key(index: int, lc: LossConfig) -> str:
    """How errors name the ``index``-th ``distill.losses`` entry: ``distill.losses[2] (vlr_ld)``."""
    return f"distill.losses[{index}] ({lc.method})"


def check_ranges(cfg: Config) -> Config:
    """Values that have the right type but no meaning (no steps, a probability above 1, an empty loss window):
    ConfigError naming the key. ``load_config`` applies it to the final config (after the overrides)."""
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    t, d = cfg.train, cfg.data
    if t.max_steps is None:
        need(t.epochs >= 1, f"train.epochs must be at least 1, got {t.epochs}")
    else:
        need(t.max_steps >= 1, f"train.max_steps must be at least 1 (or null: train.epochs), got {t.max_steps}")
    need(t.lr > 0, f"train.lr must be positive, got {t.lr}")
    need(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    need(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    need(t.accumulate >= 1, f"train.accumulate must be at least 1, got {t.accumulate}")
    need(t.grad_clip is None or t.grad_clip > 0, f"train.grad_clip must be positive (or null), got {t.grad_clip}")
    need(d.batch_size >= 1, f"data.batch_size must be at least 1, got {d.batch_size}")
    need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    need(0.0 <= d.hflip <= 1.0, f"data.hflip is a probability (0 to 1), got {d.hflip}")
    need(cfg.eval.batch_size >= 1, f"eval.batch_size must be at least 1, got {cfg.eval.batch_size}")
    for i, lc in enumerate(cfg.distill.losses if cfg.distill is not None else []):
        key = loss_key(i, lc)
        need(lc.start_step >= 0, f"{key}: start_step must be >= 0, got {lc.start_step}")
        need(lc.stop_step is None or lc.stop_step > lc.start_step,
             f"{key}: stop_step ({lc.stop_step}) must be after start_step ({lc.start_step}): the loss would never run")
        need(t.max_steps is None or lc.start_step < t.max_steps,
             f"{key}: start_step ({lc.start_step}) is not before train.max_steps ({t.max_steps}): the loss would "
             "never run")
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def dump_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
