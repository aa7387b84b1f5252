"""What a COCO instances json must satisfy before Detectron2 and pycocotools read it.

pycocotools trusts the file: duplicated image ids merge two images into one (one image then
trains on the other's masks, the other is dropped), one file listed twice trains each copy on
half its objects, annotations of an unknown image are dropped
without a word, a polygon coordinate of 1e12 makes its rasterizer allocate without bound, and
RLE counts that do not add up to the mask's size make its decoder write past its buffer. Every
field the loader and the mapper use is checked here, from the json alone (no image is decoded),
and each refusal names the file, the image or annotation id, and the problem.
"""

import logging
import math
import os
from numbers import Integral, Real
from typing import Any, Dict, List, Optional

import numpy as np

logger = logging.getLogger(__name__)


class CocoFormatError(ValueError):
    """A COCO json that cannot be read as it is meant, with where and why."""


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_size(value: Any) -> bool:
    """A positive integer (an integral float, as some tools write, is one too)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        return False
    return value > 0 and float(value).is_integer()


def _unique_int_ids(items: List[dict], what: str, where: str) -> Dict[int, dict]:
    """``{id: item}``, refusing ids that are not integers or that repeat."""
    by_id: Dict[int, dict] = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            kind = type(item).__name__
            raise CocoFormatError(f"{where}: {what} #{index} is {kind}, not an object")
        item_id = item.get("id")
        if not _is_int(item_id):
            raise CocoFormatError(
                f"{where}: {what} #{index} has id {item_id!r} ({type(item_id).__name__}): "
                "ids are integers"
            )
        if item_id in by_id:
            raise CocoFormatError(f"{where}: {what} id {item_id} is used twice (#{index} too)")
        by_id[item_id] = item
    return by_id


def _check_image(image: dict, where: str) -> None:
    name = image.get("file_name")
    if not isinstance(name, str) or not name:
        raise CocoFormatError(f"{where}: image {image['id']} has file_name {name!r}")
    for key in ("height", "width"):
        if not _is_size(image.get(key)):
            raise CocoFormatError(
                f"{where}: image {image['id']} ({name}) has {key} {image.get(key)!r}: expected a "
                "positive integer"
            )


def rle_string_counts(counts: str) -> List[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``), decoded
    without pycocotools so that a malformed string cannot reach its C code."""
    runs: List[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                raise ValueError("the string ends inside a run length")
            code = ord(counts[position]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"character {counts[position]!r} is not of the RLE alphabet")
            value |= (code & 0x1F) << (5 * shift)
            more = bool(code & 0x20)
            position += 1
            shift += 1
            if not more and code & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _rle_problem(rle: dict, height: int, width: int) -> Optional[str]:
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(map(_is_int, size))):
        return f"RLE size {size!r} is not [height, width]"
    if [int(size[0]), int(size[1])] != [int(height), int(width)]:
        return f"RLE size {list(size)} (height, width) is not the image's [{height}, {width}]"
    if isinstance(counts, str):
        try:
            runs = rle_string_counts(counts)
        except ValueError as e:
            return f"compressed RLE counts are malformed: {e}"
    elif isinstance(counts, list) and all(map(_is_int, counts)):
        runs = counts
    else:
        return "RLE counts are neither a compressed string nor a list of integers"
    total, negative = sum(runs), any(r < 0 for r in runs)
    if negative or total != height * width:
        return (
            f"RLE run lengths add up to {total} with negative runs {negative}; a {height}x{width} "
            f"mask needs {height * width}"
        )
    return None


