"""Checkpoints that are never half-written and never silently half-loaded.

fvcore's ``Checkpointer.save`` writes ``model_XXXX.pth`` in place and then ``last_checkpoint``:
a kill during the write leaves a truncated file, and a kill while ``last_checkpoint`` is being
rewritten leaves it empty. Wrapping the checkpointer's ``path_manager`` makes every file it opens
for writing appear under its name only once completely written (temporary file, fsync, rename).
"""

import contextlib
import glob
import logging
import os
import socket
from typing import Any, Callable, Iterator

import torch
from detectron2.checkpoint import DetectionCheckpointer

logger = logging.getLogger(__name__)
# what atomic_open puts between a file's name and its writer's pid: the machine, whose processes
# alone this one can tell running or not
_TEMPORARY = f".tmp.{socket.gethostname()}."


@contextlib.contextmanager
def atomic_open(path: str, mode: str) -> Iterator[Any]:
    """Like ``open(path, mode)`` for writing, but ``path`` changes only if the block succeeds."""
    tmp = f"{path}{_TEMPORARY}{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_orphaned_writes(folder: str) -> None:
    """The temporary files of :func:`atomic_open` in ``folder`` whose writer, a process of this
    machine, no longer runs: a SIGKILL mid-write (a preemption) runs no cleanup, and each is up
    to a checkpoint's size."""
    for path in glob.glob(os.path.join(glob.escape(folder), f"*{glob.escape(_TEMPORARY)}*")):
        pid = path.rsplit(_TEMPORARY, 1)[1]
        if pid.isdigit() and not _running(int(pid)):
            logger.info(f"Removing {path}, the write of a process that was killed")
            with contextlib.suppress(OSError):
                os.remove(path)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


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


class HTCCheckpointer(DetectionCheckpointer):
    """A :class:`DetectionCheckpointer` that writes atomically and refuses weights whose shapes
    do not fit the model (the parent skips them with a warning, which silently leaves e.g. a
    class-count mismatch at random initialization) unless ``skip_mismatched`` is set for
    fine-tuning. Missing and unexpected keys are logged by the parent as before."""

    def __init__(self, model, save_dir: str = "", *, skip_mismatched: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.skip_mismatched = skip_mismatched
        self.path_manager = AtomicWrites(self.path_manager)

    def save(self, name: str, **kwargs) -> None:
        """The parent's, then the writes of this folder that a killed process left behind removed
        (by a training's checkpointer only: one that only loads, as ``--eval-only``'s, may share
        the folder with a training that is writing)."""
        super().save(name, **kwargs)
        if self.save_to_disk:
            remove_orphaned_writes(self.save_dir)

    def _load_model(self, checkpoint: Any):
        if not checkpoint.get("matching_heuristics", False):  # those names are matched later
            names = {key.removeprefix("module.") for key in checkpoint["model"]}
            if not names & self.model.state_dict().keys():
                raise ValueError(
                    "the checkpoint holds none of this model's parameters: is it a checkpoint "
                    "of another model? (MMDetection's: python -m htc.convert_mmdet IN OUT)"
                )
        incompatible = super()._load_model(checkpoint)
        if incompatible.incorrect_shapes and not self.skip_mismatched:
            shapes = "\n".join(
                f"  {key}: checkpoint {tuple(theirs)}, model {tuple(ours)}"
                for key, theirs, ours in incompatible.incorrect_shapes
            )
            raise ValueError(
                f"{len(incompatible.incorrect_shapes)} parameters of the checkpoint do not fit "
                f"the model's shapes:\n{shapes}\nSet MODEL.HTC.SKIP_MISMATCHED_WEIGHTS True "
                "(LazyConfig: train.skip_mismatched_weights=True) to leave them at their "
                "initialization (fine-tuning on other classes)"
            )
        return incompatible


def load_weights(model: torch.nn.Module, cfg: Any, announce: Callable[[str], None] = print) -> None:
    """``cfg.MODEL.WEIGHTS`` into ``model`` for inference, with the shapes checked as in
    training (Detectron2's checkpointer would leave a mismatched class layer at random); an
    empty MODEL.WEIGHTS keeps the random initialization, said through ``announce``."""
    if not cfg.MODEL.WEIGHTS:
        announce("MODEL.WEIGHTS is empty: the model runs on randomly initialized weights")
        return
    skip = cfg.MODEL.HTC.SKIP_MISMATCHED_WEIGHTS
    HTCCheckpointer(model, skip_mismatched=skip).load(cfg.MODEL.WEIGHTS)
