"""htc.export: HTC traced at one image size, as TorchScript and as ONNX run in onnxruntime, agrees
with eager PyTorch on other sizes, with zero detections and with the top-k limit reached;
postprocess gives the model's own outputs; what cannot be exported is refused by name."""

import numpy as np
import pytest
import torch
from detectron2.layers import DeformConv
from detectron2.modeling import build_model
from PIL import Image

from conftest import CONFIGS, TINY_OPTS, load_cfg, tiny_cfg
from htc.demo import load_predictor_cfg
from htc.export import (
    OUTPUT_NAMES,
    check_exportable,
    export,
    load_exported,
    match_detections,
    postprocess,
    raw_inference,
    sample_image,
)
from htc.export import main as export_main

TOP_K = 10
# max |exported - eager| allowed per output; detections and classes: equal. Boxes are in pixels,
# scores and masks probabilities; logits are unbounded (random R-50 weights give them in the
# hundreds), so theirs is relative to their largest magnitude when that is over 1.
TOLERANCE = {"boxes": 1e-2, "scores": 1e-4, "mask_probs": 1e-3, "sem_logits": 1e-3}
RELATIVE = ("sem_logits",)


def _noise(height: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), generator=g).float()


def _eager(model, image):
    with torch.no_grad():
        return raw_inference(model, [{"image": image}])


