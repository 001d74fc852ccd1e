"""``render_report``: pictures of what a config distils, for a few images of its dataset.

For each image: the input with its GT boxes (and the student's / teacher's detections when weights are given), then
one set of figures per configured method: FGD masks, attention and weighted error; LD regions and edge
distributions; CWD channel distributions; LGD inside-masks and pyramids (:mod:`detkd.viz.maps` computes the
arrays with the configured loss modules, :mod:`detkd.viz.draw` draws them). Methods without a picture (hint, Chen)
are listed in ``index.md``.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from detkd.build import build_loss, build_model
from detkd.config import Config, loss_key
from detkd.data import build_dataset
from detkd.losses.base import DistillLoss
from detkd.losses.cwd import CWDLoss
from detkd.losses.fgd import FGDLoss
from detkd.losses.ld import VLRLD, MainKD, MainLD
from detkd.losses.lgd import LGDLoss
from detkd.models.adapters import DetectorAdapter, build_adapter
from detkd.models.weights import WEIGHTS_NAME
from detkd.runner import load_student_weights
from detkd.structures import DetOutputs
from detkd.viz import draw, maps

DET_SCORE_THRESH = 0.3  # detections drawn: above this score, at most MAX_DETS of them
MAX_DETS = 30
_NO_SCHEDULE = 10**9  # LGD validates max_steps against its post phase; the pictures never consult the schedule
_LD_TYPES = (MainLD, MainKD, VLRLD)
_DRAWN = (FGDLoss, CWDLoss, LGDLoss, *_LD_TYPES)


@dataclass
class VizModels:
    """Everything the pictures need, built once from a config."""

    student: nn.Module
    teacher: nn.Module | None
    losses: list[tuple[str, DistillLoss]]
    num_classes: int
    student_source: str | None = None  # the weights file, or None when freshly initialised
    teacher_source: str | None = None
    loss_source: str | None = None  # the state.pt the loss modules (connectors, GcBlocks, LGD) came from
    skipped: list[str] = field(default_factory=list)  # configured methods without a picture

    def note(self) -> str:
        def who(name: str, src: str | None) -> str:
            return f"{name}: {'/'.join(Path(src).parts[-2:])}" if src else f"{name}: FRESH INIT (no weights)"

        parts = [who("student", self.student_source)]
        if self.teacher is not None:
            parts.append(who("teacher", self.teacher_source))
        if self.loss_source:
            parts.append(f"loss modules: {'/'.join(Path(self.loss_source).parts[-2:])}")
        return " | ".join(parts)


def _build_detector(mc, num_classes: int, weights: str | Path | None, who: str,
                    keys: tuple[str, str]) -> tuple[nn.Module, str | None]:
    """A detector in eval mode; ``weights`` if given, else the config's weights, else fresh.

    ``who`` is "student" or "teacher", ``keys`` the option and config key that set its weights (for the messages). A
    given or configured file that does not exist is an error. Nothing is ever downloaded: torchvision weight names
    (backbone or full) are ignored here."""
    flag, key = keys
    configured = mc.weights if mc.weights and not WEIGHTS_NAME.match(mc.weights) else None
    path = weights or configured
    if path and not Path(path).is_file():
        raise FileNotFoundError(f"{flag if weights else key}: {who} weights not found: {path}")
    model = build_model(dataclasses.replace(mc, weights=None, backbone_weights=None), num_classes)
    if path:
        load_student_weights(model, path)
    return model.eval(), (str(path) if path else None)


def _load_loss_state(losses: list[tuple[str, DistillLoss]], state_path: Path) -> bool:
    """Load the trained loss modules (``losses.<i>.module.*`` of the Distiller in ``state.pt``); False if absent."""
    if not state_path.is_file():
        return False
    trainable = torch.load(state_path, map_location="cpu", weights_only=True).get("trainable", {})
    for i, (key, module) in enumerate(losses):
        prefix = f"losses.{i}.module."
        sub = {k[len(prefix):]: v for k, v in trainable.items() if k.startswith(prefix)}
        if not sub and not list(module.state_dict()):
            continue
        try:
            module.load_state_dict(sub, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{state_path}: the state of loss {i} ({key}) does not fit the config: {e}") from e
    return True


def build_viz_models(cfg: Config, num_classes: int, student_weights: str | Path | None = None,
                     teacher_weights: str | Path | None = None) -> VizModels:
    """Student, teacher and the configured loss modules (on the CPU, eval mode, no inheriting).

    When ``student_weights`` sits in a run folder with a ``state.pt``, the loss modules' trained parts (align
    convs, FGD GcBlocks, LGD label-guided modules) are loaded from it.
    """
    torch.manual_seed(cfg.seed)  # fresh models (and loss modules) give the same pictures on every call
    student, s_src = _build_detector(cfg.model, num_classes, student_weights, "student", ("--student", "model.weights"))
    teacher, t_src = (None, None)
    if cfg.teacher is not None:
        teacher, t_src = _build_detector(cfg.teacher, num_classes, teacher_weights, "teacher",
                                         ("--teacher", "teacher.weights"))
        if t_src is None:  # a trained teacher is the point of distilling: say it plainly, not only in index.md
            warnings.warn("viz: the teacher has no weights (--teacher / teacher.weights): its pictures show a freshly "
                          "initialised network", UserWarning, stacklevel=2)
    s_adapter = build_adapter(student)
    t_adapter = build_adapter(teacher) if teacher is not None else None
    losses, skipped, counts = [], [], {}
    for i, lc in enumerate(cfg.distill.losses if cfg.distill is not None else []):
        sl = build_loss(lc, s_adapter, t_adapter, num_classes=num_classes,
                        max_steps=cfg.train.max_steps or _NO_SCHEDULE, allow_resize=cfg.distill.allow_resize,
                        key=loss_key(i, lc))
        counts[lc.method] = counts.get(lc.method, 0) + 1
        key = lc.method if counts[lc.method] == 1 else f"{lc.method}{counts[lc.method]}"  # as the Distiller logs
        losses.append((key, sl.module.eval()))
        if not isinstance(sl.module, _DRAWN):
            skipped.append(key)
    models = VizModels(student, teacher, losses, num_classes, s_src, t_src, skipped=skipped)
    state = Path(s_src).parent / "state.pt" if s_src else None
    if state is not None and _load_loss_state(losses, state):
        models.loss_source = str(state)
    return models


# --------------------------------------------------------------------------------------------- one image
def _stages(losses: list[DistillLoss]) -> tuple[str, str | None]:
    """How far student and teacher must run for the drawn methods."""
    drawn = [m for m in losses if isinstance(m, _DRAWN)]
    head = any(m.teacher_stage == "head" for m in drawn)
    student = "loss" if any(isinstance(m, _LD_TYPES) for m in drawn) else ("head" if head else "features")
    needs_teacher = any(m.teacher_stage is not None for m in drawn)
    return student, ("head" if head else "features") if needs_teacher else None


def _detections(adapter: DetectorAdapter, image: Tensor) -> dict[str, Tensor]:
    det = adapter.detect([image])[0]
    keep = (det["scores"] >= DET_SCORE_THRESH).nonzero().squeeze(1)[:MAX_DETS]
    return {k: det[k][keep].cpu() for k in ("boxes", "labels", "scores")}


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path)
    return path


@dataclass
class _Scene:
    """One preprocessed image with both models' outputs."""

    img: np.ndarray  # (H, W, 3) network input image in [0, 1]
    s_out: DetOutputs
    t_out: DetOutputs | None
    boxes: Tensor  # GT boxes in input coordinates (CPU)
    title: str
    stem: Path


