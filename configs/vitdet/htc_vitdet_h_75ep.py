"""HTC counterpart of Detectron2's ViTDet Cascade Mask R-CNN ViT-H, 75 epochs
(projects/ViTDet/configs/COCO/cascade_mask_rcnn_vitdet_h_75ep.py): htc_vitdet_b_100ep.py with
that config's MAE ViT-H (32 blocks of width 1280, 16 heads, global attention in blocks 7, 15, 23
and 31, drop path 0.5), layer-wise lr decay 0.9 over 32 layers, weight decay on every parameter
and the schedule cut to 3/4."""

from functools import partial

from .htc_vitdet_b_100ep import (  # noqa: F401
    dataloader,
    get_vit_lr_decay_rate,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.backbone.net.update(embed_dim=1280, depth=32, num_heads=16, drop_path_rate=0.5)
model.backbone.net.window_block_indexes = [i for i in range(31) if i % 8 != 7]

train.init_checkpoint = (
    "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_huge_p14to16.pth?matching_heuristics=True"
)
train.output_dir = "./output/htc_vitdet_h_75ep"
train.max_iter = train.max_iter * 3 // 4  # 100 -> 75 epochs
lr_multiplier.scheduler.milestones = [m * 3 // 4 for m in lr_multiplier.scheduler.milestones]
lr_multiplier.scheduler.num_updates = train.max_iter

optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, lr_decay_rate=0.9, num_layers=32)
optimizer.params.overrides = {}
optimizer.params.weight_decay_norm = None
