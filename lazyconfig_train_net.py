"""Train and evaluate HTC from a LazyConfig (.py) config, as Detectron2's
tools/lazyconfig_train_net.py does for its own: with HTC's datasets registered and checked
against the model (class count, mask format), HTC's checkpointer (atomic writes, weights of
other shapes refused) and DDP on CPU too.

    .venv/bin/python lazyconfig_train_net.py --config-file configs/htc_R_50_FPN_1x.py \\
        [--num-gpus N] [--resume] [--eval-only] [key=value ...]

``key=value`` overrides the config, e.g. ``train.max_iter=100``. ``train.float32_precision``,
``train.deterministic=True`` (with ``train.seed``) and ``train.skip_mismatched_weights=True``
are the yacs configs' FLOAT32_PRECISION, DETERMINISTIC and MODEL.HTC.SKIP_MISMATCHED_WEIGHTS.
``--eval-only --resume`` evaluates the last checkpoint of ``train.output_dir``, as
``train_net.py`` does.
"""

import logging
import sys
from typing import Iterable, List, Optional, Tuple

import detectron2.data.transforms as T
from detectron2.config import LazyConfig, instantiate
from detectron2.data import MetadataCatalog
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    default_setup,
    default_writers,
    hooks,
)
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.registry import locate
from omegaconf import DictConfig, OmegaConf

from htc import set_deterministic, set_float32_precision
from htc.backbones import square_size
from htc.checkpoint import HTCCheckpointer, load_for_evaluation
from htc.config import apply_overrides, check_device, check_links_resolve
from htc.data import register_builtin
from htc.data.checks import (
    check_derived_classes,
    check_ignore_label,
    check_mask_format,
    check_same_thing_classes,
    check_thing_classes,
)
from htc.distributed import argument_parser, create_ddp_model, launch_from_args
from htc.evaluation import HTCSemSegEvaluator, check_pasted_masks

logger = logging.getLogger("htc")
# The datasets the shipped configs name; every process registers them (DDP workers import this).
register_builtin()


def evaluate(model, built: Optional[Tuple[Iterable, DatasetEvaluator]]) -> dict:
    """The metrics of the test loader and evaluator that :func:`build_evaluation` ``built`` (no
    metrics where the config has no evaluator)."""
    if built is None:
        return {}
    results = inference_on_dataset(model, *built)
    if comm.is_main_process():
        print_csv_format(results)
    return results


def build_evaluation(cfg, model) -> Optional[Tuple[Iterable, DatasetEvaluator]]:
    """The test loader and evaluator of ``cfg`` (None without ``dataloader.evaluator``), checked
    against ``model`` (not DDP-wrapped) and the training data. Called before training: a
    mistyped test json, other classes or an evaluator that cannot score the data would else
    fail at the first evaluation, after training."""
    if "evaluator" not in cfg.dataloader:
        return None
    loader = instantiate(cfg.dataloader.test)  # loads the test datasets
    names = _dataset_names(cfg.dataloader.test)
    trained = _dataset_names(cfg.dataloader.get("train"))
    for name in names:
        if trained:
            check_same_thing_classes(name, trained[0])
        check_thing_classes(name, model.roi_heads.num_classes, "model.roi_heads.num_classes")
        check_pasted_masks(name, getattr(model, "mask_output", "bitmask"), "model.mask_output")
    check_semantic_settings(model, cfg.dataloader.test.mapper, "dataloader.test.mapper", names)
    check_square_pad(model, cfg.dataloader.test.mapper, "dataloader.test.mapper")
    evaluator = instantiate(cfg.dataloader.evaluator)
    check_semantic_evaluators(evaluator, model)
    return loader, evaluator


