"""Memory measurements of ``cost.py``: the peak memory of one step above what is resident before it
(``step_peak_mib``: CUDA's ``max_memory_allocated``, or on CPU the process's peak RSS reset through
/proc/self/clear_refs after ``malloc_trim``, Linux + glibc only) and the resident weights and AdamW state each
variant owns (``resident_mib``, ``memory_accounting``).
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import synchronize
from steps import Setup
from torch import nn

from detkd.distill.distiller import Distiller


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def step_peak_mib(step: Callable[[], None], device: torch.device) -> float | None:
    """Peak memory of one call of ``step`` above what was resident just before it, in MiB (None: cannot measure).

    CUDA: ``max_memory_allocated`` after a peak reset. CPU (Linux + glibc): garbage is collected and ``malloc_trim``
    hands freed heap pages back, then the peak RSS (VmHWM) is reset through /proc/self/clear_refs.
    """
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    libc = _libc()
    try:
        if libc is None:
            return None
        libc.malloc_trim(0)
        before = _status_mib("VmRSS:")
        Path("/proc/self/clear_refs").write_text("5")
        step()
        return _status_mib("VmHWM:") - before
    except (OSError, KeyError):
        return None


def resident_mib(params: list[nn.Parameter], frozen: list[nn.Parameter]) -> float:
    """Weights + AdamW state (2 moments) of trained parameters, plus frozen weights (the teacher), in MiB."""
    trained = sum(p.numel() * p.element_size() for p in params)
    return (3 * trained + sum(p.numel() * p.element_size() for p in frozen)) / 2**20


def memory_accounting(setup: Setup, distiller: Distiller) -> dict[str, Any]:
    """Resident MiB of each variant (weights + AdamW state, frozen teacher weights) and the distillation params."""
    student = [p for p in setup.student.parameters() if p.requires_grad]
    teacher = list(setup.teacher_model.parameters()) if setup.teacher_model is not None else []
    extra = [p for sl in distiller.losses for p in sl.module.parameters() if p.requires_grad]
    return {
        "resident_mib": {"plain": resident_mib(student, []), "a": resident_mib(student, []),
                         "b": resident_mib(student, teacher), "c": resident_mib(student + extra, teacher)},
        "distill_params": sum(p.numel() for p in extra),
    }
