"""What a model's config must agree on with its datasets, checked once they are loaded and
before training (by ``train_net.py`` and ``lazyconfig_train_net.py``): a mismatch would train
without an error, or fail hours in."""

from detectron2.data import MetadataCatalog

from .coco import RLE_MASK_EXAMPLES


def check_thing_classes(name: str, num_classes: int, key: str) -> None:
    """Refuse ``num_classes`` (the config's ``key``) for dataset ``name`` of another count of
    thing classes (a class beyond the model's would train as background)."""
    meta = MetadataCatalog.get(name)
    # COCO panoptic's "standard" metadata names all 133 categories thing_classes; its things are
    # those of thing_dataset_id_to_contiguous_id.
    things = meta.get("thing_dataset_id_to_contiguous_id") or meta.get("thing_classes")
    if things is not None and len(things) != num_classes:
        raise ValueError(
            f"dataset {name!r} has {len(things)} thing classes but {key} is {num_classes}"
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
