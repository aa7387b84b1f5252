"""HTC counterpart of Detectron2's ViTDet-recipe Cascade Mask R-CNN MViTv2-H (ImageNet-21k), 36
epochs (projects/ViTDet/configs/COCO/cascade_mask_rcnn_mvitv2_h_in21k_36ep.py):
htc_mvitv2_b_in21k_100ep.py with that config's MViTv2-H (80 blocks, width 192, 3 heads, stages
ending at blocks 3, 11, 71, 79, drop path 0.6, activation checkpointing), its 36-epoch schedule
(67,500 iterations, steps at 52,500 and 62,500) and AdamW lr 1.6e-4."""

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from ..common.htc_mvit import MVITV2
from .htc_mvitv2_b_in21k_100ep import dataloader, model, optimizer, train  # noqa: F401

model.backbone.bottom_up.update(**MVITV2["H"])

train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_H_in21k.pyth"
train.output_dir = "./output/htc_mvitv2_h_in21k_36ep"
train.max_iter = 67500
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[52500, 62500, 67500]),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)
optimizer.lr = 1.6e-4
