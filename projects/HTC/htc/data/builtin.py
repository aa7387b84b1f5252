"""The datasets the shipped configs name, registered by the entry points (``train_net.py``,
``python -m htc.demo``, the main job) and by the LazyConfigs' dataset calls, rather than on
import."""

from typing import List, Union

from detectron2.data import DatasetCatalog, get_detection_dataset_dicts

from . import cityscapes, lvis
from .coco_panoptic import register_coco_panoptic_htc
from .demo_data import SPLITS, register_demo
from .register import register_coco_htc


def register_builtin() -> None:
    """Under $DETECTRON2_DATASETS: ``coco_2017_{train,val}_htc`` (COCO 2017 + COCO-Stuff),
    ``cityscapes_fine_{train,val}_htc`` (instances + train-id maps), ``lvis_v1_{train,val}_htc``
    (LVIS v1 + COCO-Stuff); and the demo's ``htc_demo_{train,val}``. Each family only where its
    names are not registered yet, so a process may call this more than once. Also HTC's class
    table on Detectron2's COCO panoptic datasets."""
    registered = set(DatasetCatalog.list())
    families = {
        "coco_2017_{}_htc": (("train", "val"), register_coco_htc),
        "cityscapes_fine_{}_htc": (cityscapes.SPLITS, cityscapes.register_cityscapes_htc),
        "lvis_v1_{}_htc": (lvis.SPLITS, lvis.register_lvis_v1_htc),
        "htc_demo_{}": (SPLITS, register_demo),
    }
    for pattern, (splits, register) in families.items():
        if not {pattern.format(split) for split in splits} & registered:
            register()
    register_coco_panoptic_htc()


def get_builtin_dataset_dicts(names: Union[str, List[str]], **kwargs) -> List[dict]:
    """Detectron2's ``get_detection_dataset_dicts`` after :func:`register_builtin`: the
    LazyConfigs' dataset call, so that a process which has imported nothing but the config
    (Detectron2's own ``tools/lazyconfig_train_net.py``) finds the datasets it names."""
    register_builtin()
    return get_detection_dataset_dicts(names, **kwargs)
