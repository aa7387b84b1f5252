"""Evaluation for HTC: the evaluators of a dataset by its kind (COCO AP by the fastest COCOeval
at hand, LVIS AP, Cityscapes' official instance and semantic scores), semantic segmentation read
as training reads it, and panoptic quality."""

import contextlib
import inspect
import json
import logging
import os
from typing import Callable, Iterator, List, Optional

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluator,
    LVISEvaluator,
    SemSegEvaluator,
    coco_evaluation,
)
from detectron2.modeling import META_ARCH_REGISTRY
from pycocotools.cocoeval import COCOeval

from .data.checks import thing_class_names
from .data.cityscapes import alias_cityscapesscripts
from .data.label_map import read_label_map
from .meta_arch import HybridTaskCascade

# Detectron2 after v0.6 takes the ground-truth reader as an argument.
_TAKES_LOADING_FN = "sem_seg_loading_fn" in inspect.signature(SemSegEvaluator.__init__).parameters
CITYSCAPES_KINDS = ("cityscapes_htc", "cityscapes_instance")
logger = logging.getLogger(__name__)


def build_evaluators(
    cfg, dataset_name: str, output_dir: Optional[str] = None, instances_only: bool = False
) -> List[DatasetEvaluator]:
    """The evaluators of ``dataset_name`` by its metadata's ``evaluator_type``: instances by
    COCO AP ("coco"), LVIS AP ("lvis", at most TEST.DETECTIONS_PER_IMAGE per image) or
    Cityscapes' instance AP ("cityscapes_htc", "cityscapes_instance"); unless
    ``instances_only``, the semantic branch's mIoU where the dataset has label maps
    (Cityscapes': cityscapesscripts' on its 19 classes) and PQ (Detectron2's
    COCOPanopticEvaluator) where it has panoptic ground truth and the model outputs panoptic
    segmentation."""
    meta = MetadataCatalog.get(dataset_name)
    kind = meta.get("evaluator_type", "coco")
    semantic = not instances_only and _scores_semantic(cfg, meta)
    check_mask_output(cfg, dataset_name)
    if kind in CITYSCAPES_KINDS:
        alias_cityscapesscripts()
        evaluators: List[DatasetEvaluator] = [HTCCityscapesInstanceEvaluator(dataset_name)]
        if semantic:
            evaluators.append(HTCCityscapesSemSegEvaluator(dataset_name))
    else:
        if kind == "lvis":
            max_dets = cfg.TEST.DETECTIONS_PER_IMAGE
            evaluators = [HTCLVISEvaluator(dataset_name, max_dets, output_dir)]
        else:
            evaluators = [HTCCOCOEvaluator(dataset_name, output_dir=output_dir)]
        if semantic:
            num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
            evaluators.append(HTCSemSegEvaluator(dataset_name, num_classes, output_dir=output_dir))
    if cfg.MODEL.HTC.PANOPTIC_ON and meta.get("panoptic_json") and not instances_only:
        if _has_semantic_branch(cfg.MODEL.META_ARCHITECTURE):  # whose stuff the fusion takes
            evaluators.append(panoptic_evaluator(dataset_name, output_dir))
        else:
            logger.info(
                f"{dataset_name}: no PQ, {cfg.MODEL.META_ARCHITECTURE} has no semantic branch"
            )
    return evaluators


def check_mask_output(cfg, dataset_name: str) -> None:
    """Refuse masks as RLEs (MODEL.HTC.MASK_OUTPUT rle) for Cityscapes' instance evaluation of
    ``dataset_name``, which reads pasted masks (train_net.py checks before it trains)."""
    check_pasted_masks(dataset_name, cfg.MODEL.HTC.MASK_OUTPUT, "MODEL.HTC.MASK_OUTPUT")


def check_pasted_masks(dataset_name: str, mask_output: str, key: str) -> None:
    """Refuse ``mask_output`` (the config's ``key``) other than "bitmask" where ``dataset_name``
    is scored by Cityscapes' instance evaluation, which reads pasted masks."""
    kind = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    if kind in CITYSCAPES_KINDS and mask_output != "bitmask":
        raise ValueError(
            f"Cityscapes' instance evaluation of {dataset_name!r} reads pasted masks: evaluate "
            f"with {key} bitmask"
        )


