"""HTC counterpart of Detectron2's MViTv2-B (ImageNet-21k) Cascade Mask R-CNN, 3x
(projects/MViTv2/configs/cascade_mask_rcnn_mvitv2_b_in21k_3x.py): htc_mvitv2_b_3x.py from the
ImageNet-21k weights."""

from .htc_mvitv2_b_3x import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_B_in21k.pyth"
train.output_dir = "./output/htc_mvitv2_b_in21k_3x"
