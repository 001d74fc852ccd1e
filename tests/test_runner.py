"""detkd.runner: what a run's config controls."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from detkd import runner
from detkd.config import Config, DataConfig, ModelConfig, SynthConfig


def test_the_seed_fixes_the_students_initial_weights_whatever_the_rng_state_before(tmp_path, monkeypatch):
    initial: list[dict[str, torch.Tensor]] = []

    def capture(cfg, student, teacher, resume=False):  # the models as train_from_config hands them over
        initial.append({k: v.clone() for k, v in student.state_dict().items()})

    monkeypatch.setattr(runner, "train_models", capture)
    data = DataConfig(format="synthetic", root=str(tmp_path / "synth"), batch_size=2,
                      synthetic=SynthConfig(num_train=4, num_val=2, image_size=64, max_objects=3, seed=2))
    model = ModelConfig(family="fcos", backbone="resnet18", fpn_channels=16, head_convs=1, min_size=64, max_size=64)
    cfg = Config(name="s", seed=3, output_dir=str(tmp_path), data=data, model=model)
    torch.manual_seed(100)
    runner.train_from_config(cfg)
    torch.manual_seed(200)  # another process, another RNG state at start
    torch.rand(17)
    runner.train_from_config(cfg)
    runner.train_from_config(dataclasses.replace(cfg, seed=4))
    same, other = initial[0], initial[1]
    assert all(torch.equal(same[k], other[k]) for k in same)  # same seed: the same student, bit for bit
    reseeded = initial[2]
    assert any(v.is_floating_point() and not torch.equal(v, reseeded[k]) for k, v in same.items())


def test_the_process_group_follows_train_device(tmp_path, monkeypatch):
    """init_distributed gets train.device: with train.device=cpu under torchrun on a GPU machine the group must be
    gloo (an NCCL group cannot reduce the CPU model's gradients)."""
    seen = []

    def spy(device="auto"):
        seen.append(device)
        raise RuntimeError("stop here")

    monkeypatch.setattr(runner, "init_distributed", spy)
    data = DataConfig(format="synthetic", root=str(tmp_path / "synth"))
    cfg = Config(name="s", output_dir=str(tmp_path), data=data)
    cfg.train.device = "cpu"
    for call in (lambda: runner.train_from_config(cfg), lambda: runner.train_models(cfg, None, None)):
        with pytest.raises(RuntimeError, match="stop here"):
            call()
    assert seen == ["cpu", "cpu"]
