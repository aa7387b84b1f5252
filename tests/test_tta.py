"""HTC's test-time augmentation, against the reference's: MMDetection 2.x's ``aug_test``
(recorded by dev/parity/make_tta_fixture.py on the small parity model) and its invariances."""

import numpy as np
import pytest
import torch
from detectron2.data.transforms import HFlipTransform, ResizeTransform, TransformList
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, pairwise_iou

from conftest import ROOT, load_cfg, make_batch, parity_model, parity_reference, tiny_cfg
from htc.tta import HybridTaskCascadeWithTTA


def _model_and_cfg(min_sizes, flip, mask_output="bitmask"):
    cfg = tiny_cfg(MASK_OUTPUT=mask_output)
    cfg.TEST.AUG.MIN_SIZES = min_sizes
    cfg.TEST.AUG.MAX_SIZE = 1000
    cfg.TEST.AUG.FLIP = flip
    model = build_model(cfg).eval()
    for predictor in model.roi_heads.box_predictor:  # confident, varied scores
        torch.nn.init.normal_(predictor.cls_score.weight, std=0.5)
    return model, cfg


def _input(image):
    return {"image": image, "height": image.shape[1], "width": image.shape[2]}


@pytest.mark.parametrize("mask_output", ["bitmask", "rle"])
def test_one_scale_without_flip_equals_plain_inference(mask_output):
    """Masks too in MODEL.HTC.MASK_OUTPUT's form (TTA pasted every mask at full size)."""
    model, cfg = _model_and_cfg((96,), False, mask_output)
    image = make_batch(num_images=1)[0]["image"]
    with torch.no_grad():
        plain = model([_input(image)])[0]["instances"]
    tta = HybridTaskCascadeWithTTA(cfg, model)([_input(image)])[0]["instances"]
    assert len(tta) == len(plain) > 0
    assert tta.get_fields().keys() == plain.get_fields().keys()
    torch.testing.assert_close(tta.pred_boxes.tensor, plain.pred_boxes.tensor)
    torch.testing.assert_close(tta.scores, plain.scores)
    assert torch.equal(tta.pred_classes, plain.pred_classes)
    if mask_output == "rle":
        assert tta.pred_masks_rle == plain.pred_masks_rle
    else:
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


def _reference_tta():
    """Our TTA of the small parity model, at the fixture's scales, fed the reference's views
    (2.x's pipeline resizes with OpenCV, Detectron2 with PIL: other pixels), and the record."""
    ref = torch.load(ROOT / "tests/fixtures/htc_tta_mmdet2.pth", weights_only=True)
    cfg = load_cfg(ROOT / "tests/fixtures/htc_parity_small.yaml")
    cfg.TEST.AUG.update(MIN_SIZES=tuple(ref["short_sides"]), MAX_SIZE=ref["max_size"], FLIP=True)
    tta = HybridTaskCascadeWithTTA(cfg, parity_model("small", cfg))
    our_views = tta._get_augmented_inputs(_input(parity_reference("small")["image_rgb"]))[0]

    def reference_views(input):
        inputs, tfms = [], []
        for view in ref["views"]:
            resize = ResizeTransform(input["height"], input["width"], *view.shape[1:])
            inputs += [dict(input, image=view), dict(input, image=view.flip(-1))]
            tfms += [TransformList([resize]), TransformList([resize, HFlipTransform(resize.new_w)])]
        return inputs, tfms

    assert [x["image"].shape for x in our_views[::2]] == [v.shape for v in ref["views"]]
    tta._get_augmented_inputs = reference_views
    return tta, ref


def test_merges_as_the_reference_2x_aug_test():
    """Multi-scale (3 sizes) and flip: the merged proposals, the 100 detections (each with its
    twin: same class, IoU > 0.999), their scores, the merged mask probabilities on the same boxes
    and the pasted masks, pixel for pixel but at the threshold. Measured 6e-5 px, 6e-7 and 6e-8;
    the bounds leave room for another machine's rounding."""
    tta, ref = _reference_tta()
    image = parity_reference("small")["image_rgb"]
    size = tuple(image.shape[1:])
    inputs, tfms = tta._get_augmented_inputs(_input(image))
    with torch.no_grad():
        views = [tta._view(x) for x in inputs]
        proposals = tta._merged_proposals(views, tfms, size)
        reference_boxes = Instances(size, pred_boxes=Boxes(ref["det_boxes"]))
        reference_boxes.pred_classes = ref["det_labels"]
        masks = tta._averaged_masks(views, tfms, reference_boxes)
    assert len(proposals) == len(ref["proposals"]) == 1000
    # by distance, not IoU: some proposals are under a pixel wide, where 4e-5 px is IoU 0.9995
    gap, twin = torch.cdist(ref["proposals"], proposals, p=1).min(dim=1)
    assert gap.max() < 4e-3 and len(set(twin.tolist())) == 1000  # one to one
    torch.testing.assert_close(masks[:, 0], ref["mask_probabilities"], rtol=0, atol=1e-6)

    got = tta([_input(image)])[0]["instances"]
    assert len(got) == len(ref["det_boxes"]) == 100
    iou = pairwise_iou(Boxes(ref["det_boxes"]), got.pred_boxes)
    iou[ref["det_labels"][:, None] != got.pred_classes[None]] = -1
    best, twin = iou.max(dim=1)
    assert (best > 0.999).all() and len(set(twin.tolist())) == 100
    torch.testing.assert_close(got.pred_boxes.tensor[twin], ref["det_boxes"], rtol=0, atol=1e-3)
    torch.testing.assert_close(got.scores[twin], ref["det_scores"], rtol=0, atol=1e-5)
    pasted = np.unpackbits(ref["masks_packed"].numpy(), axis=-1)[..., : ref["mask_width"]]
    # a pixel whose probability sits at the 0.5 threshold may flip with the summation order:
    # 1 of 41,537 in one thread, none in two (measured)
    flipped = (got.pred_masks[twin].numpy() != pasted.astype(bool)).sum()
    assert flipped <= pasted.sum() // 10_000


@pytest.mark.parametrize(
    "min_sizes, max_size, refused",
    [((), 1000, "MIN_SIZES=\\[\\]: give one or more"), ((64, 0), 1000, "positive"),
     ((400, 800), 10, "MAX_SIZE=10 is under every size")],
)  # fmt: skip
def test_sizes_that_give_no_views_or_shrunk_ones_are_refused(min_sizes, max_size, refused):
    """No sizes failed in torch.cat after the inference of the first image (in training: after
    the whole run); a MAX_SIZE of 10 scored AP near 0, silently."""
    cfg = tiny_cfg()
    cfg.TEST.AUG.update(ENABLED=True, MIN_SIZES=min_sizes, MAX_SIZE=max_size)
    with pytest.raises(ValueError, match=refused):
        HybridTaskCascadeWithTTA(cfg, build_model(cfg))
