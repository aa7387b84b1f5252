"""Exact resumption (``DATALOADER.RESUMABLE``): every checkpoint holds each process's RNG
states, and ``--resume`` restores them and starts the resumable loader at the checkpoint's
iteration, so a resumed run trains the weights the uninterrupted run would."""

import contextlib
import logging
import random
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

logger = logging.getLogger(__name__)


def rng_states() -> Dict[str, Any]:
    """This process's Python, NumPy, torch CPU and (where there is one) CUDA RNG states, as
    types that ``torch.load(weights_only=True)`` reads (NumPy's key array as a tensor)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    states["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    random.setstate(states["python"])
    name, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@contextlib.contextmanager
def kept_rngs() -> Iterator[None]:
    """This process's RNG states as they were before the block (an evaluation: each test
    loader's iterator draws its workers' seed from torch's RNG, which training then misses)."""
    states = rng_states()
    try:
        yield
    finally:
        set_rng_states(states)


def restart_data_loader(simple_trainer: Any) -> None:
    """Make ``simple_trainer`` (Detectron2's SimpleTrainer) start a new iterator of its loader:
    Detectron2 v0.6 creates it in ``__init__``, before the checkpoint is loaded."""
    loader = simple_trainer.data_loader
    if hasattr(simple_trainer, "reset_data_loader"):
        simple_trainer.reset_data_loader(lambda: loader)
    else:
        simple_trainer._data_loader_iter = iter(loader)


class ExactResume(HookBase):
    """Before each checkpoint (insert it just before Detectron2's PeriodicCheckpointer), gathers
    every rank's RNG states for the trainer's state dict; on a resumed start, points the loader
    (:func:`htc.data.resumable.build_resumable_train_loader`) at the start iteration and
    restores this rank's states."""

    def __init__(self, checkpoint_period: int, seed: Optional[int] = None):
        self.checkpoint_period = checkpoint_period
        self.seed = seed  # the config's SEED, which the data order and augmentations follow
        self._loaded_seed: Optional[int] = None
        self._gathered: Optional[List[Dict[str, Any]]] = None
        self._loaded: Optional[List[Dict[str, Any]]] = None
        self._loaded_images_per_batch: Optional[int] = None

    def gather(self) -> None:
        """Every rank's states, for the next checkpoint (a collective: all ranks call it)."""
        self._gathered = comm.all_gather(rng_states())

    def after_step(self) -> None:
        iteration = self.trainer.iter
        # the periodic checkpointer's iterations, and its model_final
        if (iteration + 1) % self.checkpoint_period == 0 or iteration >= self.trainer.max_iter - 1:
            self.gather()

    def _images_per_batch(self) -> int:
        """SOLVER.IMS_PER_BATCH, from the loader's batches and the processes."""
        return self.trainer._trainer.data_loader.batch_sampler.batch_size * comm.get_world_size()

    def state_dict(self) -> Dict[str, Any]:
        if not self._gathered:
            return {}
        return {
            "rng_states": self._gathered,
            "images_per_batch": self._images_per_batch(),
            "seed": self.seed,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._loaded = state.get("rng_states")
        self._loaded_images_per_batch = state.get("images_per_batch")
        self._loaded_seed = state.get("seed")

    def before_train(self) -> None:
        start = self.trainer.start_iter
        if start == 0:
            return
        if None not in (self.seed, self._loaded_seed) and self.seed != self._loaded_seed:
            raise ValueError(
                f"--resume: the run of the checkpoint trained with SEED {self._loaded_seed}, this "
                f"one has SEED {self.seed}: its data order and augmentations would not continue. "
                f"Resume with SEED {self._loaded_seed}"
            )
        simple_trainer = self.trainer._trainer
        same_batches = self._start_data(simple_trainer.data_loader.batch_sampler, start)
        restart_data_loader(simple_trainer)
        if self._loaded is None or len(self._loaded) != comm.get_world_size():
            logger.warning(
                "Resuming at iteration %d without the RNG states of %d processes: the data order "
                "continues, the random draws of training do not", start, comm.get_world_size(),
            )  # fmt: skip
            return
        set_rng_states(self._loaded[comm.get_rank()])
        what = "data order and RNG states" if same_batches else "RNG states"
        logger.info("Resumed the %s at iteration %d", what, start)

    def _start_data(self, batches, start: int) -> bool:
        """Skip the batches of ``start`` iterations; where the checkpoint's run had batches of
        another size, skip as many images as it trained on instead (each rank its share; with
        aspect-ratio grouping, the images of an unfinished group are skipped and others
        repeated, at most a batch of each group). Whether the batches are the same."""
        before, now = self._loaded_images_per_batch, self._images_per_batch()
        if before is None or before == now:
            batches.start = start
            return True
        batches.start_position = start * before // comm.get_world_size()
        logger.warning(
            "SOLVER.IMS_PER_BATCH is %d, and %d in the run of the checkpoint: the data continues "
            "after the %d images that run trained on, in batches of %d; the iterations (the "
            "schedule) continue from %d. No uninterrupted run trains these weights",
            now, before, start * before, now, start,
        )  # fmt: skip
        return False
