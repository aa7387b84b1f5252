"""The HTC model on MViTv2 that Detectron2's two families of MViTv2 Cascade Mask R-CNN configs
share (projects/ViTDet/configs/COCO/cascade_mask_rcnn_mvitv2_* and projects/MViTv2/configs/): the
model zoo's Mask R-CNN FPN on an MViTv2 (RGB, ImageNet statistics), a 2-conv RPN and 4conv1fc box
heads, made HTC; and the MViTv2 sizes those configs use."""

from functools import partial

import detectron2.data.transforms as T
import torch.nn as nn
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from htc.config import require_detectron2

from .htc_heads import to_htc

# MViT arguments of each size, as Detectron2's configs set them
MVITV2 = {
    "T": dict(
        embed_dim=96, depth=10, num_heads=1, last_block_indexes=(0, 2, 7, 9), drop_path_rate=0.2
    ),
    "S": dict(
        embed_dim=96, depth=16, num_heads=1, last_block_indexes=(0, 2, 13, 15), drop_path_rate=0.2
    ),
    "B": dict(
        embed_dim=96, depth=24, num_heads=1, last_block_indexes=(1, 4, 20, 23), drop_path_rate=0.4
    ),
    "L": dict(
        embed_dim=144, depth=48, num_heads=2, last_block_indexes=(1, 7, 43, 47), drop_path_rate=0.5
    ),
    "H": dict(
        embed_dim=192,
        depth=80,
        num_heads=3,
        last_block_indexes=(3, 11, 71, 79),
        drop_path_rate=0.6,
        use_act_checkpoint=True,
    ),
}


def mvit_htc(size: str, norm):
    """HTC on MViTv2-``size`` with an FPN: 4conv1fc box heads and HTC's mask heads normalized by
    ``norm`` (a name or a function of the channels)."""
    (MViT,) = require_detectron2("MViT")
    model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    constants = model_zoo.get_config("common/data/constants.py").constants
    model.pixel_mean = constants.imagenet_rgb256_mean
    model.pixel_std = constants.imagenet_rgb256_std
    model.input_format = "RGB"
    model.backbone.bottom_up = L(MViT)(
        **MVITV2[size],
        residual_pooling=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        out_features=("scale2", "scale3", "scale4", "scale5"),
    )
    model.backbone.in_features = "${.bottom_up.out_features}"
    model.proposal_generator.head.conv_dims = [-1, -1]  # 2 convs
    model.roi_heads.box_head.update(conv_dims=[256] * 4, fc_dims=[1024], conv_norm=norm)
    return to_htc(model, mask_norm=norm)


def project_lsj(dataloader) -> None:
    """The MViTv2 project's LSJ data (its coco_loader_lsj), in place, from ViTDet's: the crop
    padded to its 1024 px square (the project's FPN pads no square, ViTDet's backbone does), and
    testing as the project's other configs (short side 800, long side <= 1333)."""
    dataloader.train.mapper.augmentations[2].pad = True
    dataloader.test.mapper.augmentations = [
        L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)
    ]