def check_semantic_evaluators(evaluator: DatasetEvaluator, model) -> None:
    """Refuse an mIoU evaluator (HTCSemSegEvaluator in ``dataloader.evaluator``) that
    ``model`` gives no ``sem_seg`` for, or whose class count is not its semantic head's (the
    scores would count other classes, or fail in NumPy after the whole inference)."""
    evaluators = getattr(evaluator, "_evaluators", [evaluator])  # DatasetEvaluators' list
    head = getattr(model, "semantic_head", None)
    for semantic in (e for e in evaluators if isinstance(e, HTCSemSegEvaluator)):
        if head is None or not getattr(model, "semantic_output", True):
            raise ValueError(
                "the model outputs no sem_seg (model.semantic_head None or "
                "model.semantic_output=False): drop HTCSemSegEvaluator from dataloader.evaluator"
            )
        classes = head.conv_logits.out_channels
        if semantic._num_classes != classes:
            raise ValueError(
                f"HTCSemSegEvaluator of dataloader.evaluator scores {semantic._num_classes} "
                f"classes (its num_classes) but model.semantic_head.num_classes is {classes}"
            )


def _dataset_names(loader: Optional[DictConfig]) -> List[str]:
    """The registered datasets a loader's config reads (none where it builds its own)."""
    names = OmegaConf.select(loader, "dataset.names", default=()) if loader is not None else ()
    return [names] if isinstance(names, str) else list(names)


def check_training_data(cfg, model) -> None:
    """Refuse training data that does not fit ``model`` (call after the loader is built, which
    loads the datasets): train_net.py's checks of the class count, the mask format and the
    semantic labels."""
    mapper = cfg.dataloader.train.mapper
    names = _dataset_names(cfg.dataloader.train)
    for name in names:
        check_thing_classes(name, model.roi_heads.num_classes, "model.roi_heads.num_classes")
        if mapper.get("use_instance_mask", False):
            key = "dataloader.train.mapper.instance_mask_format"
            check_mask_format(name, mapper.get("instance_mask_format", "polygon"), key)
    check_semantic_settings(model, mapper, "dataloader.train.mapper", names)
    check_derived_labels(model, mapper, names)
    check_square_pad(model, mapper, "dataloader.train.mapper")


def check_semantic_settings(model, mapper: DictConfig, key: str, names: List[str]) -> None:
    """Refuse a mapper (config ``key``) or datasets ``names`` whose semantic labels do not fit
    ``model``'s semantic branch. A yacs config sets both from one key; here they are set apart,
    and a mismatch fails in torch (a label past the head's classes) or trains unlabeled pixels
    as a class."""
    head = getattr(model, "semantic_head", None)
    if head is None:
        return
    classes, ignore = head.conv_logits.out_channels, head.ignore_value
    mapped = mapper.get("num_semantic_classes")  # None: the mapper checks no labels
    if mapped is not None and mapped != classes:
        raise ValueError(
            f"{key}.num_semantic_classes is {mapped} but model.semantic_head.num_classes is "
            f"{classes}: set both to the number of semantic classes"
        )
    if mapper.get("ignore_value", ignore) != ignore:
        raise ValueError(
            f"{key}.ignore_value is {mapper.ignore_value} but model.semantic_head.ignore_value "
            f"is {ignore}: set both to the label of unlabeled pixels"
        )
    for name in names:
        check_ignore_label(name, ignore, "model.semantic_head.ignore_value")


def check_square_pad(model, mapper: DictConfig, key: str) -> None:
    """Refuse a mapper (config ``key``) that gives images longer than the square ``model``'s
    backbone pads them to, as yacs configs refuse MODEL.*.SQUARE_PAD shorter than
    INPUT.MAX_SIZE_*: Detectron2 crops a lone image to the square (the model refuses it, but at
    the first such image)."""
    square = square_size(model.backbone)
    longest = longest_side(mapper.get("augmentations", ()))
    if 0 < square < (longest or 0):
        length = f"up to {longest} px long" if longest < sys.maxsize else "of any length"
        raise ValueError(
            f"{key}.augmentations give images {length}, longer than the {square} px square that "
            "model.backbone.square_pad pads them to, to which Detectron2 would crop them: bound "
            f"their resize to {square} px (e.g. ResizeShortestEdge's max_size) or set "
            "model.backbone.square_pad to the longest side"
        )


