"""HTC++ on R-50-FPN, 3x, following ViT-Adapter's HTC++ recipe
(detection/configs/htc++/htc++_beit_adapter_large_fpn_3x_coco.py) on this backbone: HTC with
4conv1fc box heads without norm, training at short side 400-1400 (long side <= 1600), testing at
1400, linear Soft-NMS at 0.5 from score 0.001, AdamW (lr 1e-4, weight decay 0.05, none on norms
and biases) over 16 images per iteration, 36 epochs with lr x0.1 at 27 and 33. Left out of that
recipe: its BEiT-Adapter backbone and layer-wise lr decay (a ViT's), InstaBoost, the extra
global attention neck (ExtraAttention) and Soft-NMS among the RPN's proposals (Detectron2's RPN
keeps hard NMS at 0.7).

    .venv/bin/python lazyconfig_train_net.py --config-file configs/htcpp/htcpp_R_50_FPN_3x.py
"""

from ..common.htcpp import adamw, epochs, four_conv_one_fc, multiscale, soft_nms
from ..htc_R_50_FPN_1x import dataloader, model, train

IMAGES_PER_BATCH = 16

four_conv_one_fc(model)
soft_nms(model)
multiscale(dataloader, IMAGES_PER_BATCH)
optimizer = adamw(lr=1e-4, bias_decay=False)
lr_multiplier = epochs(train, 36, steps=(27, 33), images_per_batch=IMAGES_PER_BATCH)
train.output_dir = "./output/htcpp_R_50_FPN_3x"
