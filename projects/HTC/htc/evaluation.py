"""Semantic segmentation evaluation that reads label maps as training does."""

import inspect
from typing import Optional

from detectron2.data import MetadataCatalog
from detectron2.evaluation import SemSegEvaluator

from .data.label_map import read_label_map

# Detectron2 after v0.6 takes the ground-truth reader as an argument.
_TAKES_LOADING_FN = "sem_seg_loading_fn" in inspect.signature(SemSegEvaluator.__init__).parameters


class HTCSemSegEvaluator(SemSegEvaluator):
    """:class:`SemSegEvaluator` whose ground truth is read by :func:`read_label_map`, the dataset
    mapper's reader. Detectron2 v0.6 has no reader argument; its own read (``np.array`` of the
    PIL image) gives the same labels for every mode that ``check_label_map`` lets through."""

    def __init__(self, dataset_name: str, num_classes: Optional[int] = None, **kwargs):
        """``num_classes``: the semantic branch's; where the dataset's metadata names no
        ``stuff_classes`` (SemSegEvaluator counts the classes by them), they are named by index."""
        meta = MetadataCatalog.get(dataset_name)
        if num_classes is not None and not meta.get("stuff_classes"):
            meta.stuff_classes = [str(i) for i in range(num_classes)]
        if _TAKES_LOADING_FN:
            kwargs.setdefault("sem_seg_loading_fn", read_label_map)
        super().__init__(dataset_name, **kwargs)


def fast_coco_eval_available() -> bool:
    """Whether ``COCOEvaluator(use_fast_impl=True)`` can run: Detectron2's C++ COCOeval exists
    only with a compiled ``detectron2._C`` (the setup installs a pure-Python stand-in)."""
    import detectron2._C as C

    return not getattr(C, "STAND_IN", False)
