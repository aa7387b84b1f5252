"""Hybrid Task Cascade (HTC) for Detectron2."""

from .config import add_htc_config
from .data import HTCDatasetMapper, register_coco_htc, register_htc_instances
from .demo_data import register_demo
from .mask_head import HTCMaskHead
from .meta_arch import HybridTaskCascade
from .roi_heads import SEMANTIC_FEATURE, HybridTaskCascadeROIHeads
from .semantic_head import FusedSemanticHead

__all__ = [
    "HTCDatasetMapper",
    "register_htc_instances",
    "add_htc_config",
    "FusedSemanticHead",
    "HTCMaskHead",
    "HybridTaskCascade",
    "HybridTaskCascadeROIHeads",
    "SEMANTIC_FEATURE",
]

register_coco_htc()
register_demo()
