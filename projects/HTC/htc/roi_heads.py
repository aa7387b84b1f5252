"""The ROI heads of HTC: the three-stage cascade made hybrid (Chen et al., CVPR 2019).

Interleaved execution (stage t's mask head learns on the boxes stage t just refined), mask
information flow (each mask head receives the previous head's feature, chained from the first)
and semantic fusion (the semantic branch's RoI feature summed into every box and mask RoI
feature); at test time the stages' class logits and masks are averaged. A
:class:`CascadeROIHeads` that overrides the methods whose HTC behaviour differs, each saying
why. Shapes: R RoIs, K classes, C channels, P the mask pooler's resolution (14), M = 2P the
mask's (28)."""

import inspect
import logging
from numbers import Real
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import ROI_MASK_HEAD_REGISTRY, CascadeROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers, fast_rcnn_inference
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_loss
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import log_first_n
from torch import nn
from torch.nn import functional as F

from .host import host_tensor, repeat_rows
from .layers import roi_align_kernel, shared_levels
from .mask_head import mask_loss, of_classes
from .poolers import HTCROIPooler
from .sampling import RoISample, foreground_rois, sample_rois
from .soft_nms import soft_nms_inference

# Key of the semantic feature (N, C, H/s, W/s) in the feature dict handed to the ROI heads.
SEMANTIC_FEATURE = "htc_semantic"
FUSION_TARGETS = ("bbox", "mask")
MASK_MERGE_RULES = ("mean", "last")
TEST_NMS = ("nms", "soft_linear", "soft_gaussian")
# Sigmoid cross-entropy and the federated loss came after Detectron2 v0.6.
HAS_FED_LOSS = "use_sigmoid_ce" in inspect.signature(FastRCNNOutputLayers.__init__).parameters


CHAINED_HEAD = (
    "the cascade calls each stage's head as forward(x, *, res_feat, with_logits, classes), "
    "as HTCMaskHead's (MODEL.ROI_MASK_HEAD.NAME HTCMaskHead, or a subclass)"
)


def chains_features(head: nn.Module) -> bool:
    """Whether the cascade can call ``head`` with the previous stage's feature (``res_feat``)."""
    return "res_feat" in inspect.signature(head.forward).parameters


def fuses_semantic_feature(semantic_fusion: Sequence[str], mask_on: bool) -> bool:
    """Whether ROI heads with these settings sum the semantic feature into RoI features: into
    the box RoIs, or into the mask RoIs of a model with masks."""
    return "bbox" in semantic_fusion or ("mask" in semantic_fusion and mask_on)


