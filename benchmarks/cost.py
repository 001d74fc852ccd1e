"""What distillation costs per training step (issue 7, "Cost").

Per method, on real detectors from ``detkd.models.build`` and the real Distiller from
``detkd.build.build_distiller`` (hyper-parameters from the ``configs/`` recipes), four training steps are timed
*interleaved* in one run (plain, a, b, c, plain, a, b, c, ..., the order rotated every round), each step being
zero_grad + forward + backward + gradient clipping (the recipe's) + AdamW step:

* ``plain``: the student alone, ``model(images, targets)`` as torchvision runs it;
* ``a``: the student alone through its adapter (what the Distiller runs for the student);
* ``b``: ``a`` + the teacher's forward, on the same preprocessed batch, as far as the method needs
  (FrozenTeacher.run: no grad, eval mode);
* ``c``: the full distillation step (``Distiller.forward``: student, teacher, connectors, loss modules).

Reported: median ms per step, the teacher share (b - a)/a, the machinery overhead (c - b)/b (target <= 5%), the
adapter overhead (a - plain)/plain, and the peak memory of one step above what is resident before it
(CUDA: ``max_memory_allocated``; CPU: the process's peak RSS, reset through /proc/self/clear_refs after
``malloc_trim``, Linux + glibc only, else n/a), plus the resident weights and AdamW state each variant owns.

Teacher options (``--options-method``, default fgd): the full step and the teacher's forward alone with an fp32 or a
bf16 teacher, stopping after the FPN ("features", what feature methods need) or running the whole dense head ("full").

Inputs are random images of ``--size`` px with ``--boxes`` random boxes each (3 classes, like BCCD): timings do not
depend on the pixel values. Teachers have random weights (no checkpoint is needed to time them).
Usage: ``python benchmarks/cost.py [--device cpu|cuda] [--size 320] [--batch 2] [--methods cwd,fgd,...]``; writes
``benchmarks/results/cost_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS_DIR,
    interleaved,
    method_family,
    now_iso,
    publish,
    recipe_path,
    resolve_device,
    set_threads,
    summary_ms,
)
from memory import memory_accounting, step_peak_mib  # noqa: E402
from report import VARIANTS, cost_markdown  # noqa: E402
from steps import Setup, StageTeacher, losses_only, step_variants, teacher_forward_only, teacher_stage  # noqa: E402

from detkd.build import build_distiller, build_model  # noqa: E402
from detkd.config import DistillConfig, load_config  # noqa: E402
from detkd.distill.distiller import Distiller  # noqa: E402
from detkd.engine.optim import amp_dtype  # noqa: E402

DEFAULT_METHODS = ("cwd", "fgd", "hint", "ld", "ld_fgd", "chen", "lgd")
NUM_CLASSES = 3


# ------------------------------------------------------------------------------------------------ building


def random_batch(batch: int, size: int, boxes: int, device: torch.device, seed: int) -> tuple[list, list]:
    """``batch`` random (3, size, size) images with ``boxes`` random boxes (16 px .. size/3) and labels 1..3."""
    gen = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch):
        wh = 16 + torch.rand(boxes, 2, generator=gen) * (size / 3 - 16)
        xy = torch.rand(boxes, 2, generator=gen) * (size - wh)
        labels = torch.randint(1, NUM_CLASSES + 1, (boxes,), generator=gen)
        images.append(torch.rand(3, size, size, generator=gen).to(device))
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device), "labels": labels.to(device)})
    return images, targets


def steady_state(dc: DistillConfig) -> DistillConfig:
    """LGD's warm-up (student detached, backbone frozen for the first 20-30k steps) would hide its cost: time it
    in its steady state, with both phases over."""
    losses = []
    for lc in dc.losses:
        if lc.method == "lgd":
            lc = dataclasses.replace(lc, params={**lc.params, "pre_nondistill_steps": 0, "freeze_backbone_steps": 0})
        losses.append(lc)
    return dataclasses.replace(dc, losses=losses, check_first_step=False)


def build_setup(method: str, family: str, args: argparse.Namespace, device: torch.device) -> Setup:
    family = method_family(method, family)
    cfg = load_config(recipe_path(method, family, args.dataset))
    torch.manual_seed(args.seed)
    sized = {"min_size": args.size, "max_size": args.size}
    student = build_model(dataclasses.replace(cfg.model, **sized), NUM_CLASSES).to(device)
    teacher = None
    if cfg.teacher is not None:
        teacher = build_model(dataclasses.replace(cfg.teacher, weights=None, **sized), NUM_CLASSES).to(device)
    cfg = dataclasses.replace(cfg, distill=steady_state(cfg.distill))
    images, targets = random_batch(args.batch, args.size, args.boxes, device, args.seed)
    return Setup(method, family, cfg, student, teacher, images, targets)


def make_distiller(setup: Setup, *, bf16: bool = False, stage: str | None = None) -> Distiller:
    teacher = None
    if setup.teacher_model is not None:
        teacher = StageTeacher(setup.teacher_model, bf16=bf16, stage=stage)
    distiller = build_distiller(setup.student, teacher, setup.cfg.distill, num_classes=NUM_CLASSES, max_steps=10**6)
    distiller.to(setup.images[0].device).train()
    distiller.set_step(0)
    return distiller


# ------------------------------------------------------------------------------------------------ runs


def bench_method(setup: Setup, args: argparse.Namespace, device: torch.device, amp: torch.dtype | None) -> dict:
    distiller = make_distiller(setup)
    steps = step_variants(setup, distiller, amp)
    times = interleaved({**steps, "losses": losses_only(setup, distiller, amp)}, repeats=args.repeats,
                        warmup=args.warmup, device=device)
    t = {v: summary_ms(times[v])["median_ms"] for v in times}
    return {
        "family": setup.family,
        "losses": [lc.method for lc in setup.cfg.distill.losses],
        "teacher_stage": teacher_stage(distiller),
        "step_ms": {v: summary_ms(times[v]) for v in VARIANTS},
        "losses_only_ms": summary_ms(times["losses"]),
        "teacher_share": (t["b"] - t["a"]) / t["a"],
        "machinery_overhead": (t["c"] - t["b"]) / t["b"],
        "machinery_ms": t["c"] - t["b"],
        "losses_share": t["losses"] / t["b"],
        "adapter_overhead": (t["a"] - t["plain"]) / t["plain"],
        "paired": {"teacher_share": paired_ratio(times["b"], times["a"]),
                   "machinery_overhead": paired_ratio(times["c"], times["b"]),
                   "adapter_overhead": paired_ratio(times["a"], times["plain"])},
        "step_peak_mib": {v: (step_peak_mib(steps[v], device) if args.memory else None) for v in VARIANTS},
        **memory_accounting(setup, distiller),
    }


def paired_ratio(num: list[float], den: list[float]) -> dict[str, float]:
    """Median and quartiles over rounds of num_r / den_r - 1. The two steps of a round ran back to back, so their
    ratio cancels the slow drifts of a shared machine that a ratio of medians keeps."""
    ratios = sorted(n / d - 1 for n, d in zip(num, den))
    if len(ratios) < 4:
        return {"median": statistics.median(ratios), "q1": ratios[0], "q3": ratios[-1]}
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3}


def teacher_options(setup: Setup, args: argparse.Namespace, device: torch.device, amp: torch.dtype | None) -> dict:
    """Full steps and teacher-only forwards for fp32/bf16 and features-only/full teacher runs, interleaved."""
    fns: dict[str, Callable[[], Any]] = {}
    for precision in ("fp32", "bf16"):
        for reach, stage in (("features", None), ("full", "head")):
            distiller = make_distiller(setup, bf16=precision == "bf16", stage=stage)
            steps = step_variants(setup, distiller, amp)
            fns[f"step|{precision}|{reach}"] = steps["c"]
            fns[f"teacher|{precision}|{reach}"] = teacher_forward_only(setup, distiller, stage or "features")
    times = interleaved(fns, repeats=args.repeats, warmup=args.warmup, device=device)
    return {key: summary_ms(secs) for key, secs in times.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every method, then the teacher options. Each finished part is saved to ``<stem>.partial.json`` at once;
    ``--resume`` keeps the parts found there (each method is interleaved within itself, so parts may come from
    different processes: every part records its own date and machine load)."""
    device = resolve_device(args.device)
    amp = amp_dtype(args.amp, device)  # train.amp's rule: auto = bf16 on GPUs of compute capability 8+, fp16 below
    partial = (Path(args.out_dir) if args.out_dir else RESULTS_DIR) / f"cost_{device.type}{args.tag}.partial.json"
    done = json.loads(partial.read_text()) if args.resume and partial.is_file() else {"methods": {}}
    methods: dict[str, dict] = done["methods"]
    for method in args.methods:
        if method not in methods:
            setup = build_setup(method, args.family, args, device)
            methods[method] = {**bench_method(setup, args, device, amp), "date": now_iso(), "load": _load()}
            _save_partial(partial, done)
            del setup
            gc.collect()
        print(f"{method}: " + ", ".join(f"{v} {methods[method]['step_ms'][v]['median_ms']:.1f} ms" for v in VARIANTS),
              flush=True)
    if args.options_method and done.get("teacher_options") is None:
        setup = build_setup(args.options_method, args.family, args, device)
        if setup.teacher_model is None:
            raise SystemExit(f"--options-method {args.options_method}: the method has no teacher")
        done["teacher_options"] = {"method": args.options_method, "family": setup.family, "date": now_iso(),
                                   "results": teacher_options(setup, args, device, amp)}
        _save_partial(partial, done)
    partial.unlink(missing_ok=True)
    return {
        "settings": {"size": args.size, "batch": args.batch, "boxes": args.boxes, "amp": str(amp),
                     "repeats": args.repeats, "warmup": args.warmup, "dataset_recipes": args.dataset,
                     "family": args.family},
        "methods": {m: methods[m] for m in args.methods},
        "teacher_options": done.get("teacher_options") if args.options_method else None,
        "target_machinery_met": {m: methods[m]["paired"]["machinery_overhead"]["median"] <= 0.05
                                 for m in args.methods},
        "target_losses_share_met": {m: methods[m]["losses_share"] <= 0.05 for m in args.methods},
    }


def _load() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _save_partial(path: Path, done: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(done, indent=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated; ld*/chen pick their family")
    p.add_argument("--family", default="retinanet", help="family of the feature methods and LGD")
    p.add_argument("--dataset", default="bccd", help="recipes whose hyper-parameters are used (synth | bccd)")
    p.add_argument("--size", type=int, default=320, help="input side in px")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--boxes", type=int, default=12, help="boxes per image")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="student autocast, as train.amp (auto: bf16 on GPUs of compute capability 8+, fp16 on older "
                   "ones, off on CPU)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--options-method", default="fgd", help="method of the teacher-options table ('' to skip)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory measurements")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--resume", action="store_true", help="keep the parts saved by an interrupted run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results")
    p.add_argument("--tag", default="", help="suffix of the result file names (cost_<device><tag>)")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    start = time.perf_counter()
    return publish(f"cost_{args.device}{args.tag}", run(args), cost_markdown, args.device, start, argv, args.out_dir)


if __name__ == "__main__":
    main()
