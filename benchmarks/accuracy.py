"""The gain: AP of the student with each distillation method against the same student trained alone (issue 7).

For a dataset and a detector family: train the teacher once per family (cached by config hash under
``runs/bench/``), then the baseline student and the student with each method on the same schedule and seeds, from
the ``configs/`` recipes (``--set`` overrides applied to every run alike, the teacher's included; ``--student-set``
ones to the students only, ``--teacher-set`` ones to the teachers only). A method whose recipe changes the student
(``fgd_inherit``: the teacher's neck and head widths) is compared with that student trained alone, on the same seeds.
LD runs on GFL, Chen on Faster R-CNN, LGD needs no teacher; a combination is named ``a+b`` (the losses of both
recipes on the first one's family) or by its recipe (``ld_fgd``). Every run is cached under its config hash:
re-running a command reuses finished runs, so a study can be split over several processes (``--only-seeds``,
``--teacher-only``) and then reported by the full command.

Reported (``benchmarks/results/accuracy_<dataset>.json`` / ``.md`` / ``.png``): AP, AP50, AP75 (COCO, x100) as
mean ± std over seeds; the delta against the baseline with a 95% t-interval over the paired seed differences; the
gap closed, (AP_distilled − AP_student) / (AP_teacher − AP_student) with seed means; machine, commit, date and wall
time of the study and of every run.

Usage: ``python benchmarks/accuracy.py --dataset synth|bccd|thermal --family retinanet --methods cwd,fgd,... --seeds 3
[--epochs N] [--cpu-reduced] [--device auto|cpu|cuda] [--set key=value ...] [--student-set key=value ...]
[--teacher-set key=value ...]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS_DIR,
    ROOT,
    git_commit,
    machine_info,
    method_family,
    now_iso,
    publish,
    recipe_path,
    set_threads,
)
from report import accuracy_markdown, accuracy_plot  # noqa: E402
from stats import summarize  # noqa: E402

from detkd.config import Config, DataConfig, ModelConfig, apply_override, load_config, to_dict  # noqa: E402
from detkd.losses import LOSSES  # noqa: E402
from detkd.losses.lgd import scaled_warmup  # noqa: E402
from detkd.runner import planned_steps  # noqa: E402

DEFAULT_METHODS = ("cwd", "fgd", "hint", "ld", "chen", "lgd", "ld_fgd")
#: --cpu-reduced: schedules two CPU cores finish in a session. synth = the full ``detkd demo`` plan (96 px, 200 train /
#: 150 val images, 500 steps of batch 8), where the from-scratch ResNet-50 teacher is clearly ahead of the ResNet-18
#: student; bccd / thermal: 160 px (long side), 10 epochs of batch 4 (520 steps on BCCD). Short, from scratch: not
#: converged results.
SYNTH_CPU = ["data.synthetic.num_train=200", "data.synthetic.num_val=150", "data.synthetic.image_size=96",
             "data.root=.cache/detkd/synthetic_cpu"]
REDUCED = {
    "synth": [*SYNTH_CPU, *(f"{m}.{k}=96" for m in ("model", "teacher") for k in ("min_size", "max_size")),
              "train.epochs=20", "train.warmup_steps=20"],
    "bccd": [*(f"{m}.{k}=160" for m in ("model", "teacher") for k in ("min_size", "max_size")),
             "train.epochs=10", "train.warmup_steps=20"],
}
REDUCED["thermal"] = REDUCED["bccd"]


# ------------------------------------------------------------------------------------------------ configs


def thermal_data(batch_size: int) -> DataConfig:
    """Thermal dogs & people (no recipes): the COCO conversion with its own ``images/`` folder."""
    return DataConfig(format="coco", root="../shared/data/thermal/coco", batch_size=batch_size)


def load_recipe(method: str | None, family: str, dataset: str) -> Config:
    """The recipe of ``method`` (None: baseline, "teacher") on ``family``; "a+b" merges the recipes' losses."""
    if method and "+" in method:
        parts = [load_recipe(m, family, dataset) for m in method.split("+")]
        losses = [lc for p in parts for lc in p.distill.losses]
        weights = {k: v for p in parts for k, v in p.distill.task_weights.items()}
        distill = dataclasses.replace(parts[0].distill, losses=losses, task_weights=weights)
        return dataclasses.replace(parts[0], name=method.replace("+", "_"), distill=distill)
    if dataset == "thermal":
        cfg = load_config(recipe_path(method, family, "bccd"))
        return dataclasses.replace(cfg, name=cfg.name.replace("bccd", "thermal"),
                                   data=thermal_data(cfg.data.batch_size))
    return load_config(recipe_path(method, family, dataset))


