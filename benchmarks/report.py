"""Markdown tables and charts of the benchmark results (accuracy.py and cost.py), apart from the measuring code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common import md_meta, md_table

#: metrics reported by the accuracy study (COCO, x100)
METRICS = ("AP", "AP50", "AP75")
#: the step variants timed by cost.py (see its docstring)
VARIANTS = ("plain", "a", "b", "c")


def pct100(record: dict, key: str) -> float:
    """A run record's metric x100 (NaN stays NaN)."""
    value = record["metrics"].get(key, float("nan"))
    return 100.0 * value if value == value else float("nan")


# ------------------------------------------------------------------------------------------------ accuracy


def _ms(s: dict) -> str:
    return f"{s['mean']:.1f}" + (f" ± {s['std']:.1f}" if s["std"] is not None else "")


def _delta(d: dict) -> str:
    ci = f" [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]" if d["ci95"] else ""
    return f"{d['mean']:+.1f}{ci}"


def accuracy_markdown(payload: dict[str, Any]) -> str:
    rows = []
    for family, fam in payload["summary"].items():
        t = fam["teacher"]
        labels = {"teacher": "R50", "student": "R18", **fam.get("labels", {})}
        rows.append([f"teacher {labels['teacher']} ({family})", *(f"{t[k]:.1f}" for k in METRICS), "", "", ""])
        rows.append([f"baseline {labels['student']} ({family})", *(_ms(fam["baseline"][k]) for k in METRICS), "", "",
                     ""])
        for label, b in fam.get("baselines", {}).items():
            rows.append([f"baseline {label} ({family})", *(_ms(b[k]) for k in METRICS), "", "", ""])
        for method, r in fam["methods"].items():
            gap = r["gap_closed"]
            name = f"{method} ({family}" + (f"; student {r['student']})" if r.get("student") else ")")
            rows.append([name, *(_ms(r[k]) for k in METRICS), _delta(r["delta"]["AP"]),
                         _delta(r["delta"]["AP50"]), "n/a" if gap is None else f"{100 * gap:.0f}%"])
    s = payload["settings"]
    return "\n\n".join([
        f"# Accuracy gain on {s['dataset']}",
        md_meta(payload["meta"]),
        f"Seeds {s['seeds']}; overrides applied to every run: `{' '.join(s['overrides']) or 'none'}`"
        + (f"; to the students only: `{' '.join(s['student_overrides'])}`" if s.get("student_overrides") else "")
        + (f"; to the teachers only: `{' '.join(s['teacher_overrides'])}`" if s.get("teacher_overrides") else "")
        + "; loss weights "
        f"scaled: {', '.join(f'{m} x{f:g}' for m, f in s.get('scales', {}).items()) or 'none'}. COCO AP x100, "
        "mean ± std over seeds; Δ = paired difference to the baseline of the same family, student and seed, mean [95% "
        "t-interval]; gap closed = (AP_distilled − AP_student) / (AP_teacher − AP_student) with seed means "
        "(n/a when the teacher is not better). Teachers are trained once per family (seed 0)"
        + (f", for {s['teacher_epochs']} epochs." if s.get("teacher_epochs") else ", on the students' schedule."),
        md_table(["run", "AP", "AP50", "AP75", "Δ AP [95% CI]", "Δ AP50 [95% CI]", "gap closed"], rows),
        f"![AP per method]({payload['plot']})" if payload.get("plot") else "",
        _label_guided_md(payload["runs"]),
        f"## Runs\n\nTraining wall time of all runs together: {_total_wall(payload['runs']) / 60:.0f} min (the meta "
        "line above is the wall time of this command, which reuses cached runs).\n\n"
        + md_table(["run", "seed", "AP", "steps", "wall s", "date", "commit", "machine"], _run_rows(payload["runs"])),
    ])


#: the metrics of LGD's label-guided branch in a run record (``lgd.eval_teacher``; see detkd.runner)
BRANCH = "lgd_branch/"


