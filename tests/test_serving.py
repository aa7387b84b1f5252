"""Every inference entry where serving code calls it: under ``torch.inference_mode`` (the outputs
of ``no_grad``), under CPU autocast, and with a non-finite box, score or mask logit (an fp16
overflow), which the test-time routes drop with a warning instead of raising."""

import logging
from collections import Counter

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from conftest import make_batch, tiny_cfg
from htc.demo import TITLE_HEIGHT, draw_prediction
from htc.export import raw_inference
from htc.layers import ROI_ALIGN_KERNELS
from htc.tta import HybridTaskCascadeWithTTA

VARIANTS = {
    "nms": {},
    "soft_nms": {"TEST_NMS": "soft_linear"},
    "rle": {"MASK_OUTPUT": "rle"},
    "panoptic": {"PANOPTIC_ON": True},
}


def _cfg(variant: str):
    cfg = tiny_cfg(**VARIANTS[variant])
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.TEST.DETECTIONS_PER_IMAGE = 20  # every route as with 100, at a fraction of the time
    # one scale (the image resized) and its flip: the merging of views of several sizes is
    # test_tta's, against the reference
    cfg.TEST.AUG.MIN_SIZES, cfg.TEST.AUG.MAX_SIZE, cfg.TEST.AUG.FLIP = (128,), 1000, True
    if variant == "panoptic":
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 6
        cfg.DATASETS.TEST = ("htc_demo_val",)
        cfg.MODEL.HTC.PANOPTIC.INSTANCES_CONFIDENCE_THRESH = 0.0
        cfg.MODEL.HTC.PANOPTIC.STUFF_AREA_LIMIT = 1
    return cfg


def _entries(variant: str):
    """name -> a call of one inference entry on one image."""
    cfg = _cfg(variant)
    model = build_model(cfg).eval()
    batch = make_batch(1, with_gt=False)
    entries = {
        "model": lambda: model(batch)[0],
        "tta": lambda: HybridTaskCascadeWithTTA(cfg, model)(batch)[0],
    }
    if variant == "nms":
        entries["export's eager reference"] = lambda: raw_inference(model, batch)
    return entries


def _flat(output) -> list:
    """The tensors and host values of an entry's output, in a fixed order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [v for x in output for v in _flat(x)]
    if isinstance(output, dict):
        return [v for k in sorted(output) for v in _flat(output[k])]
    if hasattr(output, "get_fields"):
        fields = output.get_fields()
        return [v for k in sorted(fields) for v in _flat(getattr(fields[k], "tensor", fields[k]))]
    return [output]


def _same(a, b) -> bool:
    flat_a, flat_b = _flat(a), _flat(b)
    if len(flat_a) != len(flat_b):
        return False
    for x, y in zip(flat_a, flat_b):
        same = torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        if not same:
            return False
    return True


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_mode_gives_the_outputs_of_no_grad(variant):
    for name, entry in _entries(variant).items():
        with torch.no_grad():
            want = entry()
        with torch.inference_mode():
            got = entry()
        assert len(_flat(want)) >= 4, name
        assert _same(want, got), name


def test_default_predictor_and_the_demo_under_inference_mode():
    cfg = _cfg("nms")
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    predictor = DefaultPredictor(cfg)
    image = make_batch(1, with_gt=False)[0]["image"].permute(1, 2, 0).numpy()[:, :, ::-1]
    want = predictor(image.copy())
    with torch.inference_mode():
        got = predictor(image.copy())
        picture = draw_prediction(image[:, :, ::-1], got, MetadataCatalog.get("htc_demo_val"))
    assert _same(want, got) and len(want["instances"]) > 0
    assert picture.shape[0] == image.shape[0] + TITLE_HEIGHT and picture.dtype == np.uint8


@pytest.mark.parametrize(
    "variant, dtype",
    [*((variant, "bfloat16") for variant in VARIANTS), ("nms", "float16")],
)
def test_every_entry_runs_under_cpu_autocast(variant, dtype: str):
    """torchvision's CPU RoIAlign has no half kernels: ours pool in float32 under autocast.
    float16 once: no code of ours tells the half types apart, and PyTorch's CPU convolutions
    run it 5 to 10 times slower than bfloat16."""
    for name, entry in _entries(variant).items():
        with torch.autocast("cpu", dtype=getattr(torch, dtype)):
            output = entry()
        tensors = [
            x for x in _flat(output) if isinstance(x, torch.Tensor) and x.is_floating_point()
        ]
        assert tensors and all(torch.isfinite(x).all() for x in tensors), name


@pytest.mark.parametrize("kernel", sorted(ROI_ALIGN_KERNELS))
def test_roi_align_kernels_take_half_features_on_cpu(kernel):
    """A half-precision feature is pooled in float32 and returned in its dtype, as
    torchvision's CUDA autocast does."""
    layer = ROI_ALIGN_KERNELS[kernel]((14, 14), 0.25, 0, True)
    g = torch.Generator().manual_seed(0)
    feature = torch.randn(2, 8, 24, 24, generator=g).to(torch.bfloat16)
    rois = torch.tensor([[0, 4.0, 4, 60, 50], [1, 0, 8, 90, 90]])
    got, want = layer(feature, rois), layer(feature.float(), rois)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))
    # pooled 2x2: the parent's pools the rounded features, ours before rounding
    got, want = layer.pooled(feature, rois, (7, 7)), layer.pooled(feature.float(), rois, (7, 7))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.to(torch.bfloat16), atol=4e-3, rtol=1.6e-2)


