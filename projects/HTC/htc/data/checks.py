"""What a model's config must agree on with its datasets, checked once they are loaded and
before training (by ``train_net.py`` and ``lazyconfig_train_net.py``): a mismatch would train
without an error, or fail hours in."""

from typing import List, Optional

from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata

from .coco import RLE_MASK_EXAMPLES


def thing_class_names(meta: Metadata) -> Optional[List[str]]:
    """The names of the thing classes of ``meta`` in contiguous order (None where it names none).
    COCO panoptic's "standard" metadata names all 133 categories ``thing_classes``; its things
    are those of ``thing_dataset_id_to_contiguous_id``, whose contiguous ids index those names."""
    names = meta.get("thing_classes")
    ids = meta.get("thing_dataset_id_to_contiguous_id")
    if names is None or not ids or len(ids) >= len(names):
        return names
    return [names[k] for k in sorted(ids.values())]


def check_thing_classes(name: str, num_classes: int, key: str) -> None:
    """Refuse ``num_classes`` (the config's ``key``) for dataset ``name`` of another count of
    thing classes (a class beyond the model's would train as background)."""
    meta = MetadataCatalog.get(name)
    things = thing_class_names(meta) or meta.get("thing_dataset_id_to_contiguous_id")
    if things is not None and len(things) != num_classes:
        raise ValueError(
            f"dataset {name!r} has {len(things)} thing classes but {key} is {num_classes}"
        )


def check_same_thing_classes(name: str, trained_on: str) -> None:
    """Refuse test dataset ``name`` whose thing classes are those of the training dataset
    ``trained_on`` in another order: the model's class k is the k-th of the training data's, so
    its detections would be scored as other classes. A no-op where either has not set its
    ``thing_classes`` yet (they are set when a dataset is loaded) or their counts differ (COCO
    panoptic's metadata names all its categories; the count is :func:`check_thing_classes`'s)."""
    tested, trained = (MetadataCatalog.get(n).get("thing_classes") for n in (name, trained_on))
    if tested is None or trained is None or len(tested) != len(trained):
        return
    if list(tested) != list(trained) and sorted(tested) == sorted(trained):
        moved = [
            f"{c!r} is class {i} there, {list(tested).index(c)} here"
            for i, c in enumerate(trained)
            if tested[i] != c
        ]
        raise ValueError(
            f"dataset {name!r} orders its thing classes unlike the training dataset "
            f"{trained_on!r}, whose order the model learned ({'; '.join(moved[:3])}): give the "
            "categories of both jsons the same ids"
        )


def check_ignore_label(name: str, ignore_value: int, key: str) -> None:
    """Refuse dataset ``name`` marking unlabeled pixels otherwise (its ``ignore_label``) than
    ``ignore_value``, the config's ``key``: they would train as a class."""
    marked = MetadataCatalog.get(name).get("ignore_label")
    if marked is not None and marked != ignore_value:
        raise ValueError(
            f"dataset {name!r} marks unlabeled pixels {marked} (its ignore_label) but {key} is "
            f"{ignore_value}"
        )


def check_derived_classes(things: int, semantic: int, keys: str) -> None:
    """Refuse ``semantic`` classes (the config's ``keys``) for labels derived from instances:
    they are the ``things`` classes + background."""
    if semantic != things + 1:
        raise ValueError(
            f"derived semantic labels are the {things} thing classes + background: set {keys} "
            f"to {things + 1} (it is {semantic})"
        )


def check_mask_format(name: str, mask_format: str, key: str) -> None:
    """Refuse the "polygon" mask format (the config's ``key``) for a dataset, loaded by
    :func:`htc.data.load_htc_json`, with masks given as RLE: Detectron2's mapper fails at the
    first image sampled with one."""
    rle = RLE_MASK_EXAMPLES.get(name)
    if mask_format == "polygon" and rle:
        raise ValueError(
            f"dataset {name!r} has masks as RLE ({rle}), which the polygon mask format cannot "
            f"hold: set {key} bitmask"
        )
