"""HTC's ROI heads and semantic branch put on a Detectron2 Mask R-CNN LazyConfig model (the model
zoo's ``mask_rcnn_fpn`` / ``mask_rcnn_vitdet`` family), as Detectron2's own cascade configs put
``CascadeROIHeads`` on it: each stage gets a copy of the model's box head, the cascade's box
predictors and IoU matchers; the mask heads become HTC's, with mask information flow; the
semantic branch reads the model's FPN levels p2-p6 (256 channels) and is fused at p3."""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import FastRCNNOutputLayers

from htc import FusedSemanticHead, HTCMaskHead, HybridTaskCascade, HybridTaskCascadeROIHeads


def to_htc(model, mask_norm: str = "LN", semantic_classes: int = 183):
    """``model`` (a LazyCall of GeneralizedRCNN with StandardROIHeads) made HTC, in place: the
    box heads and predictors of Detectron2's cascade configs (regression weights (10, 5),
    (20, 10), (30, 15), test score threshold 0.05), HTC's interleaved mask heads with
    ``mask_norm`` (``roi_heads.mask_info_flow`` gives the later ones their information-flow
    conv), and the semantic branch over ``semantic_classes``."""
    model._target_ = HybridTaskCascade
    levels = {f"p{level}": ShapeSpec(channels=256, stride=2**level) for level in range(2, 7)}
    model.semantic_head = L(FusedSemanticHead)(
        input_shape=levels,
        fusion_feature="p3",
        num_classes=semantic_classes,
        conv_dim=256,
        num_convs=4,
        embed_dim=256,
        loss_weight=0.2,
        ignore_value=255,
    )
    heads = model.roi_heads
    box_head = heads.pop("box_head")
    [heads.pop(key) for key in ("box_predictor", "proposal_matcher", "mask_head")]
    heads.update(
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
                conv_norm=mask_norm,
                with_res_conv="${...mask_info_flow}" if stage > 0 else False,
            )
            for stage in range(3)
        ],
        semantic_pooler=L(ROIPooler)(
            output_size=14, scales=(1 / 8,), sampling_ratio=0, pooler_type="ROIAlignV2"
        ),
        semantic_fusion=["bbox", "mask"],
        stage_loss_weights=[1.0, 0.5, 0.25],
        mask_info_flow=True,
    )
    return model


def without_semantic(model, dataloader) -> None:
    """HTC without the semantic branch (the reference's htc-without-semantic), in place: for data
    without stuff maps, here COCO's instances alone, evaluated by COCO AP."""
    model.pop("semantic_head")
    for key in ("semantic_pooler", "semantic_fusion"):
        model.roi_heads.pop(key)
    for split, name in (("train", "coco_2017_train"), ("test", "coco_2017_val")):
        dataloader[split].dataset.names = name
        dataloader[split].mapper.num_semantic_classes = None
    dataloader.evaluator = dataloader.evaluator.evaluators[0]  # HTCCOCOEvaluator
    dataloader.evaluator.dataset_name = "${..test.dataset.names}"  # relative to its new place
