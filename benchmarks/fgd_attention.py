"""How concentrated FGD's teacher attention is: a diagnosis of FGD's accuracy on each study's teacher (issue 7).

FGD's focal loss weights every (cell, channel) of (S - T)^2 by the teacher's attention A_S A_C, softmaxes of
``mean |T| / temp`` (``detkd.losses.fgd``); the official temperatures (0.5, FCOS 0.8) were set on teachers with
pretrained backbones. For the cached teacher of an accuracy study (found by its config hash, as ``accuracy.py``
trains it), on the first ``--images`` val images, per FPN level and temperature:

* the effective support of A_S and of A_C (``attention_support``: 1 = uniform, 1/K = one-hot), and the peak A_S;
* the share of A_S inside FGD's foreground mask, and the foreground's share of the cells;
* mean |T| (the scale that ``temp`` divides).

Usage: ``python benchmarks/fgd_attention.py --datasets synth,bccd,thermal --family fcos --cpu-reduced
--teacher-epochs bccd=24,thermal=24`` (the teachers of the README's studies; train one with ``accuracy.py
--teacher-only`` if it is missing). Writes ``benchmarks/results/fgd_attention.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy as acc  # noqa: E402
from common import ROOT, md_meta, md_table, publish, set_threads  # noqa: E402

from detkd.build import build_model  # noqa: E402
from detkd.data import build_dataset, build_loader  # noqa: E402
from detkd.losses.fgd import attention_support, fgd_attention  # noqa: E402
from detkd.models.adapters import build_adapter  # noqa: E402
from detkd.regions.fgd import fgd_masks_levels  # noqa: E402

STATS = ("spatial_support", "channel_support", "peak_spatial", "attention_in_fg", "fg_area", "mean_abs")


def level_stats(t: torch.Tensor, fg: torch.Tensor, temp: float) -> dict[str, torch.Tensor]:
    """Per-image statistics (N,) of the teacher map t (N, C, H, W) with FGD's foreground mask fg (N, H, W)."""
    spatial, channel = fgd_attention(t.float(), temp)
    s_support, c_support = attention_support(spatial), attention_support(channel)
    cells = spatial[0].numel()
    inside = (fg > 0).float()
    return {"spatial_support": s_support, "channel_support": c_support,
            "peak_spatial": spatial.flatten(1).amax(1),
            "attention_in_fg": (spatial * inside).flatten(1).sum(1) / cells,
            "fg_area": inside.flatten(1).mean(1), "mean_abs": t.float().abs().flatten(1).mean(1)}


@torch.no_grad()
def teacher_stats(cfg: Any, weights: Path, temps: list[float], images: int, batch_size: int = 8
                  ) -> dict[str, dict[str, dict[str, float]]]:
    """``{level: {temp: {stat: mean over images}}}`` for the teacher of ``cfg`` with ``weights``."""
    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    model = build_model(dataclasses.replace(cfg.model, weights=str(weights)), dataset.num_classes).eval()
    adapter = build_adapter(model)
    sums: dict[str, dict[str, dict[str, float]]] = {}  # level -> temp -> stat -> sum over images
    count = min(images, len(dataset))
    for batch_images, targets in build_loader(Subset(dataset, range(count)), batch_size, train=False):
        out = adapter.run(adapter.preprocess(batch_images, targets), stage="features")
        levels = list(out.features)
        masks = fgd_masks_levels([t["boxes"] for t in out.targets], out.image_sizes,
                                 [tuple(out.features[lv].shape[-2:]) for lv in levels], batch_shape=out.batch_shape)
        for level, (fg, _) in zip(levels, masks):
            for temp in temps:
                total = sums.setdefault(level, {}).setdefault(str(temp), dict.fromkeys(STATS, 0.0))
                for name, values in level_stats(out.features[level], fg, temp).items():
                    total[name] += float(values.sum())
    return {level: {temp: {k: v / count for k, v in stats.items()} for temp, stats in per_temp.items()}
            for level, per_temp in sums.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="synth,bccd,thermal")
    p.add_argument("--family", default="fcos")
    p.add_argument("--cpu-reduced", action="store_true", help="the teachers of accuracy.py --cpu-reduced studies")
    p.add_argument("--teacher-epochs", default="", help="per dataset, as the studies ran: 'bccd=24,thermal=24'")
    p.add_argument("--set", dest="extra", action="append", default=[], help="override, as accuracy.py --set")
    p.add_argument("--teacher-set", dest="teacher_extra", action="append", default=[],
                   help="teacher-only override, as accuracy.py --teacher-set")
    p.add_argument("--tag", default="", help="suffix of the result file names (fgd_attention<tag>)")
    p.add_argument("--temps", default="0.5,0.8,2,4,8")
    p.add_argument("--images", type=int, default=32, help="first N val images")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--out-dir", type=Path, default=None)
    args = p.parse_args(argv)
    args.dataset_list = [d for d in args.datasets.split(",") if d]
    try:
        args.temp_list = [float(t) for t in args.temps.split(",") if t]
        args.epochs = {k: int(v) for k, v in (item.split("=") for item in args.teacher_epochs.split(",") if item)}
    except ValueError:
        p.error("--temps takes numbers, --teacher-epochs DATASET=EPOCHS[,...]")
    return args


