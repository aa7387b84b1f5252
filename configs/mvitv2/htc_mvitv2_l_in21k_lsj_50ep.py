"""HTC counterpart of Detectron2's MViTv2-L (ImageNet-21k) Cascade Mask R-CNN with LSJ, 50
epochs (projects/MViTv2/configs/cascade_mask_rcnn_mvitv2_l_in21k_lsj_50ep.py):
htc_mvitv2_b_3x.py with MViTv2-L (48 blocks, width 144, 2 heads, stages ending at 1, 7, 43, 47,
drop path 0.5), LSJ at 1024 (64 images per iteration), 50 epochs (92,187 iterations, steps at
81,944 and 88,773) and AdamW lr 1e-4."""

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from ..common.htc_lsj_100ep import dataloader
from ..common.htc_mvit import MVITV2, project_lsj
from .htc_mvitv2_b_3x import model, optimizer, train

model.backbone.bottom_up.update(**MVITV2["L"])
project_lsj(dataloader)
train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_L_in21k.pyth"
train.output_dir = "./output/htc_mvitv2_l_in21k_lsj_50ep"
train.max_iter = 184375 // 2
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01],
        milestones=[163889 // 2, 177546 // 2],
        num_updates=train.max_iter,
    ),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)
optimizer.lr = 1e-4
