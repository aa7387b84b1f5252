"""HTC counterpart of Detectron2's ViTDet-recipe Cascade Mask R-CNN Swin-B (ImageNet-21k), 50
epochs (projects/ViTDet/configs/COCO/cascade_mask_rcnn_swin_b_in21k_50ep.py): that config's
model is the MViTv2-B one with a Swin-B backbone, so this is htc_mvitv2_b_in21k_100ep.py's with
Swin-B, the schedule halved, AdamW lr 4e-5 and weight decay 0.05. Needs Detectron2 with
SwinTransformer (its main branch, not v0.6)."""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from htc.config import require_detectron2

(SwinTransformer,) = require_detectron2("SwinTransformer")  # before the MViTv2 config's check

from .htc_mvitv2_b_in21k_100ep import (  # noqa: E402, F401
    dataloader,
    lr_multiplier,
    model,
    train,
)

model.backbone.bottom_up = L(SwinTransformer)(
    depths=[2, 2, 18, 2], drop_path_rate=0.4, embed_dim=128, num_heads=[4, 8, 16, 32]
)
model.backbone.in_features = ("p0", "p1", "p2", "p3")
model.backbone.square_pad = 1024

train.init_checkpoint = "detectron2://ImageNetPretrained/swin/swin_base_patch4_window7_224_22k.pth"
train.output_dir = "./output/htc_swin_b_in21k_50ep"
train.max_iter = train.max_iter // 2  # 100 -> 50 epochs
lr_multiplier.scheduler.milestones = [m // 2 for m in lr_multiplier.scheduler.milestones]
lr_multiplier.scheduler.num_updates = train.max_iter

optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.lr = 4e-5
optimizer.weight_decay = 0.05
optimizer.params.overrides = {"relative_position_bias_table": {"weight_decay": 0.0}}
