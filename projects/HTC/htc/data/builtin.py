"""The datasets the shipped configs name, registered by the entry points (``train_net.py``,
``python -m htc.demo``, the main job) and by the LazyConfigs' dataset calls, rather than on
import."""

from typing import List, Union

from detectron2.data import DatasetCatalog, get_detection_dataset_dicts

from .coco_panoptic import register_coco_panoptic_htc
from .demo_data import SPLITS, register_demo
from .register import register_coco_htc


def register_builtin() -> None:
    """``coco_2017_{train,val}_htc`` (COCO 2017 + COCO-Stuff under $DETECTRON2_DATASETS) and the
    demo's ``htc_demo_{train,val}``, each only where its names are not registered yet, so a
    process may call this more than once; and HTC's class table on Detectron2's COCO panoptic
    datasets."""
    registered = set(DatasetCatalog.list())
    if not {"coco_2017_train_htc", "coco_2017_val_htc"} & registered:
        register_coco_htc()
    if not {f"htc_demo_{split}" for split in SPLITS} & registered:
        register_demo()
    register_coco_panoptic_htc()


def get_builtin_dataset_dicts(names: Union[str, List[str]], **kwargs) -> List[dict]:
    """Detectron2's ``get_detection_dataset_dicts`` after :func:`register_builtin`: the
    LazyConfigs' dataset call, so that a process which has imported nothing but the config
    (Detectron2's own ``tools/lazyconfig_train_net.py``) finds the datasets it names."""
    register_builtin()
    return get_detection_dataset_dicts(names, **kwargs)
