"""What HTC++ adds to HTC, as its recipes have it (Swin, Liu et al. 2021, appendix A2; the
configs that exist: ViT-Adapter's detection/configs/htc++/ and CBNetV2's configs/cbnet/htc_cbv2_*),
each applied in place to an HTC LazyConfig: 4conv1fc box heads, multi-scale training (short side
400-1400, long side <= 1600) and testing at 1400/1600, Soft-NMS, AdamW, epoch schedules and, in
the Swin recipes, the GIoU loss."""

import detectron2.data.transforms as T
import torch
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import FastRCNNConvFCHead
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler

ITERS_PER_EPOCH_AT_16 = 7330  # COCO train2017's images with annotations / 16


def four_conv_one_fc(model, norm: str = "") -> None:
    """Each stage's box head: 4 3x3 convs of 256 channels with ``norm``, one fc of 1024 (the
    recipes' Shared4Conv1FCBBoxHead / ConvFCBBoxHead with 4 shared convs)."""
    model.roi_heads.box_heads = [
        L(FastRCNNConvFCHead)(
            input_shape=ShapeSpec(channels=256, height=7, width=7),
            conv_dims=[256] * 4,
            fc_dims=[1024],
            conv_norm=norm,
        )
        for _ in range(3)
    ]


def giou(model, weight: float = 10.0) -> None:
    """Each stage's box regression loss: GIoU on the decoded boxes, x ``weight`` (CBNetV2's
    Swin recipes' ``GIoULoss(loss_weight=10.0)``)."""
    for predictor in model.roi_heads.box_predictors:
        predictor.update(box_reg_loss_type="giou", loss_weight={"loss_box_reg": weight})


def soft_nms(model) -> None:
    """Linear Soft-NMS at IoU 0.5 for the final detections, scores from 0.001 (the recipes'
    ``nms=dict(type='soft_nms', iou_threshold=0.5)``, mmcv's linear method)."""
    model.roi_heads.update(test_nms="soft_linear", soft_nms_sigma=0.5, soft_nms_min_score=0.001)
    for predictor in model.roi_heads.box_predictors:
        predictor.update(test_nms_thresh=0.5, test_score_thresh=0.001)


def multiscale(dataloader, images_per_batch: int) -> None:
    """Training short side drawn from [400, 1400], long side <= 1600, and flip; testing at 1400
    (long side <= 1600)."""
    dataloader.train.mapper.augmentations = [
        L(T.ResizeShortestEdge)(short_edge_length=(400, 1400), max_size=1600, sample_style="range"),
        L(T.RandomFlip)(horizontal=True),
    ]
    dataloader.train.total_batch_size = images_per_batch
    dataloader.test.mapper.augmentations = [
        L(T.ResizeShortestEdge)(short_edge_length=1400, max_size=1600)
    ]


def adamw(lr: float, weight_decay: float = 0.05, no_decay: tuple = (), bias_decay: bool = True):
    """AdamW (betas 0.9, 0.999) without weight decay on norm layers, on the parameters named in
    ``no_decay`` and, unless ``bias_decay``, on biases."""
    return L(torch.optim.AdamW)(
        params=L(get_default_optimizer_params)(
            weight_decay_norm=0.0,
            weight_decay_bias=None if bias_decay else 0.0,
            overrides={name: {"weight_decay": 0.0} for name in no_decay},
        ),
        lr=lr,
        betas=(0.9, 0.999),
        weight_decay=weight_decay,
    )


def epochs(train, num_epochs: int, steps: tuple, images_per_batch: int):
    """``train.max_iter`` for ``num_epochs`` of COCO at ``images_per_batch``, and the schedule:
    lr x0.1 at each epoch of ``steps``, linear warm-up over 500 iterations from 0.001."""
    per_epoch = ITERS_PER_EPOCH_AT_16 * 16 // images_per_batch
    train.max_iter = num_epochs * per_epoch
    train.checkpointer.period = per_epoch
    train.eval_period = train.max_iter
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[10.0**-i for i in range(len(steps) + 1)],
            milestones=[step * per_epoch for step in steps],
            num_updates=train.max_iter,
        ),
        warmup_length=500 / train.max_iter,
        warmup_method="linear",
        warmup_factor=0.001,
    )
