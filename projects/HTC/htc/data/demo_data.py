"""The embedded demo dataset: deterministic synthetic scenes, generated as code.

Each scene has 2-3 smooth "stuff" regions (sky, grass, water) split by wavy boundaries and 2-5
"thing" objects (disc, square, triangle) of varied size, colour and position that may occlude
each other. Written as COCO json (RLE masks of the visible parts), semantic PNGs (things 0-2,
stuff 3-5) and COCO panoptic ground truth (categories 1-3 things, 4-6 stuff; the pixels of
objects too small to be annotated are void) into ``$DETECTRON2_DATASETS/htc_demo``; registered
as ``htc_demo_{train,val}``.
"""

import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
from detectron2.utils import comm
from PIL import Image
from tqdm import tqdm

from .coco import load_htc_json
from .register import datasets_root, register_with_loader

THING_CLASSES = ["disc", "square", "triangle"]
STUFF_CLASSES = ["sky", "grass", "water"]
SEMANTIC_CLASSES = THING_CLASSES + STUFF_CLASSES
SPLITS = {"train": (600, 0), "val": (100, 1)}  # number of images, seed
IMAGE_SIZE = 256
VERSION = "2"  # bump when the generator changes: cached data is regenerated

# Panoptic category id c + 1 for semantic class c; the contiguous ids are the semantic classes.
PANOPTIC_IDS = {
    "semantic_to_panoptic": list(range(1, len(SEMANTIC_CLASSES) + 1)),
    "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(len(THING_CLASSES))},
    "stuff_dataset_id_to_contiguous_id": {
        i + 1: i for i in range(len(THING_CLASSES), len(SEMANTIC_CLASSES))
    },
}

_STUFF_COLORS = np.array([[120, 170, 230], [90, 160, 70], [40, 80, 150]], dtype=np.float32)
_THING_COLORS = np.array([[220, 60, 50], [240, 200, 40], [200, 80, 220]], dtype=np.float32)