def _render_fgd(scene: _Scene, key: str, loss: FGDLoss, models: VizModels) -> list[Path]:
    data = maps.fgd_maps(loss, scene.s_out, scene.t_out)
    title = f"{scene.title} | {key} (temp {loss.temp:g}, alpha {loss.weights['fg']:g}, beta {loss.weights['bg']:g})"
    fig = draw.figure_fgd(scene.img, data, 0, scene.s_out.strides, scene.boxes, title)
    return [_save(fig, scene.stem.with_name(f"{scene.stem.name}_{key}.png"))]


def _render_cwd(scene: _Scene, key: str, loss: CWDLoss, models: VizModels) -> list[Path]:
    data = maps.cwd_maps(loss, scene.s_out, scene.t_out, 0)
    title = f"{scene.title} | {key} ({loss.source}, tau {loss.tau:g}; the {len(data.channels)} channels of largest KL)"
    fig = draw.figure_cwd(scene.img, data, scene.s_out.strides[data.level], scene.boxes, title)
    return [_save(fig, scene.stem.with_name(f"{scene.stem.name}_{key}.png"))]


def _render_lgd(scene: _Scene, key: str, loss: LGDLoss, models: VizModels) -> list[Path]:
    data = maps.lgd_maps(scene.s_out, 0, models.num_classes, loss)
    trained = "trained" if models.loss_source else "fresh"
    title = f"{scene.title} | {key} (instructive pyramid from {trained} label-guided modules)"
    fig = draw.figure_lgd(scene.img, data, scene.s_out.strides, scene.boxes, title)
    return [_save(fig, scene.stem.with_name(f"{scene.stem.name}_{key}.png"))]


