"""Whose labels each object's instructive vector carries: LGD's relation adapter, read off trained runs (issue 7).

LGD renders, for every GT box, the output of a multi-head attention whose query is the box's pooled student
appearance and whose keys and values are the label embeddings of *all* boxes of the image (docs/methods.md §5.1.4;
the context box too when ``add_context``). Nothing ties a box's query to its own label: if the attention spreads,
the vector painted into a box mixes the other objects' classes and coordinates. This script measures that spread on
the val images of trained LGD runs (run folders of ``detkd train`` that still hold ``state.pt``), per FPN level,
for every box in an image with at least two boxes (with one box the weight on itself is 1 by construction):

* ``own``: mean attention weight on the box's own label row, beside ``uniform``, what a weight spread evenly over
  the image's boxes would give (1/n); ``argmax own``: share of boxes whose largest weight is their own row;
* ``same class``: weight on the *other* boxes of the same class; ``other class``: weight on boxes of another class;
* ``class mass``: own + same class (how much of the rendered label is the right class);
* per run, the mean cosine similarity of the label embeddings (keys and values) of two boxes of one image.

Weights are averaged over the heads (``LGDTeacher.relations``). The run's own metrics (student AP, and the branch's
AP when it ran with ``eval_teacher``) are listed beside them.

Usage: ``python benchmarks/lgd_relations.py RUN_DIR [RUN_DIR ...] --tag _synth``. Writes
``benchmarks/results/lgd_relations<tag>.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import md_meta, md_table, publish, set_threads  # noqa: E402

from detkd.build import build_distiller, build_model  # noqa: E402
from detkd.config import load_config  # noqa: E402
from detkd.data import build_dataset, build_loader  # noqa: E402
from detkd.engine.checkpoint import load_checkpoint  # noqa: E402
from detkd.losses.lgd import LGDLoss  # noqa: E402
from detkd.runner import planned_steps  # noqa: E402

STATS = ("own", "uniform", "argmax_own", "same_class", "other_class", "class_mass")


def _real_pairs(labels: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """(T, T) True where rows i and j are both real boxes (label > 0) of the same image (the diagonal included)."""
    real = labels > 0
    return (image_index[:, None] == image_index[None, :]) & real[:, None] & real[None, :]


def box_shares(weights: torch.Tensor, labels: torch.Tensor, image_index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per real box in an image with >= 2 real boxes: the STATS of its attention row (each (B,)).

    ``weights`` (T, T) rows over the batch's label rows; ``labels`` (T,), 0 for context and dummy rows.
    """
    real_pairs = _real_pairs(labels, image_index)
    keep = (labels > 0) & (real_pairs.sum(1) >= 2)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    same_label = labels[:, None] == labels[None, :]
    own = weights.diagonal()
    same = (weights * (real_pairs & same_label & ~eye)).sum(1)
    other = (weights * (real_pairs & ~same_label)).sum(1)
    # argmax over the real rows of the box's image (the context row is not a box)
    masked = weights.masked_fill(~real_pairs, -1.0)
    argmax_own = masked.argmax(1) == torch.arange(len(labels), device=labels.device)
    out = {"own": own, "uniform": 1.0 / real_pairs.sum(1).clamp(min=1), "argmax_own": argmax_own.float(),
           "same_class": same, "other_class": other,
           "class_mass": own + same}
    return {k: v[keep] for k, v in out.items()}