def _scores_semantic(cfg, meta) -> bool:
    """Whether the semantic branch's mIoU can be scored on the dataset of ``meta``: it has label
    maps, and the model outputs ``sem_seg`` (said where MODEL.HTC.SEMANTIC_OUTPUT turns it off)."""
    if not (cfg.MODEL.HTC.SEMANTIC_ON and meta.get("sem_seg_root")):
        return False
    if not _has_semantic_branch(cfg.MODEL.META_ARCHITECTURE):
        logger.info(f"{meta.name}: no mIoU, {cfg.MODEL.META_ARCHITECTURE} has no semantic branch")
        return False
    if not cfg.MODEL.HTC.SEMANTIC_OUTPUT:
        logger.info(f"{meta.name}: no mIoU, the model outputs no sem_seg (SEMANTIC_OUTPUT False)")
    return cfg.MODEL.HTC.SEMANTIC_OUTPUT


def _has_semantic_branch(meta_architecture: str) -> bool:
    """Whether the registered ``meta_architecture`` is HTC's (or a subclass): Detectron2's
    GeneralizedRCNN around HTC's ROI heads outputs no ``sem_seg``."""
    try:
        return issubclass(META_ARCH_REGISTRY.get(meta_architecture), HybridTaskCascade)
    except KeyError:  # not registered: the model cannot be built either
        return False


class ScoresRLEMasks:
    """Mixin for Detectron2's COCO and LVIS evaluators, whose results take segmentations from
    ``pred_masks`` only: the COCO RLEs of ``pred_masks_rle`` (MODEL.HTC.MASK_OUTPUT rle) become
    the segmentations of their instances."""

    def process(self, inputs, outputs):
        """The parent's, with the segmentations from ``pred_masks_rle`` (it reads none)."""
        start = len(self._predictions)
        super().process(inputs, outputs)
        rles = {
            image["image_id"]: output["instances"].pred_masks_rle
            for image, output in zip(inputs, outputs)
            if "instances" in output and output["instances"].has("pred_masks_rle")
        }
        for prediction in self._predictions[start:]:
            results = prediction.get("instances", [])
            for result, rle in zip(results, rles.get(prediction["image_id"], [])):
                result["segmentation"] = rle


class OnTodaysNumpy:
    """Mixin for an evaluator whose official evaluation calls names NumPy removed: lvis 0.5.3
    (its newest release, 2020) calls ``np.float``, gone in NumPy 1.24; cityscapesscripts
    2.3.0 (2026) ``np.in1d``, gone in 2.4. Its ``evaluate`` runs with those that this NumPy
    lacks put back, and removed after."""

    def evaluate(self):
        """The parent's, with the NumPy names it calls put back."""
        with _removed_numpy_names():
            return super().evaluate()


def _in1d(ar1, ar2, assume_unique: bool = False, invert: bool = False) -> np.ndarray:
    """NumPy's ``in1d`` (before 2.4): ``isin`` of the flattened ``ar1``."""
    return np.isin(ar1, ar2, assume_unique=assume_unique, invert=invert).ravel()


_REMOVED_FROM_NUMPY = {"float": float, "in1d": _in1d}


@contextlib.contextmanager
def _removed_numpy_names() -> Iterator[None]:
    """NumPy with the names of ``_REMOVED_FROM_NUMPY`` that it lacks, for the block."""
    missing = [name for name in _REMOVED_FROM_NUMPY if name not in vars(np)]
    for name in missing:
        setattr(np, name, _REMOVED_FROM_NUMPY[name])
    try:
        yield
    finally:
        for name in missing:
            delattr(np, name)


class HTCLVISEvaluator(ScoresRLEMasks, OnTodaysNumpy, LVISEvaluator):
    """:class:`LVISEvaluator` (at most ``max_dets_per_image`` per image) on today's NumPy, RLE
    masks scored."""

    def __init__(self, dataset_name: str, max_dets_per_image: int, output_dir: Optional[str]):
        super().__init__(dataset_name, output_dir=output_dir, max_dets_per_image=max_dets_per_image)


