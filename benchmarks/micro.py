"""Loss-level micro-benchmarks at realistic shapes (issue 7, "Cost").

Inputs are built by hand, no detector runs: a batch of 8 images of 512x512 px, 5 FPN levels (strides 8..128, maps
64², 32², 16², 8², 4²) of 256 channels, 10-50 random boxes per image, GFL-shaped head outputs for the LD terms
(``cls_logits`` (N, L, 80), ``bbox_dist`` (N, L, 68), anchors of side 8·stride at the stride grid, an ATSS
assignment) and Faster R-CNN-shaped RPN/RoI samples for Chen et al. (256 RPN samples and 512 RoIs per image).

Measured, interleaved in one run (medians of repeated calls after warm-up):

* every loss module: milliseconds per call for the forward (autograd recording, as in training) and for
  forward + backward;
* FGD masks and LD's VLR: the vectorised code against the per-box loop reference (``fgd_masks_loop``,
  ``vlr_region_loop``), the speed-up (target >= 10x) and the largest difference between the two results.

Usage: ``python benchmarks/micro.py [--device cpu|cuda] [--quick]``; writes ``benchmarks/results/micro_<device>.json``
and ``.md`` (``--out-dir`` elsewhere, ``--tag`` appends a suffix to the file names).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    interleaved,
    md_meta,
    md_table,
    publish,
    resolve_device,
    set_threads,
    summary_ms,
)
from micro_inputs import LEVELS, QUICK, Inputs, Shapes, build_inputs  # noqa: E402

from detkd.distill.lgd import LGDTeacher  # noqa: E402
from detkd.losses.chen import ChenDenseLoss, ChenLoss  # noqa: E402
from detkd.losses.cwd import CWDLoss  # noqa: E402
from detkd.losses.fgd import FGD_DEFAULTS, FGDLoss  # noqa: E402
from detkd.losses.hint import HintLoss  # noqa: E402
from detkd.losses.ld import VLRLD, MainKD, MainLD  # noqa: E402
from detkd.losses.lgd import SequentialConvs, lgd_distill_loss  # noqa: E402
from detkd.regions.fgd import fgd_masks_levels, fgd_masks_loop  # noqa: E402
from detkd.regions.vlr import vlr_region, vlr_region_loop  # noqa: E402

# ------------------------------------------------------------------------------------------------ candidates


def loss_candidates(inp: Inputs, shapes: Shapes, device: torch.device) -> dict[str, tuple[Callable[[], Tensor], list]]:
    """``{name: (forward returning the summed loss, modules with parameters)}`` for every loss module."""
    lv, sp = list(LEVELS), inp.specs
    modules: dict[str, Any] = {
        "cwd": CWDLoss(lv, sp, sp, tau=1.0),
        "fgd": FGDLoss(lv, sp, sp, **FGD_DEFAULTS["retinanet"]),
        "hint": HintLoss(["p3", "p4", "p5"], sp, sp),
        "ld (Main LD)": MainLD(lv, sp),
        "kd (Main KD)": MainKD(lv, sp),
        "vlr_ld (region + KL)": VLRLD(lv, sp),
        "chen (RPN + RCN)": ChenLoss(lv, sp),
        "chen_dense (GFL)": ChenDenseLoss(lv, sp),
    }
    out: dict[str, tuple[Callable[[], Tensor], list]] = {}
    for name, module in modules.items():
        module.to(device)
        out[name] = (lambda m=module: sum(m(inp.student, inp.teacher).values()), [module])
    # LGD: the distillation term (student adapter + normalised MSE against the instructive pyramid, here random)
    adapter = SequentialConvs(shapes.channels).to(device)
    pyramid = [t.clone() for t in inp.teacher.features.values()]
    feats = list(inp.student.features.values())
    out["lgd distill term"] = (lambda: lgd_distill_loss([adapter(f) for f in feats], pyramid), [adapter])
    # LGD's label-guided teacher modules (label encoder, relation adapter, knowledge mapper) build that pyramid
    lgd_teacher = LGDTeacher(shapes.channels, shapes.classes).to(device)
    shape = inp.student.batch_shape
    out["lgd pyramid (teacher modules)"] = (
        lambda: sum(p.sum() for p in lgd_teacher(inp.student.features, inp.student.targets, shape).values()),
        [lgd_teacher],
    )
    return out


def timed_losses(inp: Inputs, cands: dict, device: torch.device) -> dict[str, Callable[[], Any]]:
    """Two timed callables per loss: forward only (graph recorded) and forward + backward."""

    def clear(mods: list) -> None:
        for t in inp.leaves:
            t.grad = None
        for m in mods:
            m.zero_grad(set_to_none=True)

    fns: dict[str, Callable[[], Any]] = {}
    for name, (forward, mods) in cands.items():
        fns[f"{name}|fwd"] = forward
        fns[f"{name}|fwd+bwd"] = lambda f=forward, m=mods: (clear(m), f().backward())
    return fns


def region_candidates(inp: Inputs, shapes: Shapes) -> dict[str, Callable[[], Any]]:
    """Vectorised FGD masks / VLR against their per-box loop references, on the same boxes and anchors."""
    st = inp.student
    boxes = [t["boxes"] for t in st.targets]
    hws = [tuple(f.shape[-2:]) for f in st.features.values()]
    sizes = st.level_sizes
    return {
        "fgd_masks|vectorised": lambda: fgd_masks_levels(boxes, st.image_sizes, hws, batch_shape=st.batch_shape),
        "fgd_masks|loop": lambda: [fgd_masks_loop(boxes, st.image_sizes, hw, batch_shape=st.batch_shape) for hw in hws],
        "vlr|vectorised": lambda: [vlr_region(st.anchors, sizes, b) for b in boxes],
        "vlr|loop": lambda: [vlr_region_loop(st.anchors, sizes, b) for b in boxes],
    }


def region_agreement(fns: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Largest absolute difference between the vectorised results and the loop references."""
    vec, ref = fns["fgd_masks|vectorised"](), fns["fgd_masks|loop"]()
    fgd = max(float((a - b).abs().max()) for (va, vb), (ra, rb) in zip(vec, ref) for a, b in ((va, ra), (vb, rb)))
    vlr = max(float((a - b.to(a)).abs().max()) for a, b in zip(fns["vlr|vectorised"](), fns["vlr|loop"]()))
    return {"fgd_masks": fgd, "vlr": vlr}


