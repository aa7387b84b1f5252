"""Checkpoints that are never half-written and never silently half-loaded.

fvcore's ``Checkpointer.save`` writes ``model_XXXX.pth`` in place and then ``last_checkpoint``:
a kill during the write leaves a truncated file, and a kill while ``last_checkpoint`` is being
rewritten leaves it empty. Wrapping the checkpointer's ``path_manager`` makes every file it opens
for writing appear under its name only once completely written (temporary file, fsync, rename).
"""

import contextlib
import glob
import io
import logging
import os
import pickle
import socket
import zipfile
from typing import Any, Callable, Dict, Iterable, Iterator, List, Set, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer

# the filter fvcore applies to the missing keys it logs (private; fvcore is pinned: constraints)
from fvcore.common.checkpoint import _filter_reused_missing_keys

logger = logging.getLogger(__name__)
# what atomic_open puts between a file's name and its writer's pid: the machine, whose processes
# alone this one can tell running or not
_TEMPORARY = f".tmp.{socket.gethostname()}."
# what to do about a refused checkpoint, where it is loaded for fine-tuning or inference
SHAPE_ADVICE = (
    "A backbone of another depth or width needs its own weights; to fine-tune on other classes, "
    "set MODEL.HTC.SKIP_MISMATCHED_WEIGHTS True (LazyConfig: train.skip_mismatched_weights=True),"
    " which leaves these at their initialization"
)
COMPLETE_ADVICE = (
    "Inference would run them at random: is the checkpoint for another config (the cascade's "
    "stages, the backbone's depth, the semantic branch)?"
)
INFERENCE_SHAPE_ADVICE = (
    "Inference would run them at random (MODEL.HTC.SKIP_MISMATCHED_WEIGHTS, LazyConfig: "
    "train.skip_mismatched_weights, skips weights only for training): is the checkpoint for "
    "another config (the class count, the backbone's depth or width)?"
)
UNUSED_ADVICE = (
    "Inference would run without them, computing something else than the checkpoint's model: "
    "is the checkpoint for another config (deformable convs, the backbone's depth, the semantic "
    "branch)?"
)
BODY_ADVICE = (
    "A backbone of another depth or width needs its own weights: MODEL.HTC.SKIP_MISMATCHED_WEIGHTS"
    " (LazyConfig: train.skip_mismatched_weights) starts only the other layers (the class layers,"
    " the image's input layer, deformable convs' offsets) anew"
)
# the backbones' pretrained feature extractors (FPN's, SimpleFeaturePyramid's), of which only the
# layers reading the image (a stem, a patch embedding: RGB-D inputs) may start anew, and the
# deformable convs' offsets, which Detectron2 starts at zero (DCN v1 weights fine-tuned as v2)
BODIES = ("backbone.bottom_up.", "backbone.net.")
INPUT_LAYERS = ("stem.", "patch_embed.")
OFFSETS = ".conv2_offset."
# the globals that a Detectron2 .pkl of weights names: torch's tensors (write_checkpoint's), NumPy's
# arrays (the model zoo's, written with NumPy 1 or 2), an OrderedDict, and the bytes that Python 3
# pickles of protocol 2 and lower write through _codecs.encode
PICKLED_WEIGHTS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("_codecs", "encode"),
}


