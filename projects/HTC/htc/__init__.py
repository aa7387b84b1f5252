"""Hybrid Task Cascade (HTC) for Detectron2. Importing it registers the model's parts in
Detectron2's registries; datasets are registered by the entry points (``htc.data``)."""

from .backbones import build_mvit_fpn_backbone, build_swin_fpn_backbone, build_vit_sfp_backbone
from .config import add_htc_config, set_deterministic, set_float32_precision
from .data import HTCDatasetMapper, register_builtin, register_htc_instances
from .mask_head import HTCMaskHead
from .meta_arch import HybridTaskCascade
from .roi_heads import SEMANTIC_FEATURE, HybridTaskCascadeROIHeads
from .semantic_head import FusedSemanticHead

__all__ = [
    "HTCDatasetMapper",
    "register_builtin",
    "register_htc_instances",
    "add_htc_config",
    "build_mvit_fpn_backbone",
    "build_swin_fpn_backbone",
    "build_vit_sfp_backbone",
    "set_deterministic",
    "set_float32_precision",
    "FusedSemanticHead",
    "HTCMaskHead",
    "HybridTaskCascade",
    "HybridTaskCascadeROIHeads",
    "SEMANTIC_FEATURE",
]
