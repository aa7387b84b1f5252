"""LVIS v1 for HTC: Detectron2's LVIS loader and metadata (1203 categories on COCO 2017's
images), each image joined with COCO-Stuff's label map of the same COCO image for the semantic
branch. The evaluator is Detectron2's :class:`LVISEvaluator` (the ``lvis`` package).

Layout under $DETECTRON2_DATASETS, as Detectron2's LVIS datasets and COCO-Stuff lay it out::

    coco/{train2017,val2017}/*.jpg    coco/stuffthingmaps/{train2017,val2017}/*.png
    lvis/lvis_v1_{train,val}.json
"""

from pathlib import Path
from typing import Dict, List, Optional, Tuple

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.data.datasets.lvis import get_lvis_instances_meta, load_lvis_json
from detectron2.data.datasets.lvis_v0_5_categories import LVIS_CATEGORIES as LVIS_V0_5_CATEGORIES
from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES as LVIS_V1_CATEGORIES

from .coco import check_images_found, read_json
from .coco_checks import check_lvis_json
from .label_map import check_label_map
from .register import datasets_root, register_with_loader

SPLITS = ("train", "val")


def stuff_map(image_file: str, stuff_root: str) -> str:
    """COCO-Stuff's ``<stuff_root>/<train2017|val2017>/<id>.png`` of ``.../<folder>/<id>.jpg``
    (LVIS v1's val images come from both of COCO's folders)."""
    image = Path(image_file)
    return str(Path(stuff_root) / image.parent.name / f"{image.stem}.png")


def load_lvis_htc(
    json_file: str, image_root: str, dataset_name: str, stuff_root: Optional[str] = None
) -> List[dict]:
    """Detectron2's :func:`load_lvis_json` records (with ``not_exhaustive_category_ids`` and
    ``neg_category_ids``), plus ``sem_seg_file_name`` from ``stuff_root`` where given. As
    :func:`htc.data.load_htc_json` does for COCO, the json is checked first
    (:func:`check_lvis_json`, against the categories that ``dataset_name`` picks), then the
    images' presence and the maps' headers; no image is decoded."""
    for path, kind in ((json_file, "json file"), (image_root, "image folder")):
        if not Path(path).exists():
            raise FileNotFoundError(f"{dataset_name}: no {kind} {path}")
    check_lvis_json(read_json(json_file, "LVIS"), json_file, *category_table(dataset_name))
    # Detectron2 joins image_root and the image's COCO folder as strings
    dicts = load_lvis_json(json_file, str(image_root).rstrip("/") + "/", dataset_name)
    check_images_found(dicts, json_file)
    if stuff_root is None:
        return dicts
    for record in dicts:
        record["sem_seg_file_name"] = stuff_map(record["file_name"], stuff_root)
        if not Path(record["sem_seg_file_name"]).is_file():
            raise FileNotFoundError(
                f"{dataset_name}: the COCO-Stuff map {record['sem_seg_file_name']} of "
                f"{record['file_name']} is missing"
            )
        check_label_map(
            record["sem_seg_file_name"], record["height"], record["width"], record["file_name"]
        )
    return dicts


def category_table(dataset_name: str) -> Tuple[Dict[int, str], bool]:
    """The ``{id: name}`` categories that Detectron2's LVIS loader takes for ``dataset_name``
    (:func:`get_lvis_instances_meta`'s rule), and whether a json's must be exactly these (LVIS's
    tables) or some of their ids (COCO's, for LVIS's categories renumbered by
    ``prepare_cocofied_lvis.py``)."""
    if "cocofied" in dataset_name:
        return {c["id"]: c["name"] for c in COCO_CATEGORIES if c["isthing"]}, False
    if "v0.5" in dataset_name:
        return {c["id"]: c["name"] for c in LVIS_V0_5_CATEGORIES}, True
    if "v1" in dataset_name:
        return {c["id"]: c["name"] for c in LVIS_V1_CATEGORIES}, True
    raise ValueError(
        f"{dataset_name!r}: the name of an LVIS dataset picks its category table: it holds "
        "'v1' (LVIS v1), 'v0.5' or 'cocofied' (COCO's 80)"
    )


def register_lvis_htc(
    name: str, json_file: str, image_root: str, stuff_root: Optional[str] = None
) -> None:
    """Register an LVIS-format dataset for HTC, evaluated by :class:`LVISEvaluator`.

    Args:
        name: Detectron2's LVIS loader takes the category table by the name, and the json's
            category ids must be that table's: "v1" in the name gives LVIS v1's (its 1203
            categories, and the image counts the federated loss weighs classes by), "v0.5"
            LVIS v0.5's, "cocofied" COCO's 80; any other name is refused. The json's
            categories are checked against that table when it is loaded.
        stuff_root: COCO-Stuff's ``stuffthingmaps`` folder (labels 0-181, 255 = unlabeled), or
            None for a model without the semantic branch.
    """
    register_with_loader(
        name,
        lambda: load_lvis_htc(json_file, image_root, name, stuff_root),
        json_file=json_file,
        image_root=image_root,
        sem_seg_root=stuff_root,
        evaluator_type="lvis",
        **get_lvis_instances_meta(name),
    )


def register_lvis_v1_htc(root: Optional[Path] = None) -> None:
    """``lvis_v1_{train,val}_htc``: LVIS v1 with COCO-Stuff's maps. The configs without the
    semantic branch use Detectron2's own ``lvis_v1_{train,val}``."""
    root = root or datasets_root()
    for split in SPLITS:
        register_lvis_htc(
            f"lvis_v1_{split}_htc",
            str(root / "lvis" / f"lvis_v1_{split}.json"),
            str(root / "coco"),
            stuff_root=str(root / "coco" / "stuffthingmaps"),
        )
