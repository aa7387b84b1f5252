"""htc.roi_heads: the interleaved cascade, mask information flow, semantic fusion, and HTC's
test-time rules."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.structures import Boxes, Instances
from torch.nn import functional as F

from conftest import make_batch, tiny_cfg, train_losses
from htc import SEMANTIC_FEATURE

STAGES = range(3)


def test_loss_keys_and_finite():
    model = build_model(tiny_cfg())
    losses = train_losses(model, make_batch())
    expected = {"loss_sem_seg", "loss_rpn_cls", "loss_rpn_loc"}
    for t in STAGES:
        expected |= {f"loss_cls_stage{t}", f"loss_box_reg_stage{t}", f"loss_mask_stage{t}"}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("images_with_gt", [(False, False), (False, True)])
def test_images_without_annotations_train(images_with_gt):
    """A batch without any GT box, or with one image without: background RoIs only there, no
    box or mask loss from them."""
    model = build_model(tiny_cfg())
    batch = [make_batch(1, with_gt=gt, seed=i)[0] for i, gt in enumerate(images_with_gt)]
    losses = train_losses(model, batch)
    assert all(torch.isfinite(v) for v in losses.values())
    if not any(images_with_gt):
        for t in STAGES:
            assert losses[f"loss_box_reg_stage{t}"] == 0 and losses[f"loss_mask_stage{t}"] == 0
            assert losses[f"loss_cls_stage{t}"] > 0
    else:
        assert all(losses[f"loss_mask_stage{t}"] > 0 for t in STAGES)


def test_stage_weights_scale_box_and_mask_losses():
    cfg = tiny_cfg()
    model = build_model(cfg)
    base = train_losses(model, make_batch())
    model.roi_heads.stage_loss_weights = [2.0, 3.0, 4.0]
    scaled = train_losses(model, make_batch())
    for t, w_old, w_new in zip(STAGES, [1.0, 0.5, 0.25], [2.0, 3.0, 4.0]):
        for name in ("loss_cls", "loss_box_reg", "loss_mask"):
            key = f"{name}_stage{t}"
            assert scaled[key].item() == pytest.approx(base[key].item() * w_new / w_old, rel=1e-5)
    assert scaled["loss_sem_seg"].item() == pytest.approx(base["loss_sem_seg"].item(), rel=1e-6)


def _record_rois(model, batch):
    """Per stage: the boxes the box head saw and its number of foreground RoIs, and the boxes
    the mask loss saw with their ``from_gt``."""
    heads = model.roi_heads
    box_rois, num_fg, mask_rois, mask_from_gt = {}, {}, {}, {}
    run_stage, mask_loss = heads.box_stage, heads._mask_loss
    bg = heads.num_classes

    def spy_stage(features, proposals, stage):
        box_rois[stage] = torch.cat([p.proposal_boxes.tensor for p in proposals])
        classes = torch.cat([p.gt_classes for p in proposals])
        num_fg[stage] = int(((classes >= 0) & (classes != bg)).sum())
        return run_stage(features, proposals, stage)

    def spy_mask(features, instances, stage):
        mask_rois[stage] = torch.cat([p.proposal_boxes.tensor for p in instances])
        mask_from_gt[stage] = torch.cat([p.from_gt for p in instances])
        classes = torch.cat([p.gt_classes for p in instances])
        assert ((classes >= 0) & (classes != bg)).all()  # the mask loss sees foreground only
        return mask_loss(features, instances, stage)

    heads.box_stage, heads._mask_loss = spy_stage, spy_mask
    train_losses(model, batch)
    return box_rois, num_fg, mask_rois, mask_from_gt


def _rows_in(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return (rows[:, None, :] == table[None, :, :]).all(-1).any(-1)


@pytest.mark.parametrize("interleaved", [True, False])
def test_interleaving_changes_mask_rois(interleaved):
    model = build_model(tiny_cfg(interleaved=interleaved))
    box_rois, num_fg, mask_rois, from_gt = _record_rois(model, make_batch())
    for t in STAGES:
        inside = _rows_in(mask_rois[t], box_rois[t])
        if interleaved:  # refined boxes of stage t, re-sampled (re-added GT boxes coincide)
            assert (~from_gt[t]).any()
            assert inside[~from_gt[t]].float().mean() < 0.5
        else:  # the foreground of the box head's RoIs
            assert inside.all() and len(mask_rois[t]) == num_fg[t]


@pytest.mark.parametrize("info_flow", [True, False])
def test_stage2_mask_loss_reaches_earlier_mask_heads_only_with_info_flow(info_flow):
    model = build_model(tiny_cfg(mask_info_flow=info_flow))
    losses = train_losses(model, make_batch())
    losses["loss_mask_stage2"].backward()
    for t in STAGES:
        grad = model.roi_heads.mask_head[t].mask_fcn1.weight.grad
        reached = grad is not None and grad.abs().sum() > 0
        assert reached == (t == 2 or info_flow), t
    assert (model.roi_heads.mask_head[2].res_conv is not None) == info_flow
    assert model.roi_heads.mask_head[0].res_conv is None


def test_a_stage_learns_on_the_boxes_before_it_without_reaching_their_box_head():
    """The refined boxes are constants to the next stage (the reference refines them under
    no_grad): its losses reach no earlier box head, whose regression would otherwise also learn
    from the later stages' targets."""
    model = build_model(tiny_cfg())
    losses = train_losses(model, make_batch())
    later = [v for k, v in losses.items() if k.endswith(("stage1", "stage2"))]
    sum(later).backward()
    heads = model.roi_heads
    assert heads.box_predictor[1].bbox_pred.weight.grad.abs().sum() > 0
    assert heads.box_predictor[0].bbox_pred.weight.grad is None
    assert heads.box_head[0].fcs[0].weight.grad is None
    # the refinement itself hands on constants (the sampling after it is no_grad too)
    rois = [Instances((96, 96), proposal_boxes=Boxes(torch.tensor([[8.0, 8, 40, 40]])),
                      from_gt=torch.tensor([False]))]  # fmt: skip
    scores, deltas = torch.zeros(1, 4, requires_grad=True), torch.ones(1, 4, requires_grad=True)
    (refined,) = heads._refine((scores, deltas), rois, 0)
    assert not refined.proposal_boxes.tensor.requires_grad


