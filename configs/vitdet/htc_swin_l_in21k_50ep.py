"""HTC counterpart of Detectron2's ViTDet-recipe Cascade Mask R-CNN Swin-L (ImageNet-21k), 50
epochs (projects/ViTDet/configs/COCO/cascade_mask_rcnn_swin_l_in21k_50ep.py):
htc_swin_b_in21k_50ep.py with that config's Swin-L (width 192, heads 6, 12, 24, 48)."""

from .htc_swin_b_in21k_50ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.backbone.bottom_up.update(
    depths=[2, 2, 18, 2], drop_path_rate=0.4, embed_dim=192, num_heads=[6, 12, 24, 48]
)

train.init_checkpoint = "detectron2://ImageNetPretrained/swin/swin_large_patch4_window7_224_22k.pth"
train.output_dir = "./output/htc_swin_l_in21k_50ep"
