"""What LD transfers at the positives: a diagnosis of LD's accuracy on the synthetic set (issue 7).

Main LD pulls the student's edge distributions towards the teacher's at the student's ATSS positives. For finished
GFL runs with kept weights (``accuracy.py --keep-weights``): a teacher and students, all on the same anchors, at the
positives of the reference student's assignment on the validation images (one shared preprocessing, as in training):

* IoU of each model's decoded box with the positive's ground-truth box (mean, median, share above 0.75);
* the share of positives where a model's box beats the reference student's (the teacher's lead is what LD can pass on);
* the entropy of the edge distributions at tau 1 and at LD's tau 10 (``log 17`` = uniform over the 17 bins);
* the max class score at the positives (GFL weights its box losses, and ranks detections, by it).

Usage: ``python benchmarks/ld_positives.py --teacher RUN_DIR --student baseline=RUN_DIR --student ld=RUN_DIR
--reference baseline --tag _synth_mobilenet``. Writes ``benchmarks/results/ld_positives<tag>.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import md_meta, md_table, publish, set_threads  # noqa: E402

from detkd.build import build_model  # noqa: E402
from detkd.config import load_config  # noqa: E402
from detkd.data import build_dataset  # noqa: E402
from detkd.models.adapters import build_adapter  # noqa: E402
from detkd.runner import load_student_weights  # noqa: E402

STATS = ("iou_mean", "iou_median", "iou_above_075", "beats_reference", "entropy_tau1", "entropy_tau10", "score")


def run_config(run_dir: Path) -> Any:
    """The config of a finished GFL run with kept weights."""
    for name in ("config.yaml", "last.pt"):
        if not (run_dir / name).is_file():
            raise SystemExit(f"{run_dir}: no {name} (train the run with accuracy.py --keep-weights)")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.model.family != "gfl":
        raise SystemExit(f"{run_dir}: a {cfg.model.family} run; the statistics read GFL's edge distributions")
    return cfg


def load_model(cfg: Any, run_dir: Path, num_classes: int) -> Any:
    """Adapter of the run's model, in eval mode, with its last.pt."""
    model = build_model(cfg.model, num_classes)
    load_student_weights(model, run_dir / "last.pt")
    return build_adapter(model.eval())


def edge_entropy(dist: torch.Tensor, bins: int, tau: float) -> torch.Tensor:
    """(R,) entropy (nats) of softmax(z / tau) of each edge row of ``dist`` (P, 4 * bins)."""
    p = torch.softmax(dist.reshape(-1, bins).float() / tau, dim=-1)
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