def _stuff(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Background: (H, W, 3) float image and (H, W) stuff labels (3..5), smooth gradients."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(0.01, 0.04)
    horizon = size * rng.uniform(0.3, 0.6) + size * 0.06 * np.sin(freq * xx + phase)
    labels = np.where(yy < horizon, 0, 1)
    if rng.random() < 0.6:  # a water region on one side of a second wavy boundary
        shore = size * rng.uniform(0.3, 0.7) + size * 0.05 * np.sin(freq * 1.7 * yy + phase)
        water = (xx > shore) if rng.random() < 0.5 else (xx < shore)
        labels = np.where((labels == 1) & water, 2, labels)
    shade = 1.0 + 0.15 * (yy / size - 0.5) + 0.05 * np.sin(0.05 * xx + phase)
    colors = _STUFF_COLORS + rng.normal(0, 12, size=_STUFF_COLORS.shape)
    image = colors[labels] * shade[..., None]
    return image, labels + len(THING_CLASSES)


def _shape_mask(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    """(H, W) bool mask of one object of class ``cls``, 40-120 px across."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    extent = rng.uniform(40, 120)
    cx, cy = rng.uniform(extent / 2, size - extent / 2, size=2)
    r = extent / 2
    if cls == 0:
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    if cls == 1:
        angle = rng.uniform(0, np.pi / 2)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        half = r / np.sqrt(2) * 1.2
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    angle = rng.uniform(0, 2 * np.pi)
    corners = [
        (cx + r * np.cos(angle + k * 2 * np.pi / 3), cy + r * np.sin(angle + k * 2 * np.pi / 3))
        for k in range(3)
    ]
    inside = np.ones((size, size), dtype=bool)
    for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]):
        inside &= (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) >= 0
    return inside


def make_scene(
    rng: np.random.Generator, size: int = IMAGE_SIZE
) -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
    """One scene: uint8 (H, W, 3) RGB image, uint8 (H, W) semantic labels, and its objects as
    dicts with ``category_id`` (0-based) and the bool ``mask`` of the visible part."""
    image, semantic = _stuff(rng, size)
    objects: List[Tuple[int, np.ndarray]] = []
    occupied = np.zeros((size, size), dtype=bool)
    for _ in range(rng.integers(2, 6)):
        cls = int(rng.integers(0, len(THING_CLASSES)))
        for _ in range(10):  # mild occlusion: up to 10 draws for one overlapping <= 1/4
            mask = _shape_mask(rng, cls, size)
            if (mask & occupied).sum() <= 0.25 * mask.sum():
                break
        color = _THING_COLORS[cls] * rng.uniform(0.75, 1.1) + rng.normal(0, 10, size=3)
        image[mask] = color
        semantic[mask] = cls
        occupied |= mask
        objects = [(c, m & ~mask) for c, m in objects]  # the new object occludes the earlier ones
        objects.append((cls, mask))
    image += rng.normal(0, 4, size=image.shape)
    kept = [{"category_id": c, "mask": m} for c, m in objects if m.sum() >= 150]
    return np.clip(image, 0, 255).astype(np.uint8), semantic.astype(np.uint8), kept


def _annotation(obj: Dict, image_id: int, ann_id: int) -> Dict:
    rle = mask_util.encode(np.asfortranarray(obj["mask"].astype(np.uint8)))
    x, y, w, h = mask_util.toBbox(rle).tolist()
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj["category_id"] + 1,
        "segmentation": rle,
        "area": float(mask_util.area(rle)),
        "bbox": [x, y, w, h],
        "iscrowd": 0,
    }


def _panoptic(semantic: np.ndarray, objects: List[Dict]) -> Tuple[np.ndarray, List[Dict]]:
    """(H, W, 3) uint8 COCO panoptic PNG (segment id = R + 256 G + 65536 B, 0 void) and its
    segments: one per annotated object, one per stuff class present."""
    ids = np.zeros(semantic.shape, dtype=np.int32)
    regions = [(o["category_id"], o["mask"]) for o in objects]
    regions += [(s, semantic == s) for s in range(len(THING_CLASSES), len(SEMANTIC_CLASSES))]
    segments = []
    for label, mask in regions:
        if not mask.any():
            continue
        ids[mask] = len(segments) + 1
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        segments.append(
            {
                "id": len(segments) + 1,
                "category_id": label + 1,
                "iscrowd": 0,
                "area": int(mask.sum()),
                "bbox": mask_util.toBbox(rle).tolist(),
            }
        )
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    return rgb, segments


def generate_split(root: Path, split: str, num_images: int, seed: int) -> None:
    """Write ``root/{split}/*.png`` images, ``root/{split}_sem/*.png`` semantic labels,
    ``root/{split}.json`` instances, ``root/{split}_panoptic/*.png`` and
    ``root/{split}_panoptic.json`` panoptic ground truth."""
    rng = np.random.default_rng(seed)
    for folder in (split, f"{split}_sem", f"{split}_panoptic"):
        (root / folder).mkdir(parents=True)
    images, annotations, panoptic = [], [], []
    for image_id in tqdm(range(1, num_images + 1), desc=f"htc_demo {split}", unit="img"):
        image, semantic, objects = make_scene(rng)
        name = f"{image_id:05d}.png"
        Image.fromarray(image).save(root / split / name)
        Image.fromarray(semantic).save(root / f"{split}_sem" / name)
        images.append(
            {"id": image_id, "file_name": name, "height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
        for obj in objects:
            annotations.append(_annotation(obj, image_id, len(annotations) + 1))
        rgb, segments = _panoptic(semantic, objects)
        Image.fromarray(rgb).save(root / f"{split}_panoptic" / name)
        panoptic.append({"image_id": image_id, "file_name": name, "segments_info": segments})
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(THING_CLASSES)]
    with open(root / f"{split}.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    categories = [
        {"id": i + 1, "name": n, "isthing": int(i < len(THING_CLASSES))}
        for i, n in enumerate(SEMANTIC_CLASSES)
    ]
    with open(root / f"{split}_panoptic.json", "w") as f:
        json.dump({"images": images, "annotations": panoptic, "categories": categories}, f)


def demo_root() -> Path:
    return datasets_root() / "htc_demo"


def ensure_demo_data(root: Optional[Path] = None) -> Path:
    """Generate the demo dataset unless a complete copy of this version is there. Writes into a
    temporary folder renamed at the end, so an interrupted run leaves nothing half-written."""
    root = Path(root or demo_root())
    stamp = root / "VERSION"
    if stamp.is_file() and stamp.read_text() == VERSION:
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, (num_images, seed) in SPLITS.items():
        generate_split(tmp, split, num_images, seed)
    (tmp / "VERSION").write_text(VERSION)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def register_demo(root: Optional[Path] = None) -> None:
    """``htc_demo_{train,val}``; the data is generated on first use, by the first process of
    each machine while the others wait for it."""
    base = Path(root or demo_root())
    for split in SPLITS:
        name = f"htc_demo_{split}"
        files = dict(
            json_file=str(base / f"{split}.json"),
            image_root=str(base / split),
            sem_seg_root=str(base / f"{split}_sem"),
        )

        def loader(name=name, files=files):
            if comm.get_local_rank() == 0:
                ensure_demo_data(base)
            comm.synchronize()
            return load_htc_json(dataset_name=name, **files)

        register_with_loader(
            name,
            loader,
            thing_classes=THING_CLASSES,
            stuff_classes=SEMANTIC_CLASSES,
            panoptic_root=str(base / f"{split}_panoptic"),
            panoptic_json=str(base / f"{split}_panoptic.json"),
            **PANOPTIC_IDS,
            **files,
        )