@pytest.fixture(scope="module")
def tiny():
    """A random-weight tiny HTC whose score threshold lies between the best score on a flat
    image (so: no detection there) and the TOP_K-th best on a noise image (so: TOP_K there),
    and its images: the traced one, then other sizes (noise and flat), each with its own count
    of proposals (the shipped configs' top-k, which no image here fills: a count frozen by the
    trace fails the others)."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 1000
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.TEST.DETECTIONS_PER_IMAGE = 1000
    model = build_model(cfg).eval()
    traced, flat = _noise(128, 160, seed=0), torch.full((3, 96, 128), 90.0)
    best_flat = _eager(model, flat)[1].max().item()
    kth_noise = _eager(model, traced)[1].sort(descending=True).values[TOP_K - 1].item()
    assert best_flat < kth_noise, "the random model no longer separates the two images"
    for predictor in model.roi_heads.box_predictor:
        predictor.test_score_thresh = (best_flat + kth_noise) / 2
        predictor.test_topk_per_image = TOP_K
    images = [traced, _noise(96, 128, seed=1), _noise(160, 100, seed=2), flat]
    counts = [len(_proposals(model, image)) for image in images]
    assert len(set(counts)) == len(images) and max(counts) < 1000, counts
    return model, images


def _proposals(model, image: torch.Tensor):
    with torch.no_grad():
        images = model.preprocess_image([{"image": image}])
        return model.proposal_generator(images, model.backbone(images.tensor), None)[0][0]


def _assert_agrees(ours, eager):
    """The same detections and classes; an order differing only between detections whose
    scores agree within the score tolerance (a tie that float rounding breaks); outputs within
    TOLERANCE."""
    assert len(ours) == len(eager)
    order = match_detections(ours, eager, box_tolerance=TOLERANCE["boxes"])
    assert order is not None
    if len(order):
        assert (eager[1][order] - eager[1]).abs().max() <= TOLERANCE["scores"]
    for i, (name, a, b) in enumerate(zip(OUTPUT_NAMES, ours, eager)):
        b = b[order] if i < 4 else b
        if name == "classes":
            assert torch.equal(a.long(), b)
        elif b.numel():
            scale = max(1.0, b.abs().max().item()) if name in RELATIVE else 1.0
            assert (a.float() - b).abs().max().item() <= TOLERANCE[name] * scale, name


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_model_agrees_with_eager_on_other_sizes(tiny, fmt, tmp_path):
    model, images = tiny
    run = load_exported(export(model, images[0], fmt, tmp_path))
    counts = []
    for image in images:
        eager = _eager(model, image)
        counts.append(len(eager[1]))
        _assert_agrees(run(image), eager)
    assert counts[0] == TOP_K and counts[-1] == 0  # the limit reached; no detection at all
    assert len(run(images[0])) == len(OUTPUT_NAMES)


def test_postprocess_gives_the_models_outputs(tiny):
    """Eager inference at another output size equals postprocess() of the raw outputs, which
    stay as they were (the boxes were scaled in place: a second call scaled them again)."""
    model, images = tiny
    image = images[1]
    with torch.no_grad():
        (want,) = model([{"image": image, "height": 150, "width": 200}])
    raw = _eager(model, image)
    kept = [o.clone() for o in raw]
    postprocess(raw, tuple(image.shape[1:]), 150, 200)
    assert all(torch.equal(o, k) for o, k in zip(raw, kept))
    got = postprocess(raw, tuple(image.shape[1:]), 150, 200)
    a, b = got["instances"], want["instances"]
    assert a.image_size == b.image_size == (150, 200)
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)
    assert torch.equal(a.pred_masks, b.pred_masks)
    torch.testing.assert_close(got["sem_seg"], want["sem_seg"], rtol=1e-5, atol=1e-5)


def test_postprocess_takes_the_semantic_stride_and_refuses_a_smaller_one():
    """A model whose semantic branch works at stride 16: postprocess at that stride gives its
    sem_seg; at the default 8 the logits would cover a quarter of the image, which is named."""
    cfg = tiny_cfg()
    cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 16
    model = build_model(cfg).eval()
    image = _noise(96, 128, seed=3)
    with torch.no_grad():
        (want,) = model([{"image": image, "height": 120, "width": 160}])
    raw = _eager(model, image)
    got = postprocess(raw, (96, 128), 120, 160, semantic_stride=16)
    torch.testing.assert_close(got["sem_seg"], want["sem_seg"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pass the model's MODEL.SEM_SEG_HEAD.COMMON_STRIDE"):
        postprocess(raw, (96, 128), 120, 160)


def _add_a_deformable_conv(model) -> None:
    """What MODEL.RESNETS.DEFORM_ON_PER_STAGE builds, which the tiny ResNet-18 cannot."""
    model.backbone.bottom_up.add_module("deform", DeformConv(4, 4, 3, padding=1))


@pytest.mark.parametrize(
    "opts, fmt, opset, message",
    [
        (["MODEL.HTC.TEST_NMS", "soft_linear"], "onnx", 17, "TEST_NMS nms"),
        (_add_a_deformable_conv, "onnx", 17, "deformable convs \\(backbone.bottom_up.deform\\)"),
        (["MODEL.MASK_ON", False], "torchscript", 17, "MASK_ON False"),
        ([], "onnx", 15, "aligned=True"),
        ([], "coreml", 17, "--format"),
    ],
)  # fmt: skip
def test_what_cannot_be_exported_is_refused(opts, fmt, opset, message, tmp_path):
    """By the Python function too: a Soft-NMS model built in Python was traced, and its file
    gave other images' detections."""
    cfg = tiny_cfg()
    cfg.merge_from_list([] if callable(opts) else opts)
    model = build_model(cfg).eval()
    if callable(opts):
        opts(model)
    with pytest.raises(ValueError, match=message):
        check_exportable(model, fmt, opset)
    with pytest.raises(ValueError, match=message):
        export(model, _noise(64, 64, 0), fmt, tmp_path, opset)
    assert not list(tmp_path.iterdir()), "refused before anything is written"


@pytest.mark.heavy
def test_r50_exports_to_onnx_and_agrees(tmp_path):
    """The shipped R-50 config (random weights, BN: FrozenBN's identity would let activations
    grow through 50 layers), traced at one size, checked at another. The class logits are
    scaled down: random ones are so large that every score is 1.0 and ties decide the order.
    200 proposals and 20 detections give the same graph as 1000 and 100 at a fifth of the time."""
    cfg = load_cfg(CONFIGS / "htc_R_50_FPN_1x.yaml")
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST, cfg.TEST.DETECTIONS_PER_IMAGE = 200, 20
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for predictor in model.roi_heads.box_predictor:
            predictor.cls_score.weight.mul_(0.1)
    run = load_exported(export(model, _noise(256, 320, seed=3), "onnx", tmp_path))
    image = _noise(224, 288, seed=4)
    eager = _eager(model, image)
    assert len(eager[1]) > 0
    _assert_agrees(run(image), eager)


