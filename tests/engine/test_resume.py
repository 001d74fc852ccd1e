"""The acceptance test of resume: N steps + stop + resume N steps == 2N uninterrupted steps, exactly.

The data augmentation draws from the torch, python and numpy RNGs, the model uses dropout and BN, the optimizer has
momentum and the LR a warm-up + cosine schedule, and evaluation (which draws random numbers too) runs at epoch
ends: a resume that missed any of these would change the losses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch
from engine_helpers import TinyTrainable, ToyDetection, make_loader, tiny_fcos

from detkd.config import Config, TrainConfig, load_config
from detkd.data.loader import build_loader
from detkd.engine import TaskModel, fit


def _torchvision_or_skip():
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # a broken install raises RuntimeError, not ImportError
        pytest.skip(f"torchvision does not import here: {e}")


def cfg(accumulate: int) -> TrainConfig:
    return TrainConfig(max_steps=6, lr=0.05, momentum=0.9, weight_decay=1e-4, warmup_steps=2, warmup_factor=0.1,
                       schedule="cosine", accumulate=accumulate, log_every=1, eval_every=1, progress=False,
                       device="cpu", amp="off")


def noisy_eval(student):
    torch.rand(5)  # evaluation may use random numbers; it must not shift training
    return {"AP": float(sum(p.detach().abs().sum() for p in student.parameters()) % 1.0)}


def train(run_dir, *, accumulate=1, n=8, stop=None, resume=None, model_seed=0, seed=0, make=TinyTrainable,
          config=None, workers=None):
    torch.manual_seed(model_seed)  # a resumed run starts from other weights: everything must come from state.pt
    trainable = make()
    if workers is None:
        loader = make_loader(ToyDetection(n), batch_size=2, seed=0)
    else:  # the project's loader: set_epoch on the loader, seeded generator, worker seeding
        loader = build_loader(ToyDetection(n), 2, train=True, num_workers=workers, seed=0)
    res = fit(trainable, loader, cfg(accumulate), run_dir, evaluate=noisy_eval, resume=resume, seed=seed,
              stop_at_step=stop, config=config)
    if workers:
        del loader  # shut the worker processes down now
    return res, trainable


def train_records(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in recs if r["event"] in ("train", "eval")]


def assert_same_weights(a, b):
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


_REFERENCE = {}


def reference(tmp_path_factory, accumulate, n, make=TinyTrainable, workers=None):
    key = (accumulate, n, make.__name__, workers)
    if key not in _REFERENCE:
        run_dir = tmp_path_factory.mktemp("reference")
        res, _ = train(run_dir, accumulate=accumulate, n=n, make=make, workers=workers)
        _REFERENCE[key] = (run_dir, res)
    return _REFERENCE[key]


@pytest.mark.parametrize(
    ("accumulate", "n", "stop"),
    [
        (1, 8, 3),  # 4 batches per epoch: stop in the middle of epoch 0
        (1, 8, 4),  # stop exactly at the end of epoch 0 (after its evaluation)
        (2, 10, 2),  # 5 micro-batches per epoch in groups (2, 2, 1): stop after micro-batch 4 of epoch 0
        (2, 10, 4),  # ... and after the first group of epoch 1
    ],
)
def test_stop_and_resume_follows_the_uninterrupted_trajectory(tmp_path_factory, tmp_path, accumulate, n, stop):
    ref_dir, ref = reference(tmp_path_factory, accumulate, n)
    first, _ = train(tmp_path, accumulate=accumulate, n=n, stop=stop)
    assert first.stopped and first.steps == stop
    second, _ = train(tmp_path, accumulate=accumulate, n=n, resume=True, model_seed=123)
    assert not second.stopped and second.steps == ref.steps == 6
    assert train_records(tmp_path) == train_records(ref_dir)  # every step's losses and LR, every evaluation
    assert_same_weights(tmp_path / "last.pt", ref_dir / "last.pt")
    assert_same_weights(tmp_path / "best.pt", ref_dir / "best.pt")
    assert second.best_metric == ref.best_metric and second.epochs == ref.epochs == 6 // math.ceil(n / 2 / accumulate)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_the_project_loader(tmp_path_factory, tmp_path, workers):
    # detkd.data.build_loader reseeds per epoch through loader.set_epoch; with 2 worker processes the workers'
    # seeds come from the replayed epoch-start draw, so their augmentations of the skipped batches replay too.
    ref_dir, _ = reference(tmp_path_factory, 1, 8, workers=workers)
    train(tmp_path, stop=3, workers=workers)
    train(tmp_path, resume=True, model_seed=5, workers=workers)
    assert train_records(tmp_path) == train_records(ref_dir)
    assert_same_weights(tmp_path / "last.pt", ref_dir / "last.pt")


def test_the_trajectory_depends_on_the_seed(tmp_path_factory, tmp_path):
    # guards the test above against vacuity: the losses do depend on the RNG state
    ref_dir, _ = reference(tmp_path_factory, 1, 8)
    train(tmp_path, seed=1)
    ours, theirs = train_records(tmp_path), train_records(ref_dir)
    assert ours[0]["loss"] != theirs[0]["loss"] and ours[-1] != theirs[-1]


def test_run_folder_files(tmp_path_factory, tmp_path):
    config = Config(name="tiny")
    res, trainable = train(tmp_path, stop=2, config=config)
    assert load_config(tmp_path / "config.yaml").name == "tiny"
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["progress"] == {"step": 2, "epoch": 0, "batch": 2, "best_metric": None, "skipped_steps": 0,
                                 "nonfinite_in_row": 0}
    assert set(state["trainable"]) == set(trainable.state_dict())  # student + the connector
    assert any(k.startswith("connector.") for k in state["trainable"])
    assert list(torch.load(tmp_path / "last.pt", weights_only=True)) == list(trainable.student.state_dict())
    assert any((tmp_path / "tb").iterdir())
    assert not (tmp_path / "best.pt").exists()  # no evaluation before the stop


def test_tiny_fcos_resume_and_plain_torchvision_checkpoint(tmp_path_factory, tmp_path):
    _torchvision_or_skip()
    make = lambda: TaskModel(tiny_fcos())  # noqa: E731
    ref_dir, _ = reference(tmp_path_factory, 1, 8, make=make)
    train(tmp_path, stop=3, make=make)
    train(tmp_path, resume=True, model_seed=7, make=make)
    assert train_records(tmp_path) == train_records(ref_dir)
    assert {"task/classification", "task/bbox_regression", "task/bbox_ctrness"} <= set(train_records(tmp_path)[0])
    # last.pt is a plain torchvision state_dict: a freshly built FCOS loads it strictly and predicts the same
    fresh = tiny_fcos()
    fresh.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True), strict=True)
    trained = tiny_fcos()
    trained.load_state_dict(torch.load(ref_dir / "last.pt", weights_only=True))
    image = [ToyDetection(1, augment=False)[0][0]]
    with torch.no_grad():
        a, b = fresh.eval()(image)[0], trained.eval()(image)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_resuming_in_another_precision_says_so(tmp_path):
    """train.device may change on resume and train.amp=auto follows the device: a run that trained in fp32 and goes
    on in bf16 (a CPU run resumed on a GPU) is warned about, naming both."""
    def run(amp, resume, stop=None):
        torch.manual_seed(0)
        loader = make_loader(ToyDetection(8), batch_size=2, seed=0)
        return fit(TinyTrainable(), loader, dataclasses.replace(cfg(1), amp=amp), tmp_path, resume=resume,
                   stop_at_step=stop)

    run("off", None, stop=2)
    with pytest.warns(UserWarning, match="trained in fp32 until step 2 and goes on in bf16"):
        run("bf16", True, stop=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run("bf16", True)  # saved in bf16 at step 4: same precision, no warning
