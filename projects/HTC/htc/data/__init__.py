"""HTC's data: COCO json loading and checks, dataset registration, the dataset mapper and the
embedded demo dataset, one file each."""

from .builtin import get_builtin_dataset_dicts, register_builtin
from .coco import check_annotations, load_htc_json
from .coco_panoptic import coco_stuff_to_panoptic
from .dataset_mapper import HTCDatasetMapper
from .demo_data import ensure_demo_data, register_demo
from .register import datasets_root, register_coco_htc, register_htc_instances

__all__ = [
    "HTCDatasetMapper",
    "check_annotations",
    "coco_stuff_to_panoptic",
    "datasets_root",
    "ensure_demo_data",
    "get_builtin_dataset_dicts",
    "load_htc_json",
    "register_builtin",
    "register_coco_htc",
    "register_demo",
    "register_htc_instances",
]