def study_args(dataset: str, args: argparse.Namespace) -> argparse.Namespace:
    """accuracy.py's arguments for the study whose teacher is inspected."""
    argv = ["--dataset", dataset, "--family", args.family, "--runs-dir", str(args.runs_dir)]
    argv += ["--cpu-reduced"] if args.cpu_reduced else []
    argv += ["--teacher-epochs", str(args.epochs[dataset])] if dataset in args.epochs else []
    for item in args.extra:
        argv += ["--set", item]
    for item in args.teacher_extra:
        argv += ["--teacher-set", item]
    return acc.parse_args(argv)


def markdown(payload: dict[str, Any]) -> str:
    lines = ["# FGD teacher attention", "", md_meta(payload["meta"]), "",
             f"First {payload['settings']['images']} val images of each dataset; means over images. Support: "
             "effective fraction of cells (A_S) or channels (A_C) that the attention covers, 1 = uniform, "
             "1/K = one-hot. `A_S in fg`: the share of A_S inside FGD's foreground mask (`fg area`: its share of "
             "the cells).", ""]
    for dataset, entry in payload["teachers"].items():
        lines += [f"## {dataset}: teacher AP {entry['AP']:.1f}", "", f"`{entry['run_dir']}`", ""]
        rows = []
        for level, per_temp in entry["levels"].items():
            for temp, s in per_temp.items():
                rows.append([level, temp, f"{s['mean_abs']:.2f}", f"{s['spatial_support']:.3f}",
                             f"{s['channel_support']:.3f}", f"{s['peak_spatial']:.1f}", f"{s['attention_in_fg']:.2f}",
                             f"{s['fg_area']:.2f}"])
        lines += [md_table(["level", "temp", "mean abs T", "A_S support", "A_C support", "peak A_S", "A_S in fg",
                            "fg area"], rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    start = time.perf_counter()
    teachers = {}
    for dataset in args.dataset_list:
        s_args = study_args(dataset, args)
        cfg = acc.teacher_config(args.family, s_args)
        run_dir = acc.cached_run_dir(cfg, f"teacher_{args.family}", s_args)
        record = run_dir / "bench.json"
        if not (run_dir / "last.pt").is_file() or not record.is_file():
            raise SystemExit(f"{dataset}: no finished teacher run at {run_dir}; train it with benchmarks/accuracy.py "
                             "--teacher-only and the same --dataset/--family/--cpu-reduced/--teacher-epochs/--set/"
                             "--teacher-set")
        print(f"[fgd_attention] {dataset}: {run_dir.name}", flush=True)
        levels = teacher_stats(cfg, run_dir / "last.pt", args.temp_list, args.images)
        ap = 100 * float(json.loads(record.read_text())["metrics"]["AP"])
        teachers[dataset] = {"run_dir": str(run_dir), "AP": ap, "levels": levels}
    payload = {"settings": {"family": args.family, "images": args.images, "temps": args.temp_list,
                            "cpu_reduced": args.cpu_reduced, "teacher_epochs": args.epochs, "overrides": args.extra,
                            "teacher_overrides": args.teacher_extra},
               "teachers": teachers}
    return publish(f"fgd_attention{args.tag}", payload, markdown, "cpu", start, argv, args.out_dir)


if __name__ == "__main__":
    main()