def absolute_paths(cfg: Config) -> Config:
    """Relative data paths of the recipes are relative to the repository root; make them independent of the cwd."""

    def fix(p: str | None) -> str | None:
        return p if p is None or Path(p).is_absolute() else str((ROOT / p).resolve())

    data = dataclasses.replace(cfg.data, root=fix(cfg.data.root), image_root=fix(cfg.data.image_root),
                               ann_file=fix(cfg.data.ann_file))
    return dataclasses.replace(cfg, data=data)


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    for ov in overrides:
        key = ov.split("=", 1)[0]
        if (key.startswith("teacher.") and cfg.teacher is None) or (key.startswith("distill.") and cfg.distill is None):
            continue  # teacher / distill overrides do not create a section for LGD / baselines / teacher runs
        cfg = apply_override(cfg, ov)
    return cfg


def config_hash(cfg: Config) -> str:
    """Hash of everything that changes a run's result (not its name or where it is written)."""
    d = to_dict(cfg)
    d.pop("name")
    d.pop("output_dir")
    d["train"].pop("progress", None)
    d["train"].pop("log_every", None)
    # The device decides the numerics (train.amp=auto: bf16/fp16 autocast on CUDA, fp32 on CPU), so a GPU run and a CPU
    # run of one config are two cache entries. CPU runs keep the hash of the device as the studies gave it ("auto").
    device = _auto_device(d["train"]["device"]).split(":")[0]  # "cpu" or "cuda" (any GPU index)
    d["train"]["device"] = "auto" if device == "cpu" else device
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def scale_losses(cfg: Config, scales: dict[str, float]) -> Config:
    """Multiply the weight of every loss term of method ``m`` by ``scales[m]`` (``--scale fgd=0.01``): FGD's
    official weights assume pretrained features; from scratch its terms start ~300x the task loss."""
    if cfg.distill is None or not scales:
        return cfg
    losses = [dataclasses.replace(lc, weight=lc.weight * scales.get(lc.method, 1.0)) for lc in cfg.distill.losses]
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, losses=losses))


def scale_lgd_schedule(cfg: Config) -> Config:
    """LGD's warm-up phases are fixed step counts (30k detached, 20k frozen backbone, of 180k): keep their
    fractions (1/6, 1/9) of the schedule actually run (the recipes' own counts are those fractions of the recipe's
    schedule, which the benchmark may shorten)."""
    if cfg.distill is None or not any(lc.method == "lgd" for lc in cfg.distill.losses):
        return cfg
    total = planned_steps(cfg.data, cfg.train)
    losses = []
    for lc in cfg.distill.losses:
        if lc.method == "lgd":
            params = {**lc.params, **scaled_warmup(total)}
            lc = dataclasses.replace(lc, params=params)
        losses.append(lc)
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, losses=losses))


# ------------------------------------------------------------------------------------------------ runs


#: what a finished run leaves besides its record: the teacher's weights (the students distil from last.pt); the
#: students' checkpoints only with --keep-weights (a three-seed study trains ~150 runs of ~265 MB each)
RESUME_STATE, WEIGHTS = ("state.pt",), ("last.pt", "best.pt")


