"""Small generated datasets in the layouts of the real ones, for the tests.

Cityscapes: ``leftImg8bit/`` and ``gtFine/`` with each image's ``_polygons.json`` and the PNGs
that cityscapesscripts' own preparation scripts draw from it (``_labelIds``, ``_labelTrainIds``,
``_instanceIds``), and the panoptic ground truth its ``createPanopticImgs`` makes.
LVIS v1: COCO-named images under ``coco/{train2017,val2017}`` with COCO-Stuff maps, and
``lvis/lvis_v1_{train,val}.json`` with LVIS v1's 1203 categories (their
``frequency``), ``not_exhaustive_category_ids`` and ``neg_category_ids``.
"""

import json
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image, ImageDraw

HEIGHT, WIDTH = 128, 256
CITIES = {"train": "aachen", "val": "frankfurt"}
# The scene's stuff bands (label, top, bottom) and the instance classes drawn on them.
BANDS = (("sky", 0, 40), ("building", 40, 72), ("road", 72, HEIGHT))
THINGS = ("car", "person", "rider", "bicycle")


def _box_polygon(rng: np.random.Generator, min_size: int = 24) -> List[List[int]]:
    """A quadrilateral at least ``min_size`` pixels wide and high, inside the image."""
    w, h = (int(v) for v in rng.integers(min_size, 2 * min_size, size=2))
    x, y = int(rng.integers(0, WIDTH - w)), int(rng.integers(40, HEIGHT - h))
    skew = int(rng.integers(0, 6))
    return [[x + skew, y], [x + w, y], [x + w - skew, y + h], [x, y + h]]


def _paint(polygons: List[tuple], seed: int) -> Image.Image:
    """An RGB image: each labelled polygon filled with its own colour, plus noise."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (WIDTH, HEIGHT))
    draw = ImageDraw.Draw(image)
    for _, polygon in polygons:
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.polygon([tuple(p) for p in polygon], fill=colour)
    noise = rng.integers(-12, 13, size=(HEIGHT, WIDTH, 3))
    return Image.fromarray(
        np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype("uint8")
    )


def write_cityscapes(root: Path, images_per_split: int = 2, seed: int = 0) -> Path:
    """``root/cityscapes`` in Cityscapes' layout; returns that folder."""
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    rng = np.random.default_rng(seed)
    cityscapes = root / "cityscapes"
    for split, city in CITIES.items():
        images, gt = cityscapes / "leftImg8bit" / split / city, cityscapes / "gtFine" / split / city
        images.mkdir(parents=True)
        gt.mkdir(parents=True)
        for i in range(images_per_split):
            objects = [
                (label, [[0, top], [WIDTH - 1, top], [WIDTH - 1, bottom - 1], [0, bottom - 1]])
                for label, top, bottom in BANDS
            ]
            objects += [(thing, _box_polygon(rng)) for thing in rng.permutation(THINGS)[:3]]
            base = f"{city}_000000_{i:06d}"
            _paint(objects, seed=int(rng.integers(1 << 30))).save(
                images / f"{base}_leftImg8bit.png"
            )
            polygons = gt / f"{base}_gtFine_polygons.json"
            polygons.write_text(
                json.dumps(
                    {
                        "imgHeight": HEIGHT,
                        "imgWidth": WIDTH,
                        "objects": [{"label": str(n), "polygon": p} for n, p in objects],
                    }
                )
            )
            for suffix, encoding in (("labelIds", "ids"), ("labelTrainIds", "trainIds")):
                json2labelImg(str(polygons), str(gt / f"{base}_gtFine_{suffix}.png"), encoding)
            # drawn by cityscapesscripts in a 32-bit image, which Pillow 13 no longer writes as
            # PNG: saved 16-bit, as Cityscapes ships them
            annotation = Annotation()
            annotation.fromJsonFile(str(polygons))
            ids = np.asarray(createInstanceImage(annotation, "ids")).astype(np.uint16)
            Image.fromarray(ids).save(gt / f"{base}_gtFine_instanceIds.png")
    from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

    convert2panoptic(str(cityscapes / "gtFine"), setNames=list(CITIES))  # cityscapes_panoptic_*
    return cityscapes


def lvis_categories() -> List[Dict]:
    """LVIS v1's 1203 categories as its json gives them (id, name, frequency, ...)."""
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    return [dict(c) for c in LVIS_CATEGORIES]


def write_lvis(root: Path, images_per_split: int = 3, seed: int = 0) -> Dict[str, List[int]]:
    """``root/coco/{train2017,val2017}``, ``root/coco/stuffthingmaps/...`` and
    ``root/lvis/lvis_v1_{train,val}.json``, 3 objects an image of 4 categories (a rare, a
    common, two frequent ones), each split having all. Returns the category ids annotated per
    split. The val images come from both of COCO's folders, as LVIS v1's val does."""
    rng = np.random.default_rng(seed)
    categories = lvis_categories()
    by_frequency = {f: [c["id"] for c in categories if c["frequency"] == f] for f in "rcf"}
    used = [by_frequency["r"][0], by_frequency["c"][0], by_frequency["f"][0], by_frequency["f"][1]]
    (root / "lvis").mkdir(parents=True)
    annotated = {}
    next_annotation = 1
    for split in ("train", "val"):
        images, annotations = [], []
        for i in range(images_per_split):
            image_id = (1 if split == "train" else 500) + i
            folder = "train2017" if split == "train" or i % 2 else "val2017"
            (root / "coco" / folder).mkdir(parents=True, exist_ok=True)
            (root / "coco" / "stuffthingmaps" / folder).mkdir(parents=True, exist_ok=True)
            name = f"{image_id:012d}"
            shapes = [(used[(3 * i + k) % len(used)], _box_polygon(rng)) for k in range(3)]
            _paint(shapes, seed=int(rng.integers(1 << 30))).save(
                root / "coco" / folder / f"{name}.jpg", quality=95
            )
            stuff = Image.new("L", (WIDTH, HEIGHT), 150)  # COCO-Stuff's "road" (id 149)
            draw = ImageDraw.Draw(stuff)
            for _, polygon in shapes:
                draw.polygon([tuple(p) for p in polygon], fill=int(rng.integers(0, 80)))
            stuff.save(root / "coco" / "stuffthingmaps" / folder / f"{name}.png")
            for category, polygon in shapes:
                xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
                bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
                annotations.append(
                    {
                        "id": next_annotation,
                        "image_id": image_id,
                        "category_id": category,
                        "segmentation": [[float(v) for p in polygon for v in p]],
                        "bbox": [float(v) for v in bbox],
                        "area": float(bbox[2] * bbox[3]),
                    }
                )
                next_annotation += 1
            present = sorted({c for c, _ in shapes})
            absent = [c for c in used if c not in present]
            images.append(
                {
                    "id": image_id,
                    "width": WIDTH,
                    "height": HEIGHT,
                    "coco_url": f"http://images.cocodataset.org/{folder}/{name}.jpg",
                    "not_exhaustive_category_ids": present[:1],
                    "neg_category_ids": absent[:1],
                }
            )
        annotated[split] = sorted({a["category_id"] for a in annotations})
        data = {"images": images, "annotations": annotations, "categories": categories}
        (root / "lvis" / f"lvis_v1_{split}.json").write_text(json.dumps(data))
    return annotated
