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
import re
import socket
from typing import Any, Callable, Iterator, List, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer

logger = logging.getLogger(__name__)
# what atomic_open puts between a file's name and its writer's pid: the machine, whose processes
# alone this one can tell running or not
_TEMPORARY = f".tmp.{socket.gethostname()}."
# Detectron2's name-matching heuristics (Caffe2, pycls and other "matching_heuristics" files) skip
# a weight whose shape does not fit the model with this warning, and report it nowhere else.
_HEURISTICS_LOGGER = "detectron2.checkpoint.c2_model_loading"
_SKIPPED_SHAPE = re.compile(
    r"Shape of (\S+) in checkpoint is (.+), while shape of (\S+) in model is (.+)\.$"
)


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


class _SkippedShapes(logging.Handler):
    """Collects (checkpoint key, model key, checkpoint shape, model shape) of the weights that
    the heuristics skipped for their shape."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.skipped: List[Tuple[str, str, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = _SKIPPED_SHAPE.match(record.getMessage())
        if match:
            theirs_key, theirs, key, ours = match.groups()
            self.skipped.append((theirs_key, key, _shape(theirs), _shape(ours)))


def _misfits(
    skipped: List[Tuple[str, str, str, str]], loaded: List[str]
) -> List[Tuple[str, str, str]]:
    """(model key, checkpoint shape, model shape) of the skipped weights that belong to the
    module that the checkpoint loaded into (where the checkpoint key is attached, other weights
    were loaded): a backbone of another width. The others are chance matches of a short name, as
    an ImageNet classifier's final "norm.weight" with every "*.norm.weight" of the FPN and heads,
    which Detectron2 rightly skips; but where nothing was loaded (a backbone of another width
    throughout), every skipped weight counts."""
    if not loaded:
        return [(key, theirs, ours) for _, key, theirs, ours in skipped]
    misfits = []
    for theirs_key, key, theirs, ours in skipped:
        home = key[: len(key) - len(theirs_key)]
        if any(k.startswith(home) for k in loaded):
            misfits.append((key, theirs, ours))
    return misfits


def _shape(text: str) -> str:
    """ "torch.Size([64, 3, 7, 7])" as "(64, 3, 7, 7)", as a tuple prints."""
    match = re.fullmatch(r"torch\.Size\(\[(.*)\]\)", text)
    return str(tuple(int(n) for n in match.group(1).split(",") if n.strip())) if match else text


@contextlib.contextmanager
def _skipped_by_heuristics() -> Iterator[List[Tuple[str, str, str, str]]]:
    """The list that the heuristics' shape warnings fill within the block (heard even where
    Detectron2's logging is set above warnings)."""
    logger, handler = logging.getLogger(_HEURISTICS_LOGGER), _SkippedShapes()
    level = logger.level
    if not logger.isEnabledFor(logging.WARNING):
        logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield handler.skipped
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


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
    class-count mismatch at random initialization), also those that its name-matching heuristics
    skip (ImageNet backbones of another width), unless ``skip_mismatched`` is set for
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
        with _skipped_by_heuristics() as skipped:
            incompatible = super()._load_model(checkpoint)
        mismatched = [
            (key, str(tuple(theirs)), str(tuple(ours)))
            for key, theirs, ours in incompatible.incorrect_shapes
        ] + _misfits(skipped, self._loaded_keys(incompatible))
        if mismatched and not self.skip_mismatched:
            shapes = "\n".join(
                f"  {key}: checkpoint {theirs}, model {ours}" for key, theirs, ours in mismatched
            )
            raise ValueError(
                f"{len(mismatched)} parameters of the checkpoint do not fit the model's shapes:"
                f"\n{shapes}\nSet MODEL.HTC.SKIP_MISMATCHED_WEIGHTS True "
                "(LazyConfig: train.skip_mismatched_weights=True) to leave them at their "
                "initialization (fine-tuning on other classes)"
            )
        return incompatible

    def _loaded_keys(self, incompatible: Any) -> List[str]:
        """The model's keys that the checkpoint gave; a BatchNorm's ``num_batches_tracked`` is
        never reported missing (PyTorch fills it in), so it tells nothing."""
        missing = set(incompatible.missing_keys)
        return [
            key
            for key in self.model.state_dict()
            if key not in missing and not key.endswith("num_batches_tracked")
        ]


def load_weights(model: torch.nn.Module, cfg: Any, announce: Callable[[str], None] = print) -> None:
    """``cfg.MODEL.WEIGHTS`` into ``model`` for inference, with the shapes checked as in
    training (Detectron2's checkpointer would leave a mismatched class layer at random); an
    empty MODEL.WEIGHTS keeps the random initialization, said through ``announce``."""
    if not cfg.MODEL.WEIGHTS:
        announce("MODEL.WEIGHTS is empty: the model runs on randomly initialized weights")
        return
    skip = cfg.MODEL.HTC.SKIP_MISMATCHED_WEIGHTS
    HTCCheckpointer(model, skip_mismatched=skip).load(cfg.MODEL.WEIGHTS)