def _label_guided_md(records: dict[str, Any]) -> str:
    """LGD's label-guided branch next to the student of the same run, for the runs that evaluated it ("" if none):
    the AP the student's head reaches from the instructive pyramid (built from the ground truth), i.e. how far
    LGD's teacher is ahead of (or behind) the student it distils into."""
    rows, gaps = [], {}
    for family, rec in records.items():
        for method, group in rec["methods"].items():
            for seed, run in group.items():
                if f"{BRANCH}AP" not in run["metrics"]:
                    continue
                student, branch = pct100(run, "AP"), pct100(run, f"{BRANCH}AP")
                gaps.setdefault(f"{method} ({family})", []).append(branch - student)
                rows.append([f"{method} ({family})", seed, f"{student:.1f}", f"{branch:.1f}",
                             f"{pct100(run, f'{BRANCH}AP50'):.1f}", f"{pct100(run, f'{BRANCH}AP75'):.1f}",
                             f"{branch - student:+.1f}"])
    if not rows:
        return ""
    means = "; ".join(f"{name} {sum(g) / len(g):+.1f}" for name, g in gaps.items())
    return ("## LGD's label-guided branch\n\nLGD's teacher is the instructive pyramid built from the ground truth "
            "and the student's own features; here it is evaluated on val through the student's head after training "
            "(`lgd.eval_teacher`, the reference's EVAL_TEACHER). It reads the labels, so it is not a detector, but "
            "it is only as good as what the student's head reads from it. Branch − student is the lead of LGD's "
            f"teacher over the student (negative: it trails); mean over the seeds of each entry: {means} AP.\n\n"
            + md_table(["run", "seed", "student AP", "branch AP", "branch AP50", "branch AP75",
                        "branch − student"], rows))


def _all_runs(records: dict[str, Any]) -> list[tuple[str, dict]]:
    """``(name, run)`` for every run. A method's runs are named by its report entry: variants of one method
    (``ld``, ``ld@kd=0.025``) share a run label (their run folders differ by the config hash only)."""
    runs = []
    for family, rec in records.items():
        groups = [rec["baseline"], *rec.get("baselines", {}).values()]
        runs += [(run["label"], run) for run in (rec["teacher"], *(r for group in groups for r in group.values()))]
        for method, group in rec["methods"].items():
            runs += [(f"{method.replace('+', '_')}_{family}_s{seed}", run) for seed, run in group.items()]
    return runs


def _total_wall(records: dict[str, Any]) -> float:
    return sum(r["wall_time_s"] for _, r in _all_runs(records))


def _run_rows(records: dict[str, Any]) -> list[list]:
    return [[name, r["seed"], f"{pct100(r, 'AP'):.1f}", r["steps"], r["wall_time_s"], r["date"],
             r.get("commit", "?"), r.get("machine", "?")] for name, r in _all_runs(records)]