def run_cached(cfg: Config, label: str, runs_dir: Path, dataset: str, keep_weights: bool = False) -> dict[str, Any]:
    """Train + evaluate ``cfg`` unless a finished run with the same config hash exists; returns its record.

    A finished run is one with ``bench.json``; with ``keep_weights`` (the teachers) also its ``last.pt``. Once
    recorded, a run's resume state is deleted, and so are its checkpoints unless ``keep_weights``."""
    from detkd.runner import train_from_config

    key = config_hash(cfg)
    name = f"{dataset}_{label}_{key}"  # (cached_run_dir)
    cfg = dataclasses.replace(cfg, name=name, output_dir=str(runs_dir))
    record_file = runs_dir / name / "bench.json"

    def finished(record: Path) -> bool:
        return record.is_file() and (not keep_weights or (record.parent / "last.pt").is_file())

    # processes splitting a study (--only-seeds, --methods) may need the same run (a baseline, a teacher), perhaps
    # under another label: the first trains it under an exclusive lock on the config, the others wait and read it
    with (runs_dir / f".{dataset}_{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if finished(record_file):
            return json.loads(record_file.read_text())
        for other in sorted(runs_dir.glob(f"{dataset}_*_{key}/bench.json")):  # the same config under another label
            if finished(other):  # (e.g. a recipe that a study once built with --set overrides)
                return {**json.loads(other.read_text()), "label": label}
        print(f"[accuracy] training {name} (seed {cfg.seed})", flush=True)
        result = train_from_config(cfg)
        if result.stopped:  # a signal: leave no record, so that the next call trains this run again
            raise SystemExit(f"[accuracy] {name} stopped at step {result.steps}; not recorded")
        record = {"label": label, "run_dir": str(result.run_dir), "seed": cfg.seed, "metrics": result.metrics,
                  "steps": result.steps, "wall_time_s": round(result.wall_time, 1), "date": now_iso(), "hash": key,
                  "skipped_steps": result.skipped_steps, "commit": git_commit(), "machine": _machine(cfg.train.device)}
        record_file.write_text(json.dumps(record, indent=2))
        for file in RESUME_STATE + (() if keep_weights else WEIGHTS):
            (Path(result.run_dir) / file).unlink(missing_ok=True)
        return record


def _machine(device: str) -> str:
    info = machine_info(_auto_device(device))
    return info["gpu"] or f"{info['cpu']} ({info['torch_threads']} threads)"


class Variant(NamedTuple):
    """One ``--methods`` entry: the method (or ``a+b``) with its own loss-term scales and loss parameters."""

    entry: str
    method: str
    scales: dict[str, float]
    params: dict[str, dict[str, float | str]]


def parse_variant(entry: str) -> Variant:
    """``"ld@kd=0.1:vlr_ld=0"``: LD with its own loss-term scales, which replace ``--scale``'s for those terms;
    ``"fgd@fgd.alpha_fgd=0"``: FGD with a parameter of its ``fgd`` loss set (not scaled) — a sweep or an ablation in
    one report. A parameter's value is a number or a word (``"ld@ld.normalize=positives"``; ``true``/``false`` for a
    flag of the loss, see :func:`apply_variant`); a scale is a number."""
    method, _, spec = entry.partition("@")
    scales: dict[str, float] = {}
    params: dict[str, dict[str, float | str]] = {}
    for item in filter(None, spec.split(":")):
        term, _, factor = item.partition("=")
        loss, dot, param = term.partition(".")
        value: float | str | None
        try:
            value = float(factor)  # also fails when "=" is missing (factor "")
        except ValueError:
            value = factor if dot and factor.isidentifier() else None  # a word only for a parameter
        if not loss or (dot and not param) or value is None:
            raise ValueError(f"--methods {entry!r}: a variant is METHOD@TERM=FACTOR[:TERM=FACTOR...], "
                             "where TERM is a loss (its weight is scaled by the number FACTOR) or LOSS.PARAM "
                             "(the parameter is set to FACTOR, a number, true/false or a word)")
        if dot:
            params.setdefault(loss, {})[param] = value
        else:
            scales[loss] = value
    return Variant(entry, method, scales, params)


def apply_variant(cfg: Config, variant: Variant) -> Config:
    """Set the variant's loss parameters in ``cfg`` (its scales are applied with ``--scale``'s by
    :func:`scale_losses`). A loss or parameter the recipe's loss lacks is an error: a typo would otherwise leave the
    recipe as it is, and the report would call it a sweep or an ablation."""
    losses = {lc.method: lc for lc in cfg.distill.losses} if cfg.distill else {}
    missing = sorted({*variant.scales, *variant.params} - set(losses))
    if missing:
        raise ValueError(f"--methods {variant.entry!r}: the recipe has no {missing[0]!r} loss "
                         f"(it has {sorted(losses)})")
    for loss, values in variant.params.items():
        known = set(losses[loss].params) | (LOSSES[loss].param_names() if loss in LOSSES else set())
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"--methods {variant.entry!r}: the {loss!r} loss has no parameter {unknown[0]!r} "
                             f"(it has {sorted(known)})")
    if not variant.params:
        return cfg
    typed = {loss: {name: _flag(loss, name, value, variant.entry) for name, value in values.items()}
             for loss, values in variant.params.items()}
    new = [dataclasses.replace(lc, params={**lc.params, **typed[lc.method]}) if lc.method in typed
           else lc for lc in cfg.distill.losses]
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, losses=new))


