"""Detectron2's transformer backbones for yacs configs: ViT with its simple feature pyramid, MViT
and Swin with an FPN, as ``MODEL.BACKBONE.NAME`` builders (Detectron2 reaches them from LazyConfig
alone). Their keys (``MODEL.VIT``, ``MODEL.MVIT``, ``MODEL.SWIN``) are in :func:`add_htc_config`;
the FPN's channels and norm are ``MODEL.FPN.OUT_CHANNELS`` and ``MODEL.FPN.NORM``. They need
Detectron2's main branch: on v0.6 building one raises, naming what is missing."""

from functools import partial

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn

from .config import require_detectron2

_LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)


@BACKBONE_REGISTRY.register()
def build_vit_sfp_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """A plain ViT (``MODEL.VIT``) and ViTDet's simple feature pyramid (p2-p6 from its last
    feature at scales 4, 2, 1, 1/2), as Detectron2's ``common/models/mask_rcnn_vitdet.py``."""
    ViT, SimpleFeaturePyramid = require_detectron2("ViT", "SimpleFeaturePyramid")
    vit, square_pad = cfg.MODEL.VIT, _square_pad(cfg, "VIT")  # refused before a large build
    if not cfg.MODEL.FPN.NORM:
        raise ValueError(
            'MODEL.FPN.NORM "": Detectron2\'s SimpleFeaturePyramid puts the norm between the two '
            "transposed convs of its stride-4 level, where no norm leaves a None layer that "
            'fails at the first forward: set a norm, "LN" as ViTDet does'
        )
    net = ViT(
        img_size=vit.IMG_SIZE,
        patch_size=vit.PATCH_SIZE,
        in_chans=input_shape.channels,
        embed_dim=vit.EMBED_DIM,
        depth=vit.DEPTH,
        num_heads=vit.NUM_HEADS,
        drop_path_rate=vit.DROP_PATH_RATE,
        window_size=vit.WINDOW_SIZE,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=_LAYER_NORM,
        window_block_indexes=list(vit.WINDOW_BLOCK_INDEXES),
        residual_block_indexes=[],
        use_rel_pos=True,
        use_act_checkpoint=vit.USE_ACT_CHECKPOINT,
        out_feature="last_feat",
    )
    return SimpleFeaturePyramid(
        net=net,
        in_feature="last_feat",
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        scale_factors=(4.0, 2.0, 1.0, 0.5),
        top_block=LastLevelMaxPool(),
        norm=cfg.MODEL.FPN.NORM,
        square_pad=square_pad,
    )


@BACKBONE_REGISTRY.register()
def build_mvit_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """MViTv2 (``MODEL.MVIT``) with an FPN over its 4 scales, as Detectron2's MViTv2 configs."""
    (MViT,) = require_detectron2("MViT")
    mvit, square_pad = cfg.MODEL.MVIT, _square_pad(cfg, "MVIT")
    bottom_up = MViT(
        in_chans=input_shape.channels,
        embed_dim=mvit.EMBED_DIM,
        depth=mvit.DEPTH,
        num_heads=mvit.NUM_HEADS,
        last_block_indexes=tuple(mvit.LAST_BLOCK_INDEXES),
        residual_pooling=True,
        drop_path_rate=mvit.DROP_PATH_RATE,
        norm_layer=_LAYER_NORM,
        use_act_checkpoint=mvit.USE_ACT_CHECKPOINT,
        out_features=("scale2", "scale3", "scale4", "scale5"),
    )
    return _fpn(cfg, bottom_up, square_pad)


@BACKBONE_REGISTRY.register()
def build_swin_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Swin Transformer (``MODEL.SWIN``) with an FPN over its 4 stages."""
    (SwinTransformer,) = require_detectron2("SwinTransformer")
    swin, square_pad = cfg.MODEL.SWIN, _square_pad(cfg, "SWIN")
    bottom_up = SwinTransformer(
        in_chans=input_shape.channels,
        embed_dim=swin.EMBED_DIM,
        depths=tuple(swin.DEPTHS),
        num_heads=tuple(swin.NUM_HEADS),
        window_size=swin.WINDOW_SIZE,
        drop_path_rate=swin.DROP_PATH_RATE,
        use_checkpoint=swin.USE_ACT_CHECKPOINT,
    )
    return _fpn(cfg, bottom_up, square_pad)


def _fpn(cfg, bottom_up: Backbone, square_pad: int) -> FPN:
    """Detectron2's FPN (p2-p6) over all of ``bottom_up``'s outputs."""
    return FPN(
        bottom_up=bottom_up,
        in_features=list(bottom_up.output_shape()),
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        square_pad=square_pad,
    )


def square_size(backbone: nn.Module) -> int:
    """The side of the square that ``backbone`` pads its inputs to (ViTDet's LSJ), 0 for none
    (Detectron2 v0.6's backbones have no ``padding_constraints``)."""
    return getattr(backbone, "padding_constraints", {}).get("square_size", 0)


def _square_pad(cfg, key: str) -> int:
    """``MODEL.<key>.SQUARE_PAD``, refused where an input can be longer: Detectron2's
    ``ImageList`` would silently crop a lone image to the square and fail on a batch."""
    pad = cfg.MODEL[key].SQUARE_PAD
    sizes = {
        "INPUT.MAX_SIZE_TRAIN": cfg.INPUT.MAX_SIZE_TRAIN,
        "INPUT.MAX_SIZE_TEST": cfg.INPUT.MAX_SIZE_TEST,
    }
    if cfg.TEST.AUG.ENABLED:
        sizes["TEST.AUG.MAX_SIZE"] = cfg.TEST.AUG.MAX_SIZE
    longer = {name: size for name, size in sizes.items() if 0 < pad < size}
    if longer:
        raise ValueError(
            f"MODEL.{key}.SQUARE_PAD {pad} is shorter than the inputs can be ({longer}): set it "
            "to 0 (padding to the backbone's size divisibility) or to the longest input side"
        )
    return pad
