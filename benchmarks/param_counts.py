"""Learnable parameters of every shipped config, yaml and LazyConfig, counted as the reference
counts them (BN affine parameters included; Detectron2's FrozenBN keeps them as buffers); for
the modern-backbone configs, next to the Detectron2 Cascade Mask R-CNN they are the HTC
counterpart of (its ROI heads rebuilt from the model zoo as ViTDet's cascade config does).

    .venv/bin/python benchmarks/param_counts.py
"""

from pathlib import Path

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import CascadeROIHeads, FastRCNNOutputLayers

from htc import add_htc_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def parameters(model) -> int:
    frozen = sum(b.numel() for n, b in model.named_buffers() if n.endswith((".weight", ".bias")))
    return sum(p.numel() for p in model.parameters()) + frozen


def count(path: Path) -> int:
    if path.suffix == ".py":
        return parameters(instantiate(LazyConfig.load(str(path)).model))
    cfg = get_cfg()
    add_htc_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    return parameters(build_model(cfg))


def vitdet_cascade_b() -> int:
    """Detectron2's ViTDet Cascade Mask R-CNN ViT-B: the model zoo's ViTDet Mask R-CNN with the
    cascade ROI heads of projects/ViTDet/configs/COCO/cascade_mask_rcnn_vitdet_b_100ep.py."""
    model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
    box_head = model.roi_heads.pop("box_head")
    [model.roi_heads.pop(key) for key in ("box_predictor", "proposal_matcher")]
    model.roi_heads.update(
        _target_=CascadeROIHeads,
        box_heads=[box_head for _ in range(3)],
        box_predictors=[
            L(FastRCNNOutputLayers)(
                input_shape=ShapeSpec(channels=1024),
                box2box_transform=L(Box2BoxTransform)(weights=(w1, w1, w2, w2)),
                cls_agnostic_bbox_reg=True,
                num_classes=80,
            )
            for (w1, w2) in [(10, 5), (20, 10), (30, 15)]
        ],
        proposal_matchers=[
            L(Matcher)(thresholds=[iou], labels=[0, 1], allow_low_quality_matches=False)
            for iou in (0.5, 0.6, 0.7)
        ],
    )
    return parameters(instantiate(model))


# HTC counterpart -> the Detectron2 Cascade Mask R-CNN it is the counterpart of
CASCADES = {"vitdet/htc_vitdet_b_100ep.py": ("ViTDet Cascade Mask R-CNN ViT-B", vitdet_cascade_b)}


if __name__ == "__main__":
    print("| config | parameters |")
    print("|---|---|")
    lazy = [p for p in sorted(CONFIGS.rglob("*.py")) if "common" not in p.parts]
    paths = sorted(CONFIGS.rglob("*.yaml")) + lazy
    for path in paths:
        print(f"| {path.relative_to(CONFIGS)} | {count(path):,} |")
    print("\n| HTC config | parameters | Detectron2 Cascade Mask R-CNN | parameters | ratio |")
    print("|---|---|---|---|---|")
    for name, (cascade, build) in CASCADES.items():
        ours, theirs = count(CONFIGS / name), build()
        print(f"| {name} | {ours:,} | {cascade} | {theirs:,} | {ours / theirs:.3f} |")
