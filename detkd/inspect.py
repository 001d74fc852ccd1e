"""``detkd inspect CONFIG``: show the wiring (levels, shapes, strides, what each loss consumes) before training."""

from __future__ import annotations

import dataclasses

import torch
from rich.console import Console
from rich.table import Table

from detkd.build import build_loss, build_model
from detkd.config import Config
from detkd.data import build_dataset
from detkd.data.loader import collate
from detkd.models import count_parameters
from detkd.models.adapters import build_adapter
from detkd.models.connectors import Connector


def _shape(t: torch.Tensor | None) -> str:
    return "—" if t is None else "×".join(str(s) for s in t.shape)


@torch.no_grad()
def inspect_config(cfg: Config, *, console: Console | None = None) -> dict:
    """Print and return the wiring of ``cfg`` on one real training batch (teacher weights are not loaded)."""
    console = console or Console()
    dataset = build_dataset(cfg.data, cfg.data.train_split, train=False)
    images, targets = collate([dataset[i] for i in range(min(cfg.data.batch_size, len(dataset)))])
    student = build_model(cfg.model, dataset.num_classes).eval()
    s_adapter = build_adapter(student)
    batch = s_adapter.preprocess(images, targets)
    s_out = s_adapter.run(batch, stage="features")
    t_adapter, t_out = None, None
    if cfg.teacher is not None:
        teacher = build_model(dataclasses.replace(cfg.teacher, weights=None), dataset.num_classes).eval()
        t_adapter = build_adapter(teacher)
        t_out = t_adapter.run(batch, stage="features")

    title = f"{cfg.name}: batch {tuple(batch.images.tensors.shape)}, {dataset.num_classes} classes"
    levels = Table(title=title)
    for col in ("level", "stride", "student (N×C×H×W)", "teacher (N×C×H×W)"):
        levels.add_column(col)
    for name, feat in s_out.features.items():
        t_feat = t_out.features.get(name) if t_out is not None else None
        levels.add_row(name, str(s_out.strides[name]), _shape(feat), _shape(t_feat))
    console.print(levels)
    console.print(f"student {cfg.model.family}/{cfg.model.backbone}: {count_parameters(student) / 1e6:.2f} M params")

    report = {"levels": {k: list(v.shape) for k, v in s_out.features.items()}, "losses": []}
    if cfg.distill is not None:
        losses = Table(title="distillation losses")
        for col in ("method", "levels", "weight", "steps", "teacher runs to", "learnable", "params"):
            losses.add_column(col)
        for lc in cfg.distill.losses:
            sl = build_loss(lc, s_adapter, t_adapter, num_classes=dataset.num_classes, max_steps=cfg.train.max_steps,
                            allow_resize=cfg.distill.allow_resize)
            n_conn = sum(isinstance(m, Connector) for m in sl.module.modules())
            n_params = sum(p.numel() for p in sl.module.parameters())
            learn = f"{n_params} params" + (f", {n_conn} connectors" if n_conn else "")
            steps = f"{lc.start_step}–{lc.stop_step if lc.stop_step is not None else 'end'}"
            losses.add_row(lc.method, ",".join(sl.module.levels), f"{lc.weight:g}", steps,
                           str(sl.module.teacher_stage or "no teacher"), learn, str(lc.params or ""))
            report["losses"].append({"method": lc.method, "levels": sl.module.levels, "parameters": n_params,
                                     "connectors": n_conn, "teacher_stage": sl.module.teacher_stage})
        console.print(losses)
    return report
