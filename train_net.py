#!/usr/bin/env python
"""Train and evaluate Hybrid Task Cascade with Detectron2's DefaultTrainer.

python train_net.py --config-file configs/htc_R_50_FPN_1x.yaml --num-gpus 8
python train_net.py --config-file configs/htc_R_50_FPN_1x.yaml --eval-only MODEL.WEIGHTS m.pth
python train_net.py --config-file configs/htc_R_50_FPN_1x.yaml --slurm --nodes 2 --gpus-per-node 8
"""

import os
from collections import OrderedDict

from detectron2.config import get_cfg
from detectron2.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import (
    DefaultTrainer,
    default_setup,
    hooks,
)
from detectron2.evaluation import DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from htc import HTCDatasetMapper, add_htc_config, set_deterministic, set_float32_precision
from htc.checkpoint import HTCCheckpointer, load_for_evaluation
from htc.config import check_device
from htc.data import register_builtin
from htc.data.checks import (
    check_ignore_label,
    check_mask_format,
    check_same_thing_classes,
    check_thing_classes,
)
from htc.data.resumable import build_resumable_train_loader
from htc.distributed import argument_parser, cpu_capable_ddp, launch_from_args
from htc.evaluation import build_evaluators, check_mask_output
from htc.panoptic import class_to_stuff
from htc.resume import ExactResume, kept_rngs
from htc.slurm import PreemptionHook, add_slurm_arguments, submit
from htc.solver import build_optimizer
from htc.tta import HybridTaskCascadeWithTTA, check_tta

# The datasets the shipped configs name; every process registers them (DDP workers import this).
register_builtin()


def check_dataset(cfg, name: str, is_train: bool) -> None:
    """Refuse a config that does not fit dataset ``name`` (call after the dataset was loaded,
    which sets its ``thing_classes``): class count, and semantic labels for training."""
    meta = MetadataCatalog.get(name)
    if cfg.MODEL.HTC.SEMANTIC_ON:
        ignore = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        check_ignore_label(name, ignore, "MODEL.SEM_SEG_HEAD.IGNORE_VALUE")
    check_thing_classes(name, cfg.MODEL.ROI_HEADS.NUM_CLASSES, "MODEL.ROI_HEADS.NUM_CLASSES")
    if not is_train and cfg.DATASETS.TRAIN:
        check_same_thing_classes(name, cfg.DATASETS.TRAIN[0])
    if cfg.MODEL.HTC.PANOPTIC_ON and not is_train:
        check_panoptic_dataset(cfg, name)
    if is_train and cfg.MODEL.MASK_ON:
        check_mask_format(name, cfg.INPUT.MASK_FORMAT, "INPUT.MASK_FORMAT")
    has_labels = meta.get("sem_seg_root") or meta.get("derive_semantic")
    if is_train and cfg.MODEL.HTC.SEMANTIC_ON and not has_labels:
        raise ValueError(
            f"MODEL.HTC.SEMANTIC_ON trains on semantic labels, and dataset {name!r} has none: "
            "register it with sem_seg_root or derive_semantic=True (htc.register_htc_instances), "
            "or set MODEL.HTC.SEMANTIC_ON False and MODEL.HTC.SEMANTIC_FUSION []"
        )


