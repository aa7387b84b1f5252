"""Loading and checking COCO-format instance annotations for HTC (Detectron2's loader, with the
files and annotations checked where they are read)."""

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pycocotools.mask as mask_util
from detectron2.data.datasets import load_coco_json
from detectron2.utils.file_io import PathManager

from .coco_checks import check_coco_json
from .label_map import check_label_map

logger = logging.getLogger(__name__)
# dataset name -> its first mask (no crowd) given as an RLE, named, as last loaded in this
# process: INPUT.MASK_FORMAT polygon cannot hold it (train_net checks before training)
RLE_MASK_EXAMPLES: Dict[str, Optional[str]] = {}


def load_htc_json(
    json_file: str,
    image_root: str,
    dataset_name: str,
    sem_seg_root: Optional[str] = None,
) -> List[dict]:
    """COCO json records (Detectron2's format) with ``sem_seg_file_name`` when ``sem_seg_root``
    is given. The json is checked before Detectron2 reads it (:func:`check_coco_json`), the
    records after (:func:`check_annotations`), the label maps' headers against their images
    (:func:`check_label_map`); no image is decoded. Raises ``FileNotFoundError`` naming the first
    missing file or folder and ``ValueError`` naming the file, the id and the problem."""
    _require(Path(json_file), f"{dataset_name}: annotation file")
    _require(Path(image_root), f"{dataset_name}: image folder")
    check_coco_json(read_json(json_file, "COCO instances"), json_file)
    records = load_coco_json(json_file, image_root, dataset_name, extra_annotation_keys=["id"])
    check_images_found(records, json_file)
    for record in records:  # integral floats passed the checks; mask pasting needs ints
        record["height"], record["width"] = int(record["height"]), int(record["width"])
    records = check_annotations(records, json_file)
    RLE_MASK_EXAMPLES[dataset_name] = _first_rle_mask(records)
    if sem_seg_root is not None:
        root = _require(Path(sem_seg_root), f"{dataset_name}: semantic map folder")
        for record, path in zip(records, semantic_map_paths(records, image_root, root)):
            record["sem_seg_file_name"] = str(
                _require(path, f"semantic map of {record['file_name']}")
            )
            check_label_map(
                record["sem_seg_file_name"], record["height"], record["width"], record["file_name"]
            )
    return records


def read_json(json_file: str, kind: str) -> Any:
    """The parsed ``json_file`` (a ``kind`` file), for the checks before Detectron2 reads it
    again; ValueError naming it where it is malformed."""
    try:
        with PathManager.open(json_file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_file}: malformed {kind} file: {e}") from e


def check_images_found(records: List[dict], json_file: str) -> None:
    """Refuse records of ``json_file`` whose image file is missing."""
    missing = [r["file_name"] for r in records if not os.path.isfile(r["file_name"])]
    if missing:
        raise FileNotFoundError(f"{json_file}: {len(missing)} images not found, e.g. {missing[0]}")


def semantic_map_paths(records: List[dict], image_root: str, sem_seg_root: Path) -> List[Path]:
    """Each record's label map: its image's path under ``image_root``, under ``sem_seg_root``
    with ".png" (subfolders kept, as Detectron2's ``load_sem_seg`` pairs them), else by the
    image's name alone (maps in one folder, or an image outside ``image_root``). The layout is
    the dataset's, not each image's: where any map of an image in a subfolder is at its path,
    all are looked for at theirs (a missing one is not replaced by a map of its name elsewhere).
    Two images that would share a map (``a.jpg`` and ``a.png``, or ``a/1.jpg`` and ``b/1.jpg``
    with maps in one folder) raise ValueError naming both."""
    relatives = [
        Path(os.path.relpath(record["file_name"], image_root)).with_suffix(".png")
        for record in records
    ]
    nested = [r for r in relatives if r.parts[0] != os.pardir and len(r.parts) > 1]
    in_subfolders = any((sem_seg_root / r).exists() for r in nested)
    paths, owner = [], {}
    for record, relative in zip(records, relatives):
        path = sem_seg_root / relative
        if relative.parts[0] == os.pardir or (len(relative.parts) > 1 and not in_subfolders):
            path = sem_seg_root / relative.name
        if path in owner:
            raise ValueError(
                f"{owner[path]} and {record['file_name']} would share the semantic map {path}: "
                "rename one of the images"
            )
        owner[path] = record["file_name"]
        paths.append(path)
    return paths


