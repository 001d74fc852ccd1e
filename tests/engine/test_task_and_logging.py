"""TaskModel (the plain-student trainable) and the run logger."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from engine_helpers import ToyDetection, collate, tiny_fcos
from torch import nn

from detkd.config import TrainConfig
from detkd.engine import TaskModel, fit
from detkd.engine.logging import RunLogger


class FakeDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([2.0, 3.0]))

    def forward(self, images, targets=None):
        if not self.training:
            return [{"boxes": torch.zeros(0, 4)} for _ in images]
        return {"loss_classifier": self.w[0] * 1.5, "loss_box_reg": self.w[1] ** 2}


def test_task_model_sums_the_detector_losses():
    t = TaskModel(FakeDetector())
    out = t([torch.zeros(3, 4, 4)], [{}])
    # loss = 2 * 1.5 + 3^2 = 12; d loss / d w = [1.5, 2 * 3]
    assert set(out) == {"loss", "task/loss_classifier", "task/loss_box_reg"}
    assert out["loss"].item() == pytest.approx(12.0)
    out["loss"].backward()
    assert t.student.w.grad.tolist() == pytest.approx([1.5, 6.0])
    t.student.eval()
    with pytest.raises(TypeError, match="training mode"):
        t([torch.zeros(3, 4, 4)], [{}])


def test_task_model_on_a_torchvision_fcos_matches_its_own_losses():
    try:
        import torchvision  # noqa: F401
    except Exception as e:
        pytest.skip(f"torchvision does not import here: {e}")
    model = tiny_fcos()
    images, targets = collate([ToyDetection(2, augment=False)[i] for i in range(2)])
    own = model(images, targets)
    out = TaskModel(model)(images, targets)
    assert {f"task/{k}" for k in own} | {"loss"} == set(out)
    assert out["loss"].item() == pytest.approx(sum(v.item() for v in own.values()))


def test_logger_writes_jsonl_and_compact_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    log = RunLogger(tmp_path, total_steps=10, log_every=1, progress=True)
    assert log.bar is None  # no TTY: compact lines instead of a bar
    log.log("train", 1, 0, {"loss": 2.5, "task/cls": 1.25, "lr": 0.01, "skipped_steps": 0.0})
    log.log("eval", 1, 0, {"AP": 0.5})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"event": "train", "step": 1, "epoch": 0, "loss": 2.5, "task/cls": 1.25, "lr": 0.01, "skipped_steps": 0.0},
        {"event": "eval", "step": 1, "epoch": 0, "AP": 0.5},
    ]
    log.log("train", 2, 0, {"loss": 2.0, "distill/fgd/p3": 0.25, "distill/fgd/p4": 0.5, "raw/fgd/p3": 0.125,
                            "lr": 0.01, "skipped_steps": 1.0})
    log.close()
    out = capsys.readouterr().out
    assert "step 1/10 ep 0 loss 2.5000 task/cls 1.2500 lr 0.01 eta" in out and "eval step 1 ep 0: AP 0.5000" in out
    # the terminal line sums a method's per-level terms and leaves out raw/ terms (metrics.jsonl has them all)
    assert "step 2/10 ep 0 loss 2.0000 distill/fgd 0.7500 lr 0.01 skipped 1 eta" in out
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_logger_resume_drops_records_after_the_saved_step(tmp_path):
    log = RunLogger(tmp_path, total_steps=10, progress=False)
    for s in range(1, 6):
        log.log("train", s, 0, {"loss": float(s)})
    log.close()
    RunLogger(tmp_path, total_steps=10, progress=False, resume_step=3).close()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_logger_ema_bar_and_muted_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    log = RunLogger(tmp_path / "a", total_steps=4, progress=True)
    assert log.bar is not None
    log.step(1, {"loss": 1.0})
    log.step(2, None)  # a skipped step leaves the EMA alone
    log.step(3, {"loss": 2.0})
    assert log.smoothed["loss"] == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)
    log.close()
    muted = RunLogger(tmp_path / "b", total_steps=4, enabled=False)
    muted.log("train", 1, 0, {"loss": 1.0})
    muted.close()
    assert not (tmp_path / "b").exists()


def test_fit_logs_window_means_every_log_every_steps(tmp_path):
    class Counter(nn.Module):
        """loss = w * x with x the batch value; w stays 1 (lr 0), so the logged loss is x."""

        def __init__(self):
            super().__init__()
            self.student = nn.Linear(1, 1, bias=False)
            nn.init.ones_(self.student.weight)

        def forward(self, images, targets):
            return {"loss": self.student(torch.stack(images)).sum()}

    data = [([torch.tensor([float(x)])], [{}]) for x in (1, 2, 3, 4, 5)]
    cfg = TrainConfig(epochs=1, lr=0.0, log_every=2, progress=False, device="cpu", warmup_steps=0)
    fit(Counter(), data, cfg, tmp_path)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # steps 2 and 4 report the mean over their window (1.5, 3.5); the last step (5) is always logged
    assert [(r["step"], r["loss"]) for r in recs] == [(2, 1.5), (4, 3.5), (5, 5.0)]