def accuracy_plot(summary: dict[str, Any], path: Path, title: str) -> Path:
    """Bar chart of AP (mean ± std) per family: baseline, methods; the teacher as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(summary)
    widths = [1 + len(summary[f].get("baselines", {})) + len(summary[f]["methods"]) for f in fams]
    longest = max((len(m) for f in fams for m in summary[f]["methods"]), default=0)
    # rotated tick labels take height from the bars: add it back for long entries (variants with parameters)
    fig, axes = plt.subplots(1, len(fams), figsize=(1.0 + 1.1 * sum(widths), 4.2 + 0.05 * max(0, longest - 20)),
                             squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, family in zip(axes[0], fams):
        fam = summary[family]
        others = fam.get("baselines", {})  # baselines of the students some methods change (e.g. wider necks)
        names = ["baseline", *(f"baseline {label}" for label in others), *fam["methods"]]
        stats = [fam["baseline"]["AP"], *(b["AP"] for b in others.values())]
        stats += [r["AP"] for r in fam["methods"].values()]
        means = [s["mean"] for s in stats]
        errs = [s["std"] or 0.0 for s in stats]
        colors = ["#9e9e9e"] * (1 + len(others)) + ["#1f77b4"] * len(fam["methods"])
        bars = ax.bar(range(len(names)), means, yerr=errs, capsize=4, color=colors)
        for bar, m, e in zip(bars, means, errs):  # above the error bar, so the two never overlap
            ax.text(bar.get_x() + bar.get_width() / 2, m + e + 0.3, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
        ax.axhline(fam["teacher"]["AP"], color="#d62728", linestyle="--", label=f"teacher {fam['teacher']['AP']:.1f}")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(family)
        ax.set_ylabel("COCO AP (x100)")
        ax.legend(loc="lower right", fontsize=8)
        top = max([fam["teacher"]["AP"], *(m + e for m, e in zip(means, errs))])
        ax.set_ylim(0, max(top * 1.2, 1.0))  # an untrained run (AP 0) still gets a readable axis
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ cost


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _mib(x: float | None) -> str | None:
    return None if x is None else f"{x:,.0f}"


def cost_markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    rows = []
    for name, r in payload["methods"].items():
        ms = {v: r["step_ms"][v]["median_ms"] for v in VARIANTS}
        peak, res = r["step_peak_mib"], r["resident_mib"]
        family = f"{r['family']} ({r['teacher_stage'] or 'no teacher'})"
        pm = r["paired"]["machinery_overhead"]
        rows.append([name, family, *(f"{ms[v]:,.1f}" for v in VARIANTS),
                     _pct(r["teacher_share"]), _pct(r["machinery_overhead"]),
                     f"{_pct(pm['median'])} [{_pct(pm['q1'])}, {_pct(pm['q3'])}]",
                     f"{r['losses_only_ms']['median_ms']:,.1f} ({100 * r['losses_share']:.1f}%)",
                     _pct(r["adapter_overhead"]),
                     " / ".join(_mib(peak[v]) or "n/a" for v in ("a", "b", "c")),
                     " / ".join(_mib(res[v]) for v in ("a", "b", "c"))])
    headers = ["method", "family (teacher stage)", "plain ms", "a ms", "b ms", "c ms", "teacher (b-a)/a",
               "machinery (c-b)/b", "machinery per round [IQR]", "loss modules ms (% of b)", "adapter (a-plain)/plain",
               "step peak MiB a / b / c",
               "resident MiB a / b / c"]
    met = [m for m, ok in payload["target_machinery_met"].items() if ok]  # on the paired medians
    missed = [m for m, ok in payload["target_machinery_met"].items() if not ok]
    lmet = [m for m, ok in payload["target_losses_share_met"].items() if ok]
    lmissed = [m for m, ok in payload["target_losses_share_met"].items() if not ok]
    parts = [
        f"# Cost of distillation per training step ({payload['meta']['machine']['device']})",
        md_meta(payload["meta"]),
        f"Student R18-FPN64 (2 head convs), teacher R50-FPN128 (4 head convs), random weights, batch {s['batch']} of "
        f"{s['size']}x{s['size']} px with {s['boxes']} boxes per image, 3 classes, autocast {s['amp']}; method "
        f"hyper-parameters from `configs/*_{s['dataset_recipes']}.yaml`. Medians of {s['repeats']} interleaved steps "
        f"after {s['warmup']} warm-up rounds. plain = `model(images, targets)`; a = student through its adapter; "
        "b = a + teacher forward (as far as the method needs); c = full Distiller step. Step peak = peak memory of "
        "one step above what was resident before it; resident = weights + AdamW state (+ frozen teacher weights). "
        "Machinery per round = median over rounds of c_r / b_r - 1 (steps run back to back) with its quartiles. "
        "Loss modules = forward + backward of the configured loss modules alone on fixed outputs of one batch (the "
        "loss part of c - b, timed in the same rounds).",
        md_table(headers, rows),
        f"Machinery target (c-b)/b <= 5% (per-round median): met by {', '.join(met) or 'none'}; missed by "
        f"{', '.join(missed) or 'none'}. Loss modules alone <= 5% of b: met by {', '.join(lmet) or 'none'}; missed "
        f"by {', '.join(lmissed) or 'none'}.",
    ]
    if payload.get("teacher_options"):
        parts += _options_md(payload["teacher_options"])
    return "\n\n".join(parts)


def _options_md(opt: dict[str, Any]) -> list[str]:
    res = opt["results"]
    rows = [[f"{precision} teacher, {reach}", res[f"teacher|{precision}|{reach}"]["median_ms"],
             res[f"step|{precision}|{reach}"]["median_ms"]]
            for precision in ("fp32", "bf16") for reach in ("features", "full")]
    return [
        f"## Teacher options ({opt['method']} on {opt['family']})",
        "features = the teacher stops after the FPN (what the method needs); full = it also runs its dense head. "
        "bf16 = the teacher runs under bf16 autocast (FrozenTeacher(bf16=True)).",
        md_table(["teacher", "teacher forward ms", "full distillation step ms"], rows),
    ]
