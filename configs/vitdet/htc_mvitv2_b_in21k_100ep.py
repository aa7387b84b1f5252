"""HTC counterpart of Detectron2's ViTDet-recipe Cascade Mask R-CNN MViTv2-B (ImageNet-21k),
100 epochs (projects/ViTDet/configs/COCO/cascade_mask_rcnn_mvitv2_b_in21k_100ep.py). Kept: the
MViTv2-B backbone with its LN FPN, 2-conv RPN, 4conv1fc LN box heads and regression weights, LSJ
at 1024, AdamW (lr 8e-5), the 100-epoch schedule, AMP. Replaced: the cascade ROI heads by HTC's
(LN mask heads). Needs Detectron2 with MViT (its main branch, not v0.6)."""

from detectron2 import model_zoo

from ..common.htc_lsj_100ep import dataloader, lr_multiplier, train  # noqa: F401
from ..common.htc_mvit import mvit_htc

model = mvit_htc("B", norm="LN")
model.backbone.update(square_pad=1024, norm="LN")

train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_B_in21k.pyth"
train.output_dir = "./output/htc_mvitv2_b_in21k_100ep"

optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
optimizer.lr = 8e-5
