"""Which boxes LGD's label-guided teacher can see: inside-mask coverage per FPN level (issue 7, LGD diagnosis).

LGD pools the student's features over each box's inside-mask and renders its instance vector back onto the same
grid points (``detkd.regions.inside``, the official integer-grid rule of docs/methods.md §5.4). A box whose mask
holds no grid point on a level is invisible there: its appearance vector is 0 and nothing is rendered for it, so
the instructive pyramid that LGD's student imitates has no object at that place on that level.

For the students of an accuracy study (the LGD recipe of ``--dataset``, with ``accuracy.py``'s overrides, e.g.
``--cpu-reduced``'s input size), this script reads every image of ``--split`` without augmentation, batches them as
the recipe does, runs the student's transform and backbone (feature sizes only; weights do not matter), and counts
per level and per class:

* ``empty``: the share of GT boxes whose inside-mask holds no grid point;
* ``points``: the median number of grid points inside a box;
* the share of boxes empty on *every* level (never seen by the teacher at all).

Usage: ``python benchmarks/lgd_masks.py --datasets synth,bccd --cpu-reduced`` (add ``--set model.min_size=320``
etc. for another input size). Writes ``benchmarks/results/lgd_masks<tag>.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy as acc  # noqa: E402
from common import md_meta, md_table, publish, set_threads  # noqa: E402

from detkd.build import build_model  # noqa: E402
from detkd.data import build_dataset, build_loader  # noqa: E402
from detkd.distill.lgd_modules import label_boxes  # noqa: E402
from detkd.models.adapters import build_adapter  # noqa: E402
from detkd.regions.inside import inside_masks  # noqa: E402


def box_points(targets: list[dict[str, torch.Tensor]], batch_shape: tuple[int, int],
               level_hw: dict[str, tuple[int, int]], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) grid points inside each GT box per level, and the (B,) labels, as LGD builds its masks.

    Boxes are clamped to the padded batch exactly as LGD's ``label_boxes`` does (no context or dummy rows: an image
    without boxes contributes none).
    """
    real = [t for t in targets if len(t["boxes"])]
    if not real:
        return torch.zeros(0, len(level_hw), dtype=torch.long), torch.zeros(0, dtype=torch.long)
    boxes, labels, _, _ = label_boxes(real, batch_shape, num_classes, add_context=False)
    counts = [inside_masks(boxes, batch_shape, hw).flatten(1).sum(1) for hw in level_hw.values()]
    return torch.stack(counts, 1), labels


def summarise(points: torch.Tensor, labels: torch.Tensor, levels: list[str], class_names: list[str]
              ) -> dict[str, Any]:
    """Shares of empty masks and median points per level, overall and per class; the share empty on every level."""
    def group(mask: torch.Tensor) -> dict[str, Any]:
        p = points[mask]
        if len(p) == 0:
            return {"boxes": 0}
        return {"boxes": len(p),
                "empty": {lv: float((p[:, i] == 0).float().mean()) for i, lv in enumerate(levels)},
                "points": {lv: float(p[:, i].float().median()) for i, lv in enumerate(levels)},
                "empty_all_levels": float((p.sum(1) == 0).float().mean())}

    out = {"all": group(torch.ones(len(labels), dtype=torch.bool))}
    for k, name in enumerate(class_names, start=1):
        out[name] = group(labels == k)
    return out


@torch.no_grad()
def coverage(cfg: Any, split: str) -> dict[str, Any]:
    """Inside-mask coverage of the boxes of ``split`` for the student of ``cfg`` (its transform and batch size)."""
    dataset = build_dataset(cfg.data, split, train=False)
    adapter = build_adapter(build_model(cfg.model, dataset.num_classes).eval())
    all_points, all_labels, level_hw, batch_shapes = [], [], {}, set()
    for images, targets in build_loader(dataset, cfg.data.batch_size, train=False):
        out = adapter.run(adapter.preprocess(images, targets), stage="features")
        level_hw = {lv: tuple(f.shape[-2:]) for lv, f in out.features.items()}
        batch_shapes.add(out.batch_shape)
        points, labels = box_points(out.targets, out.batch_shape, level_hw, dataset.num_classes)
        all_points.append(points)
        all_labels.append(labels)
    levels = list(level_hw)
    return {"split": split, "images": len(dataset), "batch_shapes": sorted(batch_shapes),
            "level_hw": {lv: list(hw) for lv, hw in level_hw.items()},
            "coverage": summarise(torch.cat(all_points), torch.cat(all_labels), levels, dataset.class_names)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="synth,bccd")
    p.add_argument("--family", default="fcos")
    p.add_argument("--split", default="train")
    p.add_argument("--cpu-reduced", action="store_true", help="the input size of accuracy.py --cpu-reduced studies")
    p.add_argument("--set", dest="extra", action="append", default=[], help="override, as accuracy.py --set")
    p.add_argument("--tag", default="", help="suffix of the result file names (lgd_masks<tag>)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", type=Path, default=None)
    args = p.parse_args(argv)
    args.dataset_list = [d for d in args.datasets.split(",") if d]
    return args


def markdown(payload: dict[str, Any]) -> str:
    lines = ["# LGD inside-mask coverage", "", md_meta(payload["meta"]), "",
             "Per FPN level: the share of GT boxes whose LGD inside-mask holds no grid point (the label-guided teacher "
             "renders nothing for them there) and, in brackets, the median number of grid points inside a box. "
             "Images read without augmentation, batched as the recipe does.", ""]
    for dataset, entry in payload["datasets"].items():
        cov = entry["coverage"]
        levels = list(entry["level_hw"])
        names = [n for n in cov if cov[n]["boxes"]]
        lines += [f"## {dataset}: {entry['split']} split, {entry['images']} images, input {entry['input_size']}, "
                  f"padded batch {', '.join('x'.join(map(str, s)) for s in entry['batch_shapes'])}", ""]
        rows = [[lv, "x".join(map(str, entry["level_hw"][lv])),
                 *(f"{cov[n]['empty'][lv]:.0%} ({cov[n]['points'][lv]:g})" for n in names)] for lv in levels]
        rows.append(["every level", "", *(f"{cov[n]['empty_all_levels']:.0%}" for n in names)])
        lines += [md_table(["level", "map", *(f"{n} ({cov[n]['boxes']} boxes)" for n in names)], rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    start = time.perf_counter()
    datasets = {}
    for dataset in args.dataset_list:
        s_argv = ["--dataset", dataset, "--family", args.family, *(["--cpu-reduced"] if args.cpu_reduced else [])]
        for item in args.extra:
            s_argv += ["--set", item]
        cfg = acc.student_config("lgd", args.family, acc.parse_args(s_argv), None, 0)
        print(f"[lgd_masks] {dataset}: {cfg.name}", flush=True)
        entry = coverage(cfg, args.split)
        entry["input_size"] = f"{cfg.model.min_size}/{cfg.model.max_size}"
        datasets[dataset] = entry
    payload = {"settings": {"family": args.family, "split": args.split, "cpu_reduced": args.cpu_reduced,
                            "overrides": args.extra}, "datasets": datasets}
    return publish(f"lgd_masks{args.tag}", payload, markdown, "cpu", start, argv, args.out_dir)


if __name__ == "__main__":
    main()
