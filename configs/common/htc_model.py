"""The model of configs/htc_R_50_FPN_1x.yaml as a LazyConfig: HTC R-50-FPN (pytorch-style ResNet,
RGB) with the semantic branch over COCO-Stuff's 183 classes. Same classes, same parameters
(tests/test_lazy_config.py compares the two models' state_dicts). ``htc_fpn`` makes it with
other depths and widths (the tests' small model)."""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import FPN, BasicStem, BottleneckBlock, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNOutputLayers

from htc import FusedSemanticHead, HTCMaskHead, HybridTaskCascade, HybridTaskCascadeROIHeads

ROI_FEATURES = ["p2", "p3", "p4", "p5"]
ROI_SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
# box regression weights of the stages: 1 / the reference's target stds
STAGE_BOX_WEIGHTS = [
    (10.0, 10.0, 5.0, 5.0),
    (20.0, 20.0, 10.0, 10.0),
    (30.303030303030305, 30.303030303030305, 14.925373134328357, 14.925373134328357),
]


def htc_fpn(
    depth: int = 50,
    norm: str = "FrozenBN",
    freeze_at: int = 2,
    width: int = 256,
    fc_dim: int = 1024,
    mask_convs: int = 4,
    mask_width: int = 256,
    num_classes: int = 80,
    semantic_classes: int = 183,
    semantic_width: int = 256,
    rpn_pre_topk: tuple = (2000, 1000),
    rpn_post_topk: tuple = (2000, 1000),
    rois_per_image: int = 512,
    num_groups: int = 1,
    width_per_group: int = 64,
):
    """HTC on a ResNet-``depth`` FPN of ``width`` channels: the arguments are the yaml keys
    RESNETS.DEPTH/NORM, BACKBONE.FREEZE_AT, FPN.OUT_CHANNELS (= SEM_SEG_HEAD.EMBED_DIM),
    ROI_BOX_HEAD.FC_DIM, ROI_MASK_HEAD.NUM_CONV/CONV_DIM, ROI_HEADS.NUM_CLASSES,
    SEM_SEG_HEAD.NUM_CLASSES/CONVS_DIM, RPN.PRE_NMS_TOPK_TRAIN/TEST and POST_NMS_TOPK_TRAIN/TEST
    (train, test), ROI_HEADS.BATCH_SIZE_PER_IMAGE and RESNETS.NUM_GROUPS/WIDTH_PER_GROUP."""
    stages = L(ResNet.make_default_stages)(depth=depth, norm=norm)
    if depth >= 50:
        stages.stride_in_1x1 = False  # pytorch style (basic blocks have no 1x1 conv)
    if num_groups > 1:
        stages = resnext_stages(depth, norm, num_groups, width_per_group)
    return L(HybridTaskCascade)(
        backbone=L(FPN)(
            bottom_up=L(ResNet)(
                stem=L(BasicStem)(in_channels=3, out_channels=64, norm=norm),
                stages=stages,
                out_features=["res2", "res3", "res4", "res5"],
                freeze_at=freeze_at,
            ),
            in_features=["res2", "res3", "res4", "res5"],
            out_channels=width,
            top_block=L(LastLevelMaxPool)(),
        ),
        proposal_generator=L(RPN)(
            in_features=["p2", "p3", "p4", "p5", "p6"],
            head=L(StandardRPNHead)(in_channels=width, num_anchors=3),
            anchor_generator=L(DefaultAnchorGenerator)(
                sizes=[[32], [64], [128], [256], [512]],
                aspect_ratios=[0.5, 1.0, 2.0],
                strides=[4, 8, 16, 32, 64],
                offset=0.0,
            ),
            anchor_matcher=L(Matcher)(
                thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True
            ),
            box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
            batch_size_per_image=256,
            positive_fraction=0.5,
            pre_nms_topk=rpn_pre_topk,
            post_nms_topk=rpn_post_topk,
            nms_thresh=0.7,
            anchor_boundary_thresh=0,
            smooth_l1_beta=1 / 9,
        ),
        roi_heads=L(HybridTaskCascadeROIHeads)(
            num_classes=num_classes,
            batch_size_per_image=rois_per_image,
            positive_fraction=0.25,
            proposal_append_gt=True,
            box_in_features=ROI_FEATURES,
            box_pooler=L(ROIPooler)(
                output_size=7, scales=ROI_SCALES, sampling_ratio=0, pooler_type="ROIAlignV2"
            ),
            box_heads=[
                L(FastRCNNConvFCHead)(
                    input_shape=ShapeSpec(channels=width, height=7, width=7),
                    conv_dims=[],
                    fc_dims=[fc_dim, fc_dim],
                )
                for _ in STAGE_BOX_WEIGHTS
            ],
            box_predictors=[
                L(FastRCNNOutputLayers)(
                    input_shape=ShapeSpec(channels=fc_dim),
                    box2box_transform=L(Box2BoxTransform)(weights=weights),
                    num_classes="${...num_classes}",  # roi_heads.num_classes, as the mask heads
                    cls_agnostic_bbox_reg=True,
                    smooth_l1_beta=1.0,
                    test_score_thresh=0.001,
                    test_nms_thresh=0.5,
                    test_topk_per_image=100,
                )
                for weights in STAGE_BOX_WEIGHTS
            ],
            proposal_matchers=[
                L(Matcher)(thresholds=[iou], labels=[0, 1], allow_low_quality_matches=False)
                for iou in (0.5, 0.6, 0.7)
            ],
            mask_in_features=ROI_FEATURES,
            mask_pooler=L(ROIPooler)(
                output_size=14, scales=ROI_SCALES, sampling_ratio=0, pooler_type="ROIAlignV2"
            ),
            mask_head=[
                L(HTCMaskHead)(
                    input_shape=ShapeSpec(channels=width, height=14, width=14),
                    num_classes="${...num_classes}",
                    conv_dims=[mask_width] * (mask_convs + 1),  # the convs, then the deconv
                    # mask information flow: the heads after the first take the previous one's
                    with_res_conv="${...mask_info_flow}" if stage > 0 else False,
                )
                for stage in range(len(STAGE_BOX_WEIGHTS))
            ],
            semantic_pooler=L(ROIPooler)(
                output_size=14, scales=(1 / 8,), sampling_ratio=0, pooler_type="ROIAlignV2"
            ),
            semantic_fusion=["bbox", "mask"],
            stage_loss_weights=[1.0, 0.5, 0.25],
            interleaved=True,
            mask_info_flow=True,
            mask_merge="mean",
            test_nms="nms",
            roi_align="auto",
        ),
        semantic_head=L(FusedSemanticHead)(
            input_shape={
                f"p{level}": ShapeSpec(channels=width, stride=2**level) for level in range(2, 7)
            },
            fusion_feature="p3",
            num_classes=semantic_classes,
            conv_dim=semantic_width,
            num_convs=4,
            embed_dim=width,
            loss_weight=0.2,
            ignore_value=255,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
        input_format="RGB",
    )


def resnext_stages(depth: int, norm: str, num_groups: int, width_per_group: int) -> list:
    """The stages of a pytorch-style ResNeXt-``depth`` (``num_groups`` x ``width_per_group``d), as
    Detectron2's yaml builder makes them: ``make_default_stages`` has no group width."""
    blocks = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}[depth]
    return [
        L(ResNet.make_stage)(
            block_class=BottleneckBlock,
            num_blocks=n,
            stride_per_block=[1 if i == 0 else 2] + [1] * (n - 1),
            in_channels=64 if i == 0 else 256 * 2 ** (i - 1),
            out_channels=256 * 2**i,
            bottleneck_channels=num_groups * width_per_group * 2**i,
            num_groups=num_groups,
            norm=norm,
            stride_in_1x1=False,
        )
        for i, n in enumerate(blocks)
    ]


model = htc_fpn()
