"""Registering datasets for HTC: COCO-format instances with semantic labels (from PNGs or derived
from the instances), and COCO 2017 with COCO-Stuff maps."""

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

from .coco import load_htc_json
from .coco_panoptic import coco_stuff_names

IGNORE_LABEL = 255  # "unlabeled" in the semantic PNGs of COCO-Stuff and of the demo data


def datasets_root() -> Path:
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def register_htc_instances(
    name: str,
    json_file: str,
    image_root: str,
    sem_seg_root: Optional[str] = None,
    derive_semantic: bool = False,
    metadata: Optional[Dict] = None,
) -> None:
    """Register a COCO-format instance dataset for HTC in one call.

    Args:
        sem_seg_root: folder of semantic label PNGs at the images' paths under
            ``image_root``, with ".png", or by the images' names (see
            :func:`htc.data.coco.semantic_map_paths`); 255 = unlabeled, unless ``metadata``
            gives another ``ignore_label``.
        derive_semantic: without ``sem_seg_root``, derive the semantic labels from the instance
            masks: thing class ids 0..K-1, background K (set SEM_SEG_HEAD.NUM_CLASSES = K+1),
            the ignore value in crowd regions.
        metadata: more metadata. Panoptic output (MODEL.HTC.PANOPTIC_ON) on this dataset takes
            its ``semantic_to_panoptic`` and ``stuff_dataset_id_to_contiguous_id``, else default
            categories (:func:`htc.panoptic.set_default_panoptic_categories`) unless
            ``default_panoptic`` is False.
    """
    if sem_seg_root is not None and not str(sem_seg_root):
        raise ValueError(f"{name}: sem_seg_root is empty: give the maps' folder, or None")
    if sem_seg_root is not None and derive_semantic:
        raise ValueError(f"{name}: give either sem_seg_root or derive_semantic, not both")
    metadata = {"default_panoptic": True, **(metadata or {})}
    register_with_loader(
        name,
        lambda: load_htc_json(json_file, image_root, name, sem_seg_root),
        json_file=json_file,
        image_root=image_root,
        sem_seg_root=sem_seg_root,
        derive_semantic=derive_semantic,
        **metadata,
    )


def register_with_loader(name: str, loader: Callable[[], List[dict]], **metadata) -> None:
    """Register ``loader`` under ``name`` with the metadata HTC's evaluators read
    (``ignore_label``: the unlabeled value of its semantic maps, 255 unless given;
    ``evaluator_type``: "coco" unless given, see :func:`htc.evaluation.build_evaluators`)."""
    DatasetCatalog.register(name, loader)
    metadata.setdefault("ignore_label", IGNORE_LABEL)
    metadata.setdefault("evaluator_type", "coco")
    MetadataCatalog.get(name).set(**metadata)


def register_coco_htc(root: Optional[Path] = None) -> None:
    """``coco_2017_{train,val}_htc``: COCO 2017 + COCO-Stuff stuffthingmaps (the reference's
    layout: coco/{train2017,val2017}, coco/annotations/instances_*2017.json,
    coco/stuffthingmaps/{train2017,val2017})."""
    coco = (root or datasets_root()) / "coco"
    for split in ("train", "val"):
        register_htc_instances(
            f"coco_2017_{split}_htc",
            str(coco / "annotations" / f"instances_{split}2017.json"),
            str(coco / f"{split}2017"),
            sem_seg_root=str(coco / "stuffthingmaps" / f"{split}2017"),
            metadata={
                **_get_builtin_metadata("coco"),  # the class names before the json is read
                "stuff_classes": coco_stuff_names(),
                "default_panoptic": False,  # COCO panoptic's categories: coco_2017_*_panoptic
            },
        )
