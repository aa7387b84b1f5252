"""Semantic segmentation evaluation that reads label maps as training does."""

import inspect

from detectron2.evaluation import SemSegEvaluator

from .data.label_map import read_label_map

# Detectron2 after v0.6 takes the ground-truth reader as an argument.
_TAKES_LOADING_FN = "sem_seg_loading_fn" in inspect.signature(SemSegEvaluator.__init__).parameters


class HTCSemSegEvaluator(SemSegEvaluator):
    """:class:`SemSegEvaluator` whose ground truth is read by :func:`read_label_map`, the dataset
    mapper's reader. Detectron2 v0.6 has no reader argument; its own read (``np.array`` of the
    PIL image) gives the same labels for every mode that ``check_label_map`` lets through."""

    def __init__(self, dataset_name: str, **kwargs):
        if _TAKES_LOADING_FN:
            kwargs.setdefault("sem_seg_loading_fn", read_label_map)
        super().__init__(dataset_name, **kwargs)
