"""Command line: ``detkd train|eval|demo|inspect|viz|viz-curves|data stats|data synth``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from detkd.config import ConfigError, SynthConfig, load_config

#: ``detkd demo --method`` choices, the default first (detkd.demo's METHODS and DEFAULT_METHOD; not imported here, so
#: that the parser does not load the models)
DEMO_METHODS = ("cwd", "fgd", "hint", "ld", "lgd")

console = Console()


def _cmd_train(args: argparse.Namespace) -> int:
    from detkd.runner import earlier_run, train_from_config

    cfg = load_config(args.config, args.set)
    earlier = earlier_run(cfg.run_dir)
    if earlier and not (args.resume or args.overwrite):
        raise ConfigError(f"{cfg.run_dir} already holds a run ({', '.join(earlier)}): continue it with --resume, "
                          "replace it with --overwrite, or train into another folder (--set name=...)")
    result = train_from_config(cfg, resume=args.resume)
    _print_metrics(f"{cfg.name}: {result.steps} steps in {result.wall_time:.0f}s", result.metrics)
    console.print(f"run folder: {result.run_dir}  (student weights: {result.run_dir / 'last.pt'})")
    if result.stopped:
        again = ["detkd", "train", args.config, *(f"--set={s}" for s in args.set), "--resume"]
        console.print(f"stopped early at step {result.steps}: continue with `{escape(shlex.join(again))}`")
        return 130
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from detkd.runner import eval_from_config

    cfg = load_config(args.config, args.set)
    metrics = eval_from_config(cfg, args.checkpoint, split=args.split)
    if args.json:
        print(json.dumps(metrics))
    else:
        _print_metrics(f"{cfg.name}: {args.checkpoint}", metrics)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from detkd.demo import run_demo

    run_demo(quick=args.quick, method=args.method, out_dir=Path(args.out), console=console)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from detkd.inspect import inspect_config

    cfg = load_config(args.config, args.set)
    inspect_config(cfg, console=console)
    return 0


def _cmd_viz(args: argparse.Namespace) -> int:
    from detkd.viz import render_report

    cfg = load_config(args.config, args.set)
    paths = render_report(cfg, Path(args.out), student_weights=args.student, teacher_weights=args.teacher,
                          num_images=args.images, split=args.split)
    console.print(f"{len(paths)} pictures written to {args.out} (see {Path(args.out) / 'index.md'})")
    return 0


def _cmd_viz_curves(args: argparse.Namespace) -> int:
    from detkd.viz import save_training_curves

    console.print(f"training curves: {save_training_curves(Path(args.run_dir))}")
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from detkd.data.stats import dataset_stats, format_stats_table, open_dataset

    dataset = open_dataset(args.path, format=args.format, split=args.split, image_root=args.image_root)
    stats = dataset_stats(dataset)
    if args.json:
        print(json.dumps(stats))
    else:
        console.print(format_stats_table(stats))
    return 0


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from detkd.data.synthetic import generate

    cfg = SynthConfig(num_train=args.num_train, num_val=args.num_val, image_size=args.image_size, seed=args.seed)
    generate(Path(args.out), cfg)
    console.print(f"synthetic COCO dataset written to {args.out} ({cfg.num_train} train / {cfg.num_val} val images)")
    return 0


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
    from rich.table import Table

    table = Table(title=title)
    keys = [k for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100") if k in metrics]
    for k in keys:
        table.add_column(k, justify="right")
    table.add_row(*(f"{100 * metrics[k]:.1f}" for k in keys))
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detkd", description="Knowledge distillation for object detectors")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a student (plain or distilled) from a recipe")
    t.add_argument("config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (a list entry by index: distill.losses.0.weight=2)")
    t.add_argument("--resume", action="store_true", help="resume from the run folder's state.pt")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in the run folder")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a student checkpoint (COCO metrics)")
    e.add_argument("config")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--split", default=None)
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_cmd_eval)

    d = sub.add_parser("demo", help="the embedded default: synthetic data, teacher, student, distillation, table")
    d.add_argument("--quick", action="store_true", help="a ≤ 3-minute smoke run")
    d.add_argument("--method", default=DEMO_METHODS[0], choices=DEMO_METHODS,
                   help=f"method of the distilled row (default {DEMO_METHODS[0]})")
    d.add_argument("--out", default=".cache/detkd/demo")
    d.set_defaults(func=_cmd_demo)

    i = sub.add_parser("inspect", help="show the feature levels, shapes and strides each loss will consume")
    i.add_argument("config")
    i.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    i.set_defaults(func=_cmd_inspect)

    v = sub.add_parser("viz", help="pictures of what each configured loss distils (masks, regions, distributions)")
    v.add_argument("config")
    v.add_argument("--student", default=None, help="student weights (last.pt); default: fresh init")
    v.add_argument("--teacher", default=None, help="teacher weights; default: the config's teacher.weights")
    v.add_argument("--out", default="viz")
    v.add_argument("--images", type=int, default=2)
    v.add_argument("--split", default="val")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(func=_cmd_viz)
    vc = sub.add_parser("viz-curves", help="plot a run folder's metrics.jsonl")
    vc.add_argument("run_dir")
    vc.set_defaults(func=_cmd_viz_curves)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("stats", help="images, boxes, classes and sizes of a dataset")
    s.add_argument("path")
    s.add_argument("--format", choices=["coco", "voc", "yolo"], default=None)
    s.add_argument("--split", default="train")
    s.add_argument("--image-root", default=None, help="COCO: image folder when it is not beside the json")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_data_stats)
    g = data.add_parser("synth", help="write the synthetic dataset (COCO format)")
    g.add_argument("out")
    g.add_argument("--num-train", type=int, default=SynthConfig.num_train)
    g.add_argument("--num-val", type=int, default=SynthConfig.num_val)
    g.add_argument("--image-size", type=int, default=SynthConfig.image_size)
    g.add_argument("--seed", type=int, default=SynthConfig.seed)
    g.set_defaults(func=_cmd_data_synth)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        if not _user_error(e):
            raise
        console.print(f"[bold red]error:[/] {escape(str(e))}")
        return 2


def _user_error(e: Exception) -> bool:
    """Errors that name the file, record or key at fault: one line, no traceback. OSError: a path that is a file, a
    missing folder; WiringError: a loss that is not finite (or not wired) at the first step; FloatingPointError: too
    many non-finite steps in a row. (Imported here: the parser does not load torch.)"""
    from detkd.distill.distiller import WiringError

    return isinstance(e, (ConfigError, ValueError, OSError, WiringError, FloatingPointError))


if __name__ == "__main__":
    sys.exit(main())
