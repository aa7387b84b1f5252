"""Hybrid Task Cascade (HTC) for Detectron2."""

from .config import add_htc_config
from .mask_head import HTCMaskHead
from .meta_arch import HybridTaskCascade
from .roi_heads import SEMANTIC_FEATURE, HybridTaskCascadeROIHeads
from .semantic_head import FusedSemanticHead

__all__ = [
    "add_htc_config",
    "FusedSemanticHead",
    "HTCMaskHead",
    "HybridTaskCascade",
    "HybridTaskCascadeROIHeads",
    "SEMANTIC_FEATURE",
]
