"""Test-time augmentation of HTC as the reference's 2.x ``aug_test`` (multi-scale + flip).

Detectron2's ``GeneralizedRCNNWithTTA`` runs full inference (with NMS) per augmentation and
merges the detections. The reference instead
  1. merges the RPN proposals of all augmentations (mapped to the original image, NMS, top-k);
  2. runs the box cascade of every augmentation on those same proposals (stage logits averaged,
     last-stage boxes), maps the boxes back and averages boxes and class scores over the
     augmentations, then applies one class-wise NMS;
  3. averages the sigmoid masks of all stages and augmentations (flipped back) on the final
     boxes.
This class keeps Detectron2's augmentation machinery and overrides the per-image inference.
"""

from typing import List, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data.transforms import HFlipTransform, TransformList
from detectron2.layers import batched_nms
from detectron2.modeling import GeneralizedRCNNWithTTA
from detectron2.structures import Boxes, ImageList, Instances

from .roi_heads import with_masks

View = Tuple[ImageList, dict]  # one augmented image: its ImageList and features


def _apply(tfm: TransformList, boxes: torch.Tensor) -> torch.Tensor:
    """(R, 4) XYXY ``boxes`` through the transforms ``tfm``, as a tensor like ``boxes``."""
    mapped = tfm.apply_box(boxes.detach().cpu().numpy().astype(np.float32))
    return torch.as_tensor(mapped, dtype=boxes.dtype, device=boxes.device)


def _clipped(boxes: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(R, 4) ``boxes`` clipped to ``size`` (H, W) as ``Boxes.clip`` clips them; a row that is
    not finite becomes NaN (``Boxes.clip`` asserts; clipping would make an inf finite), which
    the final detections drop."""
    height, width = size
    clipped = torch.min(boxes.clamp(min=0), boxes.new_tensor([width, height, width, height]))
    return torch.where(torch.isfinite(boxes).all(dim=1, keepdim=True), clipped, float("nan"))


def check_tta(cfg: CfgNode) -> None:
    """Refuse ``TEST.AUG`` sizes that give no views (``torch.cat`` of none) or views whose
    longer side is capped below their shorter side's size (AP near 0, silently)."""
    sizes, max_size = list(cfg.TEST.AUG.MIN_SIZES), cfg.TEST.AUG.MAX_SIZE
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"TEST.AUG.MIN_SIZES={sizes}: give one or more positive sizes")
    if max_size < min(sizes):
        raise ValueError(
            f"TEST.AUG.MAX_SIZE={max_size} is under every size of TEST.AUG.MIN_SIZES {sizes}: "
            "every view would be shrunk under its size"
        )


class HybridTaskCascadeWithTTA(GeneralizedRCNNWithTTA):
    """``HybridTaskCascadeWithTTA(cfg, model)``: augmentations from ``TEST.AUG``."""

    def __init__(self, cfg: CfgNode, model: torch.nn.Module, *args, **kwargs):
        """The parent's, after :func:`check_tta` (the parent takes any sizes)."""
        check_tta(cfg)
        super().__init__(cfg, model, *args, **kwargs)

    def _inference_one_image(self, input: dict) -> dict:
        """The reference's ``aug_test`` merging: the views' proposals merged, the boxes and
        scores each view computes on them averaged before one NMS, then the masks averaged (the
        parent runs NMS over the union of each view's final detections)."""
        orig_shape = (input["height"], input["width"])
        augmented_inputs, tfms = self._get_augmented_inputs(input)
        with torch.no_grad():
            views = [self._view(x) for x in augmented_inputs]
            proposals = self._merged_proposals(views, tfms, orig_shape)
            boxes, scores = self._averaged_boxes_and_scores(views, tfms, proposals)
            heads = self.model.roi_heads
            instances = heads.final_detections([boxes], [scores], [orig_shape])[0]
            if self.cfg.MODEL.MASK_ON:
                masks = self._averaged_masks(views, tfms, instances)
                instances = with_masks([instances], masks)[0]
                instances = self.model.postprocess_instances(instances, *orig_shape)
        return {"instances": instances}

    def _view(self, augmented_input: dict) -> View:
        images = self.model.preprocess_image([augmented_input])
        features, _ = self.model._features(images)
        return images, features

    def _merged_proposals(
        self, views: List[View], tfms: List[TransformList], orig_shape: Tuple[int, int]
    ) -> torch.Tensor:
        """(P, 4) proposals on the original image: every view's RPN proposals mapped back, then
        NMS (RPN threshold) and the top POST_NMS_TOPK_TEST. One view's are used as they are."""
        boxes, scores = [], []
        for (images, features), tfm in zip(views, tfms):
            proposals = self.model.proposal_generator(images, features, None)[0][0]
            boxes.append(_apply(tfm.inverse(), proposals.proposal_boxes.tensor))
            scores.append(proposals.objectness_logits)
        if len(views) == 1:
            return boxes[0]
        merged = Boxes(torch.cat(boxes))
        merged.clip(orig_shape)
        scores = torch.cat(scores)
        rpn = self.cfg.MODEL.RPN
        keep = batched_nms(merged.tensor, scores, torch.zeros_like(scores), rpn.NMS_THRESH)
        return merged.tensor[keep[: rpn.POST_NMS_TOPK_TEST]]

    def _averaged_boxes_and_scores(
        self, views: List[View], tfms: List[TransformList], proposals: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean over views of the cascade's (P, 4) boxes (on the original image) and (P, K+1)
        probabilities for the same proposals."""
        all_boxes, all_scores = [], []
        for (images, features), tfm in zip(views, tfms):
            size = images.image_sizes[0]
            aug = Instances(size, proposal_boxes=Boxes(_apply(tfm, proposals)))
            boxes, scores = self.model.roi_heads.cascade_boxes_and_scores(features, [aug])
            all_boxes.append(_apply(tfm.inverse(), _clipped(boxes[0], size)))
            all_scores.append(scores[0])
        return torch.stack(all_boxes).mean(dim=0), torch.stack(all_scores).mean(dim=0)

    def _averaged_masks(
        self, views: List[View], tfms: List[TransformList], instances: Instances
    ) -> torch.Tensor:
        """(R, 1, M, M) mean of every stage's and view's sigmoid masks on the final boxes."""
        masks = []
        for (_, features), tfm in zip(views, tfms):
            boxes = Boxes(_apply(tfm, instances.pred_boxes.tensor))
            stage_masks = self.model.roi_heads.stage_mask_probabilities(
                features, [boxes], instances.pred_classes
            )
            flipped = any(isinstance(t, HFlipTransform) for t in tfm.transforms)
            masks += [m.flip(dims=[3]) if flipped else m for m in stage_masks]
        return torch.stack(masks).mean(dim=0)