# ------------------------------------------------------------------------------------------------ run


def run(shapes: Shapes, device: torch.device, *, repeats: int, warmup: int, loop_repeats: int, vlr_repeats: int,
        skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """All measurements; returns the JSON payload without ``meta``."""
    inp = build_inputs(shapes, device)
    # regions first, so that the loss modules' large allocations (LGD: GBs) do not weigh on the small ops timed here
    region_fns = region_candidates(inp, shapes)
    agreement = region_agreement(region_fns)  # also serves as the warm-up of the loop references
    regions = {}
    for name, rounds in (("fgd_masks", loop_repeats), ("vlr", vlr_repeats)):
        pair = {k: f for k, f in region_fns.items() if k.startswith(name + "|")}
        times = interleaved(pair, repeats=rounds, warmup=1, device=device)
        vec, loop = summary_ms(times[f"{name}|vectorised"]), summary_ms(times[f"{name}|loop"])
        regions[name] = {"vectorised": vec, "loop": loop, "speedup": round(loop["median_ms"] / vec["median_ms"], 1),
                         "speedup_min": round(loop["min_ms"] / vec["min_ms"], 1), "max_abs_diff": agreement[name]}
    cands = {k: v for k, v in loss_candidates(inp, shapes, device).items() if k not in skip}
    loss_times = interleaved(timed_losses(inp, cands, device), repeats=repeats, warmup=warmup, device=device)
    losses: dict[str, dict] = {}
    for key, secs in loss_times.items():
        name, mode = key.split("|")
        losses.setdefault(name, {})[mode] = summary_ms(secs)
    st = inp.student
    counts = {"boxes_per_image": [len(t["boxes"]) for t in st.targets], "locations": sum(st.level_sizes),
              "positives": int(st.assignment.positive_mask.sum())}
    return {"shapes": asdict(shapes), "counts": counts, "repeats": repeats, "warmup": warmup,
            "loop_repeats": loop_repeats, "vlr_repeats": vlr_repeats, "losses": losses, "regions": regions,
            "target_speedup_met": all(r["speedup"] >= 10 for r in regions.values())}


def to_markdown(payload: dict[str, Any]) -> str:
    sh, counts = payload["shapes"], payload["counts"]
    boxes = counts["boxes_per_image"]
    rows = [[name, v["fwd"]["median_ms"], v["fwd+bwd"]["median_ms"], v["fwd+bwd"]["iqr_ms"]]
            for name, v in payload["losses"].items()]
    region_rows = [[name, r["vectorised"]["median_ms"], r["loop"]["median_ms"], f"{r['speedup']:.1f}x",
                    r["vectorised"]["min_ms"], r["loop"]["min_ms"], f"{r['speedup_min']:.1f}x", r["max_abs_diff"]]
                   for name, r in payload["regions"].items()]
    return "\n\n".join([
        f"# Loss micro-benchmarks ({payload['meta']['machine']['device']})",
        md_meta(payload["meta"]),
        f"Batch {sh['batch']} x {sh['image']}x{sh['image']} px, 5 FPN levels (strides 8..128), {sh['channels']} "
        f"channels, {sh['classes']} classes, {min(boxes)}-{max(boxes)} boxes per image ({sum(boxes)} in all), "
        f"{counts['locations']} head locations per image, {counts['positives']} ATSS positives in the batch. "
        f"Medians of {payload['repeats']} interleaved calls after {payload['warmup']} warm-up rounds; the "
        "forward records the autograd graph as in training.",
        md_table(["loss module", "forward ms", "fwd+bwd ms", "fwd+bwd IQR ms"], rows),
        "## Vectorised regions vs per-box loop reference",
        f"Interleaved pairs after one warm-up round: {payload['loop_repeats']} rounds for the FGD masks (all 5 "
        f"levels, whole batch), {payload['vlr_repeats']} for the VLR (every image of the batch); medians and, "
        "less sensitive to other jobs on a shared machine, minima. max |diff| compares the two results.",
        md_table(["region", "vectorised ms", "loop ms", "speed-up (medians)", "vectorised min ms", "loop min ms",
                  "speed-up (minima)", "max |diff|"], region_rows),
        f"Target speed-up >= 10x (medians): {'met' if payload['target_speedup_met'] else 'NOT met'}.",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke run, not a result)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per loss (default 10, quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2, quick 1)")
    p.add_argument("--loop-repeats", type=int, default=None, help="FGD masks: timed calls per candidate (default 20)")
    p.add_argument("--vlr-repeats", type=int, default=None, help="VLR: timed calls per candidate (default 5)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--image", type=int, default=None, help="image side in px (a multiple of 128)")
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--skip", default="", help="comma-separated loss names to leave out")
    p.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results")
    p.add_argument("--tag", default="", help="suffix of the result file names (micro_<device><tag>)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    device = resolve_device(args.device)
    shapes = QUICK if args.quick else Shapes()
    overrides = {k: getattr(args, k) for k in ("batch", "image", "channels") if getattr(args, k) is not None}
    shapes = replace(shapes, **overrides)
    if shapes.image % 128:
        raise SystemExit(f"--image must be a multiple of 128 (the coarsest stride), got {shapes.image}")
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    loop_repeats = args.loop_repeats if args.loop_repeats is not None else (1 if args.quick else 20)
    vlr_repeats = args.vlr_repeats if args.vlr_repeats is not None else (1 if args.quick else 5)
    start = time.perf_counter()
    payload = run(shapes, device, repeats=repeats, warmup=warmup, loop_repeats=loop_repeats, vlr_repeats=vlr_repeats,
                  skip=tuple(s for s in args.skip.split(",") if s))
    return publish(f"micro_{device.type}{args.tag}", payload, to_markdown, device, start, argv, args.out_dir)


if __name__ == "__main__":
    main()
