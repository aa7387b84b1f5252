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
from typing import List, Optional

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    default_setup,
    default_writers,
    hooks,
)
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import DictConfig, OmegaConf

from htc import set_deterministic, set_float32_precision
from htc.checkpoint import HTCCheckpointer, load_for_evaluation
from htc.config import apply_overrides, check_device
from htc.data import register_builtin
from htc.data.checks import check_mask_format, check_same_thing_classes, check_thing_classes
from htc.distributed import argument_parser, create_ddp_model, launch_from_args

logger = logging.getLogger("htc")
# The datasets the shipped configs name; every process registers them (DDP workers import this).
register_builtin()


def evaluate(cfg, model) -> dict:
    """The metrics of ``cfg.dataloader.evaluator`` on ``cfg.dataloader.test``, if it has one."""
    if "evaluator" not in cfg.dataloader:
        return {}
    loader, evaluator = instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    trained = _dataset_names(cfg.dataloader.get("train"))
    if trained:
        for name in _dataset_names(cfg.dataloader.test):
            check_same_thing_classes(name, trained[0])
    results = inference_on_dataset(model, loader, evaluator)
    if comm.is_main_process():
        print_csv_format(results)
    return results


def _dataset_names(loader: Optional[DictConfig]) -> List[str]:
    """The registered datasets a loader's config reads (none where it builds its own)."""
    names = OmegaConf.select(loader, "dataset.names", default=()) if loader is not None else ()
    return [names] if isinstance(names, str) else list(names)


def check_training_data(cfg, model) -> None:
    """Refuse training data that does not fit ``model`` (call after the loader is built, which
    loads the datasets): train_net.py's checks of the class count and the mask format."""
    mapper = cfg.dataloader.train.mapper
    for name in _dataset_names(cfg.dataloader.train):
        check_thing_classes(name, model.roi_heads.num_classes, "model.roi_heads.num_classes")
        if mapper.get("use_instance_mask", False):
            key = "dataloader.train.mapper.instance_mask_format"
            check_mask_format(name, mapper.get("instance_mask_format", "polygon"), key)


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
            hooks.EvalHook(cfg.train.eval_period, lambda: evaluate(cfg, model)),
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
    check_device(cfg)
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
    evaluate(cfg, create_ddp_model(model))


def invoke_main() -> None:
    launch_from_args(main, argument_parser().parse_args())


if __name__ == "__main__":
    invoke_main()
