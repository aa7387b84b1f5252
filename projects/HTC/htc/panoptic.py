"""Panoptic segmentation from one HTC forward pass: its instances, and the stuff of its semantic
branch, fused as Detectron2's PanopticFPN fuses its own two outputs."""

import logging
from typing import List, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling.meta_arch.panoptic_fpn import combine_semantic_and_instance_outputs
from detectron2.structures import Instances
from torch import nn

from .data import register_builtin

logger = logging.getLogger(__name__)


class PanopticFusion(nn.Module):
    """One image's instances and (K, H, W) semantic scores -> ``(panoptic_seg, segments_info)``,
    as PanopticFPN returns it: :func:`combine_semantic_and_instance_outputs` pastes the instances
    by decreasing score (none under ``instances_score_threshold``; one whose mask is more than
    ``overlap_threshold`` covered already is dropped, else it takes the free pixels), then fills
    the remaining pixels with stuff regions of at least ``stuff_area_limit`` pixels.

    The semantic branch predicts finer classes than the panoptic categories (COCO-Stuff's 183
    against COCO panoptic's 133), so each pixel's stuff is chosen among categories, not classes:
    the softmax probabilities of the classes of one stuff category are summed, those of thing
    classes and of classes without a category are summed into "no stuff" (left to the
    instances, void where none covers it), and the pixel takes the largest sum.
    """

    @configurable
    def __init__(
        self,
        *,
        class_to_stuff: Sequence[int],
        overlap_threshold: float = 0.5,
        stuff_area_limit: int = 4096,
        instances_score_threshold: float = 0.5,
    ):
        """
        Args:
            class_to_stuff: per semantic class, the contiguous stuff category id it belongs to
                (a value of the dataset's ``stuff_dataset_id_to_contiguous_id``), or -1 for
                thing classes and classes without a panoptic category.
        """
        super().__init__()
        thresholds = {
            "OVERLAP_THRESH": overlap_threshold,
            "INSTANCES_CONFIDENCE_THRESH": instances_score_threshold,
        }
        for name, value in thresholds.items():
            if not 0 <= value <= 1:
                raise ValueError(f"MODEL.HTC.PANOPTIC.{name}={value}: a fraction, in [0, 1]")
        stuff_ids = sorted({c for c in class_to_stuff if c >= 0})
        if not stuff_ids:
            raise ValueError("PanopticFusion: no semantic class belongs to a stuff category")
        groups = [stuff_ids.index(c) + 1 if c >= 0 else 0 for c in class_to_stuff]
        # Group 0 is "no stuff": Detectron2's fusion skips semantic label 0.
        self.register_buffer("class_group", torch.tensor(groups), persistent=False)
        self.group_category = [-1] + stuff_ids
        self.overlap_threshold = overlap_threshold
        self.stuff_area_limit = stuff_area_limit
        self.instances_score_threshold = instances_score_threshold

    @classmethod
    def from_config(cls, cfg):
        if not cfg.DATASETS.TEST:
            raise ValueError(
                "MODEL.HTC.PANOPTIC_ON reads the panoptic categories from DATASETS.TEST[0]'s "
                "metadata, and DATASETS.TEST is empty (to train without a test dataset, set "
                "MODEL.HTC.PANOPTIC_ON False)"
            )
        register_builtin()  # DATASETS.TEST[0] may be one of HTC's (the demo's, COCO panoptic)
        panoptic = cfg.MODEL.HTC.PANOPTIC
        return {
            "class_to_stuff": class_to_stuff(
                cfg.DATASETS.TEST[0], cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
            ),
            "overlap_threshold": panoptic.OVERLAP_THRESH,
            "stuff_area_limit": panoptic.STUFF_AREA_LIMIT,
            "instances_score_threshold": panoptic.INSTANCES_CONFIDENCE_THRESH,
        }

    def stuff_groups(self, scores: torch.Tensor) -> torch.Tensor:
        """(K, H, W) semantic scores -> (H, W) int64: 0 for "no stuff", g for the stuff category
        ``group_category[g]``."""
        probs = scores.softmax(dim=0)
        grouped = probs.new_zeros((len(self.group_category), *probs.shape[1:]))
        return grouped.index_add_(0, self.class_group, probs).argmax(dim=0)

    def forward(self, instances: Instances, scores: torch.Tensor) -> Tuple[torch.Tensor, List]:
        """
        Args:
            instances: one image's post-processed detections with ``pred_masks`` (N, H, W).
            scores: (K, H, W) semantic scores of the same image at the same size.

        Returns:
            panoptic_seg (H, W) int32 segment ids, 0 = void; segments_info, a dict per segment:
            "id", "isthing", "category_id" (contiguous: thing class, or stuff category), and
            "score" and "instance_id" for things, "area" for stuff.
        """
        panoptic_seg, segments_info = combine_semantic_and_instance_outputs(
            instances,
            self.stuff_groups(scores),
            self.overlap_threshold,
            self.stuff_area_limit,
            self.instances_score_threshold,
        )
        for segment in segments_info:
            if not segment["isthing"]:
                segment["category_id"] = self.group_category[segment["category_id"]]
        return panoptic_seg, segments_info


