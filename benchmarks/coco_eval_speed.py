"""COCO-style evaluation of a large generated set: pycocotools' COCOeval (pure Python loops)
beside faster-coco-eval's C++ COCOeval_faster, on the same ground truth and detections.

    .venv/bin/python benchmarks/coco_eval_speed.py [--images 3000] [--json FILE]

Ground truth: ``--images`` images of 640x480 with 5 to 15 instances each (80 categories, some
crowd), masks as ellipses in their boxes (RLE). Detections: each instance found once with
jittered box and mask and a random score, 60% of them, plus 5 false positives per image.
Both evaluators get the same pycocotools ``COCO`` objects, as Detectron2's COCOEvaluator builds
them; their 12 summary numbers are compared at the printed digits (3 decimals) and exactly.
"""

import argparse
import json
import time

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

WIDTH, HEIGHT, CATEGORIES = 640, 480, 80


def ellipse_rle(box) -> dict:
    """The ellipse inscribed in ``box`` (XYWH), as compressed RLE."""
    x, y, w, h = box
    x0, y0 = int(x), int(y)
    x1, y1 = min(WIDTH, int(np.ceil(x + w)) + 1), min(HEIGHT, int(np.ceil(y + h)) + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8, order="F")
    mask[y0:y1, x0:x1] = ((xx - x - w / 2) / (w / 2)) ** 2 + ((yy - y - h / 2) / (h / 2)) ** 2 <= 1
    rle = mask_util.encode(mask)
    rle["counts"] = rle["counts"].decode()
    return rle


def generate(num_images: int, seed: int = 0):
    """(ground truth dict, detections list)."""
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": WIDTH, "height": HEIGHT})
        for _ in range(rng.integers(5, 16)):
            w, h = rng.uniform(8, 200, 2)
            box = [rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h), w, h]
            rle = ellipse_rle(box)
            category = int(rng.integers(1, CATEGORIES + 1))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                "bbox": box, "area": float(mask_util.area(rle)), "segmentation": rle,
                "iscrowd": int(rng.random() < 0.02),
            })  # fmt: skip
            if rng.random() < 0.6:
                shift = rng.normal(0, 0.08, 2) * [w, h]
                found = [box[0] + shift[0], box[1] + shift[1], w * rng.uniform(0.85, 1.15),
                         h * rng.uniform(0.85, 1.15)]  # fmt: skip
                detections.append(_detection(image_id, category, found, rng))
        for _ in range(5):
            w, h = rng.uniform(8, 150, 2)
            box = [rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h), w, h]
            detections.append(_detection(image_id, int(rng.integers(1, CATEGORIES + 1)), box, rng))
    categories = [{"id": k, "name": str(k)} for k in range(1, CATEGORIES + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def _detection(image_id: int, category: int, box: list, rng) -> dict:
    x, y, w, h = box
    x, y = max(0.0, x), max(0.0, y)
    box = [x, y, min(w, WIDTH - x), min(h, HEIGHT - y)]
    return {"image_id": image_id, "category_id": category, "bbox": box,
            "score": float(rng.random()), "segmentation": ellipse_rle(box)}  # fmt: skip


def evaluate(evaluator_class, gt: COCO, dt: COCO, iou_type: str):
    """(summary stats, seconds) of evaluate + accumulate + summarize."""
    start = time.perf_counter()
    evaluator = evaluator_class(gt, dt, iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return np.asarray(evaluator.stats[:12]), time.perf_counter() - start, evaluator


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    from faster_coco_eval import COCOeval_faster

    start = time.perf_counter()
    dataset, detections = generate(args.images)
    print(f"generated {args.images} images, {len(dataset['annotations'])} instances, "
          f"{len(detections)} detections in {time.perf_counter() - start:.0f} s")  # fmt: skip
    gt = COCO()
    gt.dataset = dataset
    gt.createIndex()
    results = {}
    for iou_type in ("bbox", "segm"):
        dt = gt.loadRes(detections)
        reference, seconds, ref_eval = evaluate(COCOeval, gt, dt, iou_type)
        fast, fast_seconds, fast_eval = evaluate(COCOeval_faster, gt, dt, iou_type)
        precision = (ref_eval.eval["precision"], fast_eval.eval["precision"])
        results[iou_type] = {
            "pycocotools_s": round(seconds, 2), "faster_coco_eval_s": round(fast_seconds, 2),
            "speedup": round(seconds / fast_seconds, 1),
            "stats_equal_printed": bool(np.array_equal(reference.round(3), fast.round(3))),
            "stats_max_difference": float(np.abs(reference - fast).max()),
            "precision_shape_equal": precision[0].shape == precision[1].shape,
            "precision_max_difference": float(np.abs(precision[0] - precision[1]).max()),
            "AP": round(float(reference[0]) * 100, 3),
        }  # fmt: skip
        print(iou_type, results[iou_type])
    summary = {"images": args.images, "instances": len(dataset["annotations"]),
               "detections": len(detections), "results": results}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