@contextlib.contextmanager
def atomic_open(path: str, mode: str) -> Iterator[Any]:
    """Like ``open(path, mode)`` for writing, but ``path`` changes only if the block succeeds;
    its folder is made where missing."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
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


Misfit = Tuple[str, Tuple[int, ...], Tuple[int, ...]]  # model key, checkpoint shape, model shape


def _heuristic_misfits(
    model: Dict[str, torch.Tensor], handed: Dict[str, torch.Tensor], reported: Set[str]
) -> List[Misfit]:
    """The weights of a file loaded by Detectron2's name-matching heuristics (Caffe2's, pycls',
    ``matching_heuristics`` files) that it skipped for their shape, which it only logs: of the
    state dict ``handed`` to ``load_state_dict`` (matched names renamed to the model's ``model``
    keys, the others kept), each model key left out whose longest "."-suffix among the kept
    names has another shape. Counted where the file loaded other weights under the same prefix
    (a backbone of another width), or loaded nothing; not a chance match of a short name
    elsewhere, as an ImageNet classifier's final "norm.weight" with every "*.norm.weight" of the
    FPN and heads. The keys ``reported`` (by fvcore: names equal to a model key) are left out."""
    kept = [name for name in handed if name not in model]
    loaded = [key for key in handed if key in model]
    misfits = []
    for key, ours in model.items():
        if key in handed or key in reported:
            continue
        matches = [name for name in kept if key.endswith("." + name)]
        if not matches:
            continue
        name = max(matches, key=len)
        home = key[: len(key) - len(name)]
        theirs = tuple(handed[name].shape)
        if theirs != tuple(ours.shape) and (not loaded or any(k.startswith(home) for k in loaded)):
            misfits.append((key, theirs, tuple(ours.shape)))
    return misfits


@contextlib.contextmanager
def _handed_state_dict(model: torch.nn.Module) -> Iterator[Dict[str, torch.Tensor]]:
    """The state dict that ``model.load_state_dict`` receives within the block, as the root
    module's pre-hook sees it: before any module fills in what the file lacks (FrozenBatchNorm2d
    its running statistics), which would pass for loaded weights."""
    handed: Dict[str, torch.Tensor] = {}

    def keep(module: torch.nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        if not prefix:
            handed.update(state_dict)

    handle = model.register_load_state_dict_pre_hook(keep)
    try:
        yield handed
    finally:
        handle.remove()


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
    fine-tuning (but those of the backbone's body). Missing and unexpected keys are logged by the
    parent as before; with ``complete`` (inference: nothing trains them, nothing is skipped)
    both are refused."""

    def __init__(
        self,
        model,
        save_dir: str = "",
        *,
        skip_mismatched: bool = False,
        complete: bool = False,
        **kwargs,
    ):
        super().__init__(model, save_dir, **kwargs)
        self.skip_mismatched = skip_mismatched
        self.complete = complete
        self._resuming = False
        self.path_manager = AtomicWrites(self.path_manager)

    def save(self, name: str, **kwargs) -> None:
        """The parent's, then the writes of this folder that a killed process left behind removed
        (by a training's checkpointer only: one that only loads, as ``--eval-only``'s, may share
        the folder with a training that is writing)."""
        super().save(name, **kwargs)
        if self.save_to_disk:
            remove_orphaned_writes(self.save_dir)

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """The parent's; a resumed run's checkpoint must be of this very model, complete and of
        its shapes (else the optimizer's state failed deep in torch, or trained the skipped
        layers with the old momentum's shapes)."""
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        self._check_last_checkpoint()
        kept = self.complete, self.skip_mismatched
        self.complete, self.skip_mismatched, self._resuming = True, False, True
        try:
            return super().resume_or_load(path, resume=resume)
        except ValueError as error:
            raise ValueError(
                f"--resume: the last checkpoint of {self.save_dir} is not of this model (another "
                f"config's run?): {error}"
            ) from error
        finally:
            self.complete, self.skip_mismatched, self._resuming = *kept, False

    def _check_last_checkpoint(self) -> None:
        """Refuse a ``last_checkpoint`` that names no readable checkpoint (empty, or its file
        missing or cut short: fvcore and torch said "not found" or "failed reading zip
        archive"), naming the checkpoints of the folder to resume from instead."""
        last = self.get_checkpoint_file()
        problem = (
            "names no file" if os.path.normpath(last) == os.path.normpath(self.save_dir) else ""
        )
        if not problem and not os.path.isfile(last):
            problem = f"names {last}, which is missing"
        if not problem and not zipfile.is_zipfile(last):
            problem = f"names {last}, which is no complete checkpoint"
        if problem:
            others = sorted(glob.glob(os.path.join(self.save_dir, "model_*.pth")))
            raise ValueError(
                f"--resume: {os.path.join(self.save_dir, 'last_checkpoint')} {problem}; the "
                f"folder's checkpoints: {[os.path.basename(o) for o in others]} (write the name "
                "of the one to resume from into last_checkpoint)"
            )

    def _load_file(self, filename: str) -> Dict[str, Any]:
        """The parent's, naming a file that is no checkpoint (a Git LFS pointer, a web page saved
        in its place, a cut download): torch said "KeyError: 105" or "failed reading zip
        archive", or advised loading with weights_only=False, which runs the file's code."""
        try:
            return super()._load_file(filename)
        except (pickle.UnpicklingError, OSError, RuntimeError, EOFError, KeyError, ValueError) as e:
            first = str(e).splitlines()[0] if str(e) else repr(e)
            raise ValueError(f"{filename}: {_not_loadable(filename)} ({first})") from e

    def _advice(self, loading: str) -> str:
        """What to do about a refused checkpoint: ``loading``'s advice, or a resume's."""
        if self._resuming:
            return (
                "Resume with the config of that run, or start a new OUTPUT_DIR with MODEL.WEIGHTS "
                "set to its checkpoint"
            )
        return loading

    def _load_model(self, checkpoint: Any):
        """The parent's load, refusing what it skips for shape with only a warning."""
        heuristics = checkpoint.get("matching_heuristics", False)
        state = self.model.state_dict()  # the shapes the load keeps
        if not heuristics:  # those names are matched in the parent's
            _check_names({key.removeprefix("module.") for key in checkpoint["model"]}, state)
        with _handed_state_dict(self.model) as handed:
            incompatible = super()._load_model(checkpoint)
        misfits = [
            (k, tuple(theirs), tuple(ours)) for k, theirs, ours in incompatible.incorrect_shapes
        ]
        if heuristics:
            reported = {key for key, _, _ in misfits}
            misfits += _heuristic_misfits(state, handed, reported)
        self._check_misfits(misfits)
        if heuristics:
            _check_names(handed.keys(), state)
        if self.complete:
            _check_complete(self.model, incompatible.missing_keys, self._advice(COMPLETE_ADVICE))
            _check_all_used(self.model, incompatible.unexpected_keys, self._advice(UNUSED_ADVICE))
        return incompatible

    def _check_misfits(self, misfits: List[Misfit]) -> None:
        """Refuse the weights of other shapes, which the parent skips with a warning; for
        fine-tuning (``skip_mismatched`` without ``complete``) only those of the backbone's body,
        which would leave a pretrained backbone partly at random."""
        if self.complete or not self.skip_mismatched:
            refused, advice = misfits, INFERENCE_SHAPE_ADVICE if self.complete else SHAPE_ADVICE
        else:
            refused, advice = [m for m in misfits if _in_backbone_body(m[0])], BODY_ADVICE
        if refused:
            raise ValueError(f"{_refusal(refused)}\n{self._advice(advice)}")


