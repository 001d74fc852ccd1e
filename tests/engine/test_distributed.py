"""DDP on CPU: two gloo processes configured with torchrun's environment variables."""

from __future__ import annotations

import json
import multiprocessing
import socket

import pytest
import torch
from ddp_worker import run_rank

from detkd.engine.distributed import all_reduce_mean, any_rank, init_distributed, is_main, wrap_ddp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_fallbacks(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.device) == (0, 1, True, torch.device("cpu"))
    assert is_main() and not any_rank(False) and any_rank(True)
    assert all_reduce_mean({"a": 1.5}) == {"a": 1.5}
    net = torch.nn.Linear(1, 1)
    assert wrap_ddp(net, torch.device("cpu")) is net


def _two_ranks(tmp_path, mode: str = "plain") -> tuple[dict, dict]:
    # Forked, not spawned: fresh interpreters would spend most of the test importing torch again. DDP's constructor
    # imports torch._dynamo (seconds): import it once here so that both ranks inherit it.
    import torch._dynamo  # noqa: F401

    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=run_rank, args=(rank, 2, port, tmp_path, mode)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    for rank, p in enumerate(procs):
        if p.is_alive():
            p.kill()
        error = tmp_path / f"error{rank}.txt"
        assert p.exitcode == 0, error.read_text() if error.exists() else f"rank {rank} exit code {p.exitcode}"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    return r0, r1


def test_two_cpu_ranks_train_in_step_and_only_rank_0_writes(tmp_path):
    r0, r1 = _two_ranks(tmp_path)

    # 8 images, 2 ranks, batch 2: 2 steps per epoch on each rank, 2 epochs
    assert r0["steps"] == r1["steps"] == 4 and r0["epochs"] == r1["epochs"] == 2
    assert r0["world_size"] == 2
    for step in ("0", "1", "2", "3"):  # each step, the ranks see disjoint halves of the epoch's data ...
        assert not set(r0["seen"][step]) & set(r1["seen"][step])
    for epoch_steps in (("0", "1"), ("2", "3")):  # ... and together every image once per epoch
        ids = sorted(i for r in (r0, r1) for s in epoch_steps for i in r["seen"][s])
        assert ids == list(range(8))
    assert r0["seen"]["0"] + r0["seen"]["1"] != r0["seen"]["2"] + r0["seen"]["3"]  # set_epoch reshuffles

    # gradients are averaged: different initial weights (broadcast from rank 0) end identical
    assert torch.equal(torch.load(tmp_path / "params0.pt"), torch.load(tmp_path / "params1.pt"))
    # evaluation results reach every rank
    assert r0["best"] == r1["best"] == 0.25 and r1["last_metrics"] == {"AP": 0.25}

    # only rank 0 writes; its logged loss is the mean over ranks
    assert not (tmp_path / "run1").exists()
    run0 = tmp_path / "run0"
    assert {"last.pt", "best.pt", "state.pt", "metrics.jsonl", "tb"} <= {p.name for p in run0.iterdir()}
    train = [json.loads(x) for x in (run0 / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["event"] == "train"]
    for rec in train:
        s = str(rec["step"] - 1)
        assert rec["loss"] == pytest.approx((r0["losses"][s] + r1["losses"][s]) / 2, rel=1e-6)
    state = torch.load(run0 / "state.pt", weights_only=True)
    assert len(state["rng"]) == 2  # each rank's RNG states, for an exact resume


def test_parameters_frozen_for_some_steps_train_under_ddp_when_the_trainable_says_so(tmp_path):
    """LGD's warm-up freezes the backbone for its first steps: DDP then needs find_unused_parameters, which fit
    turns on when the trainable's leaves_parameters_unused() says so (without it, the second step fails with
    "Expected to have finished reduction in the prior iteration")."""
    r0, r1 = _two_ranks(tmp_path, "freeze")
    assert r0["steps"] == r1["steps"] == 4
    assert torch.equal(torch.load(tmp_path / "params0.pt"), torch.load(tmp_path / "params1.pt"))


def test_the_group_waits_for_rank_0s_evaluation_longer_than_the_default(monkeypatch):
    """Ranks wait in a collective while rank 0 evaluates: the group's timeout is an hour, not torch's 10 minutes.
    train.device=cpu makes a gloo group even where a GPU is visible."""
    import datetime

    import detkd.engine.distributed as D

    made = {}
    monkeypatch.setattr(D.dist, "init_process_group", lambda **kw: made.update(kw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = init_distributed("cpu")
    assert made == {"backend": "gloo", "rank": 1, "world_size": 2, "timeout": datetime.timedelta(minutes=60)}
    assert info.device == torch.device("cpu") and not info.is_main