def _stage_outputs(model, features, boxes):
    heads = model.roi_heads
    proposals = [Instances((96, 96), proposal_boxes=Boxes(boxes))]
    box_out = torch.cat([torch.cat(heads.box_stage(features, proposals, t), 1) for t in STAGES])
    mask_out = torch.cat(heads._run_mask_heads(features, [Boxes(boxes)], 2, keep_all=True))
    return box_out, mask_out


@pytest.mark.parametrize("fusion", [("bbox", "mask"), ("bbox",), ("mask",)], ids="+".join)
def test_zeroing_semantic_feature_changes_outputs_only_where_fused(fusion):
    model = build_model(tiny_cfg(semantic_fusion=list(fusion))).eval()
    batch = make_batch(num_images=1)
    boxes = torch.tensor([[5.0, 5.0, 60.0, 70.0], [30.0, 10.0, 90.0, 50.0]])
    with torch.no_grad():
        images = model.preprocess_image(batch)
        features, _ = model._features(images)
        box_a, mask_a = _stage_outputs(model, features, boxes)
        features[SEMANTIC_FEATURE] = torch.zeros_like(features[SEMANTIC_FEATURE])
        box_b, mask_b = _stage_outputs(model, features, boxes)
    assert (not torch.equal(box_a, box_b)) == ("bbox" in fusion)
    assert (not torch.equal(mask_a, mask_b)) == ("mask" in fusion)