def class_to_stuff(dataset_name: str, num_classes: int) -> List[int]:
    """Per semantic class, its contiguous stuff category id in dataset ``dataset_name``, or -1;
    from the dataset's metadata: ``semantic_to_panoptic`` (per semantic class, the panoptic
    category id it belongs to, 0 for none) and ``stuff_dataset_id_to_contiguous_id``."""
    meta = MetadataCatalog.get(dataset_name)
    given = [meta.get(k) for k in ("semantic_to_panoptic", "stuff_dataset_id_to_contiguous_id")]
    if given == [None, None] and meta.get("default_panoptic"):
        set_default_panoptic_categories(dataset_name, num_classes)
    table = meta.get("semantic_to_panoptic")
    stuff = meta.get("stuff_dataset_id_to_contiguous_id")
    if table is None or stuff is None:
        raise ValueError(
            f"MODEL.HTC.PANOPTIC_ON: dataset {dataset_name!r} (DATASETS.TEST[0]) has no "
            "'semantic_to_panoptic' (per semantic class, its panoptic category id or 0) or no "
            "'stuff_dataset_id_to_contiguous_id' in its metadata (COCO panoptic's "
            "coco_2017_val_panoptic and the demo's htc_demo_val have both; see docs/panoptic.md), "
            "or set MODEL.HTC.PANOPTIC_ON False"
        )
    if len(table) != num_classes:
        raise ValueError(
            f"dataset {dataset_name!r}: semantic_to_panoptic names {len(table)} semantic classes "
            f"but MODEL.SEM_SEG_HEAD.NUM_CLASSES is {num_classes}"
        )
    things = meta.get("thing_dataset_id_to_contiguous_id", {})
    unknown = sorted({c for c in table if c and c not in stuff and c not in things})
    if things and unknown:
        raise ValueError(
            f"dataset {dataset_name!r}: semantic_to_panoptic names categories {unknown} that are "
            "neither its things nor its stuff"
        )
    return [stuff.get(c, -1) for c in table]


def set_default_panoptic_categories(dataset_name: str, num_classes: int) -> None:
    """Panoptic categories for a dataset of :func:`htc.register_htc_instances` that names none
    (its metadata's ``default_panoptic``, True unless given):
    each thing class its own category (the json's id), each other semantic class a stuff
    category (ids after the largest thing id), set in its metadata as ``semantic_to_panoptic``,
    ``stuff_dataset_id_to_contiguous_id`` (stuff category k is semantic class k) and
    ``stuff_classes`` (the K semantic class names). Which semantic classes are things:
    with ``derive_semantic``, 0..T-1 (background T); with ``stuff_classes`` (K names) given,
    those named as a thing class; else 0..T-1, with a warning that this is assumed."""
    meta = MetadataCatalog.get(dataset_name)
    if "thing_dataset_id_to_contiguous_id" not in meta.as_dict():
        DatasetCatalog.get(dataset_name)  # Detectron2's loader sets the things' ids and names
    things = {c: d for d, c in meta.thing_dataset_id_to_contiguous_id.items()}
    names = list(meta.thing_classes)
    thing_at = _thing_of_each_class(dataset_name, meta, names, num_classes)
    first_stuff_id = max(things.values()) + 1
    stuff_classes = [k for k in range(num_classes) if thing_at[k] < 0]
    stuff = {first_stuff_id + j: k for j, k in enumerate(stuff_classes)}
    table = [things[t] if t >= 0 else 0 for t in thing_at]
    for dataset_id, k in stuff.items():
        table[k] = dataset_id
    if meta.get("stuff_classes") is None:
        stuff_names = ["background"] if meta.derive_semantic else []
        stuff_names += [f"stuff {j}" for j in range(len(stuff) - len(stuff_names))]
        meta.stuff_classes = names + stuff_names
    meta.set(semantic_to_panoptic=table, stuff_dataset_id_to_contiguous_id=stuff)


def _thing_of_each_class(dataset_name: str, meta, names: List[str], num_classes: int) -> list:
    """Per semantic class, the contiguous thing class it is, or -1 for stuff."""
    if len(names) >= num_classes:
        raise ValueError(
            f"MODEL.HTC.PANOPTIC_ON: dataset {dataset_name!r} has {len(names)} thing classes "
            f"and MODEL.SEM_SEG_HEAD.NUM_CLASSES is {num_classes}: no semantic class is left "
            "for stuff"
        )
    given = meta.get("stuff_classes")
    if given is not None and not meta.derive_semantic:
        if len(given) != num_classes or sorted(set(given) & set(names)) != sorted(names):
            raise ValueError(
                f"MODEL.HTC.PANOPTIC_ON: dataset {dataset_name!r}'s stuff_classes must name its "
                f"{num_classes} semantic classes, each thing class once by its name, to tell "
                "things from stuff; or give semantic_to_panoptic and "
                "stuff_dataset_id_to_contiguous_id in its metadata (docs/panoptic.md)"
            )
        return [names.index(n) if n in names else -1 for n in given]
    if not meta.derive_semantic:
        logger.warning(
            f"panoptic categories of {dataset_name!r}: its semantic classes 0..{len(names) - 1} "
            f"are taken as its thing classes in order and {len(names)}..{num_classes - 1} as "
            "stuff (name them in stuff_classes to say otherwise; docs/panoptic.md)"
        )
    return list(range(len(names))) + [-1] * (num_classes - len(names))
