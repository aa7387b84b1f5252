"""HTC's test-time augmentation (the reference's aug_test)."""

import torch
from detectron2.modeling import build_model
from detectron2.structures import pairwise_iou

from conftest import make_batch, tiny_cfg
from htc.tta import HybridTaskCascadeWithTTA


def _model_and_cfg(min_sizes, flip):
    cfg = tiny_cfg()
    cfg.TEST.AUG.MIN_SIZES = min_sizes
    cfg.TEST.AUG.MAX_SIZE = 1000
    cfg.TEST.AUG.FLIP = flip
    model = build_model(cfg).eval()
    for predictor in model.roi_heads.box_predictor:  # confident, varied scores
        torch.nn.init.normal_(predictor.cls_score.weight, std=0.5)
    return model, cfg


def _input(image):
    return {"image": image, "height": image.shape[1], "width": image.shape[2]}


def test_one_scale_without_flip_equals_plain_inference():
    model, cfg = _model_and_cfg((96,), False)
    image = make_batch(num_images=1)[0]["image"]
    with torch.no_grad():
        plain = model([_input(image)])[0]["instances"]
    tta = HybridTaskCascadeWithTTA(cfg, model)([_input(image)])[0]["instances"]
    assert len(tta) == len(plain) > 0
    torch.testing.assert_close(tta.pred_boxes.tensor, plain.pred_boxes.tensor)
    torch.testing.assert_close(tta.scores, plain.scores)
    assert torch.equal(tta.pred_classes, plain.pred_classes)
    assert torch.equal(tta.pred_masks, plain.pred_masks)


def test_flip_tta_is_invariant_to_flipping_the_input():
    model, cfg = _model_and_cfg((96, 128), True)
    tta = HybridTaskCascadeWithTTA(cfg, model)
    image = make_batch(num_images=1, seed=3)[0]["image"]
    a = tta([_input(image)])[0]["instances"]
    b = tta([_input(image.flip(-1))])[0]["instances"]
    assert len(a) == len(b) > 0
    mirrored = b.pred_boxes.tensor.clone()
    mirrored[:, [0, 2]] = 96 - b.pred_boxes.tensor[:, [2, 0]]
    iou = pairwise_iou(a.pred_boxes, type(a.pred_boxes)(mirrored))
    iou[a.pred_classes[:, None] != b.pred_classes[None]] = -1  # twins have the same class
    best = iou.argmax(dim=1)
    assert (iou.max(dim=1).values > 0.999).float().mean() > 0.95
    torch.testing.assert_close(a.scores.sort().values, b.scores.sort().values, rtol=0, atol=1e-5)
    agree = (a.pred_masks == b.pred_masks[best].flip(-1)).float().mean()
    assert agree > 0.999