def _not_loadable(filename: str) -> str:
    """What the file ``filename``, which failed to load as a checkpoint, is likely to be."""
    with open(filename, "rb") as f:
        head = f.read(64)
    text = head.lstrip().lower()
    if text.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the file it points to (git lfs pull fetches it)"
    if text.startswith((b"<!doctype html", b"<html")):
        return "a web page, not a checkpoint (a download that got a login or error page?)"
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # a zip archive's start, or a pickle
        return "not a PyTorch or Detectron2 checkpoint (neither a zip archive nor a pickle)"
    return (
        "a checkpoint cut short, or holding objects other than tensors and plain containers, "
        "which are not unpickled (weights_only)"
    )


def _check_names(names: Iterable[str], model: Dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint that gives none of the names of the ``model``'s state dict (for a file
    matched by heuristics: once matched; Detectron2 only warns)."""
    if not set(names) & model.keys():
        raise ValueError(
            "the checkpoint holds none of this model's parameters: is it a checkpoint "
            "of another model? (MMDetection's: python -m htc.convert_mmdet IN OUT)"
        )


def _check_complete(model: torch.nn.Module, missing: List[str], advice: str) -> None:
    """Refuse a checkpoint that leaves parameters or statistics of ``model`` out: inference
    would run them at their random initialization (Detectron2 only logs them)."""
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    missing = _filter_reused_missing_keys(model, missing)  # shared modules: loaded by one name
    if missing:
        raise ValueError(
            f"{len(missing)} parameters and buffers of the model are not in the checkpoint, in "
            f"{_modules(missing)}. {advice}"
        )


def _check_all_used(model: torch.nn.Module, unused: List[str], advice: str) -> None:
    """Refuse a checkpoint with weights that ``model`` has no place for (a deformable conv's
    offsets, deeper blocks, a semantic branch): inference would compute something else than the
    checkpoint's model (Detectron2 only logs them). Kept apart: a semantic embedding where the
    model fuses no semantic feature (checkpoints of such models had one, untrained), and mask
    heads where the model has no masks (its boxes do not read them); the pixel mean and std,
    which the config gives (old Detectron2 checkpoints held them, as Detectron2 allows)."""
    unused = [k for k in unused if not k.endswith("num_batches_tracked")]
    unused = [k for k in unused if k not in ("pixel_mean", "pixel_std")]
    semantic = getattr(model, "semantic_head", None)
    if semantic is not None and getattr(semantic, "conv_embedding", None) is None:
        unused = [k for k in unused if not k.startswith("semantic_head.conv_embedding.")]
    if not getattr(getattr(model, "roi_heads", None), "mask_on", True):
        unused = [k for k in unused if not k.startswith("roi_heads.mask_head.")]
    if unused:
        raise ValueError(
            f"{len(unused)} parameters and buffers of the checkpoint have no place in the model, "
            f"in {_modules(unused)}. {advice}"
        )


def _modules(keys: List[str]) -> str:
    """The modules of the state-dict ``keys``, counted and the first eight named."""
    modules = sorted({key.rsplit(".", 1)[0] for key in keys})
    return f"{len(modules)} modules: {', '.join(modules[:8])}{' ...' if len(modules) > 8 else ''}"


def _in_backbone_body(key: str) -> bool:
    """Whether the model key ``key`` is of a backbone's pretrained body, beyond its input layer."""
    body = next((key[len(b) :] for b in BODIES if key.startswith(b)), None)
    return body is not None and not body.startswith(INPUT_LAYERS) and OFFSETS not in body


