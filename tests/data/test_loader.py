"""Loader: list collate, seeded shuffling with set_epoch, worker seeding, DistributedSampler under a process group."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from detkd.data import build_loader, collate, seed_worker


class _Toy(Dataset):
    """Item i: a (3, 2 + i % 3, 4) image (sizes differ, so stacking would fail) and a random draw from torch's RNG."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        image = torch.full((3, 2 + i % 3, 4), float(i))
        return image, {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "image_id": i,
            "aug": float(torch.rand(())),
        }


def _ids(loader) -> list[int]:
    return [t["image_id"] for _, targets in loader for t in targets]


def test_collate_keeps_lists():
    images, targets = collate([_Toy()[0], _Toy()[1]])
    assert [im.shape for im in images] == [(3, 2, 4), (3, 3, 4)]
    assert [t["image_id"] for t in targets] == [0, 1]


def test_train_order_reproducible_and_epoch_dependent():
    a, b = build_loader(_Toy(), 3, train=True, seed=5), build_loader(_Toy(), 3, train=True, seed=5)
    a.set_epoch(0)
    b.set_epoch(0)
    first = _ids(a)
    assert first == _ids(b) and sorted(first) == list(range(10)) and first != list(range(10))
    a.set_epoch(1)
    second = _ids(a)
    assert second != first
    b.set_epoch(1)  # resuming at epoch 1 gives the same order without replaying epoch 0
    c = build_loader(_Toy(), 3, train=True, seed=5)
    c.set_epoch(1)
    assert _ids(c) == second
    assert _ids(build_loader(_Toy(), 3, train=True, seed=6)) != _ids(build_loader(_Toy(), 3, train=True, seed=5))


def test_eval_is_in_order():
    assert _ids(build_loader(_Toy(), 4, train=False)) == list(range(10))


def test_workers_get_reproducible_random_streams():
    def run():
        loader = build_loader(_Toy(), 2, train=True, seed=3, num_workers=2)
        loader.set_epoch(0)
        return [(t["image_id"], t["aug"]) for _, targets in loader for t in targets]

    a, b = run(), run()
    assert a == b
    assert len({aug for _, aug in a}) == 10  # the two workers do not repeat each other's draws


def test_seed_worker_seeds_numpy_and_random_from_torch():
    torch.manual_seed(1234)
    seed_worker(0)
    x, y = np.random.rand(), random.random()
    assert x == np.random.RandomState(1234).rand() and y == random.Random(1234).random()


@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_distributed_sampler_and_set_epoch(gloo_group):
    loader = build_loader(_Toy(), 4, train=True, seed=2, distributed=True)
    assert isinstance(loader.sampler, DistributedSampler)
    loader.set_epoch(3)
    assert loader.sampler.epoch == 3
    ids = _ids(loader)
    assert sorted(ids) == list(range(10))
    # DistributedSampler's documented order: randperm with a generator seeded by seed + epoch
    assert ids == torch.randperm(10, generator=torch.Generator().manual_seed(2 + 3)).tolist()
    assert _ids(build_loader(_Toy(), 4, train=False, distributed=True)) == list(range(10))


def test_ranks_workers_draw_their_own_augmentations(gloo_group, monkeypatch):
    """Under DDP the generator only seeds the workers: offset by the rank, so that two ranks' workers do not draw the
    same augmentations; the shuffling (the DistributedSampler's seed) stays common to all ranks."""
    def run(rank):
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
        loader = build_loader(_Toy(), 2, train=True, seed=3, num_workers=2, distributed=True)
        monkeypatch.undo()
        loader.set_epoch(1)
        return loader, [t["aug"] for _, targets in loader for t in targets]

    (l0, a0), (l1, a1) = run(0), run(1)
    assert l0.sampler.seed == l1.sampler.seed == 3 and (l0.sampler.rank, l1.sampler.rank) == (0, 1)
    assert len(a0) == len(a1) == 5 and not set(a0) & set(a1)
    assert run(1)[1] == a1  # still reproducible per rank