def _first_rle_mask(records: List[dict]) -> Optional[str]:
    """The first annotation that is no crowd and whose mask is an RLE, named; None if none."""
    for record in records:
        for obj in record["annotations"]:
            if not obj.get("iscrowd") and isinstance(obj.get("segmentation"), dict):
                return f"annotation {obj.get('id')} of {record['file_name']}"
    return None


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


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


def _box_misfit(obj: dict, height: int, width: int) -> Optional[str]:
    """How annotation ``obj``'s XYWH box misses its mask, or None where they agree (IoU of the
    box with the mask's extent at least 0.5)."""
    mask = _mask_extent(obj["segmentation"], height, width)
    x, y, w, h = obj["bbox"]
    if _iou((x, y, x + w, y + h), mask) >= 0.5:
        return None
    if _iou((x, y, w, h), mask) >= 0.5:
        return "box written as (x1, y1, x2, y2)"
    return "box not around its mask"


def _mask_extent(segmentation, height: int, width: int) -> Tuple[float, float, float, float]:
    """(x1, y1, x2, y2) that polygons or an RLE span."""
    if isinstance(segmentation, list):
        xs = [v for polygon in segmentation for v in polygon[0::2]]
        ys = [v for polygon in segmentation for v in polygon[1::2]]
        return min(xs), min(ys), max(xs), max(ys)
    if isinstance(segmentation["counts"], list):  # uncompressed
        segmentation = mask_util.frPyObjects(segmentation, height, width)
    x, y, w, h = mask_util.toBbox(segmentation).tolist()
    return x, y, x + w, y + h


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def check_annotations(records: List[dict], json_file: str) -> List[dict]:
    """Drop the annotations the reference ignores (boxes under 1 pixel or outside the image, no
    valid polygon or RLE; Detectron2's loader has already dropped polygons of fewer than 3
    points) and name them in one warning. Crowd annotations are kept: the mapper leaves them
    out of the training targets. Boxes that do not frame their masks (the box heads and the
    mask heads would learn different objects) are named in another warning. ``records`` come
    from a json that passed :func:`check_coco_json`."""
    ignored: Counter = Counter()
    misfits: Counter = Counter()
    example = misfit = None
    for record in records:
        kept = []
        size = (record["height"], record["width"])
        for obj in record["annotations"]:
            if obj.get("iscrowd"):
                kept.append(obj)
                continue
            reason = _ignored_reason(obj, *size)
            if reason is not None:
                ignored[reason] += 1
                example = example or (
                    f"annotation {obj.get('id')} of {record['file_name']}: {reason}"
                )
                continue
            kept.append(obj)
            how = _box_misfit(obj, *size)
            if how is not None:
                misfits[how] += 1
                misfit = misfit or f"annotation {obj.get('id')} of {record['file_name']}"
        record["annotations"] = kept
    total = sum(len(r["annotations"]) for r in records) + sum(ignored.values())
    if total and not any(obj.get("segmentation") for r in records for obj in r["annotations"]):
        why = (
            f"{sum(ignored.values())} of {total} ignored: {dict(ignored)}, e.g. {example}"
            if ignored
            else "none has one"
        )
        raise ValueError(
            f"{json_file}: no annotation is left with a segmentation ({why}); HTC learns masks"
        )
    if ignored:
        logger.warning(
            f"{json_file}: ignored {sum(ignored.values())} of {total} annotations as the "
            f"reference does ({dict(ignored)}), e.g. {example}"
        )
    if misfits:
        logger.warning(
            f"{json_file}: {sum(misfits.values())} of {total} boxes do not frame their masks "
            f"(IoU with the mask's extent under 0.5: {dict(misfits)}), e.g. {misfit}; COCO's "
            "bbox is (x, y, width, height). Kept as given (amodal boxes are meant so)"
        )
    return records