def _poison(rows, value):
    def hook(module, inputs, output):
        output = output.clone()
        output[rows] = value
        return output

    return hook


POISONS = {
    "box deltas (every stage)": ("bbox_pred", float("inf")),
    "class logits (every stage)": ("cls_score", float("nan")),
    "mask features, so logits (every stage)": ("mask", float("nan")),
}


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("variant", ["nms", "soft_nms", "rle", "panoptic"])
def test_non_finite_rows_are_dropped_with_a_warning(variant, poison, caplog, monkeypatch):
    """The first 3 RoIs of every stage (boxes, scores) or the first 3 detections (masks) go
    non-finite: no route raises; every output is finite (the masks: 3 detections fewer), and a
    warning names the drop."""
    monkeypatch.setattr("detectron2.utils.logger._LOG_COUNTER", Counter())  # logs anew
    cfg = _cfg(variant)
    model = build_model(cfg).eval()
    batch = make_batch(1, with_gt=False)
    with torch.no_grad():
        clean = [len(model(batch)[0]["instances"])]
        clean.append(len(HybridTaskCascadeWithTTA(cfg, model)(batch)[0]["instances"]))
    layer, value = POISONS[poison]
    heads = model.roi_heads
    if layer == "mask":
        modules = [head.deconv for head in heads.mask_head]
    else:
        modules = [getattr(predictor, layer) for predictor in heads.box_predictor]
    for module in modules:
        module.register_forward_hook(_poison(slice(0, 3), value))
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="htc"):
        outputs = [model(batch)[0], HybridTaskCascadeWithTTA(cfg, model)(batch)[0]]
    for output, count in zip(outputs, clean):
        instances = output["instances"]
        if layer == "mask":
            assert len(instances) == count - 3 > 0
        else:
            assert 0 < len(instances) <= count
        tensors = [x for x in _flat(instances) if isinstance(x, torch.Tensor)]
        assert all(torch.isfinite(x.float()).all() for x in tensors)
    assert "non-finite" in caplog.text and "dropped" in caplog.text


def test_a_box_lost_at_the_first_stage_stays_lost():
    """A RoI whose first-stage box is not finite goes on as an empty box (the parent's clip
    would assert) and ends NaN, to be dropped, though the later stages refine it to a finite
    box."""
    model = build_model(_cfg("nms")).eval()
    heads = model.roi_heads
    heads.box_predictor[0].bbox_pred.register_forward_hook(_poison(slice(0, 3), float("inf")))
    batch = make_batch(1, with_gt=False)
    with torch.no_grad():
        images = model.preprocess_image(batch)
        features, _ = model._features(images)
        proposals, _ = model.proposal_generator(images, features)
        (boxes,), (scores,) = heads.cascade_boxes_and_scores(features, proposals)
        (detections,) = heads.final_detections([boxes], [scores], images.image_sizes)
    assert boxes[:3].isnan().all() and torch.isfinite(boxes[3:]).all()
    assert len(detections) > 0 and torch.isfinite(detections.pred_boxes.tensor).all()
