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

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import FastRCNNOutputLayers
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from htc import FusedSemanticHead, HTCMaskHead, HybridTaskCascade, HybridTaskCascadeROIHeads
from htc.config import require_detectron2

from ..htc_R_50_FPN_1x import dataloader  # noqa: F401 (HTC's data, made LSJ below)

require_detectron2("ViT", "SimpleFeaturePyramid")
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate  # noqa: E402

IMAGE_SIZE = 1024

model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
model._target_ = HybridTaskCascade
model.semantic_head = L(FusedSemanticHead)(
    input_shape={f"p{level}": ShapeSpec(channels=256, stride=2**level) for level in range(2, 7)},
    fusion_feature="p3",
    num_classes=183,
    conv_dim=256,
    num_convs=4,
    embed_dim=256,
    loss_weight=0.2,
    ignore_value=255,
)
box_head = model.roi_heads.pop("box_head")
[model.roi_heads.pop(key) for key in ("box_predictor", "proposal_matcher", "mask_head")]
model.roi_heads.update(
    _target_=HybridTaskCascadeROIHeads,
    box_heads=[box_head for _ in range(3)],
    box_predictors=[
        L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=1024),
            test_score_thresh=0.05,
            box2box_transform=L(Box2BoxTransform)(weights=(w1, w1, w2, w2)),
            cls_agnostic_bbox_reg=True,
            num_classes="${...num_classes}",
        )
        for (w1, w2) in [(10, 5), (20, 10), (30, 15)]
    ],
    proposal_matchers=[
        L(Matcher)(thresholds=[iou], labels=[0, 1], allow_low_quality_matches=False)
        for iou in (0.5, 0.6, 0.7)
    ],
    mask_head=[
        L(HTCMaskHead)(
            input_shape=ShapeSpec(channels=256, height=14, width=14),
            num_classes="${...num_classes}",
            conv_dims=[256] * 5,
            conv_norm="LN",
            with_res_conv=stage > 0,
        )
        for stage in range(3)
    ],
    semantic_pooler=L(ROIPooler)(
        output_size=14, scales=(1 / 8,), sampling_ratio=0, pooler_type="ROIAlignV2"
    ),
    semantic_fusion=["bbox", "mask"],
    stage_loss_weights=[1.0, 0.5, 0.25],
)

# LSJ, as ViTDet's coco_loader_lsj, on HTC's data (semantic maps cropped with the images)
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(
        min_scale=0.1, max_scale=2.0, target_height=IMAGE_SIZE, target_width=IMAGE_SIZE
    ),
    L(T.FixedSizeCrop)(crop_size=(IMAGE_SIZE, IMAGE_SIZE), pad=False),
]
dataloader.train.mapper.recompute_boxes = True
dataloader.train.mapper.instance_mask_format = "polygon"
dataloader.train.total_batch_size = 64
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=IMAGE_SIZE, max_size=IMAGE_SIZE),
]

train = model_zoo.get_config("common/train.py").train
train.amp.enabled = True
train.ddp.fp16_compression = True
train.init_checkpoint = (
    "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_base.pth?matching_heuristics=True"
)
train.max_iter = 184375  # 100 epochs at 64 images per iteration
train.output_dir = "./output/htc_vitdet_b_100ep"

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[163889, 177546], num_updates=train.max_iter
    ),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)

optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7)
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
