"""The pieces our HTC takes from Detectron2 where MMDetection has its own (box decoding and its
clamps, anchors, the RPN's selection and NMS, mask pasting), against the reference on rare
inputs: extreme deltas, boxes under a pixel or of zero size, tied scores. The reference's
outputs were recorded by dev/parity/make_pieces.py in MMDetection 3.3."""

import numpy as np
import pytest
import torch
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, pairwise_iou

from conftest import ROOT, build_on_meta, load_cfg
from htc.box_coder import ReferenceBox2BoxTransform

REF = torch.load(ROOT / "tests/fixtures/mmdet_pieces.pth", weights_only=True)
SIZE = REF["image_size"]
CFG = load_cfg(ROOT / "tests/fixtures/htc_parity_small.yaml")
WEIGHTS = [*CFG.MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS, CFG.MODEL.RPN.BBOX_REG_WEIGHTS]


def _decode(transform, want):
    boxes = Boxes(transform.apply_deltas(REF["decode_deltas"], REF["decode_boxes"]))
    boxes.clip(SIZE)
    return (boxes.tensor - want).abs().max().item()


@pytest.mark.parametrize("coder", range(4), ids=["stage0", "stage1", "stage2", "rpn"])
def test_decoding_of_extreme_deltas_clamps_as_the_reference(coder):
    """Deltas of +-30 in dw/dh: the reference clamps a shrink as a growth; Detectron2's own
    transform clamps only the growth."""
    want = REF["decoded"][coder]
    assert _decode(ReferenceBox2BoxTransform(weights=WEIGHTS[coder]), want) < 1e-5
    if coder in (0, 3):  # the weights at which the shrink passes the clamp
        assert _decode(Box2BoxTransform(weights=WEIGHTS[coder]), want) > 0.1


def test_the_model_decodes_as_the_reference():
    model = build_on_meta(CFG)
    transforms = [model.proposal_generator.box2box_transform]
    transforms += [p.box2box_transform for p in model.roi_heads.box_predictor]
    assert [type(t) for t in transforms] == [ReferenceBox2BoxTransform] * 4


@pytest.fixture(scope="module")
def rpn():
    return build_model(CFG).proposal_generator.eval()


def test_anchors_are_the_reference_s(rpn):
    feats = [torch.zeros(1, 1, h, w) for h, w in REF["feature_sizes"]]
    for ours, theirs in zip(rpn.anchor_generator(feats), REF["anchors"]):
        assert torch.equal(ours.tensor, theirs)


def test_rpn_proposals_on_tied_scores(rpn):
    """Logits rounded to 1/4 (thousands of exact ties) and extreme deltas: the same scores are
    kept; boxes differ only where equal scores are ordered otherwise (torch's sort in the
    reference, topk here), at the top-k cut and in the NMS that follows."""
    anchors = rpn.anchor_generator([torch.zeros(1, 1, h, w) for h, w in REF["feature_sizes"]])
    logits = [x.permute(0, 2, 3, 1).flatten(1) for x in REF["rpn_logits"]]
    deltas = [
        x.unflatten(1, (-1, 4)).permute(0, 3, 4, 1, 2).flatten(1, -2) for x in REF["rpn_deltas"]
    ]
    with torch.no_grad():
        ours = rpn.predict_proposals(anchors, logits, deltas, [SIZE])[0]
    theirs = REF["rpn_boxes"]
    assert len(ours) == len(theirs) == 1000
    torch.testing.assert_close(
        ours.objectness_logits.sigmoid().sort().values, REF["rpn_scores"].sort().values
    )
    best = pairwise_iou(Boxes(theirs), ours.proposal_boxes).max(dim=1).values
    assert (best > 0.9999).float().mean() > 0.94
    unmatched = REF["rpn_scores"][best <= 0.9999].unique()
    all_logits = torch.cat([x.flatten() for x in REF["rpn_logits"]]).sigmoid()
    for score in unmatched:  # each shared by many anchors
        assert (all_logits == score).sum() > 100


def test_mask_pasting_as_the_reference_but_for_zero_size_boxes():
    """Equal pixel for pixel, boxes under a pixel and at the border included. A box of zero
    width or height: the reference replaces its infinite grid coordinates by 0, pasting a band
    across the image (the whole image for a point); ours pastes nothing."""
    boxes = REF["paste_boxes"]
    ours = paste_masks_in_image(REF["paste_probabilities"], Boxes(boxes), SIZE, threshold=0.5)
    packed = REF["pasted_packed"].numpy()
    theirs = torch.from_numpy(np.unpackbits(packed, axis=-1)[..., : SIZE[1]].astype(bool))
    empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    assert empty.sum() == 3 and (boxes[:, 2] - boxes[:, 0] < 1)[~empty].sum() == 3
    assert torch.equal(ours[~empty], theirs[~empty])
    assert not ours[empty].any() and theirs[empty].flatten(1).any(dim=1).all()
