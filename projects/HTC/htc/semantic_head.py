"""FusedSemanticHead: HTC's semantic segmentation branch. The FPN levels fused at stride 8,
four convs, pixel logits over stuff and thing classes (the ``sem_seg`` loss), and the feature
that the ROI heads pool for semantic fusion."""

from typing import Dict, Optional, Tuple

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn
from torch.nn import functional as F

from .layers import interpolate_bilinear
from .roi_heads import fuses_semantic_feature


@SEM_SEG_HEADS_REGISTRY.register()
class FusedSemanticHead(nn.Module):
    """HTC's semantic segmentation branch.

    All FPN levels are resized to the fusion level (P3, stride 8) with bilinear
    ``align_corners=True``, each through a 1x1 lateral conv + ReLU, and summed; then
    ``num_convs`` 3x3 convs + ReLU. Two 1x1 convs read the result: ``conv_logits`` gives the
    per-pixel class logits, ``conv_embedding`` (+ ReLU) the semantic feature that is RoI-pooled
    and summed into the box and mask RoI features. A branch whose feature nothing fuses has no
    ``conv_embedding`` (its weights would get no gradient, which DDP refuses).
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        fusion_feature: str,
        num_classes: int,
        conv_dim: int = 256,
        num_convs: int = 4,
        embed_dim: Optional[int] = 256,
        loss_weight: float = 0.2,
        ignore_value: int = 255,
        norm: str = "",
    ):
        """
        Args:
            input_shape: the FPN features to fuse, by name, in the order of their levels.
            fusion_feature: the feature whose resolution the branch works at (e.g. "p3").
            num_classes: number of semantic classes of the logits (183 for COCO-Stuff).
            conv_dim: channels of the fused levels and of the convs after the fusion.
            num_convs: number of 3x3 convs on the fused feature (4 in the reference).
            embed_dim: channels of the semantic feature (``conv_embedding``) that is pooled;
                None for a branch without it (its loss and ``sem_seg`` output only).
            loss_weight: weight of the cross-entropy loss.
            ignore_value: label of pixels without a semantic label (and of padding).
            norm: normalization after each conv but the logits ("" = none, as the reference;
                "GN", "SyncBN", ...: see :func:`detectron2.layers.get_norm`).
        """
        super().__init__()
        self.in_features = list(input_shape.keys())
        if fusion_feature not in self.in_features:
            raise ValueError(
                f"FusedSemanticHead: fusion feature {fusion_feature!r} is not among its inputs "
                f"{self.in_features}"
            )
        if num_convs < 0 or conv_dim < 1 or (embed_dim is not None and embed_dim < 1):
            raise ValueError(
                f"FusedSemanticHead: num_convs {num_convs} (MODEL.SEM_SEG_HEAD.NUM_CONVS), "
                f"conv_dim {conv_dim} (CONVS_DIM) and embed_dim {embed_dim} (EMBED_DIM): give "
                "0 or more convs of 1 or more channels"
            )
        if 0 < ignore_value < num_classes:  # 0 ignored, classes 1..K-1: a common convention
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IGNORE_VALUE (ignore_value) {ignore_value} is one of the "
                f"{num_classes} classes (NUM_CLASSES): class {ignore_value} would never be "
                f"learned or scored; mark unlabeled pixels with a label outside [0, {num_classes})"
            )
        self.fusion_feature = fusion_feature
        self.common_stride = input_shape[fusion_feature].stride
        self.embed_dim = embed_dim
        self.loss_weight = loss_weight
        self.ignore_value = ignore_value

        def conv(c_in, c_out, k):
            return Conv2d(
                c_in, c_out, kernel_size=k, padding=k // 2, bias=not norm,
                norm=get_norm(norm, c_out), activation=F.relu,
            )  # fmt: skip

        self.lateral_convs = nn.ModuleList(
            conv(s.channels, conv_dim, 1) for s in input_shape.values()
        )
        self.convs = nn.ModuleList(conv(conv_dim, conv_dim, 3) for _ in range(num_convs))
        self.conv_embedding = None if embed_dim is None else conv(conv_dim, embed_dim, 1)
        self.conv_logits = Conv2d(conv_dim, num_classes, kernel_size=1)
        for layer in [*self.lateral_convs, *self.convs, self.conv_embedding, self.conv_logits]:
            if layer is not None:  # Kaiming (fan_out), as the reference's ConvModules
                weight_init.c2_msra_fill(layer)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        fused = fuses_semantic_feature(cfg.MODEL.HTC.SEMANTIC_FUSION, cfg.MODEL.MASK_ON)
        shapes = {f: input_shape[f] for f in head.IN_FEATURES}
        fusion = [f for f, s in shapes.items() if s.stride == head.COMMON_STRIDE]
        if len(fusion) != 1:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.COMMON_STRIDE={head.COMMON_STRIDE} must be the stride of "
                f"exactly one of MODEL.SEM_SEG_HEAD.IN_FEATURES "
                f"{ {f: s.stride for f, s in shapes.items()} }"
            )
        return {
            "input_shape": shapes,
            "fusion_feature": fusion[0],
            "num_classes": head.NUM_CLASSES,
            "conv_dim": head.CONVS_DIM,
            "num_convs": head.NUM_CONVS,
            "embed_dim": head.EMBED_DIM if fused else None,  # else nothing would train it
            "loss_weight": head.LOSS_WEIGHT,
            "ignore_value": head.IGNORE_VALUE,
            "norm": head.NORM,
        }

    def forward(
        self, features: Dict[str, torch.Tensor]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """
        Args:
            features: FPN features by name, each (N, C, Hi, Wi).

        Returns:
            logits (N, num_classes, H, W) and semantic feature (N, embed_dim, H, W), or None
            without ``embed_dim``; (H, W) is the size of the fusion feature (stride
            ``common_stride``).
        """
        size = features[self.fusion_feature].shape[-2:]
        x = None
        for name, lateral in zip(self.in_features, self.lateral_convs):
            feat = features[name]
            if name != self.fusion_feature:
                feat = interpolate_bilinear(feat, size, align_corners=True)
            x = lateral(feat) if x is None else x + lateral(feat)
        for conv in self.convs:
            x = conv(x)
        embedding = None if self.conv_embedding is None else self.conv_embedding(x)
        return self.conv_logits(x), embedding

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            logits: (N, K, H, W) at stride ``common_stride``.
            targets: (N, H * stride, W * stride) int64 labels, ``ignore_value`` where unlabeled
                or padded.

        The labels are taken at stride ``common_stride`` (nearest), and the cross-entropy is
        averaged over all pixels, ignored ones included (they add 0), as the reference does.
        """
        targets = F.interpolate(targets[:, None].float(), size=logits.shape[-2:], mode="nearest")
        targets = targets[:, 0].long()
        # summed here, not by the loss: its own sum accumulates with atomics on CUDA
        loss = F.cross_entropy(logits, targets, ignore_index=self.ignore_value, reduction="none")
        return {"loss_sem_seg": loss.sum() / targets.numel() * self.loss_weight}

    def upsample_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, K, H, W) logits at stride ``common_stride`` -> (N, K, H * s, W * s)."""
        size = (logits.shape[-2] * self.common_stride, logits.shape[-1] * self.common_stride)
        return interpolate_bilinear(logits, size, align_corners=False)
