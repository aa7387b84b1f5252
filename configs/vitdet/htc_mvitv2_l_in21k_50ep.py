"""HTC counterpart of Detectron2's ViTDet-recipe Cascade Mask R-CNN MViTv2-L (ImageNet-21k), 50
epochs (projects/ViTDet/configs/COCO/cascade_mask_rcnn_mvitv2_l_in21k_50ep.py):
htc_mvitv2_b_in21k_100ep.py with that config's MViTv2-L (48 blocks, width 144, 2 heads, stages
ending at blocks 1, 7, 43, 47, drop path 0.5) and the schedule halved."""

from ..common.htc_mvit import MVITV2
from .htc_mvitv2_b_in21k_100ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.backbone.bottom_up.update(**MVITV2["L"])

train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_L_in21k.pyth"
train.output_dir = "./output/htc_mvitv2_l_in21k_50ep"
train.max_iter = train.max_iter // 2  # 100 -> 50 epochs
lr_multiplier.scheduler.milestones = [m // 2 for m in lr_multiplier.scheduler.milestones]
lr_multiplier.scheduler.num_updates = train.max_iter
