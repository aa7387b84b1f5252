"""HTC counterpart of Detectron2's ViTDet-recipe Cascade Mask R-CNN MViTv2-B (ImageNet-21k),
100 epochs (projects/ViTDet/configs/COCO/cascade_mask_rcnn_mvitv2_b_in21k_100ep.py). Kept: the
MViTv2-B backbone with its LN FPN, 2-conv RPN, 4conv1fc LN box heads and regression weights, LSJ
at 1024, AdamW (lr 8e-5), the 100-epoch schedule, AMP. Replaced: the cascade ROI heads by HTC's
(LN mask heads). Needs Detectron2 with MViT (its main branch, not v0.6)."""

from functools import partial

import torch.nn as nn
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from htc.config import require_detectron2

from ..common.htc_heads import to_htc
from ..common.htc_lsj_100ep import dataloader, lr_multiplier, train  # noqa: F401

(MViT,) = require_detectron2("MViT")

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
constants = model_zoo.get_config("common/data/constants.py").constants
model.pixel_mean = constants.imagenet_rgb256_mean
model.pixel_std = constants.imagenet_rgb256_std
model.input_format = "RGB"
model.backbone.bottom_up = L(MViT)(
    embed_dim=96,
    depth=24,
    num_heads=1,
    last_block_indexes=(1, 4, 20, 23),
    residual_pooling=True,
    drop_path_rate=0.4,
    norm_layer=partial(nn.LayerNorm, eps=1e-6),
    out_features=("scale2", "scale3", "scale4", "scale5"),
)
model.backbone.in_features = "${.bottom_up.out_features}"
model.backbone.square_pad = 1024
model.backbone.norm = "LN"
model.proposal_generator.head.conv_dims = [-1, -1]  # 2 convs
model.roi_heads.box_head.update(conv_dims=[256, 256, 256, 256], fc_dims=[1024], conv_norm="LN")
model = to_htc(model)

train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_B_in21k.pyth"
train.output_dir = "./output/htc_mvitv2_b_in21k_100ep"

optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
optimizer.lr = 8e-5
