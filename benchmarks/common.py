"""Shared helpers of the benchmark scripts: machine/commit metadata, interleaved timing, result files.

Every result file carries ``meta``: the machine (CPU model, cores, threads, load, torch/torchvision versions, GPU),
the commit (``git rev-parse --short HEAD``, ``+dirty`` when the working tree has changes), the date and the wall
time of the run. Timings are medians over repeated calls measured *interleaved* (round-robin over the candidates,
the order rotated every round) so that slow drifts of a shared machine hit every candidate alike.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------------ metadata


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """Short commit of the repository, with ``+dirty`` when tracked or untracked files differ; "unknown" outside git.
    ``benchmarks/results/`` does not count: a script writes its own outputs there (accuracy.py its plot) before it
    records the commit.

    ``BENCH_COMMIT`` in the environment wins (a copy of the tree without ``.git``, e.g. on a remote GPU machine).
    """
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"], cwd=ROOT,
            capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What the numbers were measured on. ``load_avg_1m`` matters: the CPU may be shared with other jobs."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _torchvision_version(),
        "platform": platform.platform(),
        "device": str(device),
        "gpu": None,
    }
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
        info["cuda"] = torch.version.cuda
    return info


def _torchvision_version() -> str:
    import torchvision

    return torchvision.__version__


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def meta(device: str | torch.device, wall_time_s: float, command: str | None = None) -> dict[str, Any]:
    """The ``meta`` block of a result file."""
    return {
        "machine": machine_info(device),
        "commit": git_commit(),
        "date": now_iso(),
        "wall_time_s": round(wall_time_s, 1),
        "command": command,
    }


def command_line(argv: Sequence[str]) -> str:
    """How the script was called, for the result file (``python benchmarks/x.py --flag ...``)."""
    script = Path(argv[0]) if argv else Path("?")
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", str(script), *argv[1:]])


# ------------------------------------------------------------------------------------------------ recipes

#: the family a method runs on when it is not the chosen one: LD needs GFL's edge distributions, Chen the two stages
METHOD_FAMILY = {"ld": "gfl", "ld_fgd": "gfl", "chen": "faster_rcnn"}


def method_family(method: str, family: str) -> str:
    """The detector family ``method`` is benchmarked on when the run's family is ``family``."""
    return METHOD_FAMILY.get(method, family)


def recipe_path(method: str | None, family: str, dataset: str) -> Path:
    """``configs/`` recipe of a method (None: the baseline student, "teacher": the teacher run)."""
    if method is None:
        name = f"baseline_{family}_r18_{dataset}"
    elif method == "teacher":
        name = f"teacher_{family}_r50_{dataset}"
    elif method == "lgd":
        name = f"lgd_{family}_r18_{dataset}"
    else:
        name = f"{method}_{family}_r50_r18_{dataset}"
    path = ROOT / "configs" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no recipe {path} (method {method!r} on {family!r}, dataset {dataset!r})")
    return path


# ------------------------------------------------------------------------------------------------ timing


def set_threads(n: int | None) -> None:
    """``torch.set_num_threads(n)`` when given. On a small shared CPU, 1 thread gives stable timings: an intra-op
    parallel region waits for every one of its threads to be scheduled, which under contention costs 10-50x."""
    if n:
        torch.set_num_threads(n)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``fn``, with the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(
    fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Time every candidate ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    The order of the candidates rotates by one every round (a, b, c / b, c, a / ...), so no candidate always runs
    right after the same neighbour. Returns the per-call seconds of each candidate.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            times[name].append(time_call(fns[name], device))
    return times


def summary_ms(seconds: list[float]) -> dict[str, float]:
    """Median, min and interquartile range in milliseconds of a list of per-call seconds."""
    ms = sorted(s * 1e3 for s in seconds)
    if not ms:
        return {"median_ms": float("nan"), "min_ms": float("nan"), "iqr_ms": float("nan"), "n": 0}
    if len(ms) >= 4:
        q = statistics.quantiles(ms, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = ms[-1] - ms[0]
    return {"median_ms": round(statistics.median(ms), 4), "min_ms": round(ms[0], 4), "iqr_ms": round(iqr, 4),
            "n": len(ms)}


# ------------------------------------------------------------------------------------------------ output


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are written with 3 significant decimals, None as "n/a"."""

    def cell(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return "nan" if v != v else (f"{v:.3g}" if abs(v) < 0.01 and v != 0 else f"{v:,.2f}")
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def md_meta(m: dict[str, Any]) -> str:
    """The metadata block at the top of every markdown result."""
    mc = m["machine"]
    gpu = f", GPU {mc['gpu']}" if mc.get("gpu") else ""
    lines = [
        f"- machine: {mc['cpu']}, {mc['cores_usable']}/{mc['cores']} cores usable, {mc['torch_threads']} torch "
        f"threads, load {mc['load_avg_1m']}{gpu}",
        f"- software: Python {mc['python']}, torch {mc['torch']}, torchvision {mc['torchvision']}",
        f"- commit {m['commit']}, date {m['date']}, wall time {m['wall_time_s']:.0f} s",
    ]
    if m.get("command"):
        lines.append(f"- command: `{m['command']}`")
    return "\n".join(lines)


def write_results(stem: str, payload: dict[str, Any], markdown: str, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``<out_dir>/<stem>.json`` and ``.md`` (out_dir defaults to benchmarks/results); returns both paths."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def publish(stem: str, payload: dict[str, Any], to_markdown: Callable[[dict[str, Any]], str],
            device: str | torch.device, start: float, argv: Sequence[str] | None, out_dir: Path | None = None
            ) -> dict[str, Any]:
    """A script's last step: prepend ``meta`` (wall time since ``start``, the command line from ``argv`` as passed to
    ``main``, None for ``sys.argv``), write the JSON and Markdown result files, print the Markdown; returns the
    payload with its meta."""
    argv_full = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    payload = {"meta": meta(device, time.perf_counter() - start, command_line(argv_full)), **payload}
    markdown = to_markdown(payload)
    json_path, md_path = write_results(stem, payload, markdown, out_dir)
    print(markdown)
    print(f"\nwrote {json_path} and {md_path}")
    return payload


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