def _flag(loss: str, name: str, value: float | str, entry: str) -> float | str | bool:
    """``value`` as the loss's parameter takes it: the word true/false is a bool for a flag (``lgd.eval_teacher``:
    the string "false" would be truthy) and stays a word elsewhere (``vlr_ld.diou=true`` is the string "true")."""
    param = inspect.signature(LOSSES[loss].__init__).parameters.get(name) if loss in LOSSES else None
    if param is None or not isinstance(param.default, bool):
        return value
    if not isinstance(value, str) or value.lower() not in ("true", "false"):
        raise ValueError(f"--methods {entry!r}: {loss}.{name} is a flag: set it to true or false, got {value!r}")
    return value.lower() == "true"


def variant_family(variant: Variant, args: argparse.Namespace) -> str:
    """The detector family a ``--methods`` entry runs on (a combination: its first method's)."""
    return method_family(variant.method.split("+")[0], args.family)


def student_config(method: str | None, family: str, args: argparse.Namespace, teacher_run: dict | None,
                   seed: int, variant: Variant | None = None) -> Config:
    overrides = [*args.overrides, *args.student_overrides]
    cfg = absolute_paths(with_overrides(load_recipe(method, family, args.dataset), overrides))
    if cfg.teacher is not None:
        if teacher_run is None:
            raise RuntimeError(f"{method}: needs the {family} teacher, which was not trained")
        cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(
            cfg.teacher, weights=str(Path(teacher_run["run_dir"]) / "last.pt")))
    cfg = dataclasses.replace(cfg, seed=seed)
    scales = {**args.scales, **(variant.scales if variant else {})}
    cfg = scale_lgd_schedule(scale_losses(cfg, scales))
    # a variant's parameters come last: `lgd@lgd.freeze_backbone_steps=0` must not be undone by the scaled warm-up
    return apply_variant(cfg, variant) if variant is not None else cfg


def teacher_config(family: str, args: argparse.Namespace) -> Config:
    """The teacher run of a study (its config hash names its cached run folder)."""
    cfg = absolute_paths(with_overrides(load_recipe("teacher", family, args.dataset), args.overrides))
    if args.teacher_epochs is not None:  # a teacher trained longer than the students (a stronger teacher)
        cfg = apply_override(cfg, f"train.epochs={args.teacher_epochs}")
    return with_overrides(cfg, args.teacher_overrides)


