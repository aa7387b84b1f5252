"""htc.meta_arch: the model's inputs and outputs, with and without the semantic branch."""

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.layers import DeformConv
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import sem_seg_postprocess
from torch.nn import functional as F

from conftest import make_batch, tiny_cfg, train_losses
from htc import HybridTaskCascade
from htc.layers.deform_conv import TorchvisionDeformConv


@pytest.mark.parametrize("with_gt", [True, False], ids=["positives", "no-positives"])
def test_every_parameter_gets_a_gradient(with_gt):
    model = build_model(tiny_cfg())
    losses = train_losses(model, make_batch(with_gt=with_gt))
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    if with_gt:
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert [n for n, p in trained if p.grad.abs().sum() == 0] == []


def test_inference_output_format():
    model = build_model(tiny_cfg()).eval()
    batch = make_batch(num_images=2)
    batch[1]["height"], batch[1]["width"] = 192, 144  # outputs at the requested resolution
    with torch.no_grad():
        outputs = model(batch)
    for out, x in zip(outputs, batch):
        assert set(out) == {"instances", "sem_seg"}
        inst = out["instances"]
        assert inst.image_size == (x["height"], x["width"])
        assert inst.pred_masks.shape == (len(inst), x["height"], x["width"])
        assert inst.pred_masks.dtype == torch.bool
        assert out["sem_seg"].shape == (5, x["height"], x["width"])
        assert {"pred_boxes", "scores", "pred_classes", "pred_masks"} <= set(inst.get_fields())


def test_semantic_output_is_detectron2s_postprocess_and_can_be_skipped():
    model = build_model(tiny_cfg()).eval()
    batch = make_batch(num_images=2, size=90)  # padded to 96: the crop matters
    batch[1]["height"], batch[1]["width"] = 120, 100  # and a resize
    with torch.no_grad():
        outputs = model(batch)
        images = model.preprocess_image(batch)
        _, logits = model._features(images)
        scores = model.semantic_head.upsample_logits(logits)
        model.semantic_output = False
        without = model(batch)
    stride = model.semantic_head.common_stride
    assert torch.equal(scores, F.interpolate(logits, scale_factor=stride, mode="bilinear"))
    for out, score, (height, width) in zip(outputs, scores, [(90, 90), (120, 100)]):
        assert torch.equal(out["sem_seg"], sem_seg_postprocess(score, (90, 90), height, width))
    for a, b in zip(without, outputs):
        assert set(a) == {"instances"}
        assert torch.equal(a["instances"].pred_masks, b["instances"].pred_masks)


def test_without_semantic_branch():
    model = build_model(tiny_cfg(semantic_on=False, semantic_fusion=[])).eval()
    assert model.semantic_head is None
    with torch.no_grad():
        outputs = model(make_batch(num_images=1))
    assert set(outputs[0]) == {"instances"}
    losses = train_losses(model, make_batch())
    assert "loss_sem_seg" not in losses and "loss_mask_stage2" in losses


@pytest.mark.parametrize(
    "opts",
    [
        ["MODEL.HTC.SEMANTIC_FUSION", []],
        ["MODEL.HTC.SEMANTIC_FUSION", ["mask"], "MODEL.MASK_ON", False],
    ],
    ids=["no fusion", "mask fusion without masks"],
)
def test_a_semantic_feature_that_nothing_fuses_is_not_made(opts):
    """The semantic branch then trains as a loss only: its conv_embedding, which nothing read,
    got no gradient, and DDP (find_unused_parameters=False, Detectron2's default) failed at the
    second iteration."""
    cfg = tiny_cfg()
    cfg.merge_from_list(opts)
    model = build_model(cfg)
    assert model.semantic_head.conv_embedding is None
    losses = train_losses(model, make_batch(1))
    sum(losses.values()).backward()
    assert "loss_sem_seg" in losses
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_semantic_fusion_without_the_semantic_branch_is_named():
    """The ROI heads' semantic fusion takes HybridTaskCascade's semantic feature: Detectron2's
    GeneralizedRCNN (which has no semantic branch) around them, and a model built without the
    branch (as a LazyConfig can), are refused by name, not with a KeyError."""
    cfg = tiny_cfg()
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    model = build_model(cfg)
    message = "semantic fusion .*'htc_semantic'.*META_ARCHITECTURE 'HybridTaskCascade'"
    with pytest.raises(ValueError, match=message):
        train_losses(model, make_batch())
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model.eval()(make_batch(num_images=1, with_gt=False))
    parts = HybridTaskCascade.from_config(tiny_cfg())
    with pytest.raises(ValueError, match=r"\['bbox', 'mask'\] .*no semantic branch"):
        HybridTaskCascade(**{**parts, "semantic_head": None})