def label_cosine(emb: torch.Tensor, labels: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the label embeddings of every ordered pair of distinct real boxes of the same image."""
    unit = torch.nn.functional.normalize(emb.float(), dim=1)
    pairs = _real_pairs(labels, image_index) & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return (unit @ unit.T)[pairs]


def load_lgd_run(run_dir: Path) -> tuple[Any, Any, LGDLoss, Any]:
    """(config, distiller in eval mode, its LGD loss module, val set) of a finished ``detkd train`` run folder."""
    state_path = run_dir / "state.pt"
    if not state_path.is_file():
        raise SystemExit(f"{run_dir}: no state.pt (accuracy.py drops it; train the run's config.yaml with "
                         "`detkd train` to keep it)")
    cfg = load_config(run_dir / "config.yaml")
    val_set = build_dataset(cfg.data, cfg.data.val_split, train=False)
    student = build_model(cfg.model, val_set.num_classes)
    # the run's own step count: LGD's post-phase switch (post_nondistill_steps > 0) needs it to build
    distiller = build_distiller(student, None, cfg.distill, num_classes=val_set.num_classes,
                                max_steps=planned_steps(cfg.data, cfg.train))
    distiller.load_state_dict(load_checkpoint(state_path)["trainable"])
    lgd = [sl.module for sl in distiller.losses if isinstance(sl.module, LGDLoss)]
    if not lgd:
        raise SystemExit(f"{run_dir}: the run has no LGD loss")
    return cfg, distiller.eval(), lgd[0], val_set


@torch.no_grad()
def run_relations(run_dir: Path, images: int | None) -> dict[str, Any]:
    cfg, distiller, lgd, val_set = load_lgd_run(run_dir)
    adapter = distiller.student_adapter
    count = len(val_set) if images is None else min(images, len(val_set))
    per_level: dict[str, dict[str, list[torch.Tensor]]] = {}
    boxes_per_image, cosines = [], []
    for batch_images, targets in build_loader(Subset(val_set, range(count)), cfg.data.batch_size, train=False):
        boxes_per_image += [len(t["boxes"]) for t in targets]
        out = adapter.run(adapter.preprocess(batch_images, targets), stage="features")
        rel = lgd.teacher.relations(out.features, out.targets, out.batch_shape)
        cosines.append(label_cosine(rel["labels_emb"], rel["labels"], rel["image_index"]))
        for level in out.features:
            shares = box_shares(rel[f"weights/{level}"], rel["labels"], rel["image_index"])
            for name, values in shares.items():
                per_level.setdefault(level, {}).setdefault(name, []).append(values)
    joined = {level: {name: torch.cat(v) for name, v in stats.items()} for level, stats in per_level.items()}
    levels = {level: {name: float(v.mean()) if v.numel() else float("nan") for name, v in stats.items()}
              for level, stats in joined.items()}
    counted = int(next(iter(joined.values()))["own"].numel()) if joined else 0  # the same boxes on every level
    result = run_dir / "result.json"
    metrics = json.loads(result.read_text())["metrics"] if result.is_file() else {}
    return {"run_dir": str(run_dir), "dataset": cfg.data.format if cfg.data.format == "synthetic" else cfg.data.root,
            "images": count, "boxes_counted": counted,
            "images_with_2plus_boxes": sum(n >= 2 for n in boxes_per_image),
            "mean_boxes_per_image": sum(boxes_per_image) / max(len(boxes_per_image), 1),
            "num_classes": val_set.num_classes, "add_context": lgd.teacher.add_context,
            "relation": lgd.teacher.relation, "label_embedding_cosine": float(torch.cat(cosines).mean()),
            "AP": 100 * metrics["AP"] if "AP" in metrics else None,
            "branch_AP": 100 * metrics["lgd_branch/AP"] if "lgd_branch/AP" in metrics else None,
            "levels": levels}


def markdown(payload: dict[str, Any]) -> str:
    lines = ["# LGD relation adapter: whose labels each box's vector carries", "", md_meta(payload["meta"]), "",
             "Val images; every GT box of an image with at least two boxes; attention weights averaged over heads. "
             "`own`: weight on the box's own label row; `argmax own`: share of boxes whose largest weight is their "
             "own row; `same class` / `other class`: weight on the other boxes of the same / another class; `class "
             "mass` = own + same class. `uniform (1/n)`: the own weight of an attention spread evenly over the n "
             "boxes of the image.", ""]
    for run in payload["runs"]:
        ap = "" if run["AP"] is None else f", student AP {run['AP']:.1f}"
        branch = "" if run["branch_AP"] is None else f", branch AP {run['branch_AP']:.1f}"
        lines += [f"## `{Path(run['run_dir']).name}`", "",
                  f"{run['dataset']}: {run['images']} val images ({run['images_with_2plus_boxes']} with ≥ 2 boxes, "
                  f"{run['mean_boxes_per_image']:.1f} boxes per image, {run['num_classes']} classes), "
                  f"{run['boxes_counted']} boxes counted{ap}{branch}; relation `{run['relation']}`; mean cosine "
                  f"of two label embeddings of one image {run['label_embedding_cosine']:.2f}", ""]
        rows = [[level, *(f"{s[k]:.2f}" for k in STATS)] for level, s in run["levels"].items()]
        headers = ["level", "own", "uniform (1/n)", "argmax own", "same class", "other class", "class mass"]
        lines += [md_table(headers, rows), ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path, help="folders of finished LGD runs with state.pt")
    p.add_argument("--images", type=int, default=None, help="first N val images (default: all)")
    p.add_argument("--tag", default="", help="suffix of the result file names (lgd_relations<tag>)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", type=Path, default=None)
    args = p.parse_args(argv)
    if args.images is not None and args.images < 1:
        p.error(f"--images must be at least 1, got {args.images}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    start = time.perf_counter()
    runs = []
    for run_dir in args.run_dirs:
        print(f"[lgd_relations] {run_dir}", flush=True)
        runs.append(run_relations(run_dir, args.images))
    return publish(f"lgd_relations{args.tag}", {"runs": runs}, markdown, "cpu", start, argv, args.out_dir)


if __name__ == "__main__":
    main()