def _polygon_problem(polygons: list, height: int, width: int) -> Optional[str]:
    for index, polygon in enumerate(polygons):
        if not isinstance(polygon, (list, tuple)):
            return f"polygon {index} is {type(polygon).__name__}, not a list of numbers"
        coords = np.asarray(polygon)  # once per polygon: LVIS has over a million
        if coords.ndim != 1 or coords.dtype.kind not in "iuf":
            return f"polygon {index} holds something other than numbers"
        coords = coords.astype(np.float64)
        if len(coords) % 2:
            return f"polygon {index} has {len(coords)} numbers: x, y pairs need an even count"
        if not np.isfinite(coords).all():
            return f"polygon {index} has a coordinate that is not finite"
        if len(coords) == 0:
            continue
        xs, ys = coords[0::2], coords[1::2]
        if xs.min() < -width or xs.max() > 2 * width or ys.min() < -height or ys.max() > 2 * height:
            return (
                f"polygon {index} reaches ({xs.min():g}..{xs.max():g}, {ys.min():g}..{ys.max():g})"
                f", more than the image's own size outside the {width}x{height} image"
            )
    return None


def segmentation_problem(segmentation: Any, height: int, width: int) -> Optional[str]:
    """Why ``segmentation`` cannot be rasterized as meant on a ``height`` x ``width`` image, or
    None. Missing and empty ones are the reference's business (ignored), not an error."""
    if not segmentation:
        return None
    if isinstance(segmentation, dict):
        return _rle_problem(segmentation, height, width)
    if isinstance(segmentation, list):
        return _polygon_problem(segmentation, height, width)
    return f"segmentation is {type(segmentation).__name__}: expected polygons or an RLE object"


def _check_annotation(
    ann: dict, images: Dict[int, dict], categories: Dict[int, dict], where: str
) -> None:
    image = images.get(ann.get("image_id"))
    if image is None:
        image_id = ann.get("image_id")
        raise CocoFormatError(
            f"{where}: annotation {ann['id']} refers to image_id {image_id!r} "
            f"({type(image_id).__name__}), which is not the id of an image in the file"
        )
    what = f"{where}: annotation {ann['id']} of image {image['id']} ({image['file_name']})"
    category = ann.get("category_id")
    if not _is_int(category) or category not in categories:
        raise CocoFormatError(
            f"{what} has category_id {category!r}, which is not the id of a category in the file"
        )
    if ann.get("iscrowd", 0) not in (0, 1):
        raise CocoFormatError(f"{what} has iscrowd {ann.get('iscrowd')!r}: expected 0 or 1")
    if ann.get("ignore", 0) != 0:
        raise CocoFormatError(f"{what} has ignore {ann['ignore']!r}: not supported by Detectron2")
    bbox = ann.get("bbox")
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4) or not all(
        _is_finite(v) for v in bbox
    ):
        raise CocoFormatError(
            f"{what} has bbox {bbox!r}: expected 4 finite numbers (x, y, width, height)"
        )
    problem = segmentation_problem(ann.get("segmentation"), image["height"], image["width"])
    if problem:
        raise CocoFormatError(f"{what}: {problem}")