def _semantic_feature(features: Dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, C, H/s, W/s): the semantic branch's feature, which only :class:`HybridTaskCascade`
    puts among the features (Detectron2's ``GeneralizedRCNN`` has no semantic branch)."""
    if SEMANTIC_FEATURE not in features:
        raise ValueError(
            "HTC's semantic fusion (MODEL.HTC.SEMANTIC_FUSION) needs the feature of the semantic "
            f"branch, {SEMANTIC_FEATURE!r}, which the model did not give the ROI heads: use "
            "MODEL.META_ARCHITECTURE 'HybridTaskCascade' with MODEL.HTC.SEMANTIC_ON True, or "
            "set MODEL.HTC.SEMANTIC_FUSION [] and MODEL.HTC.SEMANTIC_ON False"
        )
    return features[SEMANTIC_FEATURE]


@ROI_HEADS_REGISTRY.register()
class HybridTaskCascadeROIHeads(CascadeROIHeads):
    """The cascade of HTC: box stages with interleaved mask stages, mask information flow and
    semantic feature fusion (Chen et al., CVPR 2019; reference: MMDetection's HTC 2.x).

    Training, for each stage t (the next stage starts from stage t's refined boxes):
      1. RoIs are assigned with stage t's IoU matcher and sampled (GT boxes added);
      2. the box head learns on them; their boxes are refined by stage t's regression;
      3. interleaved: the refined boxes are assigned and sampled again with stage t's matcher
         and stage t's mask head learns on their foreground (else on the RoIs of step 1);
      4. box and mask losses are multiplied by the stage's loss weight.
    Inference: the stages' class logits are averaged before one softmax (or sigmoid), boxes come
    from the last stage, and the masks of all stages' heads on the final boxes are merged.
    """

    @configurable
    def __init__(
        self,
        *,
        stage_loss_weights: Sequence[float],
        interleaved: bool = True,
        mask_info_flow: bool = True,
        semantic_pooler: Optional[ROIPooler] = None,
        semantic_fusion: Sequence[str] = (),
        mask_merge: str = "mean",
        test_nms: str = "nms",
        soft_nms_sigma: float = 0.5,
        soft_nms_min_score: float = 0.001,
        roi_align: str = "auto",
        **kwargs,
    ):
        """
        Args:
            stage_loss_weights: weight of each stage's box and mask losses.
            interleaved: train stage t's mask head on stage t's refined boxes.
            mask_info_flow: feed each mask head the previous head's 14x14 feature.
            semantic_pooler: pools the semantic feature for each RoI (at the mask resolution).
            semantic_fusion: where to sum the pooled semantic feature: "bbox" and/or "mask".
            mask_merge: "mean" of the stages' sigmoid masks at test time, or "last" stage only.
            test_nms: "nms", or Soft-NMS "soft_linear" / "soft_gaussian" for the detections.
            soft_nms_sigma: sigma of the gaussian Soft-NMS.
            soft_nms_min_score: Soft-NMS drops boxes whose decayed score falls under this.
            roi_align: the RoIAlign kernel of every pooler (MODEL.HTC.ROI_ALIGN): the poolers
                become :class:`HTCROIPooler`, which the semantic fusion needs.
            kwargs: arguments of :class:`CascadeROIHeads`; ``mask_head`` is the list of the
                stages' heads (a LazyConfig gives a list: it is made a ModuleList).
        """
        roi_align = roi_align_kernel(roi_align)  # the successor of a deprecated name
        for key in ("box_pooler", "mask_pooler"):
            if kwargs.get(key) is not None:
                kwargs[key] = HTCROIPooler.from_pooler(kwargs[key], roi_align)
        mask_heads = kwargs.get("mask_head")
        if mask_heads is not None and not isinstance(mask_heads, nn.Module):
            kwargs["mask_head"] = nn.ModuleList(mask_heads)
        if semantic_pooler is not None:
            semantic_pooler = HTCROIPooler.from_pooler(semantic_pooler, roi_align)
        super().__init__(**kwargs)
        if not all(isinstance(w, Real) and not isinstance(w, bool) for w in stage_loss_weights):
            raise ValueError(
                f"MODEL.HTC.STAGE_LOSS_WEIGHTS={list(stage_loss_weights)}: give a number per stage"
            )
        self.stage_loss_weights = [float(w) for w in stage_loss_weights]
        self.interleaved = interleaved
        self.mask_info_flow = mask_info_flow
        self.semantic_pooler = semantic_pooler
        self.semantic_fusion = tuple(semantic_fusion)
        self.mask_merge = mask_merge
        self.test_nms = test_nms
        self.soft_nms_sigma = soft_nms_sigma
        self.soft_nms_min_score = soft_nms_min_score
        self._validate()

    def _validate(self) -> None:
        n = self.num_cascade_stages
        if len(self.stage_loss_weights) != n:
            raise ValueError(
                f"MODEL.HTC.STAGE_LOSS_WEIGHTS has {len(self.stage_loss_weights)} entries but the "
                f"cascade has {n} stages (MODEL.ROI_BOX_CASCADE_HEAD.IOUS)"
            )
        if self.mask_on and len(self.mask_head) != n:
            raise ValueError(f"HTC needs a mask head per stage: {len(self.mask_head)} for {n}")
        heads = self.mask_head if self.mask_on else ()
        unchained = [t for t, head in enumerate(heads) if not chains_features(head)]
        if unchained:
            raise ValueError(
                f"the mask heads of stages {unchained} (roi_heads.mask_head) cannot pass features "
                f"from stage to stage: {CHAINED_HEAD}"
            )
        unknown = set(self.semantic_fusion) - set(FUSION_TARGETS)
        if unknown:
            raise ValueError(
                f"MODEL.HTC.SEMANTIC_FUSION: unknown {sorted(unknown)}, use {FUSION_TARGETS}"
            )
        if self.semantic_fusion and self.semantic_pooler is None:
            raise ValueError(
                "MODEL.HTC.SEMANTIC_FUSION needs the semantic branch (MODEL.HTC.SEMANTIC_ON True); "
                "set MODEL.HTC.SEMANTIC_FUSION [] for a model without it"
            )
        for stage, matcher in enumerate(self.proposal_matchers):
            if not all(0 < t <= 1 for t in matcher.thresholds[1:-1]):
                raise ValueError(
                    f"MODEL.ROI_BOX_CASCADE_HEAD.IOUS: stage {stage}'s IoU threshold "
                    f"{matcher.thresholds[1:-1]} is outside (0, 1]: it would sample no foreground"
                )
        if any(m.allow_low_quality_matches for m in self.proposal_matchers):
            raise ValueError(
                "HTC's RoI sampling (htc.sampling.match) takes no low-quality matches: give "
                "the ROI heads matchers with allow_low_quality_matches=False"
            )
        if self.keypoint_on:
            raise ValueError(
                "HTC has no keypoint head: its cascade would leave one untrained; set "
                "MODEL.KEYPOINT_ON False"
            )
        if any(w < 0 for w in self.stage_loss_weights):
            raise ValueError(
                f"MODEL.HTC.STAGE_LOSS_WEIGHTS={self.stage_loss_weights}: weights cannot be "
                "negative"
            )
        if self.test_nms == "soft_gaussian" and not self.soft_nms_sigma > 0:
            raise ValueError(
                f"MODEL.HTC.SOFT_NMS_SIGMA={self.soft_nms_sigma}: the Gaussian Soft-NMS divides "
                "by it, give a positive value"
            )
        if not 0 <= self.soft_nms_min_score <= 1:
            raise ValueError(
                f"MODEL.HTC.SOFT_NMS_MIN_SCORE={self.soft_nms_min_score}: a score, in [0, 1]"
            )
        self._check_semantic_pooler()
        self._check_mask_info_flow()
        self._check_class_counts()
        _check_test_thresholds(self.box_predictor[-1])
        if self.test_nms not in TEST_NMS:
            raise ValueError(f"MODEL.HTC.TEST_NMS={self.test_nms!r}: use one of {TEST_NMS}")
        if self.mask_merge not in MASK_MERGE_RULES:
            raise ValueError(
                f"MODEL.HTC.MASK_MERGE={self.mask_merge!r}: use one of {MASK_MERGE_RULES}"
            )

    def _check_semantic_pooler(self) -> None:
        """Refuse a semantic RoI feature that the mask RoI features it is summed into cannot
        take (the yacs configs pool both at MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION; the box
        branch average-pools it to its own resolution, whatever it is)."""
        if "mask" not in self.semantic_fusion or not self.mask_on:
            return
        size, mask_size = self.semantic_pooler.output_size, self.mask_pooler.output_size
        if tuple(size) != tuple(mask_size):
            raise ValueError(
                f"roi_heads.semantic_pooler.output_size {tuple(size)} must be the mask pooler's "
                f"{tuple(mask_size)} (roi_heads.mask_pooler.output_size, MODEL.ROI_MASK_HEAD."
                "POOLER_RESOLUTION): the semantic RoI features are summed into the mask RoI "
                "features (semantic_fusion 'mask')"
            )

    def _check_mask_info_flow(self) -> None:
        """Refuse mask heads whose ``res_conv`` (HTCMaskHead's ``with_res_conv``) does not match
        the information flow: one that receives no feature gets no gradient (DDP refuses it,
        and the checkpoints carry dead weights); one lacking where a feature comes failed at
        the first forward. MODEL.HTC.MASK_INFO_FLOW sets both; a LazyConfig sets each."""
        if not self.mask_on:
            return
        flow = self.mask_info_flow
        heads = [(t, h) for t, h in enumerate(self.mask_head) if hasattr(h, "res_conv")]
        unfed = [t for t, h in heads if h.res_conv is not None and not (flow and t > 0)]
        lacking = [t for t, h in heads if h.res_conv is None and flow and t > 0]
        if unfed:
            raise ValueError(
                f"the mask heads of stages {unfed} have a res_conv (roi_heads.mask_head[i]."
                "with_res_conv True) that receives no feature (MODEL.HTC.MASK_INFO_FLOW, "
                f"roi_heads.mask_info_flow={flow}; the first stage's head never receives one): "
                "its weights would get no gradient, which DDP refuses. Build them with "
                "with_res_conv=False" + ("" if flow else ", or set mask_info_flow=True")
            )
        if lacking:
            raise ValueError(
                "MODEL.HTC.MASK_INFO_FLOW (roi_heads.mask_info_flow) True hands each mask head "
                f"after the first the previous head's feature, but the heads of stages {lacking} "
                "have no res_conv to take it (roi_heads.mask_head[i].with_res_conv False): "
                "build them with with_res_conv=True, or set mask_info_flow=False"
            )

    def _check_class_counts(self) -> None:
        """Refuse a stage's box predictor or mask head of other classes than the ROI heads' K
        (``num_classes``), by which the sampling labels background RoIs: a predictor of more
        classes learned them as a foreground class (box losses ~40x) and predicted classes the
        data lacks, failing only at evaluation; a mask head of other channels would take the
        masks of other classes. MODEL.ROI_HEADS.NUM_CLASSES sets them all; the LazyConfigs
        link each stage's to roi_heads.num_classes ("${...num_classes}")."""
        k = self.num_classes
        for t, predictor in enumerate(self.box_predictor):
            classes = getattr(predictor, "num_classes", k)
            logits = getattr(getattr(predictor, "cls_score", None), "out_features", k + 1)
            if (classes, logits) != (k, k + 1):
                raise ValueError(
                    f"stage {t}'s box predictor has {classes} classes (roi_heads.box_predictors."
                    f"{t}.num_classes) and {logits} class logits (its cls_score; K+1 with the "
                    f"background) but the ROI heads have K={k} (roi_heads.num_classes, MODEL."
                    f"ROI_HEADS.NUM_CLASSES), which label the background RoIs {k}: set "
                    "roi_heads.num_classes alone, which the stages' num_classes follow"
                )
        for t, head in enumerate(self.mask_head if self.mask_on else ()):
            channels = getattr(getattr(head, "predictor", None), "out_channels", k)
            if channels not in (k, 1):
                raise ValueError(
                    f"stage {t}'s mask head predicts {channels} masks per RoI (roi_heads."
                    f"mask_head.{t}.num_classes) but the ROI heads have {k} classes (roi_heads."
                    "num_classes, MODEL.ROI_HEADS.NUM_CLASSES): give it the classes' count, or "
                    "1 for class-agnostic masks (MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK)"
                )

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        cascade = cfg.MODEL.ROI_BOX_CASCADE_HEAD
        if len(cascade.IOUS) != len(cascade.BBOX_REG_WEIGHTS):  # the parent only asserts
            raise ValueError(
                f"MODEL.ROI_BOX_CASCADE_HEAD: {len(cascade.IOUS)} IOUS but "
                f"{len(cascade.BBOX_REG_WEIGHTS)} BBOX_REG_WEIGHTS; give one per stage"
            )
        box_head = cfg.MODEL.ROI_BOX_HEAD
        if (box_head.USE_FED_LOSS or box_head.USE_SIGMOID_CE) and not HAS_FED_LOSS:
            raise ValueError(
                "MODEL.ROI_BOX_HEAD.USE_FED_LOSS and USE_SIGMOID_CE (the LVIS configs) need "
                "Detectron2 after v0.6: its FastRCNNOutputLayers has neither"
            )
        ret = super().from_config(cfg, input_shape)
        htc = cfg.MODEL.HTC
        ret.update(
            stage_loss_weights=htc.STAGE_LOSS_WEIGHTS,
            interleaved=htc.INTERLEAVED,
            mask_info_flow=htc.MASK_INFO_FLOW,
            semantic_fusion=htc.SEMANTIC_FUSION,
            mask_merge=htc.MASK_MERGE,
            test_nms=htc.TEST_NMS,
            soft_nms_sigma=htc.SOFT_NMS_SIGMA,
            soft_nms_min_score=htc.SOFT_NMS_MIN_SCORE,
            roi_align=htc.ROI_ALIGN,
        )
        if htc.SEMANTIC_ON:
            ret["semantic_pooler"] = cls._init_semantic_pooler(cfg, input_shape)
        return ret

    @classmethod
    def _init_semantic_pooler(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> ROIPooler:
        """RoIAlign on the semantic feature (stride SEM_SEG_HEAD.COMMON_STRIDE) at the mask
        resolution; the box branch average-pools the result down to its own resolution."""
        stride = cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE
        if stride not in {s.stride for s in input_shape.values()}:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.COMMON_STRIDE={stride} is not the stride of a backbone "
                f"feature { {f: s.stride for f, s in input_shape.items()} }"
            )
        return ROIPooler(
            output_size=cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION,
            scales=(1.0 / stride,),
            sampling_ratio=0,
            pooler_type=cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE,
        )

    @classmethod
    def _init_mask_head(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        """One mask head per stage, each built from ROI_MASK_HEAD.NAME (the parent builds one);
        the heads after the first take the previous head's feature (mask information flow)."""
        ret = super()._init_mask_head(cfg, input_shape)
        if not ret:
            return ret
        first = ret["mask_head"]
        if not chains_features(first):
            raise ValueError(
                f"MODEL.ROI_MASK_HEAD.NAME={cfg.MODEL.ROI_MASK_HEAD.NAME!r} cannot pass features "
                f"from stage to stage: {CHAINED_HEAD}"
            )
        resolution = cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION
        channels = input_shape[cfg.MODEL.ROI_HEADS.IN_FEATURES[0]].channels
        shape = ShapeSpec(channels=channels, height=resolution, width=resolution)
        head = ROI_MASK_HEAD_REGISTRY.get(cfg.MODEL.ROI_MASK_HEAD.NAME)
        later = [
            head(cfg, shape, with_res_conv=cfg.MODEL.HTC.MASK_INFO_FLOW)
            for _ in cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS[1:]
        ]
        ret["mask_head"] = nn.ModuleList([first, *later])
        return ret

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
    ) -> Tuple[List[Instances], Dict[str, torch.Tensor]]:
        """Same contract as the parent; training runs the interleaved cascade of the class doc.
        All poolings of the call share their features' layout copies (:func:`shared_levels`)."""
        del images
        with shared_levels():
            if self.training:
                return proposals, self._forward_train(features, proposals, targets)
            pred_instances = self._forward_box(features, proposals)
            return self.forward_with_given_boxes(features, pred_instances), {}

    def _forward_train(
        self,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: List[Instances],
    ) -> Dict[str, torch.Tensor]:
        """The interleaved cascade's losses, "{loss}_stage{t}" weighted by the stage's loss
        weight. Stage t samples the RoIs of its IoU threshold from ``proposals`` (the RPN's at
        stage 0, then the previous stage's refined boxes, constants to this stage), learns its
        box head on them, refines them, and, interleaved, samples the refined boxes again for its
        mask head, which learns on their foreground with the information flow of the heads
        before it.

        Args:
            features: the backbone's levels (N, C, Hl, Wl) and, with the semantic branch,
                ``SEMANTIC_FEATURE`` (N, C, H/s, W/s).
            proposals: per image, the RPN's proposals (R_i boxes).
            targets: per image, its ground truth.
        """
        losses, mask_rates = {}, {}
        storage = get_event_storage()
        for stage in range(self.num_cascade_stages):
            with storage.name_scope(f"stage{stage}"):
                sample = self._label_and_sample(proposals, targets, stage)
                predictions = self.box_stage(features, sample.rois, stage)
                stage_losses = self.box_predictor[stage].losses(predictions, sample.rois)
            if stage + 1 < self.num_cascade_stages or (self.mask_on and self.interleaved):
                proposals = self._refine(predictions, sample.rois, stage)
            if self.mask_on:
                if self.interleaved:
                    with storage.name_scope(f"stage{stage}/mask"):
                        sample = self._label_and_sample(proposals, targets, stage)
                foreground = foreground_rois(sample, targets)
                loss, mask_rates[stage] = self._mask_loss(features, foreground, stage)
                stage_losses["loss_mask"] = loss
            weight = self.stage_loss_weights[stage]
            losses.update({f"{k}_stage{stage}": v * weight for k, v in stage_losses.items()})
        self._log_mask_rates(mask_rates)
        return losses

    def _mask_loss(
        self, features: Dict[str, torch.Tensor], instances: List[Instances], stage: int
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Stage ``stage``'s mask loss on the foreground RoIs ``instances`` and its (3,) logged
        rates (:func:`htc.mask_head.mask_loss`); on the iterations that draw pictures of the
        masks, Detectron2's ``mask_rcnn_loss`` draws them and logs the rates itself (then None)."""
        boxes = [x.proposal_boxes for x in instances]
        classes = cat([x.gt_classes for x in instances])
        (logits,) = self._run_mask_heads(features, boxes, stage, keep_all=False, classes=classes)
        vis_period = self.mask_head[stage].vis_period
        storage = get_event_storage()
        if vis_period > 0 and storage.iter % vis_period == 0:
            with storage.name_scope(f"stage{stage}"):
                return mask_rcnn_loss(logits, instances, vis_period), None
        return mask_loss(logits, instances)

    @staticmethod
    @torch.compiler.disable
    def _log_mask_rates(rates: Dict[int, Optional[torch.Tensor]]) -> None:
        """The stages' mask accuracy, false-positive and false-negative rates, as
        ``mask_rcnn_loss`` names them (under "stage{t}/"), read from the device at once (eager
        under ``torch.compile``, which cannot trace the read)."""
        rates = {stage: r for stage, r in rates.items() if r is not None}
        if not rates:
            return
        values = torch.stack(list(rates.values())).tolist()
        storage = get_event_storage()
        for stage, (accuracy, false_positive, false_negative) in zip(rates, values):
            storage.put_scalar(f"stage{stage}/mask_rcnn/accuracy", accuracy)
            storage.put_scalar(f"stage{stage}/mask_rcnn/false_positive", false_positive)
            storage.put_scalar(f"stage{stage}/mask_rcnn/false_negative", false_negative)

    def _label_and_sample(
        self, proposals: List[Instances], targets: List[Instances], stage: int
    ) -> RoISample:
        """Stage ``stage``'s RoIs, sampled with its own matcher as the reference does at every
        stage (:func:`htc.sampling.sample_rois`); the parent's ``label_and_sample_proposals``
        knows only the stage-0 matcher and syncs with the host five times per image."""
        sample = sample_rois(
            proposals, targets, self.proposal_matchers[stage], self.num_classes,
            self.batch_size_per_image, self.positive_fraction, self.proposal_append_gt,
        )  # fmt: skip
        storage = get_event_storage()
        storage.put_scalar("roi_head/num_fg_samples", sum(sample.num_fg) / len(sample.rois))
        num_bg = sum(len(x) for x in sample.rois) - sum(sample.num_fg)
        storage.put_scalar("roi_head/num_bg_samples", num_bg / len(sample.rois))
        return sample

    @torch.no_grad()
    def _refine(
        self, predictions: Tuple[torch.Tensor, torch.Tensor], rois: List[Instances], stage: int
    ) -> List[Instances]:
        """Stage ``stage``'s refined boxes of the sampled RoIs, clipped to their image, with
        ``valid`` False for the empty ones and those of GT boxes, which the reference drops: the
        next sampling ignores them (dropping them would sync with the host once per image)."""
        sizes = [len(x) for x in rois]
        boxes = torch.cat(self.box_predictor[stage].predict_boxes(predictions, rois))
        image_sizes = [(w, h, w, h) for h, w in (x.image_size for x in rois)]
        limits = repeat_rows(host_tensor(image_sizes, boxes.device, boxes.dtype), sizes)
        refined = Boxes(torch.minimum(boxes.clamp(min=0), limits))
        valid = refined.nonempty() & ~cat([x.from_gt for x in rois])
        return [
            Instances(x.image_size, proposal_boxes=Boxes(b), valid=v)
            for x, b, v in zip(rois, refined.tensor.split(sizes), valid.split(sizes))
        ]

    def _semantic_rois(self, features: Dict[str, torch.Tensor], boxes: List[Boxes]) -> torch.Tensor:
        """(R, C, P, P) RoIAlign of the semantic feature at the mask pooler's resolution."""
        return self.semantic_pooler([_semantic_feature(features)], boxes)

    def _semantic_box_rois(
        self, features: Dict[str, torch.Tensor], boxes: List[Boxes]
    ) -> torch.Tensor:
        """(R, C, Sb, Sb): the semantic RoI feature at the mask resolution average-pooled to the
        box pooler's resolution Sb, as the reference computes it (a fixed size, as exporters
        need)."""
        size = tuple(self.box_pooler.output_size)
        return self.semantic_pooler.pooled([_semantic_feature(features)], boxes, size)

    def box_stage(
        self, features: Dict[str, torch.Tensor], proposals: List[Instances], stage: int
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Box head of stage ``stage``: (R, K+1) class logits and (R, 4) deltas.

        The parent's ``_run_stage`` under its own name: this takes the feature dict (for the
        semantic feature), sums the semantic RoI feature (average-pooled to the box resolution)
        into the box RoI features, and does not scale the gradient by 1/num_stages (HTC weights
        the stage losses instead).
        """
        boxes = [x.proposal_boxes for x in proposals]
        x = self.box_pooler([features[f] for f in self.box_in_features], boxes)
        if "bbox" in self.semantic_fusion:
            x = x + self._semantic_box_rois(features, boxes)
        return self.box_predictor[stage](self.box_head[stage](x))

    def _run_stage(self, features: List[torch.Tensor], proposals: List[Instances], stage: int):
        """Refused: the parent's signature has a list of features, without the semantic one
        that HTC's box stage sums in (its output would silently not be HTC's)."""
        raise NotImplementedError(
            "HybridTaskCascadeROIHeads runs a box stage with box_stage(features: Dict[str, "
            "Tensor], proposals, stage)"
        )

    def cascade_boxes_and_scores(
        self, features: Dict[str, torch.Tensor], proposals: List[Instances]
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Inference of the box cascade before NMS: per image, the last stage's (R, 4) boxes and
        (R, K+1) class probabilities of the stages' averaged logits (the parent averages the
        stages' probabilities): a softmax, or each class's sigmoid where the box predictors learn
        with sigmoid cross-entropy (MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE, which the federated loss
        of the LVIS configs needs; Detectron2 v0.6 has neither)."""
        assert not self.training, "training runs through _forward_train"
        image_sizes, sizes = [x.image_size for x in proposals], [len(x) for x in proposals]
        stage_logits, lost = [], None
        for stage in range(self.num_cascade_stages):
            predictions = self.box_stage(features, proposals, stage)
            stage_logits.append(predictions[0])
            boxes = cat(self.box_predictor[stage].predict_boxes(predictions, proposals))
            # a row whose box is not finite (an fp16 overflow) goes on with an empty box, where
            # the parent's clip asserts, and is dropped with the non-finite rows at the end
            not_finite = ~torch.isfinite(boxes).all(dim=1)
            lost = not_finite if lost is None else lost | not_finite
            if stage < self.num_cascade_stages - 1:
                refined = torch.where(lost[:, None], 0.0, boxes).split(sizes)
                proposals = self._create_proposals_from_boxes(refined, image_sizes)
        logits = sum(stage_logits) / len(stage_logits)
        sigmoid = getattr(self.box_predictor[-1], "use_sigmoid_ce", False)
        scores = logits.sigmoid() if sigmoid else F.softmax(logits, dim=-1)
        boxes = torch.where(lost[:, None], float("nan"), boxes)
        return list(boxes.split(sizes)), list(scores.split(sizes))

    def final_detections(
        self,
        boxes: List[torch.Tensor],
        scores: List[torch.Tensor],
        image_sizes: List[Tuple[int, int]],
    ) -> List[Instances]:
        """Score threshold, class-wise NMS (or Soft-NMS) and top-k of the last box predictor:
        per image, (R, 4) ``boxes`` and (R, K+1) ``scores`` -> at most top-k detections."""
        _warn_if_not_finite(boxes, scores)
        last = self.box_predictor[-1]
        thresholds = (last.test_score_thresh, last.test_nms_thresh, last.test_topk_per_image)
        if self.test_nms == "nms":
            return fast_rcnn_inference(boxes, scores, image_sizes, *thresholds)[0]
        method = self.test_nms[len("soft_") :]
        return soft_nms_inference(
            boxes, scores, image_sizes, *thresholds, method=method, sigma=self.soft_nms_sigma,
            min_score=self.soft_nms_min_score,
        )  # fmt: skip

    def _forward_box(
        self, features: Dict[str, torch.Tensor], proposals: List[Instances], targets=None
    ) -> List[Instances]:
        """Inference of the boxes: the parent's averages the stages' class probabilities, HTC
        (the reference) their logits, before one softmax. Training runs ``_forward_train``."""
        boxes, scores = self.cascade_boxes_and_scores(features, proposals)
        return self.final_detections(boxes, scores, [x.image_size for x in proposals])

    def _forward_mask(
        self, features: Dict[str, torch.Tensor], instances: List[Instances]
    ) -> List[Instances]:
        """Inference: every stage's head on the detected boxes; ``pred_masks`` (R, 1, M, M) is
        the mean of their sigmoid masks ("mean") or the last one ("last"). The parent has one
        head. (Training computes the stages' losses with :meth:`_mask_loss`.)
        """
        if not self.mask_on:
            return instances
        boxes = [x.pred_boxes for x in instances]
        classes = cat([x.pred_classes for x in instances])
        probs = torch.stack(self.stage_mask_probabilities(features, boxes, classes)).mean(dim=0)
        return with_masks(instances, probs)

    def stage_mask_probabilities(
        self, features: Dict[str, torch.Tensor], boxes: List[Boxes], classes: torch.Tensor
    ) -> List[torch.Tensor]:
        """(R, 1, M, M) sigmoid masks of ``classes`` on ``boxes``: of every stage ("mean") or
        of the last ("last")."""
        keep_all = self.mask_merge == "mean"
        last = self.num_cascade_stages - 1
        return [x.sigmoid() for x in self._run_mask_heads(features, boxes, last, keep_all, classes)]

    def _run_mask_heads(
        self,
        features: Dict[str, torch.Tensor],
        boxes: List[Boxes],
        last_stage: int,
        keep_all: bool,
        classes: Optional[torch.Tensor] = None,
    ) -> List[torch.Tensor]:
        """Mask heads 0..``last_stage`` on the same RoIs: with mask information flow each head
        receives the previous head's (R, C, P, P) feature (earlier heads run convs only unless
        ``keep_all``). Returns the logits of the last head, or of every head: (R, 1, M, M)
        those of the (R,) ``classes``, or (R, K, M, M) every class's without them.
        """
        x = self.mask_pooler([features[f] for f in self.mask_in_features], boxes)
        if "mask" in self.semantic_fusion:
            x = x + self._semantic_rois(features, boxes)
        first = 0 if (self.mask_info_flow or keep_all) else last_stage
        logits, res_feat = [], None
        for stage in range(first, last_stage + 1):
            with_logits = keep_all or stage == last_stage
            stage_logits, feat = self.mask_head[stage](
                x, res_feat=res_feat, with_logits=with_logits, classes=classes
            )
            res_feat = feat if self.mask_info_flow else None
            if with_logits:  # a head may return every class's logits whatever ``classes``
                logits.append(
                    stage_logits if classes is None else of_classes(stage_logits, classes)
                )
        return logits


def _check_test_thresholds(predictor: nn.Module) -> None:
    """Refuse a test score or NMS IoU threshold outside [0, 1]: a score threshold of 50 (meant
    as a percentage) kept no detection, silently."""
    for key, value in (
        ("SCORE_THRESH_TEST (test_score_thresh)", predictor.test_score_thresh),
        ("NMS_THRESH_TEST (test_nms_thresh)", predictor.test_nms_thresh),
    ):
        if not 0 <= value <= 1:
            raise ValueError(f"MODEL.ROI_HEADS.{key}={value}: give a value in [0, 1]")


def _warn_if_not_finite(boxes: List[torch.Tensor], scores: List[torch.Tensor]) -> None:
    """A warning, the first time, that rows of the per-image (R, 4) ``boxes`` or (R, K+1)
    ``scores`` are not finite: the test-time NMS drops them (Detectron2's silently)."""
    if not boxes or torch.jit.is_tracing():
        return
    finite = [torch.isfinite(b).all(1) & torch.isfinite(s).all(1) for b, s in zip(boxes, scores)]
    lost = int((~cat(finite)).sum())
    if lost:
        log_first_n(
            logging.WARNING,
            f"{lost} detection candidates have a non-finite box or score (an fp16 overflow, a "
            "diverged model?): they are dropped",
            n=1,
        )


def with_masks(instances: List[Instances], probs: torch.Tensor) -> List[Instances]:
    """Each image's ``instances`` with their rows of the (R, 1, M, M) mask probabilities
    ``probs`` as ``pred_masks``; an instance whose mask is not finite is dropped, with a warning
    the first time (an empty mask would pass for a prediction), except under tracing (an
    exported graph would keep the count of one input)."""
    sizes = [len(x) for x in instances]
    finite = torch.isfinite(probs).flatten(1).all(dim=1)
    lost = 0 if torch.jit.is_tracing() else int((~finite).sum())
    if lost:
        log_first_n(
            logging.WARNING,
            f"{lost} detections have a non-finite mask (an fp16 overflow, a diverged model?): "
            "they are dropped",
            n=1,
        )
    out = []
    for x, p, keep in zip(instances, probs.split(sizes), finite.split(sizes)):
        if lost:
            x, p = x[keep], p[keep]
        x.pred_masks = p
        out.append(x)
    return out