def test_roi_heads_other_than_htcs_are_refused():
    """Detectron2's CascadeROIHeads in HTC's model trained and ignored every HTC setting
    (STAGE_LOSS_WEIGHTS [1, 0, 0] gave losses at every stage) and the semantic feature."""
    cfg = tiny_cfg()
    cfg.MODEL.ROI_HEADS.NAME = "CascadeROIHeads"
    with pytest.raises(ValueError, match="must be HybridTaskCascadeROIHeads, not CascadeROIHeads"):
        build_model(cfg)


def test_the_deformable_conv_kernels_are_an_argument_of_the_model():
    """As a LazyConfig builds it (no MODEL.HTC.DEFORM_CONV there): torchvision's kernels by
    default, which run on CPU; Detectron2's (CUDA only) where asked; another name refused."""
    kernels = lambda model: {type(m) for m in model.modules() if "Deform" in type(m).__name__}  # noqa: E731
    for asked, want in (({}, TorchvisionDeformConv), ({"deform_conv": "detectron2"}, DeformConv)):
        parts = HybridTaskCascade.from_config(tiny_cfg())
        del parts["deform_conv"]
        parts["backbone"].bottom_up.add_module("deform", DeformConv(4, 4, 3, padding=1))
        assert kernels(HybridTaskCascade(**parts, **asked)) == {want}
    with pytest.raises(ValueError, match="deform_conv.*'cuda': use one of"):
        HybridTaskCascade(**{**parts, "deform_conv": "cuda"})


def test_a_training_input_without_semantic_labels_is_named():
    """Every input is checked, not the first alone (the second's missing labels were a bare
    KeyError)."""
    model = build_model(tiny_cfg())
    batch = make_batch(2)
    del batch[1]["sem_seg"]
    with pytest.raises(ValueError, match="input 1 has no 'sem_seg'.*SEMANTIC_ON False"):
        train_losses(model, batch)


def test_fractional_semantic_labels_are_refused():
    """Float labels were cast to int64, 3.7 trained as class 3 (PanopticFPN's loss refuses
    them)."""
    model = build_model(tiny_cfg())
    batch = make_batch(2)
    batch[1]["sem_seg"] = batch[1]["sem_seg"].float() + 0.7
    with pytest.raises(ValueError, match="sem_seg of input 1 has dtype torch.float32"):
        train_losses(model, batch)


@pytest.mark.parametrize("off_image", [False, True])
def test_rle_mask_output_decodes_to_the_bitmasks(off_image):
    """MODEL.HTC.MASK_OUTPUT "rle": the same masks as COCO RLEs, no full-size pred_masks; also
    where the postprocessing drops boxes clipped to nothing (pushed off the image here)."""
    model = build_model(tiny_cfg()).eval()
    if off_image:
        with torch.no_grad():
            model.roi_heads.box_predictor[-1].bbox_pred.bias[0] = 60.0
    batch = make_batch(num_images=2)
    batch[1]["height"], batch[1]["width"] = 192, 144
    with torch.no_grad():
        detected = [len(x) for x in model.inference(batch, do_postprocess=False)]
        full = model(batch)
        model.mask_output = "rle"
        rle = model(batch)
    kept = [len(x["instances"]) for x in full]
    assert (kept != detected) == off_image and sum(kept) > 0
    for a, b in zip(full, rle):
        masks, inst = a["instances"].pred_masks, b["instances"]
        assert not inst.has("pred_masks") and len(inst.pred_masks_rle) == len(masks)
        if len(masks):
            decoded = mask_util.decode(inst.pred_masks_rle)  # (H, W, N)
            assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), masks.numpy())
        assert torch.equal(inst.pred_boxes.tensor, a["instances"].pred_boxes.tensor)


def test_unknown_mask_output_is_named():
    cfg = tiny_cfg(MASK_OUTPUT="png")
    with pytest.raises(ValueError, match="MODEL.HTC.MASK_OUTPUT='png'.*bitmask.*rle"):
        build_model(cfg)


def test_inference_mode_gives_the_outputs_of_no_grad():
    """Serving code runs models under ``torch.inference_mode`` (its tensors have no version
    counter): the same outputs as under ``no_grad`` (the Triton route's part:
    tests/layers/test_roi_align_triton.py)."""
    model = build_model(tiny_cfg()).eval()
    batch = make_batch(num_images=1, size=64)
    with torch.no_grad():
        want = model(batch)[0]
    with torch.inference_mode():
        got = model(batch)[0]
    assert len(want["instances"]) > 0
    for key in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
        a, b = want["instances"].get(key), got["instances"].get(key)
        a, b = (a.tensor, b.tensor) if key == "pred_boxes" else (a, b)
        assert torch.equal(a, b), key
    assert torch.equal(want["sem_seg"], got["sem_seg"])
