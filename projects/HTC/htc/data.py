"""Datasets and the dataset mapper of HTC: instances plus per-pixel semantic labels.

* :func:`register_htc_instances`: any COCO-format json + image root, with semantic PNGs from a
  folder (same file stem as the image) or labels derived from the instance masks.
* ``coco_2017_{train,val}_htc``: COCO 2017 with COCO-Stuff ``stuffthingmaps`` under
  ``$DETECTRON2_DATASETS/coco``.
* :class:`HTCDatasetMapper`: :class:`DatasetMapper` (which already transforms ``sem_seg`` with
  the image, nearest-neighbour) plus checks of the semantic map and derived labels.
"""

import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BitMasks, PolygonMasks
from PIL import Image

logger = logging.getLogger(__name__)

IGNORE_LABEL = 255
_EXIF_ORIENTATION = 0x0112
COCO_STUFF_CLASSES = 183  # stuffthingmaps labels 0..181 (+1 of head-room), 255 = unlabeled


def datasets_root() -> Path:
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def load_htc_json(
    json_file: str,
    image_root: str,
    dataset_name: str,
    sem_seg_root: Optional[str] = None,
) -> List[dict]:
    """COCO json records (Detectron2's format) with ``sem_seg_file_name`` when ``sem_seg_root``
    is given, checked by :func:`check_annotations`. Raises ``FileNotFoundError`` naming the
    first missing file or folder and ``ValueError`` naming a malformed json file."""
    _require(Path(json_file), f"{dataset_name}: annotation file")
    _require(Path(image_root), f"{dataset_name}: image folder")
    try:
        records = load_coco_json(json_file, image_root, dataset_name, extra_annotation_keys=["id"])
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{json_file}: malformed COCO instances file: {e}") from e
    missing = [r["file_name"] for r in records if not os.path.isfile(r["file_name"])]
    if missing:
        raise FileNotFoundError(f"{json_file}: {len(missing)} images not found, e.g. {missing[0]}")
    records = check_annotations(records, json_file)
    if sem_seg_root is not None:
        root = _require(Path(sem_seg_root), f"{dataset_name}: semantic map folder")
        for record in records:
            path = root / (Path(record["file_name"]).stem + ".png")
            record["sem_seg_file_name"] = str(
                _require(path, f"semantic map of {record['file_name']}")
            )
    return records


def _invalid_box(bbox) -> bool:
    return (
        not isinstance(bbox, (list, tuple))
        or len(bbox) != 4
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
    )


def _ignored_reason(obj: dict, height: int, width: int) -> Optional[str]:
    """Why the reference ignores annotation ``obj`` (XYWH box), or None to keep it."""
    x, y, w, h = obj["bbox"]
    if w < 1 or h < 1:
        return "box narrower or lower than 1 pixel"
    if min(x + w, width) <= max(x, 0) or min(y + h, height) <= max(y, 0):
        return "box outside the image"
    if not obj.get("segmentation"):
        return "no valid segmentation"
    return None


def check_annotations(records: List[dict], json_file: str) -> List[dict]:
    """Refuse boxes that are not 4 finite numbers; drop the annotations the reference ignores
    (boxes under 1 pixel or outside the image, no valid polygon or RLE; Detectron2's loader has
    already dropped polygons of fewer than 3 points) and name them in one warning. Crowd
    annotations are kept: the mapper leaves them out of the training targets."""
    ignored: Counter = Counter()
    example = None
    for record in records:
        kept = []
        for obj in record["annotations"]:
            if _invalid_box(obj.get("bbox")):
                raise ValueError(
                    f"{json_file}: annotation {obj.get('id')} of {record['file_name']} has bbox "
                    f"{obj.get('bbox')!r}: expected 4 finite numbers (x, y, width, height)"
                )
            size = (record["height"], record["width"])
            reason = None if obj.get("iscrowd") else _ignored_reason(obj, *size)
            if reason is None:
                kept.append(obj)
                continue
            ignored[reason] += 1
            example = example or f"annotation {obj.get('id')} of {record['file_name']}: {reason}"
        record["annotations"] = kept
    total = sum(len(r["annotations"]) for r in records) + sum(ignored.values())
    if total and not any(obj.get("segmentation") for r in records for obj in r["annotations"]):
        raise ValueError(f"{json_file}: no annotation has a segmentation; HTC learns masks")
    if ignored:
        logger.warning(
            f"{json_file}: ignored {sum(ignored.values())} of {total} annotations as the "
            f"reference does ({dict(ignored)}), e.g. {example}"
        )
    return records


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
        sem_seg_root: folder of semantic label PNGs named like the images (255 = unlabeled).
        derive_semantic: without ``sem_seg_root``, derive the semantic labels from the instance
            masks: thing class ids 0..K-1 and background K (set SEM_SEG_HEAD.NUM_CLASSES = K+1).
    """
    if sem_seg_root and derive_semantic:
        raise ValueError(f"{name}: give either sem_seg_root or derive_semantic, not both")
    register_with_loader(
        name,
        lambda: load_htc_json(json_file, image_root, name, sem_seg_root),
        json_file=json_file,
        image_root=image_root,
        sem_seg_root=sem_seg_root,
        derive_semantic=derive_semantic,
        **(metadata or {}),
    )


def register_with_loader(name: str, loader: Callable[[], List[dict]], **metadata) -> None:
    """Register ``loader`` under ``name`` with the metadata HTC's evaluators read."""
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(evaluator_type="coco", ignore_label=IGNORE_LABEL, **metadata)


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
            metadata={"stuff_classes": [f"cocostuff_{i}" for i in range(COCO_STUFF_CLASSES)]},
        )


