"""fit() on a one-weight linear trainable, where every update can be written down by hand.

loss = w · x for the batch's x, so d loss / d w = x and plain SGD (no momentum, no decay, constant LR) gives
w_after = w_before - lr * x.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from torch import nn

from detkd.config import TrainConfig
from detkd.engine import fit

W0 = [1.0, 2.0]


def plain_cfg(**kw) -> TrainConfig:
    base = dict(epochs=1, lr=0.1, momentum=0.0, weight_decay=0.0, warmup_steps=0, schedule="constant",
                log_every=1, progress=False, device="cpu", amp="off")
    return TrainConfig(**{**base, **kw})


def batches(*xs):
    """A 'loader': one batch per x, a single 'image' each."""
    return [([torch.tensor(x)], [{"image_id": i}]) for i, x in enumerate(xs)]


class Linear(nn.Module):
    def __init__(self, nan_steps=(), scale=1.0):
        super().__init__()
        self.student = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.student.weight.copy_(torch.tensor([W0]))
        self.nan_steps, self.scale = set(nan_steps), scale
        self.steps_seen, self.checks = [], []
        self.step = 0

    def set_step(self, step):
        self.step = step
        self.steps_seen.append(step)

    def step_check(self, losses):
        self.checks.append(sorted(losses))

    def forward(self, images, targets):
        loss = self.student(torch.stack(images)).float().sum() * self.scale
        if self.step in self.nan_steps:
            bad = loss * float("nan")
            return {"loss": bad, "task/a": bad.detach(), "task/b": loss.detach()}
        return {"loss": loss, "task/a": loss.detach(), "task/b": loss.detach()}

    def weight(self):
        return self.student.weight.detach()[0].tolist()


def records(run_dir, event="train"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def test_sgd_steps_match_hand_updates_and_hooks_are_called(tmp_path):
    t = Linear()
    res = fit(t, batches([1.0, 3.0], [2.0, 0.0], [0.0, 1.0]), plain_cfg(), tmp_path)
    # w = [1, 2] - 0.1 * ([1, 3] + [2, 0] + [0, 1]) = [0.7, 1.6]
    assert t.weight() == pytest.approx([0.7, 1.6])
    assert (res.steps, res.epochs, res.skipped_steps, res.stopped) == (3, 1, 0, False)
    assert t.steps_seen == [0, 1, 2]
    assert t.checks == [["loss", "task/a", "task/b"]]  # once, after the first forward
    # losses as logged: w·x before each update: [1,2]·[1,3] = 7; [0.9,1.7]·[2,0] = 1.8; [0.7,1.7]·[0,1] = 1.7
    assert [r["loss"] for r in records(tmp_path)] == pytest.approx([7.0, 1.8, 1.7])


def test_nonfinite_step_is_skipped_without_touching_weights(tmp_path):
    t = Linear(nan_steps={1})
    res = fit(t, batches([1.0, 3.0], [5.0, 5.0], [0.0, 1.0]), plain_cfg(), tmp_path)
    # step 1 (x = [5, 5]) is skipped: w = [1, 2] - 0.1 * ([1, 3] + [0, 1]) = [0.9, 1.6]; had its NaN gradient been
    # applied (or left in .grad for the next step), w would be NaN.
    assert t.weight() == pytest.approx([0.9, 1.6])
    assert res.skipped_steps == 1 and res.steps == 3
    (skip,) = records(tmp_path, "nonfinite")
    assert skip["step"] == 2 and skip["terms"] == ["loss", "task/a"]
    # the skipped step's train record has the LR and the skip count but no loss values
    assert [("loss" in r, r["skipped_steps"]) for r in records(tmp_path)] == [(True, 0), (False, 1), (True, 1)]


def test_consecutive_nonfinite_steps_abort_naming_the_terms(tmp_path):
    t = Linear(nan_steps={1, 2, 3})
    with pytest.raises(FloatingPointError, match=r"3 optimizer steps in a row.*terms: loss, task/a\.") as err:
        fit(t, batches(*[[1.0, 1.0]] * 6), plain_cfg(max_nonfinite=3), tmp_path)
    assert "task/b" not in str(err.value)
    # one good step, then three skipped ones: the weight moved once
    assert t.weight() == pytest.approx([0.9, 1.9])


def test_gradient_accumulation_averages_micro_batches_and_keeps_the_tail(tmp_path):
    t = Linear()
    res = fit(t, batches([1.0, 3.0], [3.0, 1.0], [2.0, 2.0]), plain_cfg(accumulate=2), tmp_path)
    # step 1: mean of [1, 3] and [3, 1] = [2, 2]; step 2: the epoch's tail, one micro-batch [2, 2] (divided by 1)
    # w = [1, 2] - 0.1 * ([2, 2] + [2, 2]) = [0.6, 1.6]
    assert res.steps == 2
    assert t.weight() == pytest.approx([0.6, 1.6])
    # logged loss of step 1 = mean of the micro-batch losses: ([1,2]·[1,3] + [1,2]·[3,1]) / 2 = (7 + 5) / 2
    assert records(tmp_path)[0]["loss"] == pytest.approx(6.0)


def test_gradient_clipping_bounds_the_update(tmp_path):
    t = Linear()
    fit(t, batches([30.0, 40.0]), plain_cfg(grad_clip=1.0), tmp_path)
    # |grad| = 50 -> clipped to norm 1: [0.6, 0.8]; w = [1, 2] - 0.1 * [0.6, 0.8]
    assert t.weight() == pytest.approx([0.94, 1.92])


def test_warmup_lr_is_logged_and_param_groups_are_used(tmp_path):
    t = Linear()
    t.param_groups = lambda: [{"params": [t.student.weight], "lr": 1.0}]
    fit(t, batches(*[[1.0, 0.0]] * 3), plain_cfg(warmup_steps=2, warmup_factor=0.5), tmp_path)
    # group lr 1.0 (not cfg.lr) times warm-up factors 0.5, 0.5 * 0.5 + 0.5 = 0.75, then 1
    assert [r["lr"] for r in records(tmp_path)] == pytest.approx([0.5, 0.75, 1.0])
    assert t.weight() == pytest.approx([1.0 - 2.25, 2.0])


def test_max_steps_spans_epochs_and_final_eval_keeps_best(tmp_path):
    t = Linear()
    seen = []

    def evaluate(student):
        seen.append(student.weight.detach()[0, 0].item())
        return {"AP": 0.5 - len(seen) * 0.1, "AP50": 0.9}

    res = fit(t, batches([1.0, 0.0], [1.0, 0.0]), plain_cfg(max_steps=5, eval_every=1), tmp_path, evaluate=evaluate)
    # 2 batches per epoch, 5 steps -> evaluations after epochs 1 and 2 and at the end (step 5)
    assert res.steps == 5 and res.epochs == 2
    assert seen == pytest.approx([0.8, 0.6, 0.5])
    assert res.best_metric == pytest.approx(0.4) and res.last_metrics["AP"] == pytest.approx(0.2)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["weight"][0, 0].item() == pytest.approx(0.8)  # the student of the first (best) evaluation
    assert [r["step"] for r in records(tmp_path, "eval")] == [2, 4, 5]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(amp, tmp_path):
    # loss = (w·x) / 8 in fp32 keeps fp16 gradients finite under the initial scale 2^16 (2^13 * 3 < 65504);
    # every value is exact in bf16/fp16. w = [1, 2] - 0.1 * ([1, 3] + [2, 0]) / 8
    t = Linear(scale=1 / 8)
    res = fit(t, batches([1.0, 3.0], [2.0, 0.0]), plain_cfg(amp=amp), tmp_path)
    assert t.weight() == pytest.approx([1 - 0.3 / 8, 2 - 0.3 / 8]) and res.skipped_steps == 0
    assert t.student.weight.dtype == torch.float32


def test_fp16_scaler_overflow_skips_the_update_but_not_the_step(tmp_path):
    # With loss = w·x the fp16 gradient of the matmul output is the scale 2^16 > 65504: inf. The GradScaler skips
    # that optimizer update and halves its scale (its normal dynamics, not our non-finite guard).
    t = Linear()
    res = fit(t, batches([1.0, 3.0]), plain_cfg(amp="fp16"), tmp_path)
    assert t.weight() == [1.0, 2.0] and res.steps == 1 and res.skipped_steps == 0
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] == 2.0**15


def test_missing_loss_key_is_a_clear_error(tmp_path):
    class NoLoss(Linear):
        def forward(self, images, targets):
            return {"task/a": super().forward(images, targets)["loss"]}

    with pytest.raises(KeyError, match="no 'loss' key"):
        fit(NoLoss(), batches([1.0, 1.0]), plain_cfg(), tmp_path)


def test_stop_at_step_returns_early_with_state(tmp_path):
    t = Linear()
    res = fit(t, batches(*[[1.0, 0.0]] * 4), plain_cfg(), tmp_path, stop_at_step=2)
    assert res.stopped and res.steps == 2 and t.weight() == pytest.approx([0.8, 2.0])
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["progress"]["step"] == 2 and state["progress"]["batch"] == 2


def test_sigint_finishes_the_step_saves_and_resumes(tmp_path):
    class Interrupted(Linear):
        def set_step(self, step):
            super().set_step(step)
            if step == 1 and not self.checks[1:]:
                self.checks.append("signalled")
                os.kill(os.getpid(), signal.SIGINT)  # like Ctrl-C in the middle of step 2

    t = Interrupted()
    res = fit(t, batches(*[[1.0, 0.0]] * 4), plain_cfg(), tmp_path)
    # step 2 completes (w = [1, 2] - 2 * 0.1 * [1, 0]), then the loop saves state.pt and returns
    assert res.stopped and res.steps == 2 and t.weight() == pytest.approx([0.8, 2.0])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    t2 = Linear()
    res2 = fit(t2, batches(*[[1.0, 0.0]] * 4), plain_cfg(), tmp_path, resume=True)
    assert not res2.stopped and res2.steps == 4 and t2.weight() == pytest.approx([0.6, 2.0])


def test_a_fixed_gpu_under_torchrun_is_refused_and_a_single_process_gpu_is_made_current(monkeypatch, tmp_path):
    """Under torchrun every rank trains on its LOCAL_RANK GPU (made current by init_distributed): train.device=cuda:1
    would put every rank on GPU 1. In a single process the training GPU is made current, so that checkpoints save
    and restore its RNG state. (CUDA mocked: the error comes before anything moves to the GPU.)"""
    import detkd.engine.loop as loop

    made_current = []
    monkeypatch.setattr(loop.D, "resolve_device", lambda name: torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setattr(loop.D, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="LOCAL_RANK GPU"):
        fit(Linear(), batches([1.0, 3.0]), plain_cfg(device="cuda:1"), tmp_path / "a")
    assert made_current == []
    monkeypatch.setattr(loop.D, "get_world_size", lambda: 1)

    class Stop(Exception):
        pass

    def stop(self, *a, **k):
        raise Stop

    monkeypatch.setattr(Linear, "to", stop)
    with pytest.raises(Stop):
        fit(Linear(), batches([1.0, 3.0]), plain_cfg(device="cuda:1"), tmp_path / "b")
    assert made_current == [torch.device("cuda", 1)]
