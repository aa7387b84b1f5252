"""The output folder of ``htc.predict``: the records each process appends to, the markers and
the lock that keep a later run consistent with the results there (where their image ids come
from, what they were predicted with, one run at a time), the images' ids, and the merged files
written from the records (``coco_results.json``, ``images.json``, ``panoptic.json``, each
video's json)."""

import contextlib
import errno
import hashlib
import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

from detectron2.config import CfgNode
from detectron2.utils import comm

from .checkpoint import atomic_open
from .data.inputs import is_video
from .demo import path_hash

logger = logging.getLogger("htc.predict")
RECORDS = "predictions.jsonl"
ID_SOURCE = "image_ids.json"  # where the output's image ids come from
SETTINGS = "settings.json"  # what the output's results were predicted with
LOCK = ".predict.lock"  # held by the first process of the run that writes into the output
LVIS_IMAGE_KEYS = {"not_exhaustive_category_ids", "neg_category_ids"}  # of LVIS's image entries
# MODEL keys that do not change an image's results: where the model runs, the kernels (the same
# results by each), how masks are held, how weights are loaded; MODEL.WEIGHTS counts by content.
UNSETTLED = (
    "MODEL.DEVICE", "MODEL.WEIGHTS", "MODEL.HTC.ROI_ALIGN", "MODEL.HTC.DEFORM_CONV",
    "MODEL.HTC.MASK_OUTPUT", "MODEL.HTC.SKIP_MISMATCHED_WEIGHTS",
)  # fmt: skip
# the other keys that do
RESULT_KEYS = (
    "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST", "INPUT.FORMAT", "TEST.DETECTIONS_PER_IMAGE",
    "DATASETS.TEST",
)  # fmt: skip


def records_file(output: Path, rank: int) -> Path:
    """The records that process ``rank`` appends to."""
    return output / (RECORDS if rank == 0 else RECORDS.replace(".jsonl", f".{rank}.jsonl"))


def load_records(output: Path, repair: bool = False) -> List[dict]:
    """The records of earlier runs, from every process's file. A last line cut short by a kill
    is cut from its file where ``repair`` (the next record would be appended to it) and its
    input is redone; without ``repair`` it is only left out. Another line that is not JSON
    raises ValueError naming it. Relative file names (of versions before inputs were absolute)
    are taken from the working folder, as those runs took them."""
    records = []
    for path in sorted(output.glob(RECORDS.replace(".jsonl", "*.jsonl"))):
        text = path.read_text()
        complete = text[: text.rfind("\n") + 1]
        if complete != text and repair:
            logger.warning(f"{path}: an incomplete last line (a stopped run's) is redone")
            os.truncate(path, len(complete.encode()))
        records += [_record_of(line, path, n) for n, line in enumerate(complete.splitlines(), 1)]
    return records


