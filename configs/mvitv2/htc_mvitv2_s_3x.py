"""HTC counterpart of Detectron2's MViTv2-S Cascade Mask R-CNN, 3x
(projects/MViTv2/configs/cascade_mask_rcnn_mvitv2_s_3x.py): htc_mvitv2_t_3x.py with MViTv2-S
(16 blocks, stages ending at 0, 2, 13, 15)."""

from ..common.htc_mvit import MVITV2
from .htc_mvitv2_t_3x import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model.backbone.bottom_up.update(**MVITV2["S"])
train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_S_in1k.pyth"
train.output_dir = "./output/htc_mvitv2_s_3x"
