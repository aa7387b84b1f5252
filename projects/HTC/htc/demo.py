"""Run a trained HTC on image files or folders and save visualisations.

    python -m htc.demo --config-file configs/demo/htc_R_18_FPN_demo.yaml \\
        --input img.png more_images/ --output vis/ [--confidence-threshold 0.5] \\
        --opts MODEL.WEIGHTS output/htc_demo/model_final.pth
"""

import argparse
import functools
import hashlib
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.engine import DefaultPredictor
from detectron2.structures import Instances
from detectron2.utils.visualizer import ColorMode, Visualizer
from PIL import Image, ImageDraw, ImageFont

from .checkpoint import load_weights
from .config import add_htc_config, set_float32_precision
from .data import register_builtin
from .data.coco_panoptic import COCO_STUFF_CLASSES, coco_stuff_names
from .data.inputs import IMAGE_SUFFIXES, checked_resize, read_image_or_reason

TITLE_HEIGHT = 24  # pixels of the band that names a panel


def load_predictor_cfg(config_file: str, opts: Optional[List[str]] = None) -> CfgNode:
    """The frozen config of ``config_file`` with ``opts``, HTC's keys added, on the CPU where
    the machine has no CUDA (the inference entries' rule)."""
    if config_file.endswith(".py"):
        raise ValueError(
            f"--config-file {config_file}: a LazyConfig; the inference entries take yacs "
            "(.yaml) configs, as Detectron2's demo and export do. The HTC++ recipes have yacs "
            "twins (configs/htcpp/*.yaml); ViT, MViTv2 and Swin are MODEL.BACKBONE.NAME "
            "builders there (docs/configs.md)"
        )
    cfg = get_cfg()
    add_htc_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts or [])
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


DEMO_THRESHOLD = 0.5  # the configs' SCORE_THRESH_TEST (0.001, for COCO's AP) drew a hundred


