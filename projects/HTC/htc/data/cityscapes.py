"""Cityscapes for HTC: the fine instance annotations (8 thing classes) joined, image by image,
with the 19-class train-id label maps of the same images for the semantic branch. Both come
from Detectron2's own loader and metadata; the evaluators are Detectron2's Cityscapes instance
and semantic ones (cityscapesscripts underneath).

Layout under $DETECTRON2_DATASETS, as Cityscapes ships it plus cityscapesscripts' train-id maps::

    cityscapes/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    cityscapes/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_{polygons.json,
        instanceIds.png,labelIds.png,labelTrainIds.png}
"""

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Dict, List, Optional

from detectron2.data.datasets.builtin_meta import CITYSCAPES_CATEGORIES, _get_builtin_metadata

from .register import datasets_root, register_with_loader

SPLITS = ("train", "val")
IMAGE_SUFFIX = "_leftImg8bit.png"
TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"
# Each frame's ground truth: what Detectron2's loader reads, what the instance and pixel
# evaluators read (they find it by globbing gtFine), and the semantic branch's map.
GROUND_TRUTH_SUFFIXES = (
    "_gtFine_polygons.json", "_gtFine_instanceIds.png", "_gtFine_labelIds.png", TRAIN_ID_SUFFIX,
)  # fmt: skip
# Where Detectron2's main branch (2026-06) imports cityscapesscripts from: a path inside Meta
# that no installed package provides (facebookresearch/detectron2#5436). v0.6 imports
# ``cityscapesscripts`` itself.
_META_PATH = "deeplearning.projects.cityscapesApi.cityscapesscripts"
_DETECTRON2_IMPORTS = (
    "helpers.labels",
    "evaluation.evalInstanceLevelSemanticLabeling",
    "evaluation.evalPixelLevelSemanticLabeling",
)


def alias_cityscapesscripts() -> None:
    """Make the installed ``cityscapesscripts`` importable under the path Detectron2's main
    branch imports it from, unless a package of that path exists. Its loader's worker
    processes inherit the alias where they are forked (Linux's default before Python 3.14)."""
    try:
        package = importlib.import_module("cityscapesscripts")
    except ImportError as e:
        raise ImportError(
            "Cityscapes' loaders and evaluators need cityscapesscripts: pip install "
            "cityscapesscripts==2.3.0 --no-deps pyquaternion (what scripts/setup.sh installs)"
        ) from e
    parts = _META_PATH.split(".")
    if parts[0] in sys.modules or importlib.util.find_spec(parts[0]) is not None:
        return  # aliased already, or Meta's own package
    modules = {
        f"{_META_PATH}.{m}": importlib.import_module(f"cityscapesscripts.{m}")
        for m in _DETECTRON2_IMPORTS
    }
    names = [".".join(parts[:depth]) for depth in range(1, len(parts) + 1)]
    for name in names[:-1]:
        modules[name] = types.ModuleType(name)
        modules[name].__path__ = []  # a package, so that Python looks below it
    modules[names[-1]] = package
    for parent, child, attribute in zip(names, names[1:], parts[1:]):
        setattr(modules[parent], attribute, modules[child])  # "import a.b as m" reads them
    sys.modules.update(modules)  # all at once, after every import succeeded


def frame_name(image_file: str) -> str:
    """``<city>_<seq>_<frame>`` of the image ``.../<city>_<seq>_<frame>_leftImg8bit.png``."""
    return Path(image_file).name[: -len(IMAGE_SUFFIX)]


def train_id_map(image_file: str, gt_dir: str) -> str:
    """The ``_gtFine_labelTrainIds.png`` of the image ``.../<city>/<name>_leftImg8bit.png``."""
    image = Path(image_file)
    return str(Path(gt_dir) / image.parent.name / f"{frame_name(image_file)}{TRAIN_ID_SUFFIX}")


def load_cityscapes_htc(image_dir: str, gt_dir: str) -> List[dict]:
    """Detectron2's Cityscapes instances (polygons from ``_gtFine_polygons.json``, crowd
    ``*group`` regions kept) with ``sem_seg_file_name``: the train-id map of each image (labels
    0-18, 255 = ignored); ``image_id`` is the frame's name (``<city>_<seq>_<frame>``), as in
    Cityscapes' panoptic json."""
    from detectron2.data.datasets.cityscapes import load_cityscapes_instances

    for path in (image_dir, gt_dir):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"Cityscapes: no folder {path}")
    check_frames(image_dir, gt_dir)
    alias_cityscapesscripts()
    try:
        dicts = load_cityscapes_instances(image_dir, gt_dir, from_json=True, to_polygons=True)
    except Exception:  # raised in a pool's worker, without the file it read
        _name_the_polygons_file(gt_dir)
        raise
    for record in dicts:
        record["image_id"] = frame_name(record["file_name"])
        record["sem_seg_file_name"] = train_id_map(record["file_name"], gt_dir)
    return dicts


