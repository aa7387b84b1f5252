"""HTC counterpart of Detectron2's ViTDet Cascade Mask R-CNN ViT-B, 100 epochs
(projects/ViTDet/configs/COCO/cascade_mask_rcnn_vitdet_b_100ep.py). Kept as that config has
them: the MAE ViT-B backbone with its simple feature pyramid, 2-conv RPN, 4conv1fc box heads with
LN, the stages' box regression weights, LSJ augmentation at 1024, AdamW with layer-wise lr decay
0.7, the 100-epoch schedule, AMP. Replaced: the cascade ROI heads by HTC's (interleaved, mask
information flow, semantic branch on COCO-Stuff fused into box and mask features), with LN in
the mask heads as ViTDet has. Needs Detectron2 with ViTDet (its main branch, not v0.6):

    .venv/bin/python lazyconfig_train_net.py --config-file configs/vitdet/htc_vitdet_b_100ep.py
"""

from functools import partial

from detectron2 import model_zoo

from htc.config import require_detectron2

from ..common.htc_heads import to_htc
from ..common.htc_lsj_100ep import dataloader, lr_multiplier, train  # noqa: F401

require_detectron2("ViT", "SimpleFeaturePyramid")
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate  # noqa: E402

model = to_htc(model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model)

train.init_checkpoint = (
    "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_base.pth?matching_heuristics=True"
)
train.output_dir = "./output/htc_vitdet_b_100ep"

optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7)
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
