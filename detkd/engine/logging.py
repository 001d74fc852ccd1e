"""Training logs: ``metrics.jsonl`` (one JSON object per event), TensorBoard scalars and a terminal view.

The terminal view is a rich progress bar with ETA and EMA-smoothed losses when ``progress`` is on, this is rank 0
and stdout is a TTY; otherwise (CI, files, other ranks muted) a compact line every ``log_every`` steps.

metrics.jsonl records: ``{"event": "train", "step", "epoch" (0-based epoch of the step), <every logged value, mean
over the steps since the previous record and over ranks>, "lr", "skipped_steps"}``; ``{"event": "eval", "step",
"epoch" (epochs completed), <metrics>}``; ``{"event": "nonfinite", "step", "epoch", "skipped_steps", "terms"}``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


class WindowMean:
    """Mean of each logged value over the steps since the last log (what a log line reports)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return out


def _fmt(values: dict[str, float], keys: list[str]) -> str:
    return " ".join(f"{k} {values[k]:.4f}" for k in keys if k in values)


def _compact(values: dict[str, float]) -> dict[str, float]:
    """What a terminal line shows: loss, task terms, one sum per distillation method (``distill/<method>``);
    per-level and ``raw/`` terms stay in metrics.jsonl and TensorBoard."""
    out: dict[str, float] = {}
    for k, v in values.items():
        if k in ("lr", "skipped_steps") or k.startswith("raw/"):
            continue
        if k.startswith("distill/"):
            k = "/".join(k.split("/")[:2])
            v = out.get(k, 0.0) + v
        out[k] = v
    return out


def _eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


class RunLogger:
    """Writes metrics.jsonl and TensorBoard under ``run_dir`` and shows progress; a muted no-op when
    ``enabled`` is False (ranks other than 0).

    ``resume_step``: the step the run resumes from; log records after it (written by the interrupted run after its
    last saved state) are dropped from metrics.jsonl and TensorBoard so the logs read as one run.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        total_steps: int,
        log_every: int = 10,
        progress: bool = True,
        enabled: bool = True,
        resume_step: int | None = None,
        ema: float = 0.9,
    ):
        self.enabled = enabled
        self.total = total_steps
        self.log_every = max(int(log_every), 1)
        self.beta = ema
        self.smoothed: dict[str, float] = {}
        self.start_step = resume_step or 0
        self.t0 = time.perf_counter()
        self.bar = self.writer = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            self._truncate(resume_step)
        else:  # a new run in this folder: the logs of an earlier one must not mix with its own
            self.jsonl_path.unlink(missing_ok=True)
            for old in (run_dir / "tb").glob("events.out.tfevents.*"):
                old.unlink()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1)
        if progress and sys.stdout.isatty():
            self._start_bar()

    def _truncate(self, step: int) -> None:
        if not self.jsonl_path.is_file():
            return
        lines = self.jsonl_path.read_text().splitlines()
        keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.jsonl_path.write_text("".join(ln + "\n" for ln in keep))

    def _start_bar(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        self.task = self.bar.add_task("train", total=self.total, completed=self.start_step, info="")
        self.bar.start()

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def step(self, step: int, values: dict[str, float] | None) -> None:
        """Called every optimizer step with that step's values (None for a skipped step): updates the EMA and the
        progress bar."""
        if not self.enabled:
            return
        for k, v in (values or {}).items():
            if math.isfinite(v):
                self.smoothed[k] = v if k not in self.smoothed else self.beta * self.smoothed[k] + (1 - self.beta) * v
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=_fmt(self.smoothed, ["loss"]))

    def log(
        self, event: str, step: int, epoch: int, values: dict[str, float], extra: dict[str, Any] | None = None
    ) -> None:
        """One record: metrics.jsonl line, TensorBoard scalars ``<event>/<key>`` and, without a bar, a line.
        ``extra``: non-numeric details for metrics.jsonl and the printed line only."""
        if not self.enabled:
            return
        self._write({"event": event, "step": step, "epoch": epoch, **values, **(extra or {})})
        for k, v in values.items():
            tag = k if "/" in k and event == "train" else f"{event}/{k}"
            self.writer.add_scalar(tag, v, step)
        if event == "train" and self.bar is None:
            done = step - self.start_step
            rate = (time.perf_counter() - self.t0) / done if done > 0 else math.nan
            shown = _compact(values)
            keys = ["loss", *sorted(k for k in shown if k != "loss")]
            skipped = int(values.get("skipped_steps", 0))
            print(f"step {step}/{self.total} ep {epoch} {_fmt(shown, keys)} lr {values.get('lr', 0):.3g}"
                  + (f" skipped {skipped}" if skipped else "") + f" eta {_eta(rate * (self.total - step))}", flush=True)
        elif event != "train":
            line = f"{event} step {step} ep {epoch}: " + " ".join(f"{k} {v:.4f}" for k, v in values.items())
            line += "".join(f" {k} {v}" for k, v in (extra or {}).items())
            (self.bar.console.print if self.bar is not None else print)(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.writer is not None:
            self.writer.close()
