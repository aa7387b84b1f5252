"""HTC++ on Swin-L (ImageNet-22k), 12 epochs: htcpp_swin_b_20e.py as CBNetV2's Swin-L recipe
(configs/cbnet/htc_cbv2_swin_large_patch4_window7_mstrain_400-1400_giou_4conv1f_adamw_1x_coco.py)
changes it: Swin-L (width 192, heads 6, 12, 24, 48, drop path 0.2), 12 epochs with lr x0.1 at 8
and 11."""

from ..common.htcpp import epochs
from .htcpp_swin_b_20e import IMAGES_PER_BATCH, dataloader, model, optimizer, train  # noqa: F401

model.backbone.bottom_up.update(embed_dim=192, num_heads=[6, 12, 24, 48], drop_path_rate=0.2)
lr_multiplier = epochs(train, 12, steps=(8, 11), images_per_batch=IMAGES_PER_BATCH)
train.init_checkpoint = "detectron2://ImageNetPretrained/swin/swin_large_patch4_window7_224_22k.pth"
train.output_dir = "./output/htcpp_swin_l_1x"
