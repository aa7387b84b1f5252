"""Run a trained HTC over many images and videos: COCO results, resumable, bad files skipped,
batched through a data loader, on many GPUs or CPU processes.

    python -m htc.predict --config-file configs/demo/htc_R_18_FPN_demo.yaml \\
        --input photos/ "more/*.jpg" clip.mp4 --output predictions/ \\
        [--confidence-threshold 0.05] [--image-ids dataset.json] [--draw] [--semantic] \\
        [--panoptic] [--batch-size 4] [--workers 2] [--num-gpus 8] \\
        --opts MODEL.WEIGHTS model_final.pth

Inputs are image and video files, folders (searched recursively by extension, through links to
folders) and glob patterns.
Each batch's results are appended to ``OUTPUT/predictions.jsonl`` (``predictions.R.jsonl`` for
process R > 0) as soon as it is done, so a run that is stopped loses at most the batch in flight,
and a second run with the same output skips what is already there (a run with other settings or
weights, or while another writes into it, is refused). At the end ``OUTPUT/coco_results.json``
holds every input image's results in COCO's results format (boxes XYWH, scores, masks as RLE, the
category ids of the dataset DATASETS.TEST[0] names), ``OUTPUT/images.json`` the images' ids, file
names and sizes, and ``OUTPUT/videos/NAME.json`` each video's results, whose image ids are frame
indices. ``--draw`` writes ``OUTPUT/pictures/ID.png`` and ``OUTPUT/videos/NAME.mp4``;
``--semantic`` each image's semantic labels to ``OUTPUT/semantic/ID.png`` (class indices, 8- or
16-bit); ``--panoptic`` its panoptic segmentation in COCO panoptic's format,
``OUTPUT/panoptic/ID.png`` (segment id = R + 256 G + 256^2 B, 0 = void) with
``OUTPUT/panoptic.json`` (the dataset's category ids). An input that cannot be read is named in one
warning and skipped; the summary counts it.
"""

import argparse
import datetime
import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.distributed as dist
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from PIL import Image
from tqdm import tqdm

from .checkpoint import load_weights
from .config import set_float32_precision
from .data import register_builtin
from .data.checks import check_thing_classes
from .data.inputs import PredictionInputs, find_inputs, frame_count, inputs_loader, is_video
from .demo import (
    check_serving_cfg,
    draw_prediction,
    drawing_metadata,
    load_predictor_cfg,
    with_threshold,
)
from .distributed import add_timeout_argument, launch_from_args
from .prediction_output import (
    check_id_source,
    check_settings,
    dataset_image_sizes,
    exclusive,
    finished_inputs,
    image_ids,
    load_records,
    records_file,
    run_settings,
    video_names,
    write_results,
)
from .video import write_drawn_video

logger = logging.getLogger("htc.predict")  # also when run as __main__
PNG_FOLDERS = ("pictures", "semantic", "panoptic")  # --draw, --semantic, --panoptic: PNG per image
OUTPUT_FOLDERS = (*PNG_FOLDERS, "videos")  # of images and videos written
MARKER = ".htc_predict"  # in each of those that a run made: not the user's, not inputs


def coco_results(outputs: dict, image_id: int, dataset_ids: Optional[Dict[int, int]]) -> list:
    """The image's instances in COCO's results format, with the dataset's category ids
    (``dataset_ids``, :func:`_dataset_category_ids`; None: the contiguous ids)."""
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


def _dataset_category_ids(cfg) -> Optional[Dict[int, int]]:
    """Contiguous class id -> the category id of the dataset the config names (DATASETS.TEST[0];
    None without one), from its metadata, which Detectron2's COCO loader sets when the dataset
    is first loaded. A dataset that is not registered in this process, or whose class count is
    not the model's, raises ValueError."""
    if not cfg.DATASETS.TEST:
        return None
    name = cfg.DATASETS.TEST[0]
    if name not in DatasetCatalog:
        raise ValueError(
            f"DATASETS.TEST[0] {name!r}, whose category ids the results take, is not registered "
            "in this process: register it and call htc.predict.main from your script (as "
            "docs/datasets.md's wrapper does for train_net.py), or set DATASETS.TEST () for the "
            "model's contiguous class ids"
        )
    metadata = MetadataCatalog.get(name)
    if _contiguous_to_dataset_ids(metadata) is None:  # Detectron2's COCO loader sets a mapping
        try:
            DatasetCatalog.get(name)
        except (OSError, ValueError) as error:
            logger.warning(f"category ids are the model's contiguous ids: {name}: {error}")
    check_thing_classes(name, cfg.MODEL.ROI_HEADS.NUM_CLASSES, "MODEL.ROI_HEADS.NUM_CLASSES")
    return _contiguous_to_dataset_ids(metadata)