@pytest.mark.parametrize("sigmoid", [False, True])
def test_inference_averages_stage_logits_then_softmax(sigmoid):
    """A softmax of the stages' mean logits, or their sigmoid where the predictors learn with
    sigmoid cross-entropy (the federated loss of the LVIS configs)."""
    cfg = tiny_cfg()
    model = build_model(cfg).eval()
    heads = model.roi_heads
    for predictor in heads.box_predictor:  # logits of O(1), where the two rules differ
        torch.nn.init.normal_(predictor.cls_score.weight, std=0.5)
        predictor.use_sigmoid_ce = sigmoid
    to_probs = torch.sigmoid if sigmoid else lambda x: F.softmax(x, dim=-1)
    boxes = torch.tensor([[5.0, 5.0, 60.0, 70.0], [30.0, 10.0, 90.0, 50.0], [0, 0, 95, 95]])
    with torch.no_grad():
        features, _ = model._features(model.preprocess_image(make_batch(num_images=1)))
        proposals = [Instances((96, 96), proposal_boxes=Boxes(boxes))]
        got = heads._forward_box(features, proposals)[0]
        # by hand: run the stages, refining the boxes, then softmax of the mean logits
        logits, props = [], proposals
        for t in STAGES:
            scores, deltas = heads.box_stage(features, props, t)
            logits.append(scores)
            refined = heads.box_predictor[t].box2box_transform.apply_deltas(
                deltas, props[0].proposal_boxes.tensor
            )
            props = [Instances((96, 96), proposal_boxes=Boxes(refined).clone())]
            props[0].proposal_boxes.clip((96, 96))
        probs = to_probs(sum(logits) / 3)
        last = heads.box_predictor[-1]
        want, _ = fast_rcnn_inference(
            [refined], [probs], [(96, 96)], last.test_score_thresh, last.test_nms_thresh, 100
        )
        mean_of_probs = sum(to_probs(x) for x in logits) / 3
    torch.testing.assert_close(got.scores, want[0].scores)
    torch.testing.assert_close(got.pred_boxes.tensor, want[0].pred_boxes.tensor)
    assert not torch.allclose(probs, mean_of_probs, atol=1e-2)  # the rule matters here


def test_mask_merge_last_uses_only_last_stage():
    model = build_model(tiny_cfg()).eval()
    boxes = Boxes(torch.tensor([[5.0, 5.0, 60.0, 70.0]]))
    with torch.no_grad():
        features, _ = model._features(model.preprocess_image(make_batch(num_images=1)))
        all_logits = model.roi_heads._run_mask_heads(features, [boxes], 2, keep_all=True)
        merged = {}
        for rule in ("mean", "last"):
            model.roi_heads.mask_merge = rule
            inst = Instances((96, 96), pred_boxes=boxes, pred_classes=torch.tensor([1]))
            merged[rule] = model.roi_heads._forward_mask(features, [inst])[0].pred_masks
    sig = [x.sigmoid()[:, 1:2] for x in all_logits]
    torch.testing.assert_close(merged["mean"], sum(sig) / 3)
    torch.testing.assert_close(merged["last"], sig[2])


@pytest.mark.parametrize(
    "interleaved, mask_on, calls", [(True, True, 3), (False, True, 2), (True, False, 2)]
)
def test_boxes_are_refined_only_where_a_later_step_uses_them(interleaved, mask_on, calls):
    """The last stage's refined boxes serve only its interleaved mask head."""
    cfg = tiny_cfg(INTERLEAVED=interleaved)
    cfg.MODEL.MASK_ON = mask_on
    model = build_model(cfg)
    heads, stages = model.roi_heads, []
    refine = heads._refine
    heads._refine = lambda predictions, rois, stage: (
        stages.append(stage) or refine(predictions, rois, stage)
    )
    train_losses(model, make_batch())
    assert stages == list(range(calls))


def test_the_parents_run_stage_is_refused_not_run_without_the_semantic_feature():
    heads = build_model(tiny_cfg()).roi_heads
    proposals = [Instances((96, 96), proposal_boxes=Boxes(torch.tensor([[0.0, 0, 10, 10]])))]
    with pytest.raises(NotImplementedError, match="box_stage"):
        heads._run_stage([torch.zeros(1, 32, 24, 24)], proposals, 0)