def cached_run_dir(cfg: Config, label: str, args: argparse.Namespace) -> Path:
    """Where ``run_cached(cfg, label, ...)`` keeps (or would keep) the run."""
    return args.runs_dir / f"{args.dataset}_{label}_{config_hash(cfg)}"


def study(args: argparse.Namespace) -> dict[str, Any]:
    """Teachers, baselines and methods for every (family, seed); returns per-family run records."""
    families = sorted({variant_family(v, args) for v in args.variants})
    for v in args.variants:  # a variant naming a loss or parameter its recipe lacks fails now, not after the teachers
        student_config(v.method, variant_family(v, args), args, {"run_dir": "."}, 0, v)
    records: dict[str, Any] = {}
    for family in families:
        teacher_cfg = teacher_config(family, args)
        teacher = run_cached(teacher_cfg, f"teacher_{family}", args.runs_dir, args.dataset, keep_weights=True)
        # "baseline": the baseline recipe's student; "baselines": other students (by model_label) that some
        # method's recipe uses, trained alone on the same seeds; "students": method entry -> its model_label
        student = model_label(student_config(None, family, args, None, 0).model)
        records[family] = {"teacher": teacher, "baseline": {}, "baselines": {}, "students": {}, "methods": {},
                           "labels": {"teacher": model_label(teacher_cfg.model), "student": student}}
    if args.teacher_only:
        return records
    for seed in args.seed_list:
        base_cfgs = {family: student_config(None, family, args, None, seed) for family in families}
        for family, base_cfg in base_cfgs.items():
            records[family]["baseline"][seed] = run_cached(base_cfg, f"baseline_{family}_s{seed}", args.runs_dir,
                                                           args.dataset, args.keep_weights)
        for variant in args.variants:
            entry, method = variant.entry, variant.method
            family = variant_family(variant, args)
            cfg = student_config(method, family, args, records[family]["teacher"], seed, variant)
            base_cfg = base_cfgs[family]
            if cfg.model != base_cfg.model:  # e.g. fgd_inherit's student has the teacher's neck and head widths
                student = model_label(cfg.model)
                records[family]["students"][entry] = student
                runs = records[family]["baselines"].setdefault(student, {})
                runs[seed] = run_cached(dataclasses.replace(base_cfg, model=cfg.model), f"baseline_{family}_s{seed}",
                                        args.runs_dir, args.dataset, args.keep_weights)
            label = f"{method.replace('+', '_')}_{family}_s{seed}"  # variants differ by the config hash in the name
            rec = records[family]["methods"].setdefault(entry, {})
            rec[seed] = run_cached(cfg, label, args.runs_dir, args.dataset, args.keep_weights)
    return records


#: short names of the backbones in the reports (ResNets read "R18", "R50", ...)
BACKBONE_LABELS = {"mobilenet_v3_large": "MobileNetV3-L"}


