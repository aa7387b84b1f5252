"""Run a trained HTC over many images: COCO results, resumable, bad files skipped.

    python -m htc.predict --config-file configs/demo/htc_R_18_FPN_demo.yaml \\
        --input photos/ "more/*.jpg" --output predictions/ [--confidence-threshold 0.05] \\
        [--image-ids dataset.json] [--draw] [--semantic] [--panoptic] \\
        --opts MODEL.WEIGHTS model_final.pth

Inputs are image files, folders (searched recursively by extension) and glob patterns. Each
image's results are appended to ``OUTPUT/predictions.jsonl`` as soon as it is done, so a run
that is stopped loses at most the image in flight, and a second run with the same output skips
the images already there. At the end ``OUTPUT/coco_results.json`` holds every result in COCO's
results format (boxes XYWH, scores, masks as RLE, the training dataset's category ids) and
``OUTPUT/images.json`` the images' ids, file names and sizes. ``--semantic`` writes each
image's semantic labels to ``OUTPUT/semantic/ID.png`` (class indices, 8- or 16-bit);
``--panoptic`` its panoptic segmentation in COCO panoptic's format, ``OUTPUT/panoptic/ID.png``
(segment id = R + 256 G + 256^2 B, 0 = void) with ``OUTPUT/panoptic.json`` (the dataset's
category ids). An image that cannot be read is named in one warning and skipped; the summary
counts it.
"""

import argparse
import glob
import json
import logging
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils.logger import setup_logger
from PIL import Image
from tqdm import tqdm

from .config import set_float32_precision
from .data import register_builtin
from .demo import IMAGE_SUFFIXES, draw_prediction, load_predictor_cfg

logger = logging.getLogger("htc.predict")  # also when run as __main__
RECORDS = "predictions.jsonl"


def find_images(inputs: Iterable[str]) -> List[Path]:
    """The image files named by ``inputs``: files, folders (recursively, by extension) and glob
    patterns, sorted and each once. A file of another extension in a folder is left out; an
    input that names nothing raises FileNotFoundError naming it."""
    found = set()
    for item in inputs:
        matches = [Path(item)] if Path(item).exists() else []
        matches = matches or [Path(p) for p in sorted(glob.glob(item, recursive=True))]
        if not matches:
            raise FileNotFoundError(f"input not found: {item}")
        for path in matches:
            if path.is_dir():
                found.update(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            elif path.suffix.lower() in IMAGE_SUFFIXES or not glob.has_magic(item):
                found.add(path)
    if not found:
        raise FileNotFoundError(f"no images in {list(inputs)}")
    return sorted(found)


def read_or_warn(path: Path) -> Optional[np.ndarray]:
    """The (H, W, 3) BGR image at ``path``, or None after one warning naming it and why."""
    if path.stat().st_size == 0:
        reason = "empty file"
    else:
        try:
            return read_image(str(path), format="BGR")
        except (OSError, SyntaxError, ValueError) as error:  # what PIL raises for bad files
            reason = f"{type(error).__name__}: {error}"
    logger.warning(f"skipped {path}: {reason}")
    return None


def coco_results(outputs: dict, image_id: int, dataset_ids: Optional[Dict[int, int]]) -> list:
    """The image's instances in COCO's results format, with the dataset's category ids
    (contiguous ids where the metadata has no mapping, as COCOEvaluator writes them)."""
    instances = outputs["instances"].to("cpu")
    rles = instances.get("pred_masks_rle") if instances.has("pred_masks_rle") else None
    if rles is not None:
        instances.remove("pred_masks_rle")
    results = instances_to_coco_json(instances, image_id)
    for k, result in enumerate(results):
        if rles is not None:
            result["segmentation"] = rles[k]
        if dataset_ids is not None:
            result["category_id"] = dataset_ids[result["category_id"]]
    return results


def save_semantic(outputs: dict, target: Path) -> None:
    """The (K, H, W) ``sem_seg`` scores' argmax as a PNG of class indices."""
    labels = outputs["sem_seg"].argmax(dim=0).to("cpu").numpy()
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    Image.fromarray(labels.astype(dtype)).save(target)


def save_panoptic(outputs: dict, target: Path, metadata) -> List[dict]:
    """``panoptic_seg`` as a COCO panoptic PNG (segment id = R + 256 G + 256^2 B); its segments
    with the dataset's category ids."""
    segments, info = outputs["panoptic_seg"]
    ids = segments.to("cpu").numpy().astype(np.uint32)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 256**2 % 256], axis=-1)
    Image.fromarray(rgb.astype(np.uint8)).save(target)
    things = {v: k for k, v in metadata.thing_dataset_id_to_contiguous_id.items()}
    stuff = {v: k for k, v in metadata.stuff_dataset_id_to_contiguous_id.items()}
    return [
        {"id": int(s["id"]), "category_id": (things if s["isthing"] else stuff)[s["category_id"]],
         "iscrowd": 0, "area": int((ids == s["id"]).sum())} for s in info
    ]  # fmt: skip


