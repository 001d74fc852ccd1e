"""Inference latency of a detector, for benchmark tables (a measurement, never a pass/fail test)."""

from __future__ import annotations

import statistics
from time import perf_counter

import torch
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    image_size: int | tuple[int, int],
    *,
    device: str | torch.device,
    warmup: int = 3,
    iters: int = 10,
    batch: int = 1,
) -> float:
    """Median wall time of ``model(images)`` in milliseconds per image.

    ``images`` is a list of ``batch`` random (3, H, W) tensors (``image_size`` = H = W, or (H, W)); the timed call
    includes the detector's own preprocessing and post-processing (NMS), as a deployed model would run. The model is
    put in eval mode and its previous mode restored. CUDA is synchronised around each timed call.
    """
    if iters < 1 or batch < 1 or warmup < 0:
        raise ValueError(f"measure_latency: need iters >= 1, batch >= 1, warmup >= 0 (got {iters}, {batch}, {warmup})")
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)  # fixed inputs without touching the global RNG
    images = [torch.rand(3, h, w, generator=gen).to(device) for _ in range(batch)]
    was_training = model.training
    model.to(device).eval()
    try:
        for _ in range(warmup):
            model(images)
        times = []
        for _ in range(iters):
            _sync(device)
            t0 = perf_counter()
            model(images)
            _sync(device)
            times.append(perf_counter() - t0)
    finally:
        model.train(was_training)
    return statistics.median(times) * 1000.0 / batch