def longest_side(augmentations: Iterable) -> Optional[int]:
    """The longest side of the images that a mapper's LazyCall ``augmentations`` give, as their
    resizes and crops bound it (``sys.maxsize``: a ResizeShortestEdge without ``max_size``);
    None where none of them bounds it. Others (flips, crops that only shrink) leave it; so do
    ``T.Resize`` and absolute ``RandomCrop``, not read here: a mapper of those is not refused
    here, and too long an image is refused by the model at its first step."""
    longest = None
    for augmentation in augmentations:
        target = augmentation.get("_target_") if isinstance(augmentation, DictConfig) else None
        target = locate(target) if isinstance(target, str) else target  # a saved config's
        if target is T.ResizeShortestEdge:
            longest = augmentation.get("max_size", sys.maxsize)
        elif target is T.ResizeScale:
            size = max(augmentation.target_height, augmentation.target_width)
            longest = round(augmentation.max_scale * size)
        elif target is T.FixedSizeCrop:
            crop = max(augmentation.crop_size)
            padded = augmentation.get("pad", True) or longest is None
            longest = crop if padded else min(longest, crop)
    return longest


def check_derived_labels(model, mapper: DictConfig, names: List[str]) -> None:
    """Refuse a dataset registered with ``derive_semantic`` that the training mapper does not
    derive labels for (the model would find no sem_seg), and derived labels in another count
    than the thing classes + background."""
    key = "dataloader.train.mapper.derive_semantic"
    derive = mapper.get("derive_semantic", False)
    for name in names:
        if MetadataCatalog.get(name).get("derive_semantic") and not derive:
            raise ValueError(
                f"dataset {name!r} is registered with derive_semantic=True: set {key}=True"
            )
    head = getattr(model, "semantic_head", None)
    if derive and head is not None:
        keys = "model.semantic_head.num_classes and dataloader.train.mapper.num_semantic_classes"
        check_derived_classes(model.roi_heads.num_classes, head.conv_logits.out_channels, keys)


def _checkpointer(cfg, model, complete: bool = False, **checkpointables) -> HTCCheckpointer:
    skip = cfg.train.get("skip_mismatched_weights", False)
    return HTCCheckpointer(
        model, cfg.train.output_dir, skip_mismatched=skip, complete=complete, **checkpointables
    )


def train(cfg, resume: bool) -> None:
    model = instantiate(cfg.model).to(cfg.train.device)
    logger.info("Model:\n%s", model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader = instantiate(cfg.dataloader.train)
    check_training_data(cfg, model)
    evaluation = build_evaluation(cfg, model)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, loader, optimizer)
    checkpointer = _checkpointer(cfg, model, trainer=trainer)
    main_process = comm.is_main_process()
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if main_process
            else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: evaluate(model, evaluation)),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if main_process
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args) -> None:
    cfg = apply_overrides(LazyConfig.load(args.config_file), args.opts)
    check_links_resolve(cfg)
    check_device(cfg, training=not args.eval_only)
    if args.eval_only and "evaluator" not in cfg.dataloader:  # evaluate() would do nothing
        raise ValueError("--eval-only: the config has no dataloader.evaluator to evaluate with")
    default_setup(cfg, args)
    set_float32_precision(cfg)  # train.float32_precision: default_setup of Detectron2 v0.6 does not
    set_deterministic(cfg)  # train.deterministic
    if not args.eval_only:
        train(cfg, args.resume)
        return
    model = instantiate(cfg.model).to(cfg.train.device)
    checkpointer = _checkpointer(cfg, model, complete=True)
    weights = cfg.train.init_checkpoint
    load_for_evaluation(checkpointer, weights, args.resume, "train.init_checkpoint")
    model.eval()
    evaluation = build_evaluation(cfg, model)
    evaluate(create_ddp_model(model), evaluation)


def invoke_main() -> None:
    launch_from_args(main, argument_parser().parse_args())


if __name__ == "__main__":
    invoke_main()