class HTCCityscapesInstanceEvaluator(OnTodaysNumpy, CityscapesInstanceEvaluator):
    """:class:`CityscapesInstanceEvaluator` on today's NumPy. cityscapesscripts' evaluation
    also writes its matches to ``matches.json`` in the current folder, with NumPy integers
    (from NumPy 2's ``count_nonzero``) that its json writer cannot write: it writes them, as
    Python numbers, into the evaluator's temporary folder, which is removed after."""

    def evaluate(self):
        """The parent's, with the official writer's json redirected (see the class)."""
        from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as official

        saved, folder = official.writeDict2JSON, self._temp_dir
        official.writeDict2JSON = lambda data, path: _write_json(data, os.path.join(folder, path))
        try:
            return super().evaluate()
        finally:
            official.writeDict2JSON = saved


def _write_json(data, path: str) -> None:
    """cityscapesscripts' ``writeDict2JSON``, with NumPy scalars written as numbers."""
    with open(path, "w") as f:
        json.dump(data, f, default=lambda o: o.item() if isinstance(o, np.generic) else vars(o))


class HTCCityscapesSemSegEvaluator(OnTodaysNumpy, CityscapesSemSegEvaluator):
    """:class:`CityscapesSemSegEvaluator` on today's NumPy."""


class HTCSemSegEvaluator(SemSegEvaluator):
    """:class:`SemSegEvaluator` whose ground truth is read by :func:`read_label_map`, the dataset
    mapper's reader. Detectron2 v0.6 has no reader argument; its own read (``np.array`` of the
    PIL image) gives the same labels for every mode that ``check_label_map`` lets through."""

    def __init__(self, dataset_name: str, num_classes: Optional[int] = None, **kwargs):
        """``num_classes``: the semantic branch's; where the dataset's metadata names no
        ``stuff_classes`` (SemSegEvaluator counts the classes by them), they are named by index."""
        meta = MetadataCatalog.get(dataset_name)
        if num_classes is not None and not meta.get("stuff_classes"):
            meta.stuff_classes = [str(i) for i in range(num_classes)]
        _check_stuff_classes(dataset_name, num_classes)
        if _TAKES_LOADING_FN:
            kwargs.setdefault("sem_seg_loading_fn", read_label_map)
        try:
            super().__init__(dataset_name, **kwargs)
        except KeyError as e:  # the parent's map of each image to its label map
            if e.args != ("sem_seg_file_name",):
                raise
            raise ValueError(
                f"dataset {dataset_name!r} has no semantic maps (sem_seg_file_name) to score "
                "mIoU on: drop the mIoU evaluator (HTCSemSegEvaluator) from dataloader.evaluator"
            ) from e
        # Its json names classes by the label maps' values: a dataset's
        # stuff_dataset_id_to_contiguous_id, where it has one, names the panoptic stuff
        # categories (htc.panoptic), not these labels.
        self._contiguous_id_to_dataset_id = None

    def process(self, inputs, outputs):
        """The parent's, refusing outputs without ``sem_seg`` by name (the parent's KeyError
        named no option)."""
        if any("sem_seg" not in output for output in outputs):
            raise ValueError(
                "the model outputs no sem_seg (a model without the semantic branch, or "
                "MODEL.HTC.SEMANTIC_OUTPUT False; LazyConfig: model.semantic_output=False): leave "
                "the mIoU evaluator out"
            )
        super().process(inputs, outputs)


def _check_stuff_classes(dataset_name: str, num_classes: Optional[int]) -> None:
    """Refuse ``num_classes`` other than the count of the dataset's ``stuff_classes``, by which
    SemSegEvaluator sizes its confusion matrix: it failed in NumPy after the inference."""
    stuff = MetadataCatalog.get(dataset_name).get("stuff_classes")
    if num_classes is not None and len(stuff) != num_classes:
        raise ValueError(
            f"dataset {dataset_name!r} names {len(stuff)} semantic classes (its metadata's "
            f"stuff_classes) but the mIoU evaluator scores {num_classes} (MODEL.SEM_SEG_HEAD."
            "NUM_CLASSES; LazyConfig: num_classes of HTCSemSegEvaluator, as "
            "model.semantic_head.num_classes): give stuff_classes one name per semantic class"
        )


def fast_coco_eval_available() -> bool:
    """Whether ``COCOEvaluator(use_fast_impl=True)`` can run: Detectron2's C++ COCOeval exists
    only with a compiled ``detectron2._C`` (the setup installs a pure-Python stand-in)."""
    import detectron2._C as C

    return not getattr(C, "STAND_IN", False)