def test_command_exports_and_checks_in_onnxruntime(tmp_path, capsys):
    """``python -m htc.export``'s main, in this process."""
    opts = [str(v) for v in TINY_OPTS] + ["MODEL.WEIGHTS", ""]
    opts += ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128"]
    config = str(CONFIGS / "htc_R_50_FPN_1x.yaml")
    export_main(["--config-file", config, "--format", "onnx", "--output", str(tmp_path),
                 "--opts", *opts])  # fmt: skip
    out = capsys.readouterr().out
    assert (tmp_path / "model.onnx").is_file()
    assert "MODEL.WEIGHTS is empty" in out
    assert "onnxruntime (CPU) on the (96, 128) sample image" in out
    assert "against eager PyTorch: the same " in out


def test_arguments_export_cannot_take_are_refused_before_the_model_is_built(tmp_path):
    """A LazyConfig failed in yaml's parser; an --output naming a file raised a bare
    FileExistsError after the model was built, or (model.onnx) made a folder of that name."""
    lazy = str(CONFIGS / "htc_R_50_FPN_1x.py")
    with pytest.raises(ValueError, match="a LazyConfig; the inference entries take yacs"):
        export_main(["--config-file", lazy, "--format", "onnx", "--output", str(tmp_path)])
    config = str(CONFIGS / "demo" / "htc_R_18_FPN_demo.yaml")
    existing = tmp_path / "taken"
    existing.write_text("")
    for output in (existing, tmp_path / "model.onnx"):
        with pytest.raises(SystemExit):
            export_main(["--config-file", config, "--format", "onnx", "--output", str(output)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_without_a_test_resize_the_random_sample_has_a_size():
    """INPUT.MIN_SIZE_TEST 0 (no resize, as Detectron2 reads it) made a 0x0 sample image."""
    cfg = load_predictor_cfg(str(CONFIGS / "demo" / "htc_R_18_FPN_demo.yaml"))
    cfg.defrost()
    cfg.INPUT.MIN_SIZE_TEST = 0
    assert sample_image(cfg, None).shape == (3, 800, 1066)


@pytest.mark.parametrize(
    "opts, message",
    [
        (["INPUT.FORMAT", "L"], "INPUT.FORMAT 'L': give 'RGB' or 'BGR'"),
        (["TEST.AUG.ENABLED", "True"], "TEST.AUG.ENABLED True: .* train_net.py --eval-only"),
    ],
)
def test_settings_export_would_ignore_are_refused_by_key(tmp_path, opts, message):
    config = str(CONFIGS / "demo" / "htc_R_18_FPN_demo.yaml")
    with pytest.raises(ValueError, match=message):
        export_main(["--config-file", config, "--format", "torchscript", "--output",
                     str(tmp_path / "out"), "--opts", *opts])  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_sample_image_predict_would_skip_is_refused_by_name(tmp_path):
    """As htc.predict reads images: a 16-bit PNG (clipped to white) and one too thin to resize
    (PIL's bare 'height and width must be > 0') are named with --sample-image."""
    cfg = load_predictor_cfg(str(CONFIGS / "demo" / "htc_R_18_FPN_demo.yaml"))  # at most 128 px
    wide, thin = tmp_path / "wide.png", tmp_path / "thin.png"
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(wide)
    Image.new("RGB", (4000, 8)).save(thin)
    with pytest.raises(ValueError, match=r"--sample-image .*wide.png: I(;16)? pixels"):
        sample_image(cfg, str(wide))
    with pytest.raises(ValueError, match=r"--sample-image .*thin.png: 4000x8 pixels .* too thin"):
        sample_image(cfg, str(thin))
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.full((48, 64, 3), (10, 20, 30), np.uint8)).save(rgb)
    image = sample_image(cfg, str(rgb))
    assert image.shape[0] == 3 and image[:, 0, 0].tolist() == [10.0, 20.0, 30.0]  # RGB