@torch.no_grad()
def positive_stats(models: dict[str, Any], reference: str, dataset: Any, batch_size: int = 10
                   ) -> tuple[int, dict[str, dict[str, float]]]:
    """(number of positives, ``{model: {stat: value}}``) over ``dataset`` at the reference model's positives."""
    acc: dict[str, dict[str, list[torch.Tensor]]] = {k: {s: [] for s in ("iou", "ent1", "ent10", "score", "beats")}
                                                     for k in models}
    ref_adapter = models[reference]
    for start in range(0, len(dataset), batch_size):
        items = [dataset[j] for j in range(start, min(len(dataset), start + batch_size))]
        batch = ref_adapter.preprocess([im for im, _ in items], [t for _, t in items])
        ref = ref_adapter.run(batch, "loss")
        pos = ref.assignment.positive_mask
        gt = torch.zeros(*pos.shape, 4)
        for b, (t, idx) in enumerate(zip(batch.targets, ref.assignment.matched_idxs)):
            if t["boxes"].numel():
                gt[b] = t["boxes"][idx.clamp(min=0)].float()
        anchors = ref.anchors.expand(pos.shape[0], -1, -1)
        ious = {}
        for name, adapter in models.items():
            out = ref if name == reference else adapter.run(batch, "head")
            head = adapter.model.head
            dist = out.head["bbox_dist"][pos]
            ious[name] = box_iou(head.decode(dist, anchors[pos]), gt[pos]).diagonal()
            acc[name]["iou"].append(ious[name])
            acc[name]["ent1"].append(edge_entropy(dist, head.reg_max + 1, 1.0))
            acc[name]["ent10"].append(edge_entropy(dist, head.reg_max + 1, 10.0))
            acc[name]["score"].append(out.head["cls_logits"][pos].float().sigmoid().amax(-1))
        for name in models:
            acc[name]["beats"].append((ious[name] > ious[reference]).float())
    out: dict[str, dict[str, float]] = {}
    for name, a in acc.items():
        c = {k: torch.cat(v) for k, v in a.items()}
        out[name] = {"iou_mean": float(c["iou"].mean()), "iou_median": float(c["iou"].median()),
                     "iou_above_075": float((c["iou"] > 0.75).float().mean()),
                     "beats_reference": float(c["beats"].mean()), "entropy_tau1": float(c["ent1"].mean()),
                     "entropy_tau10": float(c["ent10"].mean()), "score": float(c["score"].mean())}
    return int(torch.cat(acc[reference]["iou"]).numel()), out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, required=True, help="the teacher's run folder")
    p.add_argument("--student", action="append", default=[], metavar="LABEL=RUN_DIR", required=True)
    p.add_argument("--reference", default=None, help="the student whose positives are used (default: the first)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results")
    p.add_argument("--tag", default="", help="suffix of the result file names (ld_positives<tag>)")
    args = p.parse_args(argv)
    try:
        args.students = {k: Path(v) for k, v in (s.split("=", 1) for s in args.student)}
    except ValueError:
        p.error(f"--student takes LABEL=RUN_DIR, got {args.student}")
    if "teacher" in args.students:
        p.error("'teacher' is the --teacher's label")
    args.reference = args.reference or next(iter(args.students))
    if args.reference not in args.students:
        p.error(f"--reference {args.reference!r} is not one of the students {sorted(args.students)}")
    return args


def markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    lines = ["# What LD transfers at the positives", "", md_meta(payload["meta"]), "",
             f"{payload['positives']} positive locations (ATSS assignment of `{s['reference']}`) on {s['images']} "
             f"val images. IoU: decoded box vs its ground truth; `beats ref`: share of positives where the box's IoU "
             f"is above `{s['reference']}`'s; entropy of the edge distributions in nats (uniform: "
             f"{math.log(s['bins']):.3f}); score: max class probability.", ""]
    rows = [[name, f"{r['AP']:.1f}", f"{r['iou_mean']:.3f}", f"{r['iou_median']:.3f}", f"{r['iou_above_075']:.3f}",
             f"{r['beats_reference']:.3f}", f"{r['entropy_tau1']:.3f}", f"{r['entropy_tau10']:.3f}",
             f"{r['score']:.3f}"] for name, r in payload["models"].items()]
    lines += [md_table(["model", "AP", "IoU mean", "IoU median", "IoU > 0.75", "beats ref", "entropy τ1",
                        "entropy τ10", "score"], rows), "", "Runs:", ""]
    lines += [f"- {name}: `{r['run_dir']}`" for name, r in payload["models"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    start = time.perf_counter()
    dirs = {"teacher": args.teacher, **args.students}
    cfgs = {name: run_config(d) for name, d in dirs.items()}
    ref_cfg = cfgs[args.reference]
    dataset = build_dataset(ref_cfg.data, ref_cfg.data.val_split, train=False)  # once: every run shares the data
    models = {name: load_model(cfgs[name], d, dataset.num_classes) for name, d in dirs.items()}
    print(f"[ld_positives] {len(dataset)} val images, positives of {args.reference}", flush=True)
    positives, stats = positive_stats(models, args.reference, dataset)
    for name, d in dirs.items():
        record = d / "bench.json"
        ap = 100 * float(json.loads(record.read_text())["metrics"]["AP"]) if record.is_file() else float("nan")
        stats[name] = {"AP": ap, "run_dir": str(d), **stats[name]}
    payload = {"settings": {"reference": args.reference, "images": len(dataset),
                            "bins": models[args.reference].model.head.reg_max + 1},
               "positives": positives, "models": stats}
    return publish(f"ld_positives{args.tag}", payload, markdown, "cpu", start, argv, args.out_dir)


if __name__ == "__main__":
    main()
