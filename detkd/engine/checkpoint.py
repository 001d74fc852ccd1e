"""Run-folder files: atomic writes, plain student weights, the resume state and the RNG states it carries.

Run folder: ``config.yaml``, ``last.pt`` / ``best.pt`` (plain student ``state_dict``: loads into the torchvision
model with no detkd code), ``state.pt`` (everything needed to resume: trainable, optimizer, scheduler, grad scaler,
counters, RNG states), ``metrics.jsonl``, ``tb/``. Every write goes to a temporary file in the same folder and is
renamed over the target (``os.replace`` is atomic on POSIX), so a crash never leaves a half-written checkpoint.
Every load uses ``torch.load(..., weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

STATE_FORMAT = 1


def atomic_write(path: str | Path, write: Callable[[Any], None], *, mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a temporary file and an atomic rename."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; a clear error naming the file when it is missing, or when it is not
    a checkpoint that loads (truncated by a full disk or an interrupted copy, another format, an empty file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def save_student(student: nn.Module, path: str | Path) -> None:
    """Save the student's plain ``state_dict`` (CPU tensors, torchvision key names)."""
    atomic_save({k: v.detach().cpu() for k, v in student.state_dict().items()}, path)


# ------------------------------------------------------------------------------------------------- RNG states


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The torch.Generators a DataLoader draws from (its own, its sampler's), each once, in a fixed order."""
    candidates = [
        getattr(loader, "generator", None),
        getattr(getattr(loader, "sampler", None), "generator", None),
        getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None),
    ]
    out: list[torch.Generator] = []
    for g in candidates:
        if isinstance(g, torch.Generator) and all(g is not h for h in out):
            out.append(g)
    return out


def capture_rng(loader: Any = None) -> dict[str, Any]:
    """RNG states of python, numpy, torch (+ CUDA) and of ``loader``'s generators, as weights_only-safe values."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "loader": [g.get_state() for g in _loader_generators(loader)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's GPU only (fit makes the training device current): a state per visible GPU could not be
        # restored on a machine, or under a CUDA_VISIBLE_DEVICES, with fewer GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any], loader: Any = None) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        ("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"],
         np_state["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # an older state.pt: one state per visible GPU
            current = torch.cuda.current_device()
            cuda = cuda[current] if current < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
    generators = _loader_generators(loader)
    if len(generators) != len(state["loader"]):
        raise ValueError(
            f"resume: the data loader has {len(generators)} random generators but the checkpoint saved "
            f"{len(state['loader'])}; build the loader the same way as in the interrupted run"
        )
    for g, s in zip(generators, state["loader"]):
        g.set_state(s)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------- graceful stop


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag the loop checks between optimizer steps (it then saves the
    resume state and returns); a second signal gets the default behaviour. Only in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        print(f"[detkd] signal {signum}: finishing the current step, saving state.pt, then stopping", flush=True)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        self._previous.clear()
