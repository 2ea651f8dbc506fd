"""Tensor data of a checkpoint source: the torch side of :class:`~.core.sources.CheckpointSource`.

The planning core knows every tensor from headers alone; reading bytes is what the serving loader,
the reload, the converter and the reference path do, through a :class:`TensorReader` per source.
A reader keeps one handle per weight file (``safe_open`` for safetensors, the memory-mapped state
dict for ``.bin``) until ``close()``.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

from .core.sources import CheckpointSource


class TensorReader:
    """Reads one source's tensors; handles are cached per file until :meth:`close`."""

    def __init__(self, source: CheckpointSource):
        self.source = source
        self._handles: dict[Path, object] = {}

    def open(self, file: str | os.PathLike):
        """A cached handle on one weight file of the source."""
        path = Path(file)
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = _open(path)
        return handle

    def read(self, name: str):
        """The tensor ``name`` (memory-mapped: only this tensor is materialised)."""
        info = self.source.tensor(name)
        handle = self.open(info.file)
        return handle[name] if isinstance(handle, dict) else handle.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open(path: Path):
    if path.suffix == ".bin":
        import torch

        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    from safetensors import safe_open

    return safe_open(str(path), framework="pt", device="cpu")


_READERS: weakref.WeakKeyDictionary[CheckpointSource, TensorReader] = weakref.WeakKeyDictionary()


def reader(source: CheckpointSource) -> TensorReader:
    """The shared reader of ``source`` (one per source object, gone with it)."""
    r = _READERS.get(source)
    if r is None:
        r = _READERS[source] = TensorReader(source)
    return r


def read_tensor(source: CheckpointSource, name: str):
    """One tensor of ``source`` through its shared reader."""
    return reader(source).read(name)