def coco_eval_class() -> Callable:
    """The COCOeval that COCO AP is computed with: Detectron2's C++ one where ``detectron2._C``
    is compiled, else faster-coco-eval's where it is installed (the same numbers as pycocotools',
    3.5x to 9x faster: benchmarks/coco_eval_speed.py), else pycocotools'. Keypoints always go
    to pycocotools' under faster-coco-eval, which needs its own ground-truth class for them."""
    if fast_coco_eval_available():
        from detectron2.evaluation.fast_eval_api import COCOeval_opt

        return COCOeval_opt
    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        return COCOeval

    def cocoeval(coco_gt, coco_dt, iou_type: str):
        if iou_type == "keypoints":
            return COCOeval(coco_gt, coco_dt, iou_type)
        return COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=print)

    return cocoeval


class HTCCOCOEvaluator(ScoresRLEMasks, COCOEvaluator):
    """:class:`COCOEvaluator` computing with :func:`coco_eval_class` unless ``use_fast_impl`` is
    False (then pycocotools', as Detectron2's); RLE masks scored; the AP per class named by the
    thing classes alone (:func:`thing_class_names`)."""

    def __init__(self, dataset_name: str, *args, **kwargs):
        self._cocoeval = coco_eval_class()
        kwargs.setdefault("use_fast_impl", self._cocoeval is not COCOeval)
        with self._cocoeval_in_use():
            super().__init__(dataset_name, *args, **kwargs)
        json_file = MetadataCatalog.get(dataset_name).json_file  # the parent writes one if none
        check_areas(json_file, self._coco_api.dataset.get("annotations", []))

    def _eval_predictions(self, predictions, img_ids=None):
        # the parent's "fast" COCOeval is the module's COCOeval_opt, read at the call
        with self._cocoeval_in_use():
            super()._eval_predictions(predictions, img_ids)

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        """The parent's with the thing classes' names: it is given ``thing_classes``, all 133
        categories in COCO panoptic's metadata, and asserted that they are the json's 80."""
        names = thing_class_names(self._metadata) if class_names is not None else None
        return super()._derive_coco_results(coco_eval, iou_type, class_names=names)

    @contextlib.contextmanager
    def _cocoeval_in_use(self) -> Iterator[None]:
        saved = coco_evaluation.COCOeval_opt
        coco_evaluation.COCOeval_opt = self._cocoeval
        try:
            yield
        finally:
            coco_evaluation.COCOeval_opt = saved


def check_areas(json_file: str, annotations: List[dict]) -> None:
    """Refuse ground truth without ``area``, which COCO AP splits objects by into small, medium
    and large: faster-coco-eval counted every such object small (APs, APm, APl silently
    wrong), pycocotools raised a bare KeyError after the inference."""
    lacking = [a.get("id") for a in annotations if "area" not in a]
    if lacking:
        raise ValueError(
            f"{json_file}: {len(lacking)} of its {len(annotations)} annotations have no 'area' "
            f"(e.g. id {lacking[0]}), which COCO AP needs (its small/medium/large split): give "
            "each the area of its mask (pycocotools.mask.area) to evaluate on it"
        )


def panoptic_evaluator(dataset_name: str, output_dir: Optional[str] = None):
    """Detectron2's :class:`COCOPanopticEvaluator` (PQ, SQ, RQ of all, things, stuff); an
    ImportError that says what to install where the COCO panoptic API it calls is missing, and
    a FileNotFoundError where the folder of the dataset's panoptic PNGs is missing."""
    try:
        import panopticapi.evaluation  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"evaluating panoptic segmentation on {dataset_name!r} needs the COCO panoptic API: "
            "pip install panopticapi-lite==0.2.0 --no-deps (what scripts/setup.sh installs), or "
            "pip install git+https://github.com/cocodataset/panopticapi.git"
        ) from e
    root = MetadataCatalog.get(dataset_name).get("panoptic_root")
    if root and not os.path.isdir(root):  # else found at the end of the evaluation
        raise FileNotFoundError(
            f"{dataset_name!r}: no folder {root}, the PNGs of its panoptic ground truth"
        )
    return COCOPanopticEvaluator(dataset_name, output_dir=output_dir)
