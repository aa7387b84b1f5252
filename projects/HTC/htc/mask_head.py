"""HTCMaskHead: one stage's mask head of HTC, Detectron2's conv + deconv mask head with the
mask information flow: the previous stage's head's 14x14 feature, through a 1x1 conv, summed
into this head's RoI features, and this head's feature passed on to the next."""

import warnings
from typing import Dict, List, Optional, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling.roi_heads import ROI_MASK_HEAD_REGISTRY, MaskRCNNConvUpsampleHead
from detectron2.structures import BitMasks, Instances, PolygonMasks
from torch import nn
from torch.nn import functional as F


@ROI_MASK_HEAD_REGISTRY.register()
class HTCMaskHead(MaskRCNNConvUpsampleHead):
    """One stage's mask head of HTC: Mask R-CNN's conv + deconv head with mask information flow
    (:meth:`chain`).

    With ``with_res_conv``, the 14x14 feature of the previous stage's head (taken before its
    deconv) goes through a 1x1 conv, the head's ``conv_norm`` and a ReLU (``res_conv``, the
    reference's ``conv_res`` ConvModule) and is summed into the RoI features before this head's
    convs. Stage 0 has no ``res_conv``.
    """

    @configurable
    def __init__(
        self, input_shape: ShapeSpec, *, with_res_conv: bool = False, conv_norm="", **kwargs
    ):
        super().__init__(input_shape, conv_norm=conv_norm, **kwargs)
        self.res_conv: Optional[Conv2d] = None
        if with_res_conv:
            # what the deconv takes: the last conv's output, or the input without convs
            dim, channels = self.deconv.in_channels, input_shape.channels
            self.res_conv = Conv2d(
                dim, channels, kernel_size=1, bias=not conv_norm,
                norm=get_norm(conv_norm, channels), activation=F.relu,
            )  # fmt: skip
            weight_init.c2_msra_fill(self.res_conv)

    @classmethod
    def from_config(cls, cfg, input_shape, with_res_conv: bool = False):
        ret = super().from_config(cfg, input_shape)
        ret["with_res_conv"] = with_res_conv
        return ret

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        """The parent iterates over all children; ``res_conv`` is not one of its layers."""
        return self.predict(self.conv_features(x))

    def conv_features(
        self, x: torch.Tensor, res_feat: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """
        Args:
            x: (R, C, 14, 14) RoI features.
            res_feat: (R, D, 14, 14) feature of the previous stage's head, or None.

        Returns:
            (R, D, 14, 14) output of the convs (before the deconv).
        """
        if res_feat is not None:
            if self.res_conv is None:
                raise ValueError("this HTCMaskHead has no res_conv: it cannot take a res_feat")
            x = x + self.res_conv(res_feat)
        for conv in self.conv_norm_relus:
            x = conv(x)
        return x

    def predict(self, feat: torch.Tensor, classes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            feat: (R, D, 14, 14) conv feature.
            classes: (R,) the class of each RoI, or None for every class.

        Returns:
            (R, K, 28, 28) mask logits of every class; with ``classes`` (or class-agnostic
            masks), (R, 1, 28, 28) the logits of each RoI's class: computed alone where the
            predictor is the parent's 1x1 convolution as built (:func:`plain_1x1_conv`), else
            selected from its own output (a wrapper, a parametrization or a hook changes what
            its call computes).
        """
        x = self.deconv_relu(self.deconv(feat))
        plain = classes is not None and plain_1x1_conv(self.predictor)
        if plain and self.predictor.out_channels > 1:
            return class_logits(self.predictor, x, classes)
        logits = self.predictor(x)
        return logits if classes is None else of_classes(logits, classes)

    def forward(
        self,
        x: torch.Tensor,
        instances: Optional[List[Instances]] = None,
        *,
        res_feat: Optional[torch.Tensor] = None,
        with_logits: bool = True,
        classes: Optional[torch.Tensor] = None,
    ) -> Union[
        Dict[str, torch.Tensor], List[Instances], Tuple[Optional[torch.Tensor], torch.Tensor]
    ]:
        """With ``instances``, the parent's contract: one head alone, its loss (training) or
        its instances with ``pred_masks``; the keyword arguments are then unused. Without,
        :meth:`chain`: the cascade calls each stage's head as a module, so that hooks on it and
        wrappers of its call see every pass (the parent's cannot take ``res_feat``).

        Args:
            x: (R, C, 14, 14) RoI features.
            instances: the parent's, or None within the cascade.
            res_feat, with_logits, classes: as :meth:`chain`'s.

        Returns:
            the parent's output, or :meth:`chain`'s (logits, (R, D, 14, 14) feature).
        """
        if instances is not None:
            return super().forward(x, instances)
        return self.chain(x, res_feat, with_logits, classes)

    def chain(
        self,
        x: torch.Tensor,
        res_feat: Optional[torch.Tensor],
        with_logits: bool = True,
        classes: Optional[torch.Tensor] = None,
    ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """This stage's head within the cascade (what :meth:`forward` runs without
        ``instances``).

        Args:
            x: (R, C, 14, 14) RoI features.
            res_feat: (R, D, 14, 14) feature of the previous stage's head, or None.
            with_logits: False when only the feature for the next stage is wanted.
            classes: (R,) the class of each RoI: only its logits are computed (see
                :meth:`predict`); None for every class.

        Returns:
            mask logits (R, K, 28, 28), or (R, 1, 28, 28) with ``classes``, or None without
            ``with_logits``; and the (R, D, 14, 14) feature that the next stage's head
            receives as ``res_feat``.
        """
        feat = self.conv_features(x, res_feat)
        return (self.predict(feat, classes) if with_logits else None), feat


HOOKS = ("forward_pre", "forward", "backward_pre", "backward")  # nn.Module's, fired by its call


def plain_1x1_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a 1x1 convolution as the parent builds its predictor, whose call
    computes nothing else: exactly torch's or Detectron2's class (no subclass, wrapper or
    parametrization) and its ``forward`` (none set on the instance), stride 1, no padding or
    groups, no norm or activation, no hooks of its own (global module hooks, which trackers
    such as FlopCounterMode's install, are not its call's computation)."""
    return (
        type(module) in (nn.Conv2d, Conv2d)
        and "forward" not in vars(module)
        and (module.kernel_size, module.stride, module.padding) == ((1, 1), (1, 1), (0, 0))
        and module.groups == 1
        and getattr(module, "norm", None) is None
        and getattr(module, "activation", None) is None
        and not any(getattr(module, f"_{kind}_hooks") for kind in HOOKS)
    )


def of_classes(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(R, 1, S, S): the channel ``classes[i]`` of RoI i's (R, K, S, S) ``logits``; ``logits``
    themselves where they have one channel (class-agnostic, or computed for the classes)."""
    if _channels(logits) == 1:
        return logits
    rois = torch.arange(classes.shape[0], device=logits.device)  # traced: the count stays symbolic
    return logits[rois, classes][:, None]


def _channels(logits: torch.Tensor) -> int:
    """``logits.shape[1]``; under tracing without the warning that a shape made a Python value:
    the channel count is the model's constant."""
    if not torch.jit.is_tracing():
        return logits.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return int(logits.shape[1])


def class_logits(predictor: nn.Conv2d, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The output channel ``classes[i]`` of the 1x1 convolution ``predictor`` (stride 1, no
    padding, no norm, as the parent builds it) on RoI i alone: (R, D, S, S) ``x`` -> (R, 1, S, S).
    Every class's logits would cost R x K x S x S: 1.1 GB per stage for LVIS' 1203 classes at
    300 detections, of which one channel per RoI is used."""
    weight = predictor.weight[:, :, 0, 0][classes]
    if torch.jit.is_tracing():
        # exported graphs: onnxruntime 1.23's Einsum crashes on 0 RoIs, and it cannot resolve
        # the -1 of the Reshapes around a MatMul; this costs an (R, D, S, S) temporary
        logits = (weight[:, :, None, None] * x).sum(1, keepdim=True)
    else:
        logits = torch.einsum("rd,rdhw->rhw", weight, x)[:, None]
    if predictor.bias is not None:
        logits = logits + predictor.bias[classes].to(logits.dtype)[:, None, None, None]
    return logits


def mask_loss(
    logits: torch.Tensor, instances: List[Instances]
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Detectron2's ``mask_rcnn_loss`` with the rates it logs left on the device: it reads them
    with four host syncs per call, and HTC computes the loss at every stage.

    Args:
        logits: (R, K, M, M) mask logits of the foreground RoIs of ``instances`` (K = 1:
            class-agnostic, or each RoI's GT class alone), which have ``proposal_boxes``,
            ``gt_classes`` and ``gt_masks``.

    Returns:
        the mean binary cross-entropy of each RoI's GT-class logits against its GT mask cropped
        and resized to the RoI, and (3,) the accuracy, false-positive and false-negative rates
        of the logits' signs (None when there are no RoIs, where the loss is a zero).
    """
    side = logits.shape[-1]
    instances = [x for x in instances if len(x) > 0]
    if not instances:
        return logits.sum() * 0, None
    targets = mask_targets(instances, side).to(logits.device)
    logits = of_classes(logits, torch.cat([x.gt_classes for x in instances]).long())[:, 0]
    truth = targets if targets.dtype == torch.bool else targets > 0.5
    wrong = (logits > 0) != truth
    positives = truth.sum()
    rates = torch.stack(
        [
            1 - wrong.sum() / max(wrong.numel(), 1),
            (wrong & ~truth).sum() / (truth.numel() - positives).clamp(min=1),
            (wrong & truth).sum() / positives.clamp(min=1),
        ]
    )
    loss = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="mean")
    return loss, rates


def mask_targets(instances: List[Instances], side: int) -> torch.Tensor:
    """(R, side, side) the ``gt_masks`` of the RoIs of all images cropped and resized to their
    ``proposal_boxes``: in one call where the images' masks concatenate (polygons, bitmaps of
    one size), else image by image. One call matters for polygons: each call copies its boxes
    to the host, a wait for the device."""
    masks = [x.gt_masks for x in instances]
    kind = type(masks[0])
    joinable = kind is PolygonMasks or (
        kind is BitMasks and len({m.image_size for m in masks}) == 1
    )
    if len(masks) > 1 and joinable and all(type(m) is kind for m in masks):
        boxes = torch.cat([x.proposal_boxes.tensor for x in instances])
        return kind.cat(masks).crop_and_resize(boxes, side)
    return torch.cat(
        [m.crop_and_resize(x.proposal_boxes.tensor, side) for m, x in zip(masks, instances)]
    )
