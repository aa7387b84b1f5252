"""HTC counterpart of Detectron2's ViTDet Cascade Mask R-CNN ViT-L, 100 epochs
(projects/ViTDet/configs/COCO/cascade_mask_rcnn_vitdet_l_100ep.py): htc_vitdet_b_100ep.py with
that config's MAE ViT-L (24 blocks of width 1024, 16 heads, global attention in blocks 5, 11, 17
and 23, drop path 0.4) and layer-wise lr decay 0.8 over 24 layers."""

from functools import partial

from .htc_vitdet_b_100ep import (  # noqa: F401
    dataloader,
    get_vit_lr_decay_rate,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.backbone.net.update(embed_dim=1024, depth=24, num_heads=16, drop_path_rate=0.4)
model.backbone.net.window_block_indexes = [i for i in range(23) if i % 6 != 5]

train.init_checkpoint = (
    "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_large.pth?matching_heuristics=True"
)
train.output_dir = "./output/htc_vitdet_l_100ep"

optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, lr_decay_rate=0.8, num_layers=24)