def check_panoptic_dataset(cfg, name: str) -> None:
    """The model names stuff by DATASETS.TEST[0]'s categories: refuse a test dataset whose
    categories differ."""
    num_classes, first = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, cfg.DATASETS.TEST[0]
    if name != first and class_to_stuff(name, num_classes) != class_to_stuff(first, num_classes):
        raise ValueError(
            f"MODEL.HTC.PANOPTIC_ON: the stuff categories of {name!r} are not those of "
            f"DATASETS.TEST[0] {first!r}, which the model outputs; test on one at a time"
        )


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        with cpu_capable_ddp():  # the parent gives DDP CUDA device ids even for a CPU model
            super().__init__(cfg)
        self.check_test_datasets(cfg)

    @classmethod
    def check_test_datasets(cls, cfg) -> None:
        """Each of DATASETS.TEST loaded, checked against the config and given its evaluators
        before training (after the training data, whose classes they must share): Detectron2
        loads them at the first evaluation, the end of a run by default, so a mistyped path or
        other classes failed after the training."""
        for name in cfg.DATASETS.TEST:
            DatasetCatalog.get(name)
            check_dataset(cfg, name, is_train=False)
            cls.build_evaluator(cfg, name)

    def build_hooks(self):
        """The parent's hooks around an :class:`HTCCheckpointer` (atomic writes, shape checks):
        the parent's ``__init__`` creates its checkpointer just before calling this."""
        self.checkpointer = HTCCheckpointer(
            self.checkpointer.model,
            self.cfg.OUTPUT_DIR,
            skip_mismatched=self.cfg.MODEL.HTC.SKIP_MISMATCHED_WEIGHTS,
            **self.checkpointer.checkpointables,
        )
        hooks_ = super().build_hooks()
        if self.cfg.DATALOADER.RESUMABLE:  # every rank's RNG states, before rank 0 saves
            kinds = (hooks.PeriodicCheckpointer, hooks.EvalHook)
            at = next((i for i, h in enumerate(hooks_) if isinstance(h, kinds)), len(hooks_))
            hooks_.insert(at, ExactResume(self.cfg.SOLVER.CHECKPOINT_PERIOD, self.cfg.SEED))
        return hooks_

    def state_dict(self):
        """The parent's, with the optimizer's state: Detectron2 v0.6's DefaultTrainer leaves it
        out (--resume restarted the momentum, and the learning rate for a step); later ones
        add it themselves."""
        state = super().state_dict()
        state.setdefault("_trainer", self._trainer.state_dict())
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "state_dict" not in DefaultTrainer.__dict__ and "_trainer" in state_dict:  # v0.6
            self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def build_optimizer(cls, cfg, model):
        """SGD as the parent's, or AdamW (SOLVER.OPTIMIZER), which the parent cannot build."""
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = HTCDatasetMapper(cfg, is_train=True)
        if cfg.DATALOADER.RESUMABLE:
            loader = build_resumable_train_loader(cfg, mapper)
        else:
            loader = build_detection_train_loader(cfg, mapper=mapper)
        for name in cfg.DATASETS.TRAIN:
            check_dataset(cfg, name, is_train=True)
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = HTCDatasetMapper(cfg, is_train=False, dataset_names=[dataset_name])
        loader = build_detection_test_loader(cfg, dataset_name, mapper=mapper)
        check_dataset(cfg, dataset_name, is_train=False)
        return loader

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """The parent's evaluation, with the RNGs left as they were: its loaders draw from
        torch's, and the training after it must draw what it would without (--resume)."""
        with kept_rngs():
            return super().test(cfg, model, evaluators)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """The dataset's evaluators by its kind (COCO, LVIS, Cityscapes), with the semantic
        branch's mIoU and PQ where the dataset has their ground truth."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return DatasetEvaluators(build_evaluators(cfg, dataset_name, output_folder))

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Instance AP with HTC's test-time augmentation (TEST.AUG.MIN_SIZES, MAX_SIZE, FLIP)."""
        folders = {n: os.path.join(cfg.OUTPUT_DIR, "inference_TTA", n) for n in cfg.DATASETS.TEST}
        evaluators = [
            build_evaluators(cfg, name, folder, instances_only=True)[0]
            for name, folder in folders.items()
        ]
        results = cls.test(cfg, HybridTaskCascadeWithTTA(cfg, model), evaluators)
        return OrderedDict((f"{k}_TTA", v) for k, v in results.items())


def load_config(args):
    cfg = get_cfg()
    add_htc_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def setup(args):
    cfg = load_config(args)
    check_device(cfg, training=not args.eval_only)
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="htc")
    set_float32_precision(cfg)  # default_setup of Detectron2 v0.6 does not
    set_deterministic(cfg)
    return cfg


def main(args):
    cfg = setup(args)
    for name in cfg.DATASETS.TEST:  # before training: its evaluation comes at the end
        check_mask_output(cfg, name)
    if cfg.TEST.AUG.ENABLED:
        check_tta(cfg)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = HTCCheckpointer(model, cfg.OUTPUT_DIR, complete=True)
        load_for_evaluation(checkpointer, cfg.MODEL.WEIGHTS, args.resume, "MODEL.WEIGHTS")
        results = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            results.update(Trainer.test_with_TTA(cfg, model))
        return results
    trainer = Trainer(cfg)
    if getattr(args, "preemption", None):  # a SLURM job's process (htc/slurm.py)
        trainer.register_hooks([PreemptionHook(*args.preemption)])
    trainer.resume_or_load(resume=args.resume)
    if cfg.TEST.AUG.ENABLED:
        trainer.register_hooks(
            [hooks.EvalHook(0, lambda: trainer.test_with_TTA(cfg, trainer.model))]
        )
    return trainer.train()


def invoke_main() -> None:
    parser = argument_parser()
    add_slurm_arguments(parser)
    args = parser.parse_args()
    print("Command Line Args:", args)
    if args.slurm:
        submit(main, args, load_config(args))
    else:
        launch_from_args(main, args)


if __name__ == "__main__":
    invoke_main()