def check_dataset(cfg, name: str, is_train: bool) -> None:
    """Refuse a config that does not fit dataset ``name`` (call after the dataset was loaded,
    which sets its ``thing_classes``): class count, and semantic labels for training."""
    meta = MetadataCatalog.get(name)
    things = meta.get("thing_classes")
    if things is not None and len(things) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ValueError(
            f"dataset {name!r} has {len(things)} thing classes but MODEL.ROI_HEADS.NUM_CLASSES "
            f"is {cfg.MODEL.ROI_HEADS.NUM_CLASSES}"
        )
    has_labels = meta.get("sem_seg_root") or meta.get("derive_semantic")
    if is_train and cfg.MODEL.HTC.SEMANTIC_ON and not has_labels:
        raise ValueError(
            f"MODEL.HTC.SEMANTIC_ON trains on semantic labels, and dataset {name!r} has none: "
            "register it with sem_seg_root or derive_semantic=True (htc.register_htc_instances), "
            "or set MODEL.HTC.SEMANTIC_ON False and MODEL.HTC.SEMANTIC_FUSION []"
        )


class HTCDatasetMapper(DatasetMapper):
    """:class:`DatasetMapper` for HTC. The parent loads ``sem_seg`` and applies the image's
    geometric transforms to it; this mapper also checks it against the image (same size, labels
    in [0, num_classes) or 255) and, for datasets registered with ``derive_semantic``, paints
    it from the instance masks."""

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        num_semantic_classes: Optional[int] = None,
        derive_semantic: bool = False,
        **kwargs,
    ):
        super().__init__(is_train, **kwargs)
        self.num_semantic_classes = num_semantic_classes
        self.derive_semantic = derive_semantic and is_train
        if self.derive_semantic and (not self.use_instance_mask or num_semantic_classes is None):
            raise ValueError(
                "deriving semantic labels needs instance masks (MODEL.MASK_ON) and the semantic "
                "branch (MODEL.HTC.SEMANTIC_ON)"
            )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_names: Optional[List[str]] = None):
        ret = super().from_config(cfg, is_train)
        names = dataset_names or (cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST)
        derive = {bool(MetadataCatalog.get(n).get("derive_semantic", False)) for n in names}
        if len(derive) > 1:
            raise ValueError(f"datasets {names} mix derived and file semantic labels")
        ret["derive_semantic"] = derive.pop() if derive else False
        things, semantic = cfg.MODEL.ROI_HEADS.NUM_CLASSES, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        if ret["derive_semantic"] and semantic != things + 1:
            raise ValueError(
                f"derived semantic labels are the {things} thing classes + background: set "
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES to {things + 1} (it is {semantic})"
            )
        if cfg.MODEL.HTC.SEMANTIC_ON:
            ret["num_semantic_classes"] = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        return ret

    def __call__(self, dataset_dict: dict) -> dict:
        sem_file = dataset_dict.get("sem_seg_file_name")
        files = [f for f in (dataset_dict["file_name"], sem_file) if f]
        try:
            if sem_file:
                _check_same_size(dataset_dict["file_name"], sem_file)
            out = super().__call__(dataset_dict)
        except OSError as e:  # PIL's messages do not always name the file
            raise OSError(f"cannot read {' or '.join(files)}: {e}") from e
        if "sem_seg" in out:
            self._check_labels(out["sem_seg"], sem_file)
        elif self.derive_semantic:
            out["sem_seg"] = self._derived_semantic(out)
        return out

    def _check_labels(self, sem: torch.Tensor, name: str) -> None:
        if self.num_semantic_classes is None:
            return
        bad = (sem != IGNORE_LABEL) & ((sem < 0) | (sem >= self.num_semantic_classes))
        if bad.any():
            raise ValueError(
                f"{name}: semantic labels {sorted(sem[bad].unique().tolist())[:10]} outside "
                f"[0, {self.num_semantic_classes}) (MODEL.SEM_SEG_HEAD.NUM_CLASSES) and not "
                f"{IGNORE_LABEL}"
            )

    def _derived_semantic(self, out: dict) -> torch.Tensor:
        """(H, W) labels: the class of the last instance (annotation order) covering a pixel,
        else background (= K, the last semantic class)."""
        height, width = out["image"].shape[-2:]
        sem = torch.full((height, width), self.num_semantic_classes - 1, dtype=torch.long)
        instances = out.get("instances")
        if instances is None or len(instances) == 0:
            return sem
        masks = instances.gt_masks
        if isinstance(masks, PolygonMasks):
            masks = BitMasks.from_polygon_masks(masks, height, width)
        for mask, cls in zip(masks.tensor, instances.gt_classes):
            sem[mask] = int(cls)
        return sem


def _image_size(path: str) -> Tuple[int, int]:
    """(height, width) as Detectron2's read_image returns it (EXIF orientation applied),
    read from the file header only."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
            width, height = height, width
    return height, width


def _check_same_size(image_file: str, sem_seg_file: str) -> None:
    image_size, sem_size = _image_size(image_file), _image_size(sem_seg_file)
    if image_size != sem_size:
        raise ValueError(
            f"{sem_seg_file}: semantic map of size {sem_size} (h, w) for the image {image_file} "
            f"of size {image_size}"
        )
