"""Atomic writes, weights_only loads and RNG round trips."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from detkd.engine.checkpoint import atomic_save, capture_rng, load_checkpoint, restore_rng, save_student


def test_atomic_save_leaves_only_the_target(tmp_path):
    atomic_save({"w": torch.arange(3)}, tmp_path / "a.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]
    assert torch.equal(load_checkpoint(tmp_path / "a.pt")["w"], torch.arange(3))


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    atomic_save({"w": torch.ones(2)}, tmp_path / "a.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"w": torch.zeros(2), "x": Unpicklable()}, tmp_path / "a.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]
    assert torch.equal(load_checkpoint(tmp_path / "a.pt")["w"], torch.ones(2))


def test_loads_are_weights_only(tmp_path):
    torch.save({"fn": print}, tmp_path / "evil.pt")  # a pickled global: refused by weights_only
    with pytest.raises(Exception, match="(?i)weights.only"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_save_student_is_a_plain_cpu_state_dict(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    save_student(net, tmp_path / "s.pt")
    sd = load_checkpoint(tmp_path / "s.pt")
    assert list(sd) == list(net.state_dict())  # same keys, same order, incl. BN buffers
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    fresh.load_state_dict(sd, strict=True)
    assert torch.equal(fresh[0].weight, net[0].weight)


def test_rng_round_trip_through_a_weights_only_file(tmp_path):
    gen = torch.Generator().manual_seed(3)
    loader = torch.utils.data.DataLoader(range(4), shuffle=True, generator=gen)
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    gen.manual_seed(5)
    atomic_save(capture_rng(loader), tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.normal(size=2), torch.rand(2, generator=gen))
    torch.rand(10), random.random(), np.random.normal(size=7), torch.rand(4, generator=gen)  # move every stream
    restore_rng(load_checkpoint(tmp_path / "rng.pt"), loader)
    again = (torch.rand(3), random.random(), np.random.normal(size=2), torch.rand(2, generator=gen))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1]
    assert np.array_equal(expected[2], again[2]) and torch.equal(expected[3], again[3])


def test_cuda_rng_is_this_processs_gpu_only(monkeypatch):
    """One CUDA state, the current GPU's: a state per visible GPU (8 under an 8-GPU torchrun) cannot be restored where
    fewer are visible. An older state.pt holding the list still resumes: the current GPU's entry is used."""
    cuda = torch.cuda
    states = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    restored = []
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(cuda, "current_device", lambda: 1)
    monkeypatch.setattr(cuda, "get_rng_state", lambda device="cuda": states[1])
    monkeypatch.setattr(cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    monkeypatch.setattr(cuda, "get_rng_state_all", lambda: pytest.fail("saved every GPU's state"))
    monkeypatch.setattr(cuda, "set_rng_state_all", lambda states: pytest.fail("restored every GPU's state"))
    state = capture_rng()
    assert torch.equal(state["cuda"], states[1])
    restore_rng(state)
    restore_rng({**state, "cuda": [states[0], states[1], states[0]]})  # older format, current GPU 1
    restore_rng({**state, "cuda": [states[0]]})  # older format from fewer GPUs: nothing to restore for GPU 1
    assert [int(s) for s in restored] == [1, 1]


def test_restore_rng_refuses_a_different_loader():
    state = capture_rng(torch.utils.data.DataLoader(range(4), shuffle=True, generator=torch.Generator()))
    with pytest.raises(ValueError, match="random generators"):
        restore_rng(state, loader=None)
