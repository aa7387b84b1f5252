"""A training loader that ``--resume`` continues exactly (``DATALOADER.RESUMABLE``).

Detectron2's loader draws each image's augmentations from its worker's RNG stream and groups
images by aspect ratio after mapping them, so a resumed run cannot pick up its data where the
checkpoint was made. Here batch k is a function of (SEED, rank, k) alone: the batches are formed
from the dataset dicts' sizes before any image is mapped (Detectron2's grouping rule: width >
height, or not), and each image is mapped with NumPy's, Python's and torch's RNGs seeded by its
position in the rank's stream. Skipping k batches then costs k draws of the sampler.
"""

import contextlib
import logging
import random
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetFromList, build_detection_train_loader
from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset, Sampler

Key = Tuple[int, int]  # (position in the rank's stream, index in the dataset)


class PositionBatchSampler(Sampler):
    """Batches of (position, index) from an infinite index ``sampler``: consecutive positions,
    or, with ``buckets`` (one id per dataset index), positions grouped by bucket as Detectron2's
    ``AspectRatioGroupedDataset`` groups mapped images; the first ``start_position`` positions,
    then the first ``start`` batches skipped."""

    def __init__(self, sampler: Sampler, batch_size: int, buckets: Optional[Sequence[int]] = None):
        self.sampler, self.batch_size, self.buckets = sampler, batch_size, buckets
        self.start = self.start_position = 0

    def __iter__(self) -> Iterator[List[Key]]:
        batches = self._batches()
        for _ in range(self.start):
            next(batches)
        return batches

    def _batches(self) -> Iterator[List[Key]]:
        pending: dict = {}
        for position, index in enumerate(self.sampler):
            if position < self.start_position:
                continue
            bucket = pending.setdefault(0 if self.buckets is None else self.buckets[index], [])
            bucket.append((position, int(index)))
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()


@contextlib.contextmanager
def seeded_rngs(*entropy: int) -> Iterator[None]:
    """Python's, NumPy's and torch's CPU RNGs seeded from ``entropy``; their states restored
    after (a loader without workers maps in the training process)."""
    seed = int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed)
            torch.default_generator.manual_seed(seed)  # the mappers run on CPU
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class PositionMappedDataset(Dataset):
    """``mapper(dicts[index])`` for a key (position, index), under RNGs seeded by (seed, rank,
    position). A mapper that returns None (an image it rejects) gets another image, drawn from
    the same seeded RNG, as Detectron2's ``MapDataset`` does from its own."""

    def __init__(self, dicts: list, mapper, seed: int, rank: int):
        self.dicts = DatasetFromList(dicts, copy=True)
        self.mapper, self.seed, self.rank = mapper, seed, rank

    def __len__(self) -> int:
        return len(self.dicts)

    def __getitem__(self, key: Key):
        position, index = key
        with seeded_rngs(self.seed, self.rank, position):
            for attempt in range(1, 1_000_000):
                mapped = self.mapper(self.dicts[index])
                if mapped is not None:
                    return mapped
                if attempt % 3 == 0:
                    logging.getLogger(__name__).warning(
                        "The mapper rejected %d images in a row at position %d", attempt, position
                    )
                index = random.randrange(len(self.dicts))
        raise RuntimeError(f"the mapper rejected every image tried at position {position}")


def _buckets(dicts: list) -> List[int]:
    """Each dict's aspect-ratio bucket, as Detectron2's grouping computes it from the mapped
    image's dict (width and height are the dataset's)."""
    missing = [i for i, d in enumerate(dicts) if "width" not in d or "height" not in d]
    if missing:
        raise ValueError(
            f"DATALOADER.ASPECT_RATIO_GROUPING needs each dataset dict's width and height; "
            f"{len(missing)} dicts lack them (the first: {dicts[missing[0]].get('file_name')})"
        )
    return [0 if d["width"] > d["height"] else 1 for d in dicts]


def build_resumable_train_loader(cfg: CfgNode, mapper: Callable[[dict], dict]) -> DataLoader:
    """The training loader of ``cfg`` (its datasets, sampler, batch size, grouping and workers,
    as ``build_detection_train_loader`` reads them) with a data order that resumes exactly:
    set ``loader.batch_sampler.start`` to the iteration to begin at."""
    if cfg.SEED < 0:
        raise ValueError("DATALOADER.RESUMABLE needs a fixed SEED (>= 0): every run draws from it")
    parts = build_detection_train_loader.from_config(cfg, mapper=mapper)
    dicts, sampler = parts["dataset"], parts["sampler"]
    world = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world:
        raise ValueError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is not a multiple of "
                         f"the {world} processes")  # fmt: skip
    buckets = _buckets(dicts) if cfg.DATALOADER.ASPECT_RATIO_GROUPING else None
    batches = PositionBatchSampler(sampler, cfg.SOLVER.IMS_PER_BATCH // world, buckets)
    return DataLoader(
        PositionMappedDataset(dicts, mapper, cfg.SEED, comm.get_rank()),
        batch_sampler=batches,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=trivial_batch_collator,
        worker_init_fn=worker_init_reset_seed,
        generator=torch.Generator().manual_seed(cfg.SEED),
    )
