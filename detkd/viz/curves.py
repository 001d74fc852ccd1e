"""Training curves from a run folder's ``metrics.jsonl`` (format: :mod:`detkd.engine.logging`).

Train records carry ``loss``, ``task/<name>`` and ``distill/<method>/<term>`` (weighted) values, each the mean over
the steps since the previous record; eval records carry the COCO metrics (``AP``, ``AP50``, ...).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


@dataclass
class Curves:
    """Series read from metrics.jsonl. Train series share ``steps``; a series is NaN where a record lacks it.

    task, distill: per train record the sum of its ``task/*`` and ``distill/*`` values;
    per_method: per distillation key (``distill/<key>/...``) the sum of its terms;
    eval_steps / ap: the eval records' steps and metrics (``{"AP": [...], "AP50": [...]}``).
    """

    steps: list[int] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    task: list[float] = field(default_factory=list)
    distill: list[float] = field(default_factory=list)
    per_method: dict[str, list[float]] = field(default_factory=dict)
    eval_steps: list[int] = field(default_factory=list)
    ap: dict[str, list[float]] = field(default_factory=dict)


def _sum(record: dict, prefix: str) -> float:
    values = [v for k, v in record.items() if k.startswith(prefix) and isinstance(v, (int, float))]
    return float(sum(values)) if values else math.nan


def read_curves(path: Path) -> Curves:
    """Parse ``metrics.jsonl``; a line that is not JSON is an error naming the file and the line number."""
    curves = Curves()
    train: list[dict] = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON record: {e}") from e
        if rec.get("event") == "train":
            train.append(rec)
        elif rec.get("event") == "eval":
            curves.eval_steps.append(int(rec["step"]))
            for key in ("AP", "AP50"):
                curves.ap.setdefault(key, []).append(float(rec.get(key, math.nan)))
    methods = sorted({k.split("/")[1] for rec in train for k in rec if k.startswith("distill/")})
    for rec in train:
        curves.steps.append(int(rec["step"]))
        curves.total.append(float(rec.get("loss", math.nan)))
        curves.task.append(_sum(rec, "task/"))
        curves.distill.append(_sum(rec, "distill/"))
        for m in methods:
            curves.per_method.setdefault(m, []).append(_sum(rec, f"distill/{m}/"))
    return curves


def save_training_curves(run_dir: Path) -> Path:
    """Plot ``run_dir/metrics.jsonl`` into ``run_dir/curves.png`` and return its path.

    Left: total, task and distillation loss per logged step (log scale when all positive), one dashed line per
    distillation method when there are several; right: AP and AP50 at the eval events.
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir} (is it a detkd run folder?)")
    c = read_curves(path)
    fig = Figure(figsize=(11, 4), dpi=100, layout="constrained")
    ax_loss, ax_ap = fig.subplots(1, 2)
    fig.suptitle(f"training curves: {run_dir.name}", fontsize=10)
    series = [("total", c.total, "-"), ("task", c.task, "-"), ("distill", c.distill, "-")]
    if len(c.per_method) > 1:
        series += [(f"distill/{m}", v, "--") for m, v in c.per_method.items()]
    for name, values, style in series:
        if not np.isnan(values).all():
            ax_loss.plot(c.steps, values, style, marker="." if len(values) < 30 else None, label=name)
    finite = np.asarray([v for _, vals, _ in series for v in vals if math.isfinite(v)])
    if finite.size and (finite > 0).all():
        ax_loss.set_yscale("log")
    ax_loss.set(xlabel="step", ylabel="loss (mean since previous record)", title="losses")
    ax_loss.legend(fontsize=7)
    for key, values in c.ap.items():
        ax_ap.plot(c.eval_steps, values, "o-", label=key)
    ax_ap.set(xlabel="step", ylabel="COCO metric", title="evaluation" if c.eval_steps else "evaluation (no eval yet)")
    if c.ap:
        ax_ap.legend(fontsize=7)
    out = run_dir / "curves.png"
    fig.savefig(out)
    return out
