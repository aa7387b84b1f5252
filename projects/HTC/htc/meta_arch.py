"""HybridTaskCascade: Detectron2's GeneralizedRCNN with HTC's semantic segmentation branch,
whose feature map reaches the ROI heads and whose logits give the ``sem_seg`` output (and, with
the panoptic option, ``panoptic_seg``)."""

import math
from typing import Dict, List, Optional, Tuple, Union

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, build_sem_seg_head
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage

from .backbones import square_size
from .box_coder import use_reference_decoding
from .layers import DEFORM_CONV_KERNELS, interpolate_bilinear
from .panoptic import PanopticFusion
from .postprocessing import MASK_OUTPUTS, paste_masks_as_rle
from .roi_heads import SEMANTIC_FEATURE, HybridTaskCascadeROIHeads, fuses_semantic_feature
from .semantic_head import FusedSemanticHead

# "rle" output: the instances' (N, 1, M, M) masks through the parent's postprocessing, unpasted
HELD_MASKS = "held_box_masks"
# Detectron2's SimpleFeaturePyramid.padding_constraints' key for its size divisibility
MISSPELLED_DIVISIBILITY = "size_divisiblity"


@META_ARCH_REGISTRY.register()
class HybridTaskCascade(GeneralizedRCNN):
    """Hybrid Task Cascade: a :class:`GeneralizedRCNN` whose semantic branch runs once per batch
    on the FPN features. Its feature, where the ROI heads fuse one, reaches them as
    ``features[SEMANTIC_FEATURE]``; its loss is learned from the inputs' ``sem_seg``. At
    inference each output has ``instances`` and, with the semantic branch, ``sem_seg``
    (K, H, W) class scores and, with panoptic fusion, ``panoptic_seg`` as PanopticFPN gives it.
    """

    @configurable
    def __init__(
        self,
        *,
        semantic_head: Optional[FusedSemanticHead] = None,
        semantic_output: bool = True,
        mask_output: str = "bitmask",
        panoptic_fusion: Optional[PanopticFusion] = None,
        deform_conv: str = "torchvision",
        **kwargs,
    ):
        """
        Args:
            semantic_head: the semantic segmentation branch, or None for HTC without it.
            semantic_output: with the branch, whether inference outputs ``sem_seg``.
            mask_output: "bitmask": instances' ``pred_masks`` (N, H, W) as Detectron2 gives
                them; "rle": ``pred_masks_rle``, N COCO RLEs, made a few masks at a time.
            panoptic_fusion: with the semantic branch and "bitmask" masks, adds
                ``panoptic_seg`` to the inference outputs.
            deform_conv: the kernels of the backbone's deformable convs: "torchvision" (CPU and
                CUDA) or "detectron2" (CUDA only).
            kwargs: arguments of :class:`GeneralizedRCNN`.
        """
        super().__init__(**kwargs)
        if deform_conv not in DEFORM_CONV_KERNELS:
            raise ValueError(
                f"MODEL.HTC.DEFORM_CONV (deform_conv) {deform_conv!r}: use one of "
                f"{sorted(DEFORM_CONV_KERNELS)}"
            )
        DEFORM_CONV_KERNELS[deform_conv](self.backbone)
        use_reference_decoding(self)
        _check_pixel_statistics(self.pixel_mean, self.input_format)
        if self.proposal_generator is None:
            raise ValueError("HybridTaskCascade needs an RPN (MODEL.PROPOSAL_GENERATOR.NAME)")
        _check_roi_heads(self.roi_heads)
        _check_semantic_head(semantic_head)
        _check_semantic_fusion(self.roi_heads, semantic_head)
        if semantic_head is not None and semantic_head.embed_dim is not None:
            _check_semantic_feature(self.roi_heads, semantic_head, self.backbone.output_shape())
        self.semantic_head = semantic_head
        self.semantic_output = semantic_output
        if mask_output not in MASK_OUTPUTS:
            raise ValueError(f"MODEL.HTC.MASK_OUTPUT={mask_output!r}: use one of {MASK_OUTPUTS}")
        self.mask_output = mask_output
        if panoptic_fusion is not None:
            _check_panoptic(semantic_head, mask_output, self.roi_heads.mask_on)
        self.panoptic_fusion = panoptic_fusion

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["semantic_output"] = cfg.MODEL.HTC.SEMANTIC_OUTPUT
        ret["mask_output"] = cfg.MODEL.HTC.MASK_OUTPUT
        ret["deform_conv"] = cfg.MODEL.HTC.DEFORM_CONV
        if cfg.MODEL.HTC.SEMANTIC_ON:
            ret["semantic_head"] = build_sem_seg_head(cfg, ret["backbone"].output_shape())
        if cfg.MODEL.HTC.PANOPTIC_ON:
            ret["panoptic_fusion"] = PanopticFusion(cfg)
        return ret

    def preprocess_image(self, batched_inputs: List[dict]) -> ImageList:
        """The parent's normalized, padded batch, but padded to the backbone's divisibility where
        its ``padding_constraints`` misspell the key: the parent hands them to ``ImageList`` as
        they are, and Detectron2's SimpleFeaturePyramid (ViTDet) gives "size_divisiblity",
        which ``ImageList`` does not read, so the ViT dropped the last H % 16 rows and W % 16
        columns of an unpadded input. Refuses an image longer than the backbone's square."""
        _check_square(batched_inputs, square_size(self.backbone))
        constraints = getattr(self.backbone, "padding_constraints", {})  # none on v0.6
        if MISSPELLED_DIVISIBILITY not in constraints:
            return super().preprocess_image(batched_inputs)
        constraints = dict(constraints)
        constraints.setdefault("size_divisibility", constraints[MISSPELLED_DIVISIBILITY])
        images = [self._move_to_current_device(x["image"]) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        return ImageList.from_tensors(images, padding_constraints=constraints)

    def _features(
        self, images: ImageList
    ) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """Backbone features plus, with a semantic branch that makes one (an embedding), its
        feature under ``SEMANTIC_FEATURE``; also returns the semantic logits (N, K, H/s, W/s)
        or None."""
        features = self.backbone(images.tensor)
        if self.semantic_head is None:
            return features, None
        logits, feature = self.semantic_head(features)
        if feature is not None:
            features[SEMANTIC_FEATURE] = feature
        return features, logits

    def forward(self, batched_inputs: List[dict]) -> Union[Dict[str, torch.Tensor], List[dict]]:
        """Training: the parent's losses plus ``loss_sem_seg``; the parent cannot hand the
        semantic feature to the ROI heads."""
        if not self.training:
            return self.inference(batched_inputs)
        if "instances" not in batched_inputs[0]:
            raise ValueError("HybridTaskCascade trains on inputs with 'instances'")
        images = self.preprocess_image(batched_inputs)
        features, semantic_logits = self._features(images)
        losses = {}
        if semantic_logits is not None:
            targets = self._semantic_targets(batched_inputs, images)
            losses.update(self.semantic_head.losses(semantic_logits, targets))
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        if self.vis_period > 0 and get_event_storage().iter % self.vis_period == 0:
            self.visualize_training(batched_inputs, proposals)
        losses.update(proposal_losses)
        losses.update(detector_losses)
        return losses

    def _semantic_targets(self, batched_inputs: List[dict], images: ImageList) -> torch.Tensor:
        """(N, H, W) int64 labels padded with the ignore value to the padded image size."""
        lacking = [x.get("file_name", f"input {i}") for i, x in enumerate(batched_inputs)
                   if "sem_seg" not in x]  # fmt: skip
        if lacking:
            raise ValueError(
                f"HTC's semantic branch needs per-pixel labels: {lacking[0]} has no 'sem_seg'. "
                "Give the dataset 'sem_seg_file_name', derive labels from the instances "
                "(docs/datasets.md; LazyConfig: dataloader.train.mapper.derive_semantic=True), "
                "or turn the branch off with MODEL.HTC.SEMANTIC_ON False (LazyConfig: "
                "model.semantic_head=None, model.roi_heads.semantic_fusion=[])"
            )
        height, width = images.tensor.shape[-2:]
        targets = torch.full(
            (len(batched_inputs), height, width),
            self.semantic_head.ignore_value,
            dtype=torch.long,
            device=self.device,
        )
        for i, (x, size) in enumerate(zip(batched_inputs, images.image_sizes)):
            sem_seg, name = x["sem_seg"], x.get("file_name", f"input {i}")
            if tuple(sem_seg.shape) != tuple(size):
                raise ValueError(
                    f"sem_seg of {name} has shape {tuple(sem_seg.shape)}, its image {tuple(size)}"
                )
            if sem_seg.is_floating_point() or sem_seg.is_complex():
                raise ValueError(
                    f"sem_seg of {name} has dtype {sem_seg.dtype}: per-pixel class labels are "
                    "integers (the copy into int64 labels would truncate 3.7 to class 3)"
                )
            targets[i, : size[0], : size[1]] = sem_seg.to(self.device)
        return targets

    def inference(
        self,
        batched_inputs: List[dict],
        detected_instances: Optional[List[Instances]] = None,
        do_postprocess: bool = True,
    ) -> Union[List[dict], List[Instances]]:
        """As the parent's (TTA calls it with ``detected_instances``), with the semantic feature
        handed to the ROI heads and ``sem_seg`` added to the post-processed outputs."""
        assert not self.training
        images = self.preprocess_image(batched_inputs)
        results, semantic_logits = self.detect(images, detected_instances)
        if not do_postprocess:
            return results
        outputs = [
            {"instances": self.postprocess_instances(r, *_output_size(x, size))}
            for r, x, size in zip(results, batched_inputs, images.image_sizes)
        ]
        if semantic_logits is not None:
            self._add_semantic_outputs(outputs, semantic_logits, batched_inputs, images)
        return outputs

    def _add_semantic_outputs(
        self,
        outputs: List[dict],
        semantic_logits: torch.Tensor,
        batched_inputs: List[dict],
        images: ImageList,
    ) -> None:
        """Add ``sem_seg`` (K, height, width) scores and ``panoptic_seg``, each if asked for, to
        the post-processed ``outputs`` (in place); ``semantic_logits`` (N, K, H/s, W/s)."""
        if not self.semantic_output and self.panoptic_fusion is None:
            return
        scores = self.semantic_head.upsample_logits(semantic_logits)
        for out, score, x, size in zip(outputs, scores, batched_inputs, images.image_sizes):
            score = _resize_to_output(score, size, *_output_size(x, size))
            if self.semantic_output:
                out["sem_seg"] = score
            if self.panoptic_fusion is not None:
                out["panoptic_seg"] = self.panoptic_fusion(out["instances"], score)

    def detect(
        self, images: ImageList, detected_instances: Optional[List[Instances]] = None
    ) -> Tuple[List[Instances], Optional[torch.Tensor]]:
        """Inference before any post-processing (what ``htc.export`` traces): per image, the
        detections in the padded input's pixels with ``pred_masks`` (R, 1, M, M) mask
        probabilities (or the masks of ``detected_instances``' boxes); and the semantic logits
        (N, K, H/s, W/s) of the padded batch, or None without the semantic branch."""
        features, semantic_logits = self._features(images)
        if detected_instances is None:
            proposals, _ = self.proposal_generator(images, features, None)
            results, _ = self.roi_heads(images, features, proposals, None)
        else:
            detected_instances = [x.to(self.device) for x in detected_instances]
            results = self.roi_heads.forward_with_given_boxes(features, detected_instances)
        return results, semantic_logits

    @torch.compiler.disable
    def postprocess_instances(self, instances: Instances, height: int, width: int) -> Instances:
        """Detectron2's ``detector_postprocess`` of one image's detections to ``height`` x
        ``width``, with their masks as MODEL.HTC.MASK_OUTPUT asks (what :meth:`inference` and
        test-time augmentation return). Eager under ``torch.compile``: the pasting's shapes and
        chunks depend on the detections."""
        self._hold_box_masks(instances)
        instances = detector_postprocess(instances, height, width)
        _paste_held_masks_as_rle(instances)
        return instances

    def _hold_box_masks(self, results: Instances) -> None:
        """With "rle" output, the (N, 1, M, M) ``pred_masks`` of ``results`` renamed, so that the
        parent's postprocessing keeps them with their boxes (it drops boxes clipped to nothing)
        and does not paste them all at full resolution."""
        if self.mask_output == "rle" and results.has("pred_masks"):
            results.set(HELD_MASKS, results.pred_masks)
            results.remove("pred_masks")


def _check_square(batched_inputs: List[dict], square: int) -> None:
    """Refuse an image longer than the backbone's ``square`` (0: none), to which ``ImageList``
    would crop a lone image silently (and fail on a batch)."""
    if square <= 0 or torch.jit.is_tracing():  # htc.export checks its sample image
        return
    for i, x in enumerate(batched_inputs):
        height, width = x["image"].shape[-2:]
        if max(height, width) > square:
            raise ValueError(
                f"{x.get('file_name', f'input {i}')} is {height}x{width} px, longer than the "
                f"backbone's {square} px square (MODEL.{{VIT,MVIT,SWIN}}.SQUARE_PAD; "
                "LazyConfig: model.backbone.square_pad), to which Detectron2 would crop it: "
                "resize the inputs to fit (INPUT.MAX_SIZE_TEST, INPUT.MAX_SIZE_TRAIN; "
                "LazyConfig: the mappers' augmentations) or pad to a longer square"
            )


def _output_size(batched_input: dict, image_size: Tuple[int, int]) -> Tuple[int, int]:
    """The (height, width) an input asks its outputs at, by default its resized image's."""
    return batched_input.get("height", image_size[0]), batched_input.get("width", image_size[1])


def _paste_held_masks_as_rle(instances: Instances) -> None:
    """The held masks of :meth:`HybridTaskCascade._hold_box_masks` pasted into ``instances``'
    image, a few at a time, as ``pred_masks_rle``."""
    if instances.has(HELD_MASKS):
        masks = instances.get(HELD_MASKS)
        instances.remove(HELD_MASKS)
        height, width = instances.image_size
        instances.pred_masks_rle = paste_masks_as_rle(masks, instances.pred_boxes, height, width)


CHANNELS = {"BGR": 3, "RGB": 3, "YUV-BT.601": 3, "L": 1}  # of Detectron2's read_image formats


def _check_pixel_statistics(pixel_mean: torch.Tensor, input_format: Optional[str]) -> None:
    """Refuse a MODEL.PIXEL_MEAN of another length than the channels of INPUT.FORMAT's images:
    the backbone's stem takes len(PIXEL_MEAN) channels, and the first image failed in torch."""
    channels = CHANNELS.get(input_format)  # other formats (RGBA, ...): not checked
    if channels is not None and pixel_mean.numel() != channels:
        raise ValueError(
            f"MODEL.PIXEL_MEAN (pixel_mean) has {pixel_mean.numel()} values, but INPUT.FORMAT "
            f"(input_format) {input_format!r} gives {channels}-channel images: give a mean and a "
            "std per channel"
        )


def _check_roi_heads(roi_heads: torch.nn.Module) -> None:
    """Refuse ROI heads that are not HTC's: Detectron2's CascadeROIHeads built in their place
    trained, ignoring every HTC setting (stage loss weights, interleaving, information flow,
    semantic fusion) and the semantic feature."""
    if not isinstance(roi_heads, HybridTaskCascadeROIHeads):
        raise ValueError(
            f"HybridTaskCascade's ROI heads must be HybridTaskCascadeROIHeads, not "
            f"{type(roi_heads).__name__}, which would ignore HTC's settings: set "
            "MODEL.ROI_HEADS.NAME 'HybridTaskCascadeROIHeads' (or META_ARCHITECTURE "
            "'GeneralizedRCNN' for Detectron2's own model)"
        )


def _check_semantic_head(semantic_head: Optional[torch.nn.Module]) -> None:
    """Refuse a semantic branch that is not HTC's: the model needs its (logits, feature) pair,
    and another head (Detectron2's default ``SemSegFPNHead``) fails deep in its forward."""
    if semantic_head is not None and not isinstance(semantic_head, FusedSemanticHead):
        raise ValueError(
            f"HTC's semantic branch must be a FusedSemanticHead, not {type(semantic_head).__name__}"
            ": set MODEL.SEM_SEG_HEAD.NAME 'FusedSemanticHead' (the configs based on "
            "configs/htc_R_50_FPN_1x.yaml do)"
        )


def _check_semantic_fusion(
    roi_heads: HybridTaskCascadeROIHeads, semantic_head: Optional[FusedSemanticHead]
) -> None:
    """Refuse ROI heads that fuse the semantic feature into a model without the branch or whose
    branch makes none, and a branch that makes one that nothing fuses (its ``conv_embedding``
    would get no gradient, which DDP refuses). The yacs configs derive the branch's
    ``embed_dim`` from MODEL.HTC.SEMANTIC_FUSION; a LazyConfig sets both."""
    fusion = list(roi_heads.semantic_fusion)
    if fusion and semantic_head is None:
        raise ValueError(
            f"the ROI heads sum the semantic feature into {fusion} RoI features "
            "(semantic_fusion), but the model has no semantic branch (semantic_head None): "
            "give it one (MODEL.HTC.SEMANTIC_ON True) or set the ROI heads' semantic_fusion "
            "to [] (MODEL.HTC.SEMANTIC_FUSION [])"
        )
    if semantic_head is None:
        return
    fused = fuses_semantic_feature(fusion, roi_heads.mask_on)
    if fused and semantic_head.embed_dim is None:
        raise ValueError(
            f"the ROI heads sum the semantic feature into {fusion} RoI features "
            "(roi_heads.semantic_fusion), but the semantic branch makes none "
            "(semantic_head.embed_dim None): give it the RoI features' channels as embed_dim, "
            "or set roi_heads.semantic_fusion=[]"
        )
    if not fused and semantic_head.embed_dim is not None:
        without_masks = " (the model has no masks)" if fusion else ""
        raise ValueError(
            f"nothing sums the semantic feature into RoI features (roi_heads.semantic_fusion "
            f"{fusion}{without_masks}), so the semantic branch's conv_embedding would get no "
            "gradient, which DDP refuses: set semantic_head.embed_dim=None (the yacs configs "
            "derive it from MODEL.HTC.SEMANTIC_FUSION and MODEL.MASK_ON)"
        )


def _check_semantic_feature(
    roi_heads: HybridTaskCascadeROIHeads,
    semantic_head: FusedSemanticHead,
    shapes: Dict[str, ShapeSpec],
) -> None:
    """Refuse a semantic feature of other channels than the RoI features it is summed into
    (``shapes``: the backbone's), or pooled at another scale than its stride (the RoIs would be
    pooled from the wrong place, silently). The yacs configs derive the scale and the stride
    from MODEL.SEM_SEG_HEAD.COMMON_STRIDE; a LazyConfig sets each."""
    fusion = roi_heads.semantic_fusion
    names = list(roi_heads.box_in_features) if "bbox" in fusion else []
    if "mask" in fusion and roi_heads.mask_on:
        names += roi_heads.mask_in_features
    channels = sorted({shapes[name].channels for name in names})
    if channels != [semantic_head.embed_dim]:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.EMBED_DIM (semantic_head.embed_dim) {semantic_head.embed_dim} "
            f"must equal the channels of the RoI features {channels} it is summed into "
            "(MODEL.FPN.OUT_CHANNELS; LazyConfig: the backbone's out_channels)"
        )
    stride = semantic_head.common_stride
    scales = [level.spatial_scale for level in roi_heads.semantic_pooler.level_poolers]
    if len(scales) != 1 or not math.isclose(scales[0], 1 / stride):
        raise ValueError(
            f"roi_heads.semantic_pooler.scales {tuple(scales)} must be (1/{stride},): the "
            f"semantic feature has stride {stride} (semantic_head.fusion_feature "
            f"{semantic_head.fusion_feature!r}); the yacs configs derive both from "
            "MODEL.SEM_SEG_HEAD.COMMON_STRIDE"
        )


