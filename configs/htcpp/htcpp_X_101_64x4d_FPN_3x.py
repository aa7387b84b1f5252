"""HTC++ on X-101-64x4d-FPN, 3x: htcpp_R_50_FPN_3x.py (ViT-Adapter's HTC++ recipe,
detection/configs/htc++/htc++_beit_adapter_large_fpn_3x_coco.py, on a ResNeXt) with the
reference's ResNeXt-101 64x4d, as htc_X_101_64x4d_FPN_20e.yaml has it."""

from ..common.htc_model import htc_fpn
from .htcpp_R_50_FPN_3x import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model.backbone = htc_fpn(depth=101, num_groups=64, width_per_group=4).backbone
train.init_checkpoint = "pretrained/X-101-64x4d.pkl"  # open-mmlab resnext101_64x4d, converted
train.output_dir = "./output/htcpp_X_101_64x4d_FPN_3x"