def check_frames(image_dir: str, gt_dir: str) -> None:
    """Every image has all its ground-truth files and every frame of ``gt_dir`` its image:
    without them the evaluators leave a frame out of the scores silently, or stop the process
    at the end of the evaluation (cityscapesscripts' ``sys.exit``). A file in a city folder
    that is no Cityscapes image is named too (Detectron2's loader asserts on it)."""
    images = sorted(p for p in Path(image_dir).glob("*/*") if p.is_file())
    strays = [str(p) for p in images if not p.name.endswith(IMAGE_SUFFIX)]
    if strays:
        raise ValueError(f"Cityscapes: files not named *{IMAGE_SUFFIX} in {image_dir}: {strays}")
    frames = {(p.parent.name, frame_name(str(p))) for p in images}
    missing = [
        str(Path(gt_dir, city, f"{frame}{suffix}"))
        for city, frame in sorted(frames)
        for suffix in GROUND_TRUTH_SUFFIXES
        if not Path(gt_dir, city, f"{frame}{suffix}").is_file()
    ]
    if missing:
        hint = ""
        if any(path.endswith(TRAIN_ID_SUFFIX) for path in missing):
            hint = (
                ". Make the train-id maps with cityscapesscripts (CITYSCAPES_DATASET=<the "
                "cityscapes folder> csCreateTrainIdLabelImgs)"
            )
        raise FileNotFoundError(
            f"Cityscapes: {len(missing)} ground-truth files of the images of {image_dir} are "
            f"missing: {_some(missing)}{hint}"
        )
    globbed = {  # what the evaluators read
        (p.parent.name, p.name[: -len(suffix)])
        for suffix in GROUND_TRUTH_SUFFIXES[1:3]
        for p in Path(gt_dir).glob(f"*/*{suffix}")
    }
    orphans = [f"{city}/{frame}" for city, frame in sorted(globbed - frames)]
    if orphans:
        raise FileNotFoundError(
            f"Cityscapes: {len(orphans)} frames of {gt_dir} have no image in {image_dir}: "
            f"{_some(orphans)}; the evaluators read every frame there"
        )


def _name_the_polygons_file(gt_dir: str) -> None:
    """Raise ValueError naming the first ``_gtFine_polygons.json`` of ``gt_dir`` that Detectron2's
    loader cannot read: not json, or an object of a label that cityscapesscripts does not know
    (``<label>group`` is a crowd of ``<label>``). Returns where every file reads."""
    from cityscapesscripts.helpers.labels import name2label

    for path in sorted(Path(gt_dir).glob(f"*/*{GROUND_TRUTH_SUFFIXES[0]}")):
        try:
            objects = json.loads(path.read_text())["objects"]
            labels = {obj["label"] for obj in objects if "deleted" not in obj}
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a Cityscapes polygons file ({error!r})") from None
        unknown = sorted(label for label in labels if label.removesuffix("group") not in name2label)
        if unknown:
            raise ValueError(f"{path}: labels that Cityscapes does not have: {unknown}")


def _some(paths: List[str], shown: int = 3) -> str:
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more


def panoptic_metadata(gt_root: Path, split: str) -> Dict:
    """What panoptic output and COCOPanopticEvaluator read: the categories are Cityscapes' label
    ids; the semantic branch's class k (train id k) belongs to the category of that train id
    (things: 11-18, the 8 thing classes in order; stuff: 0-10, stuff category k). With
    ``panoptic_json`` and ``panoptic_root`` where cityscapesscripts' ``csCreatePanopticImgs``
    made them (``gtFine/cityscapes_panoptic_<split>.json`` and folder)."""
    classes = sorted(CITYSCAPES_CATEGORIES, key=lambda c: c["trainId"])  # the branch's 19
    things = [c for c in classes if c["isthing"]]
    stuff = [c for c in classes if not c["isthing"]]
    meta = {
        "semantic_to_panoptic": [c["id"] for c in classes],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(things)},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(stuff)},
    }
    panoptic_json = gt_root / f"cityscapes_panoptic_{split}.json"
    if panoptic_json.is_file():
        meta.update(
            panoptic_json=str(panoptic_json),
            panoptic_root=str(gt_root / f"cityscapes_panoptic_{split}"),
        )
    return meta


def register_cityscapes_htc(root: Optional[Path] = None) -> None:
    """``cityscapes_fine_{train,val}_htc``: instances + train-id semantic maps, evaluated by
    Detectron2's Cityscapes instance and semantic evaluators (``evaluator_type``
    "cityscapes_htc"; see :func:`htc.evaluation.build_evaluators`), and by PQ where the
    panoptic ground truth is there when this is called (:func:`panoptic_metadata`)."""
    cityscapes = (root or datasets_root()) / "cityscapes"
    meta = _get_builtin_metadata("cityscapes")  # thing_classes (8), stuff_classes (19)
    for split in SPLITS:
        image_dir = str(cityscapes / "leftImg8bit" / split)
        gt_dir = str(cityscapes / "gtFine" / split)
        panoptic = panoptic_metadata(cityscapes / "gtFine", split)
        register_with_loader(
            f"cityscapes_fine_{split}_htc",
            lambda x=image_dir, y=gt_dir: load_cityscapes_htc(x, y),
            image_dir=image_dir,
            gt_dir=gt_dir,
            sem_seg_root=gt_dir,
            evaluator_type="cityscapes_htc",
            **meta,
            **panoptic,
        )
