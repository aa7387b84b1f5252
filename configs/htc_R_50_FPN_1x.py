"""HTC R-50-FPN 1x (the reference's htc_r50_fpn_1x_coco) as a LazyConfig: the model, data,
optimizer and schedule of htc_R_50_FPN_1x.yaml, for the project's lazyconfig_train_net.py:

    .venv/bin/python lazyconfig_train_net.py --config-file configs/htc_R_50_FPN_1x.py
"""

import detectron2.data.transforms as T
import torch
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.evaluation import DatasetEvaluators
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf

from htc import HTCDatasetMapper
from htc.data import get_builtin_dataset_dicts
from htc.evaluation import HTCCOCOEvaluator, HTCSemSegEvaluator

from .common.htc_model import model  # noqa: F401 (the config's model)

MAX_ITER = 87960  # 12 epochs of COCO train2017 at 16 images per iteration; steps at 8 and 11

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_builtin_dataset_dicts)(names="coco_2017_train_htc"),
    mapper=L(HTCDatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=(800,), max_size=1333, sample_style="choice"),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="RGB",
        use_instance_mask=True,
        instance_mask_format="polygon",
        num_semantic_classes=183,
        ignore_value=255,
    ),
    total_batch_size=16,
    num_workers=4,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_builtin_dataset_dicts)(names="coco_2017_val_htc", filter_empty=False),
    mapper=L(HTCDatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],
        image_format="RGB",
        num_semantic_classes=183,
        ignore_value=255,
    ),
    num_workers=4,
)
dataloader.evaluator = L(DatasetEvaluators)(
    evaluators=[
        L(HTCCOCOEvaluator)(dataset_name="${....test.dataset.names}"),
        L(HTCSemSegEvaluator)(dataset_name="${....test.dataset.names}", num_classes=183),
    ]
)

optimizer = L(torch.optim.SGD)(
    params=L(get_default_optimizer_params)(weight_decay_norm=1e-4),  # .model set by the script
    lr=0.02,
    momentum=0.9,
    weight_decay=1e-4,
)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[58640, 80630], num_updates=MAX_ITER
    ),
    warmup_length=500 / MAX_ITER,
    warmup_method="linear",
    warmup_factor=0.001,
)
train = dict(
    output_dir="./output/htc_R_50_FPN_1x",
    init_checkpoint="pretrained/R-50.pkl",  # torchvision ResNet-50, converted (docs/datasets.md)
    max_iter=MAX_ITER,
    amp=dict(enabled=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=7330, max_to_keep=100),
    eval_period=MAX_ITER,
    log_period=20,
    device="cuda",
)