def _is_finite(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_unique_files(images: Dict[int, dict], where: str) -> None:
    """Refuse an image file listed under two ids: each record would train the other's objects
    as background."""
    seen: Dict[str, int] = {}
    for image_id, image in images.items():
        name = os.path.normpath(image["file_name"])
        if name in seen:
            raise CocoFormatError(
                f"{where}: images {seen[name]} and {image_id} are the same file {name}: list each "
                "image once, with all its annotations"
            )
        seen[name] = image_id


def _check_lists(data: Any, where: str) -> None:
    """Refuse a json that is not an object of the three lists."""
    if not isinstance(data, dict):
        raise CocoFormatError(f"{where}: the json holds a {type(data).__name__}, not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise CocoFormatError(f"{where}: {key!r} is missing or not a list")


def check_coco_json(data: Any, where: str) -> None:
    """Refuse a COCO instances dict that the loader or the mapper would misread.

    Args:
        data: the parsed json.
        where: the file, for the messages.
    """
    _check_lists(data, where)
    images = _unique_int_ids(data["images"], "image", where)
    for image in images.values():
        _check_image(image, where)
    _check_unique_files(images, where)
    categories = _unique_int_ids(data["categories"], "category", where)
    _check_category_names(categories, where)
    annotations = _unique_int_ids(data["annotations"], "annotation", where)
    for ann in annotations.values():
        _check_annotation(ann, images, categories, where)


def _check_category_names(categories: Dict[int, dict], where: str) -> None:
    """Refuse a category without a name (the loader's bare KeyError 'name'); warn of two of one
    name, which Detectron2 accepts, but whose classes the evaluation and the class-order check
    cannot tell apart."""
    seen: Dict[str, int] = {}
    for category_id, category in categories.items():
        name = category.get("name")
        if name is None or name == "":
            raise CocoFormatError(f"{where}: category {category_id} has name {name!r}")
        if str(name) in seen:
            logger.warning(
                f"{where}: categories {seen[str(name)]} and {category_id} are both named {name!r}"
            )
        seen.setdefault(str(name), category_id)


def check_lvis_json(data: Any, where: str, categories: Dict[int, str], exact: bool) -> None:
    """Refuse an LVIS dict that Detectron2's LVIS loader or the LVIS evaluator would misread:
    the checks of :func:`check_coco_json` for LVIS's fields (images by ``coco_url``, polygons
    only), and its categories, which must fit the table that the dataset's name picks, each
    with LVIS's ``frequency`` ("r", "c" or "f"), which the evaluator groups AP by.

    Args:
        data: the parsed json.
        where: the file, for the messages.
        categories: the table's ``{id: name}``.
        exact: whether the json's categories must be the table's, ids and names (LVIS's own:
            the loader trains category k as class k - 1), or some of its ids (a "cocofied"
            json: LVIS's categories under COCO's ids, the loader mapping them by COCO's table).
    """
    _check_lists(data, where)
    _check_lvis_categories(_unique_int_ids(data["categories"], "category", where), where,
                           categories, exact)  # fmt: skip
    images = _unique_int_ids(data["images"], "image", where)
    for image in images.values():
        url = image.get("coco_url")
        if not isinstance(url, str) or url.count("/") < 1:
            raise CocoFormatError(
                f"{where}: image {image['id']} has coco_url {url!r}: Detectron2's LVIS loader "
                "finds the image by its last two parts (<COCO folder>/<file>)"
            )
        image["file_name"] = "/".join(url.split("/")[-2:])  # for the messages and checks below
        _check_image(image, where)
    _check_unique_files(images, where)
    for ann in _unique_int_ids(data["annotations"], "annotation", where).values():
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, dict) or not segmentation:
            raise CocoFormatError(
                f"{where}: annotation {ann['id']} has segmentation {type(segmentation).__name__}"
                f" {str(segmentation)[:40]}: Detectron2's LVIS loader reads polygons only"
            )
        if any(isinstance(p, (list, tuple)) and 0 < len(p) < 6 for p in segmentation):
            raise CocoFormatError(
                f"{where}: annotation {ann['id']} has a polygon of fewer than 3 points"
            )
        _check_annotation(ann, images, categories, where)


def _check_lvis_categories(
    found: Dict[int, dict], where: str, table: Dict[int, str], exact: bool
) -> None:
    extra = sorted(set(found) - set(table))
    if exact:
        moved = [
            f"{i}: {found[i].get('name')!r} here, {table[i]!r} in the table"
            for i in sorted(set(found) & set(table))
            if found[i].get("name") != table[i]
        ]
        missing = sorted(set(table) - set(found))
        if moved or missing or extra:
            raise CocoFormatError(
                f"{where}: its categories are not the {len(table)} of the table that the "
                f"dataset's name picks (Detectron2's LVIS loader trains category k as class "
                f"k - 1): {len(missing)} of its ids missing {missing[:5]}, {len(extra)} ids not "
                f"in it {extra[:5]}, {len(moved)} named otherwise {moved[:3]}"
            )
    elif extra:
        raise CocoFormatError(
            f"{where}: category ids {extra[:5]} are not in COCO's table, which Detectron2's LVIS "
            "loader maps a cocofied dataset's ids by"
        )
    for category in found.values():
        if category.get("frequency") not in ("r", "c", "f"):
            raise CocoFormatError(
                f"{where}: category {category['id']} ({category.get('name')}) has frequency "
                f"{category.get('frequency')!r}: the LVIS evaluator groups AP by r, c or f"
            )