def load_records(path: Path) -> List[dict]:
    """The records of an earlier run. A last line cut short by a kill is cut from the file (the
    next record would be appended to it) and its image is redone."""
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    if complete != text:
        logger.warning(f"{path}: an incomplete last line (a run stopped while writing) is redone")
        path.write_text(complete)
    return [json.loads(line) for line in complete.splitlines()]


def _dataset_category_ids(name: str) -> Optional[Dict[int, int]]:
    """Contiguous class id -> the dataset's category id, from the metadata of the dataset the
    config names, which Detectron2's COCO loader sets when the dataset is first loaded."""
    metadata = MetadataCatalog.get(name)
    if not metadata.get("thing_dataset_id_to_contiguous_id") and name in DatasetCatalog:
        try:
            DatasetCatalog.get(name)
        except (OSError, ValueError) as error:
            logger.warning(f"category ids are the model's contiguous ids: {name}: {error}")
    mapping = metadata.get("thing_dataset_id_to_contiguous_id")
    return {v: k for k, v in mapping.items()} if mapping else None


def image_ids(files: List[Path], done: List[dict], dataset_json: Optional[str]) -> Dict[str, int]:
    """Each file's image id: from ``dataset_json`` by file name where given (to score against
    its ground truth), else as an earlier run gave it, else the next free id."""
    if dataset_json:
        images = json.loads(Path(dataset_json).read_text())["images"]
        by_name = {Path(image["file_name"]).name: image["id"] for image in images}
        missing = [f for f in files if f.name not in by_name]
        if missing:
            raise ValueError(f"{len(missing)} images are not in {dataset_json}, e.g. {missing[0]}")
        return {str(f): by_name[f.name] for f in files}
    ids = {r["file_name"]: r["image_id"] for r in done}
    next_id = max(ids.values(), default=0) + 1
    for f in files:
        if str(f) not in ids:
            ids[str(f)], next_id = next_id, next_id + 1
    return ids


def predict(args: argparse.Namespace) -> dict:
    """Run the model over ``args.input`` into ``args.output``; the run's counts."""
    register_builtin()
    opts = list(args.opts)
    if args.confidence_threshold is not None:
        opts += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", str(args.confidence_threshold)]
    cfg = load_predictor_cfg(args.config_file, opts)
    _check_outputs(cfg, args)
    set_float32_precision(cfg)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    dataset_ids = _dataset_category_ids(metadata.name)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    wanted = {"pictures": args.draw, "semantic": args.semantic, "panoptic": args.panoptic}
    for folder in [name for name, on in wanted.items() if on]:
        (output / folder).mkdir(exist_ok=True)
    files = find_images(args.input)
    done = load_records(output / RECORDS)
    finished = {r["file_name"] for r in done}
    ids = image_ids(files, done, args.image_ids)
    todo = [f for f in files if str(f) not in finished]
    predictor = DefaultPredictor(cfg)
    with open(output / RECORDS, "a") as records:
        for path in tqdm(todo, unit="img", desc="htc.predict"):
            record = _predict_one(predictor, path, ids[str(path)], args, metadata, dataset_ids)
            records.write(json.dumps(record) + "\n")
            records.flush()
            os.fsync(records.fileno())
    wanted = {str(f) for f in files}
    records = [r for r in load_records(output / RECORDS) if r["file_name"] in wanted]
    return _write_results(output, records, len(todo))