def _contiguous_to_dataset_ids(metadata: Metadata) -> Optional[Dict[int, int]]:
    """Contiguous class id -> dataset category id, as Detectron2's evaluators write results:
    ``thing_dataset_id_to_contiguous_id`` inverted; for LVIS ("lvis" ``evaluator_type``), which
    has none (Detectron2's loader numbers LVIS's category ids 1..K from 0), the class + 1,
    as LVISEvaluator adds; else None (the contiguous ids, as COCOEvaluator keeps them)."""
    mapping = metadata.get("thing_dataset_id_to_contiguous_id")
    if mapping:
        return {v: k for k, v in mapping.items()}
    if metadata.get("evaluator_type") == "lvis":
        return {k: k + 1 for k in range(len(metadata.get("thing_classes") or ()))}
    return None


def predict(args: argparse.Namespace) -> Optional[dict]:
    """Run the model over ``args.input`` into ``args.output``: the run's counts, or None where
    several processes ran it (the first logs them)."""
    if args.num_gpus * args.num_machines == 1:
        return predict_process(args)
    launch_from_args(_logged_predict_process, args)
    return None


def _logged_predict_process(args: argparse.Namespace) -> None:
    setup_logger(name="htc")  # in every process: each names the inputs it skips
    predict_process(args)


def predict_process(args: argparse.Namespace) -> Optional[dict]:
    """One process's share of :func:`predict`; the counts on the first process, which holds the
    output's lock for the run. What can be refused without the output is refused first."""
    register_builtin()
    cfg = _config(args)
    dataset_ids = _dataset_category_ids(cfg)
    output = Path(args.output)
    files = find_inputs(args.input, exclude=_made_folders(output))
    _check_outputs(cfg, args, files)
    _check_not_users(output, _asked_folders(args, files))
    comm.synchronize()  # every process checked before the first makes the folders
    if not comm.is_main_process():
        return _predict_into(cfg, args, files, dataset_ids)
    with exclusive(output):
        return _predict_into(cfg, args, files, dataset_ids)


def _predict_into(
    cfg: CfgNode, args: argparse.Namespace, files: List[Path], dataset_ids: Optional[Dict]
) -> Optional[dict]:
    """:func:`predict_process` once the output is this run's."""
    output = Path(args.output)
    if comm.is_main_process():
        output.mkdir(parents=True, exist_ok=True)
        for name in _asked_folders(args, files):
            (output / name).mkdir(exist_ok=True)
            (output / name / MARKER).touch()
        load_records(output, repair=True)
    comm.synchronize()
    done = load_records(output)
    comm.synchronize()  # every process has read the records before any is appended
    if comm.is_main_process():
        _warn_of_outputs_not_asked_then(output, done, args)
    shard, done_frames = _plan(files, done, args.image_ids)
    check_id_source(output, args.image_ids, done)
    check_settings(output, run_settings(cfg), done)
    model = build_model(cfg).eval()
    load_weights(model, cfg, announce=logger.warning)
    metadata = drawing_metadata(cfg)  # after the build, which sets default panoptic categories
    rank, world = comm.get_rank(), comm.get_world_size()
    patient = _patient_group() if world > 1 else None
    share = shard[rank::world]
    ran = _predict_share(model, cfg, args, share, done_frames, metadata, dataset_ids)
    if patient is not None:
        counts = [0] * world
        dist.all_gather_object(counts, ran, group=patient)  # also waits for every share
        ran = sum(counts)
    if args.draw:  # every frame is recorded now, whichever process predicted it
        mine = [f for f in files[rank::world] if is_video(f)]
        names, records = video_names(files), load_records(output)
        _draw_videos(mine, names, records, args, metadata, dataset_ids, args.draw_threshold)
    if not comm.is_main_process():
        return None
    return write_results(output, files, load_records(output), ran)


