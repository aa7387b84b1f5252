"""Atomic checkpoint writes for Detectron2's checkpointers.

fvcore's ``Checkpointer.save`` writes ``model_XXXX.pth`` in place and then ``last_checkpoint``:
a kill during the write leaves a truncated file, and a kill while ``last_checkpoint`` is being
rewritten leaves it empty. Wrapping the checkpointer's ``path_manager`` makes every file it opens
for writing appear under its name only once completely written (temporary file, fsync, rename).
"""

import contextlib
import os
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_open(path: str, mode: str) -> Iterator[Any]:
    """Like ``open(path, mode)`` for writing, but ``path`` changes only if the block succeeds."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class AtomicWrites:
    """A path manager that delegates to ``base`` and writes local files atomically."""

    def __init__(self, base: Any):
        self._base = base

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    def open(self, path: str, mode: str = "r", **kwargs):
        if "w" in mode and "://" not in path:
            return atomic_open(path, mode)
        return self._base.open(path, mode, **kwargs)


def make_atomic(checkpointer):
    """Make ``checkpointer`` (fvcore/Detectron2) write its files atomically; returns it."""
    if not isinstance(checkpointer.path_manager, AtomicWrites):
        checkpointer.path_manager = AtomicWrites(checkpointer.path_manager)
    return checkpointer
