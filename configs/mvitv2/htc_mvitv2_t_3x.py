"""HTC counterpart of Detectron2's MViTv2-T Cascade Mask R-CNN, 3x
(projects/MViTv2/configs/cascade_mask_rcnn_mvitv2_t_3x.py). Kept as that config has them: the
MViTv2-T backbone (10 blocks, drop path 0.2) with a plain FPN, 2-conv RPN, 4conv1fc box heads with
NaiveSyncBN ("N" statistics, for heads that may get no RoI) and the stages' regression weights;
the MViTv2 project's data (short side 480-800, long side <= 1333, half of the images first
resized to 400-600 and cropped to 384-600, flip), 64 images per iteration, 36 epochs (67,500
iterations, steps at 52,500 and 62,500), AdamW lr 1.6e-4 without weight decay on position
tables, AMP. Replaced: the cascade ROI heads by HTC's (NaiveSyncBN mask heads), the data by
COCO + COCO-Stuff through HTCDatasetMapper. Needs Detectron2 with MViT (its main branch).

    .venv/bin/python lazyconfig_train_net.py --config-file configs/mvitv2/htc_mvitv2_t_3x.py
"""

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from ..common.htc_mvit import mvit_htc
from ..htc_R_50_FPN_1x import dataloader

# NaiveSyncBatchNorm(channels, stats_mode="N") by Detectron2's name, which a saved config keeps
model = mvit_htc("T", norm="naiveSyncBN_N")

dataloader.train.mapper.augmentations = [
    L(T.RandomApply)(
        tfm_or_aug=L(T.AugmentationList)(
            augs=[
                L(T.ResizeShortestEdge)(short_edge_length=[400, 500, 600], sample_style="choice"),
                L(T.RandomCrop)(crop_type="absolute_range", crop_size=(384, 600)),
            ]
        ),
        prob=0.5,
    ),
    L(T.ResizeShortestEdge)(
        short_edge_length=(480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
        sample_style="choice",
        max_size=1333,
    ),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 64

train = model_zoo.get_config("common/train.py").train
train.amp.enabled = True
train.ddp.fp16_compression = True
train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_T_in1k.pyth"
train.output_dir = "./output/htc_mvitv2_t_3x"
train.max_iter = 67500
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[52500, 62500, 67500]),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)

optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.params.overrides = {
    name: {"weight_decay": 0.0} for name in ("pos_embed", "rel_pos_h", "rel_pos_w")
}
optimizer.lr = 1.6e-4
