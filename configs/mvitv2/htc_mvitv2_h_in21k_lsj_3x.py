"""HTC counterpart of Detectron2's MViTv2-H (ImageNet-21k) Cascade Mask R-CNN with LSJ, 3x
(projects/MViTv2/configs/cascade_mask_rcnn_mvitv2_h_in21k_lsj_3x.py): htc_mvitv2_b_3x.py with
MViTv2-H (80 blocks, width 192, 3 heads, stages ending at 3, 11, 71, 79, drop path 0.6,
activation checkpointing) and LSJ at 1024 (64 images per iteration); the 3x schedule and AdamW
lr 1.6e-4 kept."""

from ..common.htc_lsj_100ep import dataloader
from ..common.htc_mvit import MVITV2, project_lsj
from .htc_mvitv2_b_3x import lr_multiplier, model, optimizer, train  # noqa: F401

model.backbone.bottom_up.update(**MVITV2["H"])
project_lsj(dataloader)
train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_H_in21k.pyth"
train.output_dir = "./output/htc_mvitv2_h_in21k_lsj_3x"
