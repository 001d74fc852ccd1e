"""Training curves from metrics.jsonl: totals summed as the logger writes them, a PNG, clear errors."""

from __future__ import annotations

import json
import math

import pytest

from detkd.viz import read_curves, save_training_curves


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


RECORDS = [
    {"event": "train", "step": 10, "epoch": 0, "loss": 3.75, "task/cls": 1.0, "task/box": 2.0,
     "distill/fgd/p3/fg": 0.5, "raw/fgd/p3/fg": 0.5, "distill/ld/p3": 0.25, "lr": 0.01, "skipped_steps": 0.0},
    {"event": "nonfinite", "step": 11, "epoch": 0, "skipped_steps": 1.0, "terms": ["task/cls"]},
    {"event": "train", "step": 20, "epoch": 0, "loss": 2.0, "task/cls": 0.5, "task/box": 1.0,
     "distill/fgd/p3/fg": 0.25, "distill/fgd/p4/fg": 0.125, "distill/ld/p3": 0.125, "lr": 0.01},
    {"event": "eval", "step": 20, "epoch": 1, "AP": 0.125, "AP50": 0.25, "APl": float("nan")},
    {"event": "train", "step": 30, "epoch": 1, "loss": 1.5, "task/cls": 0.75, "task/box": 0.75},
]


def test_read_curves_sums_by_hand(tmp_path):
    _write(tmp_path / "metrics.jsonl", RECORDS)
    c = read_curves(tmp_path / "metrics.jsonl")
    assert c.steps == [10, 20, 30] and c.total == [3.75, 2.0, 1.5]
    assert c.task == [3.0, 1.5, 1.5]
    # weighted distill terms only (raw/* are not added again); a record without any is NaN, not 0
    assert c.distill[:2] == [0.75, 0.5] and math.isnan(c.distill[2])
    assert c.per_method["fgd"][:2] == [0.5, 0.375] and c.per_method["ld"][:2] == [0.25, 0.125]
    assert c.eval_steps == [20] and c.ap == {"AP": [0.125], "AP50": [0.25]}


def test_save_training_curves_writes_a_png(tmp_path, png_ok):
    _write(tmp_path / "metrics.jsonl", RECORDS)
    out = save_training_curves(tmp_path)
    assert out == tmp_path / "curves.png"
    png_ok(out)


def test_curves_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        save_training_curves(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON record"):
        read_curves(tmp_path / "metrics.jsonl")
