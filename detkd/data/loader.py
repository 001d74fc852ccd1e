"""DataLoader construction: detection collate, reproducible shuffling and worker seeding, DDP sampling.

Reproducibility: shuffling draws from a ``torch.Generator`` seeded from ``seed``; the DataLoader also derives each
worker's torch seed from that generator, and :func:`seed_worker` propagates it to ``random`` and ``numpy``. Call
``loader.set_epoch(epoch)`` at the start of every epoch: it reseeds the generator with ``seed + epoch``, so an
epoch's order and augmentations do not depend on how many epochs ran before (exact resume), and under DDP also the
``DistributedSampler`` (all ranks shuffle alike, each takes its own shard). Under DDP the generator only seeds the
workers, and it is offset by the rank (``seed + RANK_STRIDE * rank + epoch``): with the same generator every rank's
workers would draw the same augmentations.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler


def collate(batch: list[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Images of different sizes cannot be stacked: keep ``list[Tensor[3, H, W]]`` and ``list[target]``."""
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed ``random`` and ``numpy`` from the worker's torch seed (set by the DataLoader)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


#: rank r's worker-seeding generator starts at seed + RANK_STRIDE * r (epochs add 1 each: no overlap in practice)
RANK_STRIDE = 1 << 20


class DetectionLoader(DataLoader):
    """A DataLoader that remembers its generator's seed, for :meth:`set_epoch`."""

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        if self.generator is not None:
            self.generator.manual_seed(self.seed + epoch)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    num_workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DetectionLoader:
    """Loader yielding ``(list[image], list[target])`` batches.

    ``train``: shuffled (seeded); otherwise in dataset order. ``distributed``: a ``DistributedSampler`` over the
    current process group (note it pads the last shard with repeated images so every rank has as many; evaluation
    code should de-duplicate by ``image_id``). ``batch_size`` is per process.
    """
    generator = torch.Generator().manual_seed(seed)
    sampler: Sampler
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=drop_last and train)
        generator.manual_seed(seed + RANK_STRIDE * sampler.rank)  # it seeds only the workers: one stream per rank
    elif train:
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    return DetectionLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=seed_worker,
        generator=generator,
        drop_last=drop_last and train,
        pin_memory=pin_memory,
        persistent_workers=False,
        seed=generator.initial_seed(),
    )
