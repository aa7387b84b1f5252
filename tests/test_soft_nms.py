"""Soft-NMS against a hand computation, and as HTC's test-time option."""

import math

import pytest
import torch
from detectron2.modeling import build_model

from conftest import dev_parity_module, make_batch, tiny_cfg
from htc.soft_nms import soft_nms, soft_nms_inference

BOXES = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 9]])
SCORES = torch.tensor([0.9, 0.8, 0.7, 0.05])
# IoU(A, B) = 90 / 110, IoU(A, D) = 90 / 100, IoU(B, D) = 81 / 109; C overlaps nothing
IOU_AB, IOU_AD, IOU_BD = 90 / 110, 0.9, 81 / 109


def test_linear_by_hand():
    keep, scores = soft_nms(BOXES, SCORES, "linear", iou_threshold=0.5, sigma=0.5, min_score=0.01)
    b = 0.8 * (1 - IOU_AB)  # 0.1455: decayed by A, then picked after C
    assert 0.05 * (1 - IOU_AD) < 0.01  # D falls under min_score once A is kept: dropped
    assert keep.tolist() == [0, 2, 1]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7, b]))


def test_gaussian_by_hand():
    keep, scores = soft_nms(
        BOXES, SCORES, "gaussian", iou_threshold=0.5, sigma=0.5, min_score=0.001
    )
    b = 0.8 * math.exp(-(IOU_AB**2) / 0.5)
    d = 0.05 * math.exp(-(IOU_AD**2) / 0.5) * math.exp(-(IOU_BD**2) / 0.5)
    assert keep.tolist() == [0, 2, 1, 3]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7, b, d]))


def test_linear_keeps_scores_below_the_threshold():
    keep, scores = soft_nms(BOXES, SCORES, "linear", iou_threshold=0.95, sigma=0.5, min_score=0.0)
    assert keep.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(scores, SCORES)


def test_linear_decays_at_exactly_the_threshold():
    """mmcv decays a box whose IoU equals the threshold (>=)."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5]])  # IoU 0.5
    _, scores = soft_nms(boxes, torch.tensor([0.9, 0.8]), "linear", 0.5, 0.5, 0.001)
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.4]))


@pytest.mark.parametrize("method, code", [("linear", 1), ("gaussian", 2)])
def test_follows_mmcv_step_by_step(method, code):
    """dev/parity/mmcv_ext.py's softnms, written from mmcv's C++: the same picks in the same
    order, equal scores picked alike, on integer boxes and scores with many ties."""
    g = torch.Generator().manual_seed(0)
    corner = torch.rand(300, 2, generator=g) * 100
    boxes = torch.cat([corner, corner + torch.rand(300, 2, generator=g) * 40 + 1], 1).round()
    scores = (torch.rand(300, generator=g) * 20).round() / 20 + 0.001
    picked, decayed = soft_nms(boxes, scores, method, 0.5, 0.5, min_score=0.01)
    dets = torch.empty(300, 5)
    theirs = dev_parity_module("mmcv_ext").softnms(boxes, scores, dets, 0.5, 0.5, 0.01, code, 0)
    assert 0 < len(picked) < 300  # some are dropped
    assert torch.equal(picked, theirs)
    # exp rounds differently in numpy and torch: a few ulps after chained decays
    torch.testing.assert_close(decayed, dets[: len(theirs), 4], rtol=1e-5, atol=0)
    assert torch.equal(boxes[picked], dets[: len(theirs), :4])


def test_unknown_method():
    with pytest.raises(ValueError, match="Soft-NMS method"):
        soft_nms(BOXES, SCORES, "hard", 0.5, 0.5, 0.0)


@pytest.mark.parametrize("method", ["soft_linear", "soft_gaussian"])
def test_htc_test_option(method):
    model = build_model(tiny_cfg()).eval()
    for predictor in model.roi_heads.box_predictor:  # confident, varied scores
        torch.nn.init.normal_(predictor.cls_score.weight, std=0.5)
    batch = make_batch(num_images=1)
    with torch.no_grad():
        hard = model(batch)[0]["instances"]
        model.roi_heads.test_nms = method
        soft = model(batch)[0]["instances"]
    assert len(soft) >= len(hard) > 0
    assert torch.all(soft.scores[:-1] >= soft.scores[1:])
    torch.testing.assert_close(soft.scores[0], hard.scores[0])  # the top box is never decayed
    assert soft.pred_masks.shape[0] == len(soft)


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_stopping_after_k_picks_gives_the_top_k_of_the_full_loop(method):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 20 + torch.rand(300, 2, generator=g) * 60], dim=1)
    scores = torch.rand(300, generator=g)
    full = soft_nms(boxes, scores, method, 0.3, 0.5, min_score=0.0)
    for k in (25, 0):  # 0: TEST.DETECTIONS_PER_IMAGE 0, no detection as with hard NMS
        top = soft_nms(boxes, scores, method, 0.3, 0.5, min_score=0.0, max_picks=k)
        assert torch.equal(top[0], full[0][:k]) and torch.equal(top[1], full[1][:k])
    assert torch.all(full[1][:-1] >= full[1][1:])


def test_min_score_is_its_own_key():
    cfg = tiny_cfg()
    cfg.MODEL.HTC.SOFT_NMS_MIN_SCORE = 0.2
    heads = build_model(cfg).roi_heads
    assert heads.soft_nms_min_score == 0.2 != heads.box_predictor[-1].test_score_thresh


def test_non_finite_rows_are_dropped_as_detectron2s_nms_drops_them():
    """A box or score that overflowed (fp16) is left out, the other rows kept as without it,
    where Boxes.clip would raise on it."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [0, 0, float("inf"), 5]])
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    args = ([(100, 100)], 0.05, 0.3, 100, "linear", 0.5, 0.001)
    want = soft_nms_inference([boxes[:2]], [scores[:2]], *args)[0]
    for bad in (boxes, boxes[[0, 1, 1]]):
        nan_scores = scores.clone()
        if bad is not boxes:
            nan_scores[2, 0] = float("nan")
        got = soft_nms_inference([bad], [nan_scores], *args)[0]
        assert torch.equal(got.pred_boxes.tensor, want.pred_boxes.tensor)
        assert torch.equal(got.scores, want.scores) and len(want) == 2