def _check_panoptic(semantic_head, mask_output: str, mask_on: bool) -> None:
    """Refuse panoptic fusion where its inputs are missing."""
    if semantic_head is None:
        raise ValueError(
            "MODEL.HTC.PANOPTIC_ON takes the stuff from the semantic branch: set "
            "MODEL.HTC.SEMANTIC_ON True"
        )
    if not mask_on:
        raise ValueError(
            "MODEL.HTC.PANOPTIC_ON pastes the instances' masks: set MODEL.MASK_ON True"
        )
    if mask_output != "bitmask":
        raise ValueError(
            "MODEL.HTC.PANOPTIC_ON pastes the instances' masks as bitmasks: set "
            f"MODEL.HTC.MASK_OUTPUT 'bitmask' (it is {mask_output!r})"
        )


def _resize_to_output(scores: torch.Tensor, size: Tuple[int, int], height: int, width: int):
    """(K, H, W) scores of the padded input -> (K, height, width) of the output: Detectron2's
    ``sem_seg_postprocess`` (crop to ``size``, bilinear resize) with its resize by
    :func:`htc.layers.interpolate_bilinear`, which stays small in deterministic runs; at the
    input's own size the crop alone (the resize would be an identity that costs a pass over
    K x H x W floats)."""
    crop = scores[:, : size[0], : size[1]]
    if (height, width) == tuple(size):
        return crop
    return interpolate_bilinear(crop[None], (height, width), align_corners=False)[0]