def _check_outputs(cfg, args: argparse.Namespace) -> None:
    """A ValueError naming the config key when an asked output is one the model does not give."""
    htc = cfg.MODEL.HTC
    if args.semantic and not (htc.SEMANTIC_ON and htc.SEMANTIC_OUTPUT):
        raise ValueError("--semantic needs MODEL.HTC.SEMANTIC_ON and SEMANTIC_OUTPUT True")
    if args.panoptic and not htc.PANOPTIC_ON:
        raise ValueError("--panoptic needs MODEL.HTC.PANOPTIC_ON True")


def _predict_one(predictor, path: Path, image_id: int, args, metadata, dataset_ids) -> dict:
    """The record of one image: its id, size and COCO results, or ``skipped``."""
    record = {"file_name": str(path), "image_id": image_id}
    image = read_or_warn(path)
    if image is None:
        return dict(record, skipped=True)
    outputs = predictor(image)
    record.update(height=image.shape[0], width=image.shape[1])
    record["results"] = coco_results(outputs, image_id, dataset_ids)
    output = Path(args.output)
    if args.draw:
        threshold = 0.5 if args.confidence_threshold is None else args.confidence_threshold
        picture = draw_prediction(image[:, :, ::-1], outputs, metadata, threshold)
        Image.fromarray(picture).save(output / "pictures" / f"{image_id}.png")
    if args.semantic:
        save_semantic(outputs, output / "semantic" / f"{image_id}.png")
    if args.panoptic:
        target = output / "panoptic" / f"{image_id}.png"
        record["segments_info"] = save_panoptic(outputs, target, metadata)
    return record


def _write_results(output: Path, records: List[dict], ran: int) -> dict:
    """coco_results.json and images.json from every record; the counts of the run."""
    kept = [r for r in records if not r.get("skipped")]
    results = [result for r in kept for result in r["results"]]
    images = [
        {"id": r["image_id"], "file_name": r["file_name"], "height": r["height"],
         "width": r["width"]} for r in kept
    ]  # fmt: skip
    (output / "coco_results.json").write_text(json.dumps(results))
    (output / "images.json").write_text(json.dumps(images))
    panoptic = [
        {"image_id": r["image_id"], "file_name": f"{r['image_id']}.png",
         "segments_info": r["segments_info"]} for r in kept if "segments_info" in r
    ]  # fmt: skip
    if panoptic:
        (output / "panoptic.json").write_text(json.dumps({"annotations": panoptic}))
    counts = {"images": len(kept), "skipped": len(records) - len(kept), "this run": ran}
    counts["results"] = len(results)
    logger.info(f"done: {counts} -> {output / 'coco_results.json'}")
    return counts


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", nargs="+", required=True, help="files, folders, globs")
    parser.add_argument("--output", required=True, help="folder of the results")
    parser.add_argument(
        "--confidence-threshold", type=float, help="MODEL.ROI_HEADS.SCORE_THRESH_TEST"
    )
    parser.add_argument("--image-ids", help="a COCO json whose image ids the results take")
    parser.add_argument("--draw", action="store_true", help="also write pictures")
    parser.add_argument("--semantic", action="store_true", help="also write semantic PNGs")
    parser.add_argument("--panoptic", action="store_true", help="also write panoptic PNGs")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE pairs")
    setup_logger(name="htc")
    return predict(parser.parse_args(argv))


if __name__ == "__main__":
    main()