def _patient_group():
    """A gloo group for the wait at the end: the shares are uneven (a video goes whole to one
    process), and the default group's timeout (--dist-timeout) would end a long one."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))


def _config(args: argparse.Namespace):
    cfg = load_predictor_cfg(args.config_file, with_threshold(args.opts, args.confidence_threshold))
    check_serving_cfg(cfg)
    set_float32_precision(cfg)
    if cfg.MODEL.DEVICE == "cpu" and comm.get_local_size() > 1:  # the cores shared, not contended
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))
    return cfg


def _asked_pngs(args: argparse.Namespace) -> Dict[str, bool]:
    """Each folder of PNGs per image: whether it is asked."""
    return dict(zip(PNG_FOLDERS, (args.draw, args.semantic, args.panoptic)))


def _asked_folders(args: argparse.Namespace, files: List[Path]) -> List[str]:
    """The folders of :data:`OUTPUT_FOLDERS` that this run writes into."""
    asked = dict(_asked_pngs(args), videos=any(map(is_video, files)))
    return [name for name, on in asked.items() if on]


def _made_folders(output: Path) -> List[Path]:
    """The folders of :data:`OUTPUT_FOLDERS` in ``output`` that runs made: with :data:`MARKER`,
    or beside records (an htc.predict before the marker made them). Their pictures are no
    inputs of the next run, where the output lies in an input folder."""
    recorded = records_file(output, 0).exists()
    return [
        output / name
        for name in OUTPUT_FOLDERS
        if (output / name / MARKER).exists() or (recorded and (output / name).is_dir())
    ]


def _check_not_users(output: Path, names: List[str]) -> None:
    """A ValueError naming a folder ``output/NAME`` to write into that exists without
    :data:`MARKER`: the user's own (the output being an input folder), whose files would be
    overwritten."""
    made = _made_folders(output)
    for name in names:
        folder = output / name
        if folder.exists() and folder not in made:
            raise ValueError(
                f"{folder} exists and no htc.predict made it (it has no {MARKER}, and {output} "
                "no records): its files would be overwritten; move it or predict into another "
                "output folder"
            )


def _warn_of_outputs_not_asked_then(output: Path, done: List[dict], args) -> None:
    """Name the PNGs asked now that images done by earlier runs lack: those are not redone."""
    images = [r for r in done if "results" in r and "frame" not in r]
    lacking = {}
    for name in (name for name, on in _asked_pngs(args).items() if on):
        missing = sum(not (output / name / f"{r['image_id']}.png").exists() for r in images)
        if missing:
            lacking[name] = missing
    if lacking:
        logger.warning(
            f"images that earlier runs predicted into {output} lack these outputs, which are "
            f"not made for them now: {lacking}; predict into another output folder for them"
        )


def _check_outputs(cfg, args: argparse.Namespace, files: List[Path]) -> None:
    """A ValueError naming the config key when an asked output is one the model does not give,
    or naming a video where PNGs per image are asked; a draw threshold that is no score."""
    htc = cfg.MODEL.HTC
    if args.semantic and not (htc.SEMANTIC_ON and htc.SEMANTIC_OUTPUT):
        raise ValueError("--semantic needs MODEL.HTC.SEMANTIC_ON and SEMANTIC_OUTPUT True")
    if args.panoptic and not htc.PANOPTIC_ON:
        raise ValueError("--panoptic needs MODEL.HTC.PANOPTIC_ON True")
    if not 0 <= args.draw_threshold <= 1:
        raise ValueError(f"--draw-threshold {args.draw_threshold}: a score, in [0, 1]")
    videos = [f for f in files if is_video(f)]
    if (args.semantic or args.panoptic) and videos:
        raise ValueError(f"--semantic and --panoptic write PNGs of images, not of videos: {videos}")


def _plan(
    files: List[Path], done: List[dict], dataset_json: Optional[str]
) -> Tuple[List[Tuple[Path, int]], Dict[str, Set[int]]]:
    """The inputs still to do with their image ids (-1 for a video), and each video's frames
    that are done (see :func:`finished_inputs`: what an earlier run skipped is read again)."""
    finished = finished_inputs(done)
    done_frames = defaultdict(set)
    for record in done:
        if "frame" in record:
            done_frames[record["file_name"]].add(record["frame"])
    ids = image_ids(files, done, dataset_json)
    todo = [(f, ids.get(str(f), -1)) for f in files if str(f) not in finished]
    return todo, dict(done_frames)


def _predict_share(
    model: torch.nn.Module,
    cfg: CfgNode,
    args: argparse.Namespace,
    share: List[Tuple[Path, int]],
    done_frames: Dict[str, Set[int]],
    metadata: Metadata,
    dataset_ids: Optional[Dict[int, int]],
) -> int:
    """Predict ``share`` with ``model`` in batches, appending each batch's records as soon as it
    is done: how many images and frames were read."""
    sizes = dataset_image_sizes(args.image_ids) if args.image_ids else None
    inputs = PredictionInputs(
        share, done_frames, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, cfg.INPUT.FORMAT,
        keep_original=args.draw, sizes=sizes,
    )  # fmt: skip
    total = sum(max(frame_count(f), 1) if is_video(f) else 1 for f, _ in share)
    bar = tqdm(total=total, unit="img", desc="htc.predict", disable=not comm.is_main_process())
    ran = 0
    with open(records_file(Path(args.output), comm.get_rank()), "a") as records, bar:
        for batch in inputs_loader(inputs, args.batch_size, args.workers):
            lines = _predict_batch(model, batch, args, metadata, dataset_ids, args.draw_threshold)
            records.write("".join(json.dumps(line) + "\n" for line in lines))
            records.flush()
            os.fsync(records.fileno())
            read = sum("frames" not in item for item in batch)
            bar.update(read)
            ran += read
    return ran


@torch.inference_mode()
def _predict_batch(
    model, batch: List[dict], args, metadata, dataset_ids, threshold: float
) -> List[dict]:
    """The records of a batch of items (see :mod:`htc.data.inputs`), one per item."""
    ready = [item for item in batch if "image" in item]
    inputs = [{k: item[k] for k in ("image", "height", "width")} for item in ready]
    outputs = model(inputs) if inputs else []
    by_item = {id(item): output for item, output in zip(ready, outputs)}
    return [
        _record(item, by_item.get(id(item)), args, metadata, dataset_ids, threshold)
        for item in batch
    ]


def _record(
    item: dict, outputs: Optional[dict], args, metadata, dataset_ids, threshold: float
) -> dict:
    """An item's record: its results, with its PNGs written where asked (its picture drawing
    the instances scored above ``threshold``), or what it is."""
    keys = ("file_name", "image_id", "frame", "frames", "skipped")
    record = {k: item[k] for k in keys if k in item}
    if "skipped" in item:
        logger.warning(f"skipped {item['file_name']}: {item['skipped']}")
    if outputs is None:
        return record
    record.update(height=item["height"], width=item["width"])
    record["results"] = coco_results(outputs, item["image_id"], dataset_ids)
    if "frame" in item:
        return record
    output, name = Path(args.output), f"{item['image_id']}.png"
    if args.draw:
        picture = draw_prediction(item["original"], outputs, metadata, threshold)
        Image.fromarray(picture).save(output / "pictures" / name)
    if args.semantic:
        save_semantic(outputs, output / "semantic" / name)
    if args.panoptic:
        record["segments_info"] = save_panoptic(outputs, output / "panoptic" / name, metadata)
    return record


def _draw_videos(
    videos: Sequence[Path], names: Dict[str, str], records, args, metadata, ids, threshold: float
) -> None:
    """OUTPUT/videos/NAME.mp4 for each finished video of ``videos`` not drawn yet."""
    ended = {r["file_name"] for r in records if "frames" in r}
    contiguous = {v: k for k, v in ids.items()} if ids else None
    for video in videos:
        target = Path(args.output) / "videos" / f"{names[str(video)]}.mp4"
        if str(video) in ended and not target.exists():
            frames = {
                r["frame"]: r["results"]
                for r in records
                if "frame" in r and r["file_name"] == str(video)
            }
            write_drawn_video(video, frames, target, metadata, threshold, contiguous)


def main(argv: Optional[List[str]] = None) -> Optional[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", nargs="+", required=True, help="files, folders, globs")
    parser.add_argument("--output", required=True, help="folder of the results")
    parser.add_argument(
        "--confidence-threshold", type=float, help="MODEL.ROI_HEADS.SCORE_THRESH_TEST"
    )
    parser.add_argument("--image-ids", help="a COCO json whose image ids the results take")
    parser.add_argument("--draw", action="store_true", help="also write pictures and videos")
    parser.add_argument(
        "--draw-threshold", type=float, default=0.5,
        help="the score above which pictures and videos show a result (the results keep what "
        "--confidence-threshold keeps)",
    )  # fmt: skip
    parser.add_argument("--semantic", action="store_true", help="also write semantic PNGs")
    parser.add_argument("--panoptic", action="store_true", help="also write panoptic PNGs")
    parser.add_argument("--batch-size", type=int, default=1, help="images per model call")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes per process")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument("--dist-url", default="auto", help="tcp://HOST:PORT of machine 0")
    add_timeout_argument(parser)
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE pairs")
    setup_logger(name="htc")
    return predict(parser.parse_args(argv))


if __name__ == "__main__":
    main()