def model_label(model: ModelConfig) -> str:
    """How the reports name a detector: backbone, FPN width, head convs (teachers, baselines, and a student that a
    method's recipe changes)."""
    backbone = BACKBONE_LABELS.get(model.backbone, model.backbone.replace("resnet", "R"))
    return f"{backbone}-FPN{model.fpn_channels}, {model.head_convs} head convs"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="synth", choices=["synth", "bccd", "thermal"])
    p.add_argument("--family", default="retinanet", help="family of the feature methods and LGD")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated; 'a+b' for a combination; 'ld@kd=0.1:vlr_ld=0' for a method with its own "
                        "loss-term scales (they replace --scale's for those terms); 'fgd@fgd.alpha_fgd=0' or "
                        "'ld@ld.normalize=positives' for one with a loss parameter set (a number, true/false or a "
                        "word)")
    p.add_argument("--seeds", type=int, default=3, help="how many seeds: FIRST..FIRST+N-1")
    p.add_argument("--first-seed", type=int, default=0,
                   help="first seed (a confirmation study on fresh seeds: --first-seed 10 --seeds 10)")
    p.add_argument("--only-seeds", default=None, help="train only these seeds (e.g. '1' or '0,2'); report skipped")
    p.add_argument("--teacher-only", action="store_true", help="train (or find) the teachers and stop")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs of every run (default: the recipes')")
    p.add_argument("--teacher-epochs", type=int, default=None,
                   help="train.epochs of the teachers only (default: as the students)")
    p.add_argument("--cpu-reduced", action="store_true", help="small CPU schedule (see REDUCED); not converged")
    p.add_argument("--device", default="auto", help="train.device of every run: auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--set", dest="extra", action="append", default=[],
                   help="override for every run, key=value; the teacher's run too, whose model is `model`")
    p.add_argument("--student-set", dest="student_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the baseline and distilled students only (e.g. model.backbone=resnet34); "
                        "the teacher's run is left as it is")
    p.add_argument("--teacher-set", dest="teacher_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the teacher's run only, after --set and --teacher-epochs (e.g. "
                        "data.scale_jitter=[0.6,1.4]: a teacher trained with stronger augmentation)")
    p.add_argument("--scale", dest="scale", action="append", default=[], metavar="METHOD=FACTOR",
                   help="multiply the weights of METHOD's loss terms by FACTOR (e.g. fgd=0.01)")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--keep-weights", action="store_true",
                   help="keep every student's last.pt and best.pt (default: only the teachers'; records stay)")
    p.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results")
    p.add_argument("--tag", default="", help="suffix of the result file names (accuracy_<dataset><tag>)")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    try:  # parsed once
        args.variants = [parse_variant(m) for m in args.methods]
    except ValueError as err:
        p.error(str(err))
    try:
        args.scales = {k: float(v) for k, v in (item.split("=", 1) for item in args.scale)}
    except ValueError:
        p.error(f"--scale takes METHOD=FACTOR, got {args.scale}")
    if args.seeds < 1 or args.first_seed < 0:
        p.error(f"--seeds must be >= 1 and --first-seed >= 0, got {args.seeds} and {args.first_seed}")
    args.seed_list = (list(range(args.first_seed, args.first_seed + args.seeds)) if args.only_seeds is None
                      else [int(s) for s in args.only_seeds.split(",") if s])
    overrides = list(REDUCED[args.dataset]) if args.cpu_reduced else []
    if args.epochs is not None:  # replaces the reduced schedule's epochs (the report lists each override once)
        overrides = [o for o in overrides if not o.startswith("train.epochs=")] + [f"train.epochs={args.epochs}"]
    overrides += [f"train.device={args.device}", "train.progress=false", *args.extra]
    args.overrides = overrides
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    set_threads(args.threads)
    start = time.perf_counter()
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    records = study(args)
    if args.teacher_only or args.only_seeds is not None:
        print("[accuracy] runs done; run without --teacher-only/--only-seeds to write the report")
        return None
    payload: dict[str, Any] = {
        "settings": {"dataset": args.dataset, "family": args.family, "methods": args.methods,
                     "seeds": args.seed_list, "overrides": args.overrides,
                     "student_overrides": args.student_overrides,
                     "teacher_overrides": args.teacher_overrides, "scales": args.scales,
                     "teacher_epochs": args.teacher_epochs},
        "summary": summarize(records, args.seed_list),
        "runs": records,
    }
    out_dir = Path(args.out_dir) if args.out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"accuracy_{args.dataset}{args.tag}"
    png = accuracy_plot(payload["summary"], out_dir / f"{stem}.png", f"{args.dataset}: AP of the R18 student, "
                        f"{len(args.seed_list)} seed(s)")
    payload["plot"] = png.name
    payload = publish(stem, payload, accuracy_markdown, _auto_device(args.device), start, argv, out_dir)
    print(f"and {png}")
    return payload


def _auto_device(name: str) -> str:
    """The device a run with ``train.device=name`` trains on here ("auto" resolved)."""
    import torch

    return "cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name)


if __name__ == "__main__":
    main()
