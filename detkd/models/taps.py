"""Forward hooks that record the outputs of named sub-modules, only while a capture is open.

Used when a method distils a map that the adapter does not expose (a backbone stage such as
``backbone.body.layer2``, Chen et al.'s hint layer). Hooks are registered once; outside ``with taps.capture():``
they return immediately, so evaluation and the teacher's other calls keep no tensors alive.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn


class FeatureTaps:
    """Record ``model.get_submodule(name)`` outputs for each name, inside ``capture()``.

    ``read()`` returns ``{name: output}`` and clears the store (no memory kept between steps). A module called
    several times inside one capture keeps its last output. ``remove()`` (or leaving ``with FeatureTaps(...)``)
    removes the hooks.
    """

    def __init__(self, model: nn.Module, names: list[str]):
        self._store: dict[str, Tensor] = {}
        self._active = False
        self._handles = []
        modules = {name: _find(model, name) for name in names}
        for name, module in modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        self.names = list(names)

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            if self._active:
                self._store[name] = output

        return hook

    @contextmanager
    def capture(self) -> Iterator[FeatureTaps]:
        """Record outputs while the block runs (nested captures are not allowed: they would clear each other)."""
        if self._active:
            raise RuntimeError("FeatureTaps.capture() is already open")
        if not self._handles:
            raise RuntimeError("FeatureTaps were removed; create new taps")
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def read(self) -> dict[str, Tensor]:
        """The outputs recorded since the last read, then forget them."""
        out, self._store = self._store, {}
        return out

    def remove(self) -> None:
        """Remove every hook and drop anything recorded."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._store = {}

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _find(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"; close names: {close}" if close else ""
        raise KeyError(f"no module named {name!r} in {type(model).__name__}{hint}") from None