def _record_of(line: str, path: Path, number: int) -> dict:
    """The record of line ``number`` of ``path``, its file name made absolute."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}, line {number}, is not a record ({error}): remove the line to redo its "
            "input, or predict into another output folder"
        ) from None
    record["file_name"] = os.path.abspath(record["file_name"])
    return record


@contextlib.contextmanager
def exclusive(output: Path) -> Iterator[None]:
    """Hold ``output``'s lock: a second run writing into it at the same time would record its
    images twice. RuntimeError where another process holds it. A POSIX lock (``lockf``): the
    data-loader workers, forked with its file open, do not hold it, so a killed run's workers
    that outlive it briefly do not keep the next run out. Where the file system or the system
    has no such locks, a warning says the run goes on unguarded."""
    output.mkdir(parents=True, exist_ok=True)
    with open(output / LOCK, "a") as lock:
        try:
            import fcntl  # POSIX only

            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0, os.SEEK_SET)  # the whole file
        except (ImportError, OSError) as error:
            if getattr(error, "errno", None) in (errno.EACCES, errno.EAGAIN):
                raise RuntimeError(
                    f"another htc.predict is writing into {output}: let it end, or predict "
                    "into another output folder"
                ) from None
            logger.warning(f"{output} cannot be locked ({error!r}): run one htc.predict at a time")
        yield


def check_id_source(output: Path, dataset_json: Optional[str], done: List[dict]) -> None:
    """Where the image ids come from (``--image-ids``' json, or numbered by the runs) must be
    where the output's results took theirs from (OUTPUT/image_ids.json): a run without
    ``--image-ids`` after one with it would number new images over the dataset's ids. A
    ValueError names both (see :func:`_recorded` for outputs without the record)."""
    source = {"image_ids": str(Path(dataset_json).resolve()) if dataset_json else None}
    earlier = _recorded(output / ID_SOURCE, source, done)
    if earlier != source:
        raise ValueError(
            f"{output} holds results with {_ids_of(earlier)}, and this run's would have "
            f"{_ids_of(source)}: give the --image-ids of the runs before, or another output "
            "folder"
        )


def _recorded(marker: Path, current: dict, done: List[dict]) -> dict:
    """What the file ``marker`` records of the output's results (the records ``done``), to
    compare with this run's ``current``. An output without results yet records ``current``
    (the first process writes it, whole or not at all) and gives it back; so do the results of
    versions before the marker, which are not checked."""
    if any("results" in r for r in done):
        return json.loads(marker.read_text()) if marker.exists() else current
    if comm.is_main_process():
        with atomic_open(str(marker), "w") as f:
            json.dump(current, f)
    return current


def _ids_of(source: dict) -> str:
    return f"the image ids of {source['image_ids']}" if source["image_ids"] else "numbered ids"


def run_settings(cfg: CfgNode) -> Dict[str, object]:
    """What an image's results depend on, by key: the model's config (MODEL but
    :data:`UNSETTLED`), the test-time input sizes and format, the detections per image, the
    dataset whose category ids the results take, and the weights: by their content where
    MODEL.WEIGHTS is a file, else by their name (a URL)."""
    flat = dict(_flattened(cfg))
    settings = {k: v for k, v in flat.items() if k.startswith("MODEL.") and k not in UNSETTLED}
    settings.update((k, flat[k]) for k in RESULT_KEYS)
    digest = _sha256(cfg.MODEL.WEIGHTS)
    if digest is None:
        settings["MODEL.WEIGHTS"] = cfg.MODEL.WEIGHTS
    else:
        settings["MODEL.WEIGHTS sha256"] = digest
    return json.loads(json.dumps(settings))  # tuples as lists, as read back


def _flattened(node: dict, prefix: str = "") -> Iterator[Tuple[str, object]]:
    """(dotted key, value) of each leaf of the nested config ``node``."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _flattened(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _sha256(path: str) -> Optional[str]:
    """The sha256 of the file ``path``, or None where it is none (no weights, or a URL)."""
    if not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_settings(output: Path, settings: Dict[str, object], done: List[dict]) -> None:
    """This run's :func:`run_settings` must be those of the output's results
    (OUTPUT/settings.json): another threshold, config or weights would mix two models' results
    in one file. A ValueError names what differs. The keys that only one side has (a config key
    of another HTC or Detectron2 version) are not compared, but the weights' (a file against a
    URL). See :func:`_recorded` for outputs without the record."""
    earlier = _recorded(output / SETTINGS, settings, done)
    weights = {"MODEL.WEIGHTS", "MODEL.WEIGHTS sha256"}
    compared = (set(earlier) & set(settings)) | (weights & (set(earlier) | set(settings)))
    changed = [k for k in sorted(compared) if earlier.get(k) != settings.get(k)]
    if changed:
        named = "; ".join(f"{k} {earlier.get(k)!r} then, {settings.get(k)!r} now" for k in changed)
        raise ValueError(
            f"{output} holds results predicted with other settings ({named}): predict into "
            "another output folder, or with the settings of the runs before"
        )


def image_ids(files: List[Path], done: List[dict], dataset_json: Optional[str]) -> Dict[str, int]:
    """Each image file's id: from ``dataset_json`` where given (to score against its ground
    truth; see :func:`dataset_image_ids`), else as an earlier run gave it, else the next free
    id. An earlier run's results under other ids than ``dataset_json``'s raise ValueError."""
    images = [f for f in files if not is_video(f)]
    ids = {r["file_name"]: r["image_id"] for r in done if "image_id" in r and "frame" not in r}
    if dataset_json:
        wanted = dataset_image_ids(images, dataset_json)
        for record in done:
            name = record["file_name"]
            if "results" in record and name in wanted and ids[name] != wanted[name]:
                raise ValueError(
                    f"{name}: its results in the output have image id {ids[name]}, not "
                    f"{wanted[name]} of {dataset_json}: predict into another output folder"
                )
        return wanted
    next_id = max(ids.values(), default=0) + 1
    for f in images:
        if str(f) not in ids:
            ids[str(f)], next_id = next_id, next_id + 1
    return ids


def dataset_image_ids(images: List[Path], dataset_json: str) -> Dict[str, int]:
    """Each image file's id in the COCO json ``dataset_json``: that of the entry of its name
    whose path (:func:`_entry_parts`) ends the file's path, the longest such; else the entry that
    shares the longest ending with it (``data/cam1/001.jpg`` takes ``cam1/001.jpg``, or
    ``/elsewhere/cam1/001.jpg``, over ``cam2/001.jpg``). ValueError names an image that no entry
    or two entries alike match, or two images that match one entry."""
    entries = defaultdict(list)
    for image in _json_images(dataset_json):
        parts = _entry_parts(image, dataset_json)
        entries[parts[-1]].append((parts, image["id"]))
    ids, owner = {}, {}
    for f in images:
        path = Path(os.path.abspath(f)).parts
        matches = sorted(
            ((_common_ending(path, p), i, p) for p, i in entries.get(f.name, [])), reverse=True
        )
        if not matches:
            raise ValueError(f"{f} is not an image of {dataset_json}")
        if len(matches) > 1 and matches[0][0] == matches[1][0]:
            names = [str(Path(*m[2])) for m in matches[:2]]
            raise ValueError(f"{f} matches two images of {dataset_json} alike: {names}")
        _, image_id, parts = matches[0]
        if image_id in owner:
            raise ValueError(
                f"{owner[image_id]} and {f} both match image {image_id} ({Path(*parts)}) of "
                f"{dataset_json}: give one of them as input"
            )
        ids[str(f)], owner[image_id] = image_id, f
    return ids


def _entry_parts(image: dict, dataset_json: str) -> Tuple[str, ...]:
    """The path parts of an image entry of ``dataset_json``: for LVIS's entries (v1 has no
    ``file_name``; v0.5's names the 2014 file) the split folder and name that end its
    ``coco_url``, as Detectron2's LVIS loader reads them (``.../val2017/000000000139.jpg``:
    ``val2017``, ``000000000139.jpg``); else its ``file_name``, as Detectron2's COCO loader."""
    lvis = "coco_url" in image and ("file_name" not in image or LVIS_IMAGE_KEYS & image.keys())
    if lvis:
        return tuple(image["coco_url"].split("/")[-2:])
    if "file_name" in image:
        return Path(image["file_name"]).parts
    raise ValueError(
        f"--image-ids {dataset_json}: image {image.get('id')} has no 'file_name' (nor LVIS's "
        "'coco_url') to match the input files by: give each image its file name"
    )


def dataset_image_sizes(dataset_json: str) -> Dict[int, Tuple[int, int]]:
    """Image id -> (height, width) of the entries of the COCO json ``dataset_json`` that give
    both."""
    return {
        image["id"]: (image["height"], image["width"])
        for image in _json_images(dataset_json)
        if "height" in image and "width" in image
    }


def _json_images(dataset_json: str) -> List[dict]:
    """The "images" of the COCO json ``dataset_json``; ValueError naming the file where it is
    not one."""
    try:
        images = json.loads(Path(dataset_json).read_text())["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"--image-ids {dataset_json}: not a COCO json with 'images' ({error!r})"
        ) from None
    return images


def _common_ending(path: Tuple[str, ...], entry: Tuple[str, ...]) -> Tuple[bool, int]:
    """Whether ``entry`` ends ``path`` (all its parts alike), and how many parts they end with
    alike."""
    count = 0
    while count < min(len(path), len(entry)) and path[-1 - count] == entry[-1 - count]:
        count += 1
    return count == len(entry), count


def video_names(files: List[Path]) -> Dict[str, str]:
    """Each video's name in OUTPUT/videos: its stem and a hash of its absolute path, the same in
    every run whatever else the inputs are."""
    return {str(path): f"{path.stem}_{path_hash(path)}" for path in filter(is_video, files)}


def write_results(output: Path, files: List[Path], records: List[dict], ran: int) -> dict:
    """coco_results.json, images.json, panoptic.json (removed where none of the inputs has
    panoptic results) and each video's json from the records of ``files``, this run's inputs;
    a warning counts the inputs that earlier runs predicted and these files leave out. The
    counts of the run."""
    wanted = {str(f) for f in files}
    _warn_of_left_out(output, finished_inputs(records) - wanted)
    records = [r for r in records if r["file_name"] in wanted]
    kept = sorted(
        (r for r in records if "results" in r and "frame" not in r), key=lambda r: r["image_id"]
    )
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
    else:  # an earlier run's, of other inputs
        (output / "panoptic.json").unlink(missing_ok=True)
    frames = _write_video_results(output, files, records)
    skipped = sorted(_still_skipped(records))
    counts = {"images": len(kept), "skipped": len(skipped), "this run": ran}
    counts.update(results=len(results), videos=len(video_names(files)), frames=frames)
    logger.info(f"done: {counts} -> {output / 'coco_results.json'}")
    if skipped:
        logger.warning(f"{len(skipped)} inputs could not be read, e.g. {skipped[0]}")
    return counts


def _warn_of_left_out(output: Path, left_out: Set[str]) -> None:
    """Name how many inputs done in ``output`` are not this run's (left out of its merged
    files), and how to merge them."""
    if left_out:
        logger.warning(
            f"{len(left_out)} inputs that earlier runs predicted into {output} are not inputs of "
            f"this run (e.g. {min(left_out)}): coco_results.json, images.json and panoptic.json "
            "hold this run's inputs only; run with all the inputs to merge them (what is done "
            "is not predicted again)"
        )


def finished_inputs(records: List[dict]) -> Set[str]:
    """The inputs done: the images whose results and the videos whose end are recorded. An
    input skipped (unreadable) is not: each run reads it again, as it may have been mended."""
    return {
        r["file_name"] for r in records if ("results" in r and "frame" not in r) or "frames" in r
    }


def _still_skipped(records: List[dict]) -> Set[str]:
    """The inputs skipped by a run and not predicted by a later one."""
    return {r["file_name"] for r in records if "skipped" in r} - finished_inputs(records)


def _write_video_results(output: Path, files: List[Path], records: List[dict]) -> int:
    """OUTPUT/videos/NAME.json (COCO results, image id = frame index) for each video with
    predicted frames; how many frames they have."""
    by_video = defaultdict(list)
    for record in records:
        if "frame" in record:
            by_video[record["file_name"]].append(record)
    for video, name in video_names(files).items():
        frames = sorted(by_video.get(video, []), key=lambda r: r["frame"])
        if frames:
            results = [result for r in frames for result in r["results"]]
            (output / "videos" / f"{name}.json").write_text(json.dumps(results))
    return sum(map(len, by_video.values()))
