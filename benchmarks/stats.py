"""The statistics of ``accuracy.py``: per detector family, the teacher's metrics, mean ± std over seeds of the
baseline and of every method (``mean_std``), the paired delta of a method against the baseline with a 95%
t-interval over the seed differences (``paired_delta``, ``T975``) and the share of the teacher–student AP gap the
method closes (``gap_closed``), all put together by ``summarize``.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from report import METRICS
from report import pct100 as _metric

#: t_{0.975, df} for df = 1..30 (two-sided 95%); larger df use 1.96
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_std(values: list[float]) -> dict[str, float | None]:
    mean = statistics.fmean(values)
    return {"mean": mean, "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def paired_delta(method: list[float], base: list[float]) -> dict[str, Any]:
    """Mean of the paired differences and its 95% t-interval (None with one seed)."""
    diffs = [m - b for m, b in zip(method, base)]
    out: dict[str, Any] = {"mean": statistics.fmean(diffs), "ci95": None, "diffs": diffs}
    if len(diffs) > 1:
        df = len(diffs) - 1
        half = (T975[df - 1] if df <= len(T975) else 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out


def gap_closed(ap_method: float, ap_base: float, ap_teacher: float) -> float | None:
    """(AP_distilled − AP_student) / (AP_teacher − AP_student); None when the teacher is not better."""
    gap = ap_teacher - ap_base
    return (ap_method - ap_base) / gap if gap > 1e-9 else None


def summarize(records: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Per family: teacher, baseline(s) and every method with mean ± std, paired deltas and gap closed, each
    against the baseline of the method's own student (``student``: None for the baseline recipe's)."""
    out: dict[str, Any] = {}
    for family, rec in records.items():
        teacher = {k: _metric(rec["teacher"], k) for k in METRICS}
        base = {k: [_metric(rec["baseline"][s], k) for s in seeds] for k in METRICS}
        others = {label: {k: [_metric(runs[s], k) for s in seeds] for k in METRICS}
                  for label, runs in rec.get("baselines", {}).items()}
        fam = {"teacher": teacher, "labels": rec.get("labels", {}), "baseline": {k: mean_std(base[k]) for k in METRICS},
               "baselines": {label: {k: mean_std(v[k]) for k in METRICS} for label, v in others.items()},
               "methods": {}}
        for method, runs in rec["methods"].items():
            student = rec.get("students", {}).get(method)  # None: the baseline recipe's student
            ref = others[student] if student else base
            vals = {k: [_metric(runs[s], k) for s in seeds] for k in METRICS}
            fam["methods"][method] = {
                **{k: mean_std(vals[k]) for k in METRICS},
                "student": student,
                "delta": {k: paired_delta(vals[k], ref[k]) for k in METRICS},
                "gap_closed": gap_closed(statistics.fmean(vals["AP"]), statistics.fmean(ref["AP"]), teacher["AP"]),
            }
        out[family] = fam
    return out