def _refusal(misfits: List[Misfit]) -> str:
    """The error of a checkpoint whose ``misfits`` are not to be skipped."""
    shapes = "\n".join(
        f"  {key}: checkpoint {theirs}, model {ours}" for key, theirs, ours in misfits
    )
    return f"{len(misfits)} parameters of the checkpoint do not fit the model's shapes:\n{shapes}"


def load_for_evaluation(
    checkpointer: HTCCheckpointer, weights: str, resume: bool, key: str
) -> Dict[str, Any]:
    """``checkpointer.resume_or_load(weights, resume=resume)`` for ``--eval-only``, refusing
    where there is nothing to load (``key`` names the weights' setting): Detectron2 would score
    the randomly initialized model."""
    if not weights and not (resume and checkpointer.has_checkpoint()):
        holds = f" and {checkpointer.save_dir} holds no checkpoint" if resume else ""
        raise ValueError(
            f"--eval-only: {key} is empty{holds}: the model would be scored on its random "
            "initialization"
        )
    return checkpointer.resume_or_load(weights, resume=resume)


def load_weights(model: torch.nn.Module, cfg: Any, announce: Callable[[str], None] = print) -> None:
    """``cfg.MODEL.WEIGHTS`` into ``model`` for inference: every weight of the model given, of
    its shape, and none unused (Detectron2's checkpointer would leave a mismatched class layer at
    random, or drop a deformable conv's offsets); an empty MODEL.WEIGHTS keeps the random
    initialization, said through ``announce``."""
    if not cfg.MODEL.WEIGHTS:
        announce("MODEL.WEIGHTS is empty: the model runs on randomly initialized weights")
        return
    HTCCheckpointer(model, complete=True).load(cfg.MODEL.WEIGHTS)


def write_checkpoint(model: Dict[str, torch.Tensor], path: str, author: str) -> None:
    """``model`` as a Detectron2 checkpoint by ``author``, written whole or not at all: a
    ``.pth``, or for ``.pkl`` Detectron2's model-zoo pickle (which its checkpointer reads by the
    extension, a ``torch.save`` zip there failing) of tensors, not NumPy arrays: NumPy 2 pickles
    name ``numpy._core``, which the NumPy 1 of Detectron2 v0.6 cannot load; exact names, no
    matching heuristics."""
    with atomic_open(path, "wb") as f:
        if path.endswith(".pkl"):
            data = {"model": dict(model), "__author__": author, "matching_heuristics": False}
            pickle.dump(data, f)
        else:
            torch.save({"model": model, "__author__": author}, f)


class _WeightsUnpickler(pickle.Unpickler):
    """Unpickles tensors, NumPy arrays and plain containers only (as ``torch.load``'s
    ``weights_only``): a pickle runs any global it names, so every other is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        if (module, name) not in PICKLED_WEIGHTS:
            raise pickle.UnpicklingError(
                f"{module}.{name} is no tensor's, NumPy array's or plain container's"
            )
        return super().find_class(module, name)


def _storage_from_bytes(data: bytes) -> Any:
    """A pickled tensor's storage (``torch.save``'s bytes), loaded with ``weights_only``, which
    torch's own ``_load_from_bytes`` does not ask for."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def read_detectron2_pickle(path: str) -> Any:
    """A Detectron2 ``.pkl``: a pickle of ``{"model": ..., "__author__": ...}`` (or, of Caffe2's
    model zoo, of the weights alone), read as Detectron2's checkpointer reads it (latin1 for
    Python 2's pickles) but unpickling tensors, NumPy arrays and plain containers only."""
    with open(path, "rb") as f:
        return _WeightsUnpickler(f, encoding="latin1").load()
