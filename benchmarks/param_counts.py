"""Learnable parameters of every shipped config, yaml and LazyConfig, counted as the reference
counts them (BN affine parameters included; Detectron2's FrozenBN keeps them as buffers); for
the modern-backbone configs, next to the Detectron2 Cascade Mask R-CNN they are the HTC
counterpart of (rebuilt from our config: the same model with Detectron2's cascade ROI heads).

    .venv/bin/python benchmarks/param_counts.py
"""

from pathlib import Path

from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.modeling.roi_heads import CascadeROIHeads, MaskRCNNConvUpsampleHead

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


def cascade_counterpart(path: Path) -> int:
    """The Detectron2 Cascade Mask R-CNN that HTC config ``path`` is the counterpart of: its
    model with the cascade ROI heads of Detectron2's ViTDet configs (the same box heads,
    predictors and matchers, one LN mask head) and no semantic branch."""
    model = LazyConfig.load(str(path)).model
    model._target_ = GeneralizedRCNN
    model.pop("semantic_head")
    heads = model.roi_heads
    for key in ("semantic_pooler", "semantic_fusion", "stage_loss_weights", "mask_info_flow"):
        heads.pop(key)
    heads._target_ = CascadeROIHeads
    heads.mask_head = L(MaskRCNNConvUpsampleHead)(
        input_shape=ShapeSpec(channels=256, height=14, width=14),
        num_classes=heads.num_classes,
        conv_dims=[256] * 5,
        conv_norm="LN",
    )
    return parameters(instantiate(model))


# HTC counterpart -> the Detectron2 Cascade Mask R-CNN config it is the counterpart of
CASCADES = {
    "vitdet/htc_vitdet_b_100ep.py": "ViTDet COCO/cascade_mask_rcnn_vitdet_b_100ep.py",
    "vitdet/htc_mvitv2_b_in21k_100ep.py": "ViTDet COCO/cascade_mask_rcnn_mvitv2_b_in21k_100ep.py",
    "vitdet/htc_swin_b_in21k_50ep.py": "ViTDet COCO/cascade_mask_rcnn_swin_b_in21k_50ep.py",
    "vitdet/htc_vitdet_l_100ep.py": "ViTDet COCO/cascade_mask_rcnn_vitdet_l_100ep.py",
    "vitdet/htc_vitdet_h_75ep.py": "ViTDet COCO/cascade_mask_rcnn_vitdet_h_75ep.py",
    "vitdet/htc_mvitv2_l_in21k_50ep.py": "ViTDet COCO/cascade_mask_rcnn_mvitv2_l_in21k_50ep.py",
    "vitdet/htc_mvitv2_h_in21k_36ep.py": "ViTDet COCO/cascade_mask_rcnn_mvitv2_h_in21k_36ep.py",
    "vitdet/htc_swin_l_in21k_50ep.py": "ViTDet COCO/cascade_mask_rcnn_swin_l_in21k_50ep.py",
    **{
        f"mvitv2/htc_mvitv2_{size}.py": f"MViTv2 cascade_mask_rcnn_mvitv2_{size}.py"
        for size in ("t_3x", "s_3x", "b_3x", "b_in21k_3x", "l_in21k_lsj_50ep", "h_in21k_lsj_3x")
    },
}


if __name__ == "__main__":
    print("| config | parameters |")
    print("|---|---|")
    lazy = [p for p in sorted(CONFIGS.rglob("*.py")) if "common" not in p.parts]
    paths = sorted(CONFIGS.rglob("*.yaml")) + lazy
    for path in paths:
        print(f"| {path.relative_to(CONFIGS)} | {count(path):,} |")
    print("\n| HTC config | parameters | Detectron2 Cascade Mask R-CNN | parameters | ratio |")
    print("|---|---|---|---|---|")
    for name, cascade in CASCADES.items():
        ours, theirs = count(CONFIGS / name), cascade_counterpart(CONFIGS / name)
        print(f"| {name} | {ours:,} | {cascade} | {theirs:,} | {ours / theirs:.3f} |")