def _render_ld(scene: _Scene, ld_losses: list[DistillLoss]) -> list[Path]:
    vlr = next((m for m in ld_losses if isinstance(m, VLRLD)), None)
    tau = next((m.tau for m in ld_losses if isinstance(m, (MainLD, VLRLD))), 10.0)
    regions = maps.ld_regions(scene.s_out, vlr)
    edges = maps.edge_distributions(scene.s_out, scene.t_out, 0, tau=tau) if scene.t_out is not None else None
    names = "+".join(m.name for m in ld_losses)
    title = f"{scene.title} | {names} regions" + ("" if vlr else " | VLR with the LD defaults (vlr_ld not configured)")
    fig = draw.figure_ld_regions(scene.img, regions, 0, scene.boxes, edges, title)
    paths = [_save(fig, scene.stem.with_name(f"{scene.stem.name}_ld_regions.png"))]
    if edges is not None:
        where = f"{edges.level} cell (y={edges.cell[0]}, x={edges.cell[1]})"
        fig = draw.figure_ld_edges(edges, f"{scene.title} | LD edge distributions at the starred positive, {where}")
        paths.append(_save(fig, scene.stem.with_name(f"{scene.stem.name}_ld_edges.png")))
    return paths


_RENDERERS = ((FGDLoss, _render_fgd), (CWDLoss, _render_cwd), (LGDLoss, _render_lgd))


def _detection_figure(models: VizModels, image: Tensor, target: dict, class_names, title: str) -> Figure:
    """GT boxes, then the detections of each model that has weights (fresh models would only draw noise)."""
    img = image.permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    panels = [("ground truth", img, {k: target[k].cpu() for k in ("boxes", "labels")})]
    for name, model, src in (("student", models.student, models.student_source),
                             ("teacher", models.teacher, models.teacher_source)):
        if model is not None and src:
            panels.append((f"{name} (score >= {DET_SCORE_THRESH:g})", img, _detections(build_adapter(model), image)))
    if len(panels) == 1:
        title += " | detections are drawn for models with weights only"
    return draw.figure_detections(panels, class_names, title)


@torch.no_grad()
def render_image(models: VizModels, image: Tensor, target: dict, stem: Path, class_names, title: str) -> list[Path]:
    """All figures for one dataset image; files are ``<stem>_<figure>.png``."""
    device = next(models.student.parameters()).device
    image = image.to(device)
    target = {"boxes": target["boxes"].to(device).float(), "labels": target["labels"].to(device)}
    paths = [_save(_detection_figure(models, image, target, class_names, f"{title} | {models.note()}"),
                   stem.with_name(f"{stem.name}_detections.png"))]
    modules = [m for _, m in models.losses]
    s_stage, t_stage = _stages(modules)
    s_adapter = build_adapter(models.student)
    batch = s_adapter.preprocess([image], [target])
    s_out = s_adapter.run(batch, s_stage)
    # the teacher sees the student's padded batch (shared geometry), as in training
    t_out = build_adapter(models.teacher).run(batch, t_stage) if t_stage and models.teacher is not None else None
    transform = models.student.transform
    img = draw.input_image(batch.images.tensors[0], transform.image_mean, transform.image_std)
    scene = _Scene(img, s_out, t_out, s_out.targets[0]["boxes"].cpu(), f"{title} | {models.note()}", stem)
    for key, module in models.losses:
        for cls, render in _RENDERERS:
            if isinstance(module, cls):
                paths += render(scene, key, module, models)
    ld = [m for m in modules if isinstance(m, _LD_TYPES)]
    if ld:
        paths += _render_ld(scene, ld)
    return paths


def _split_name(cfg: Config, split: str) -> str:
    return {"val": cfg.data.val_split, "train": cfg.data.train_split}.get(split, split)


def render_report(cfg: Config, out_dir: Path, *, student_weights: str | Path | None = None,
                  teacher_weights: str | Path | None = None, num_images: int = 2, split: str = "val") -> list[Path]:
    """Write the pictures for the first ``num_images`` images of ``split`` ("val", "train" or a split name) to
    ``out_dir`` and return the PNG paths (an ``index.md`` beside them lists them and any method without pictures).

    Weights: the given files, else ``model.weights`` / ``teacher.weights`` (a path that does not exist is a
    FileNotFoundError), else a fresh initialisation (seeded with ``cfg.seed``; the figure titles say so, and a
    warning for the teacher): masks and regions depend only on the boxes, attention and distributions then show an
    untrained network. Everything runs on the CPU (a few images).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = build_dataset(cfg.data, _split_name(cfg, split), train=False)
    models = build_viz_models(cfg, dataset.num_classes, student_weights, teacher_weights)
    paths: list[Path] = []
    for idx in range(min(num_images, len(dataset))):
        image, target = dataset[idx]
        title = f"{cfg.name} | {split} image {idx} (id {target.get('image_id', idx)})"
        paths += render_image(models, image, target, out_dir / f"img{idx:03d}", dataset.class_names, title)
    _write_index(out_dir, paths, models)
    return paths


def _write_index(out_dir: Path, paths: list[Path], models: VizModels) -> None:
    lines = ["# detkd distillation pictures", "", models.note(), ""]
    if models.loss_source:
        lines += [f"Loss modules (align convs, GcBlocks, LGD modules) loaded from {models.loss_source}.", ""]
    if models.skipped:
        lines += [f"No pictures for: {', '.join(models.skipped)}.", ""]
    lines += [f"- [{p.name}]({p.name})" for p in paths]
    (out_dir / "index.md").write_text("\n".join(lines) + "\n")