def with_threshold(opts: List[str], threshold: Optional[float]) -> List[str]:
    """``opts`` with --confidence-threshold as MODEL.ROI_HEADS.SCORE_THRESH_TEST where given."""
    if threshold is None:
        return list(opts)
    return [*opts, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", str(threshold)]


def drawing_metadata(cfg: CfgNode) -> Metadata:
    """The metadata of DATASETS.TEST[0], with generic class names ("class K", for each of the
    model's thing and semantic classes) where it lacks them, as it does without a test dataset:
    Detectron2's Visualizer needs ``stuff_classes`` for the panoptic panel (the semantic one
    takes :func:`semantic_metadata`'s)."""
    name = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused"
    fields = MetadataCatalog.get(name).as_dict()
    counts = {
        "thing_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
        "stuff_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
    }
    for key, count in counts.items():
        fields.setdefault(key, _generic_class_names(count))
    return Metadata(**fields)


def _generic_class_names(count: int) -> List[str]:
    """The names of ``count`` classes that a dataset names none: "class K" for class K."""
    return [f"class {k}" for k in range(count)]


def semantic_metadata(metadata: Metadata, count: int) -> Metadata:
    """``metadata`` where its ``stuff_classes`` name ``count`` semantic classes, else metadata
    naming them alone: COCO-Stuff's names for its 183 labels (COCO panoptic's ``stuff_classes``
    name its 133 categories: label 11 was drawn "stop sign", labels from 133 on not at all),
    else :func:`_generic_class_names`."""
    if len(metadata.get("stuff_classes") or ()) == count:
        return metadata
    names = coco_stuff_names() if count == COCO_STUFF_CLASSES else _generic_class_names(count)
    return Metadata(stuff_classes=names)


def check_serving_cfg(cfg: CfgNode) -> None:
    """A ValueError naming the key of a setting that htc.demo, htc.predict and htc.export would
    otherwise ignore or misread: they flip channels for "RGB" and feed anything else as BGR, and
    they run the plain model, without test-time augmentation."""
    if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
        raise ValueError(f"INPUT.FORMAT {cfg.INPUT.FORMAT!r}: give 'RGB' or 'BGR'")
    if cfg.TEST.AUG.ENABLED:
        raise ValueError(
            "TEST.AUG.ENABLED True: test-time augmentation runs in train_net.py --eval-only, "
            "not here; set TEST.AUG.ENABLED False"
        )


def image_files(inputs: Iterable[str]) -> List[Path]:
    """The image files named by ``inputs`` (files, or folders searched non-recursively)."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"input not found: {item}")
    if not files:
        raise FileNotFoundError(f"no images in {list(inputs)}")
    return files


@functools.cache
def _title_font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=15)
    except (TypeError, OSError):  # Pillow before 10.1, or without FreeType: its 11 px bitmap font
        return ImageFont.load_default()


def titled(panel: np.ndarray, title: str) -> np.ndarray:
    """(H + TITLE_HEIGHT, W, 3) uint8: the (H, W, 3) ``panel`` under a white band that names it."""
    band = Image.new("RGB", (panel.shape[1], TITLE_HEIGHT), "white")
    ImageDraw.Draw(band).text((4, 3), title, fill="black", font=_title_font())
    return np.concatenate([np.asarray(band), panel], axis=0)


def draw_prediction(
    image_rgb: np.ndarray, outputs: dict, metadata, threshold: float = 0.5
) -> np.ndarray:
    """Titled panels side by side: the predicted instances (score above ``threshold``) over the
    image, then the predicted semantic map (its classes named by :func:`semantic_metadata`) and
    panoptic segmentation, each if the outputs have it."""
    confident = _confident(outputs["instances"].to("cpu"), threshold)
    panels = [
        titled(
            Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE)
            .draw_instance_predictions(confident)
            .get_image(),
            f"prediction: {len(confident)} instances",
        )
    ]
    if "sem_seg" in outputs:  # (K, H, W) scores
        scores = outputs["sem_seg"]
        visualizer = Visualizer(image_rgb, semantic_metadata(metadata, len(scores)))
        semantic = visualizer.draw_sem_seg(scores.argmax(dim=0).to("cpu"), alpha=0.6).get_image()
        panels.append(titled(semantic, "prediction: semantic"))
    if "panoptic_seg" in outputs:
        segments, info = outputs["panoptic_seg"]
        visualizer = Visualizer(image_rgb, metadata)
        panoptic = visualizer.draw_panoptic_seg(segments.to("cpu"), info).get_image()
        panels.append(titled(panoptic, "prediction: panoptic"))
    return np.concatenate(panels, axis=1)


def _confident(instances: Instances, threshold: float) -> Instances:
    """The instances scored above ``threshold``. ``pred_masks_rle`` (MODEL.HTC.MASK_OUTPUT rle) is
    a list, which Instances cannot index with a tensor: its RLEs go to ``pred_masks``, which
    the Visualizer decodes."""
    keep = torch.nonzero(instances.scores > threshold).squeeze(1)
    if not instances.has("pred_masks_rle"):
        return instances[keep]
    fields = instances.get_fields()
    rles = fields.pop("pred_masks_rle")
    confident = Instances(instances.image_size, **fields)[keep]
    confident.pred_masks = [rles[k] for k in keep.tolist()]
    return confident


def picture_names(files: List[Path]) -> Dict[Path, str]:
    """Each image's picture name: its stem, with a hash of its path where stems repeat
    (``a/x.png``, ``b/x.png``, ``x.jpg``), so that no picture overwrites another."""
    stems = Counter(path.stem for path in files)
    return {
        path: path.stem if stems[path.stem] == 1 else f"{path.stem}_{path_hash(path)}"
        for path in files
    }


def path_hash(path: Path) -> str:
    """8 hex digits that name the file at ``path`` apart from others of its name."""
    return hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]


def _without_weights(cfg: CfgNode) -> CfgNode:
    """``cfg`` with an empty MODEL.WEIGHTS: DefaultPredictor's checkpointer would skip weights of
    other shapes with only a warning, so the weights are loaded after it (``load_weights``)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    return cfg


def _too_thin(predictor: DefaultPredictor, image_bgr: np.ndarray) -> Optional[str]:
    """Why ``predictor``'s resize leaves ``image_bgr`` no pixel across; None where it does not
    (DefaultPredictor would fail inside the model)."""
    try:
        checked_resize(predictor.aug, image_bgr)
    except ValueError as error:
        return str(error)
    return None


def check_targets(inputs: Iterable[str], files: List[Path], targets: Iterable[Path]) -> None:
    """A ValueError naming the output folder where it is a folder of ``inputs`` (a second run
    would read the pictures as photos), or the picture that would overwrite an input file."""
    folders = {Path(item).resolve() for item in inputs if Path(item).is_dir()}
    originals = {path.resolve() for path in files}
    for target in targets:
        if target.parent.resolve() in folders:
            raise ValueError(f"--output {target.parent} is an --input folder: give another one")
        if target.resolve() in originals:
            raise ValueError(
                f"the picture {target} would overwrite that input: give another --output"
            )


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="HTC inference on images")
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", nargs="+", required=True, help="image files or folders")
    parser.add_argument("--output", required=True, help="folder for the visualisations")
    parser.add_argument(
        "--confidence-threshold", type=float,
        help="MODEL.ROI_HEADS.SCORE_THRESH_TEST: the instances counted and drawn (default 0.5, "
        "as Detectron2's demo, where --opts does not set that key)",
    )  # fmt: skip
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE pairs")
    args = parser.parse_args(argv)

    register_builtin()  # the class names of the configs' datasets
    threshold = args.confidence_threshold
    if threshold is None and "MODEL.ROI_HEADS.SCORE_THRESH_TEST" not in args.opts:
        threshold = DEMO_THRESHOLD
    cfg = load_predictor_cfg(args.config_file, with_threshold(args.opts, threshold))
    check_serving_cfg(cfg)
    out_dir = Path(args.output)
    files = image_files(args.input)
    targets = {path: out_dir / f"{name}.png" for path, name in picture_names(files).items()}
    check_targets(args.input, files, targets.values())
    set_float32_precision(cfg)
    predictor = DefaultPredictor(_without_weights(cfg))
    load_weights(predictor.model, cfg)
    metadata = drawing_metadata(cfg)
    drawn_above = cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST  # each instance that the model keeps
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, target in targets.items():
        image_bgr, reason = read_image_or_reason(path)
        if image_bgr is not None:
            reason = _too_thin(predictor, image_bgr)
        if reason:  # as htc.predict: named and skipped, not clipped or fatal
            print(f"{path}: skipped, {reason}", file=sys.stderr)
            continue
        outputs = predictor(image_bgr)
        picture = draw_prediction(image_bgr[:, :, ::-1], outputs, metadata, drawn_above)
        Image.fromarray(picture).save(target)
        print(f"{path}: {len(outputs['instances'])} instances -> {target}")


if __name__ == "__main__":
    main()
