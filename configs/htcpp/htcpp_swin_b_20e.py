"""HTC++ on Swin-B (ImageNet-22k), 20 epochs, following CBNetV2's Swin-B HTC recipe
(configs/cbnet/htc_cbv2_swin_base_patch4_window7_mstrain_400-1400_giou_4conv1f_adamw_20e_coco.py)
with one Swin-B instead of its composite (dual) backbone: Detectron2's SwinTransformer (window 7,
drop path 0.3) with a plain FPN; 4conv1fc box heads with SyncBN and the GIoU loss (weight 10) on
the decoded boxes; training at short side 400-1400 (long side <= 1600), testing at 1400; linear
Soft-NMS at 0.5 from score 0.001; AdamW (lr 5e-5 = the recipe's 1e-4 x 1/2 for 1 image per GPU,
weight decay 0.05, none on norms and position tables: the box heads' SyncBN, which the recipe's
rule by name decays, included) over 8 images per iteration (its 8 GPUs); 20 epochs with lr x0.1
at 16 and 19; mixed precision. The recipe has neither InstaBoost nor an extra attention neck.
Needs Detectron2 with SwinTransformer (its main branch, not v0.6).

    .venv/bin/python lazyconfig_train_net.py --config-file configs/htcpp/htcpp_swin_b_20e.py
"""

from detectron2.config import LazyCall as L

from htc.config import require_detectron2

from ..common.htcpp import adamw, epochs, four_conv_one_fc, giou, multiscale, soft_nms
from ..htc_R_50_FPN_1x import dataloader, model, train

(SwinTransformer,) = require_detectron2("SwinTransformer")

IMAGES_PER_BATCH = 8

model.backbone.bottom_up = L(SwinTransformer)(
    embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], drop_path_rate=0.3
)
model.backbone.in_features = ("p0", "p1", "p2", "p3")
four_conv_one_fc(model, norm="SyncBN")
giou(model)
soft_nms(model)
multiscale(dataloader, IMAGES_PER_BATCH)
optimizer = adamw(lr=5e-5, no_decay=("relative_position_bias_table",))
lr_multiplier = epochs(train, 20, steps=(16, 19), images_per_batch=IMAGES_PER_BATCH)
train.amp.enabled = True
train.init_checkpoint = "detectron2://ImageNetPretrained/swin/swin_base_patch4_window7_224_22k.pth"
train.output_dir = "./output/htcpp_swin_b_20e"
