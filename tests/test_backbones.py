"""htc.backbones: the yacs builders of Detectron2's ViT + simple feature pyramid, MViT + FPN and
Swin + FPN build the LazyConfigs' backbones (same parameter names and shapes), and their small
variants train a step and infer through build_model; the HTC++ yaml configs build their
LazyConfig's model; export refuses the backbones whose graphs would hold the sample's size. On
Detectron2 v0.6: an immediate error naming what is missing."""

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model

from conftest import (
    CONFIGS,
    HAS_MODERN_BACKBONES,
    build_on_meta,
    load_cfg,
    make_batch,
    on_meta,
    tiny_cfg,
    train_losses,
)
from htc.export import check_exportable


def _shapes(module) -> dict:
    return {name: tuple(value.shape) for name, value in module.state_dict().items()}


# builder -> (the LazyConfig whose backbone it builds, yacs options, the classes it needs)
LSJ = ["INPUT.MAX_SIZE_TRAIN", 1024, "INPUT.MAX_SIZE_TEST", 1024]  # ViTDet's 1024 px squares
BUILDERS = {
    "build_vit_sfp_backbone": (
        "vitdet/htc_vitdet_b_100ep.py",
        ["MODEL.FPN.NORM", "LN", "MODEL.VIT.SQUARE_PAD", 1024, *LSJ],
        "ViT, SimpleFeaturePyramid",
    ),
    "build_mvit_fpn_backbone": (
        "vitdet/htc_mvitv2_b_in21k_100ep.py",
        ["MODEL.FPN.NORM", "LN", "MODEL.MVIT.SQUARE_PAD", 1024, *LSJ],
        "MViT",
    ),
    "build_swin_fpn_backbone": ("htcpp/htcpp_swin_b_20e.py", [], "SwinTransformer"),
}
SMALL = {
    "build_vit_sfp_backbone": [
        "MODEL.VIT.IMG_SIZE", 128, "MODEL.VIT.EMBED_DIM", 64, "MODEL.VIT.DEPTH", 2,
        "MODEL.VIT.NUM_HEADS", 2, "MODEL.VIT.WINDOW_SIZE", 4, "MODEL.VIT.WINDOW_BLOCK_INDEXES",
        [0], "MODEL.VIT.SQUARE_PAD", 128, "INPUT.MAX_SIZE_TRAIN", 128, "INPUT.MAX_SIZE_TEST", 128,
        "MODEL.FPN.NORM", "LN",
    ],
    "build_mvit_fpn_backbone": [
        "MODEL.MVIT.EMBED_DIM", 16, "MODEL.MVIT.DEPTH", 4, "MODEL.MVIT.LAST_BLOCK_INDEXES",
        [0, 1, 2, 3], "MODEL.MVIT.SQUARE_PAD", 0,
    ],
    "build_swin_fpn_backbone": [
        "MODEL.SWIN.EMBED_DIM", 16, "MODEL.SWIN.DEPTHS", [1, 1, 1, 1], "MODEL.SWIN.NUM_HEADS",
        [1, 1, 2, 2],
    ],
}  # fmt: skip


def _yacs(builder: str, *opts):
    cfg = tiny_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", builder, "MODEL.FPN.OUT_CHANNELS", 256, *opts])
    cfg.merge_from_list(["MODEL.SEM_SEG_HEAD.EMBED_DIM", 256])  # as wide as the FPN
    return cfg


@pytest.mark.parametrize("builder", BUILDERS)
def test_builder_makes_the_lazy_configs_backbone(builder):
    lazy_config, opts, needs = BUILDERS[builder]
    cfg = _yacs(builder, *opts)
    if not HAS_MODERN_BACKBONES:
        with pytest.raises(ImportError, match=f"{needs}.*v0.6 release"):
            build_model(cfg)
        return
    ours = build_on_meta(cfg).backbone
    with on_meta():
        theirs = instantiate(LazyConfig.load(str(CONFIGS / lazy_config)).model.backbone)
    assert _shapes(ours) == _shapes(theirs)
    assert ours.output_shape() == theirs.output_shape()
    assert ours.padding_constraints == theirs.padding_constraints


@pytest.mark.parametrize("builder", BUILDERS)
def test_small_backbone_trains_a_step_and_infers(builder):
    if not HAS_MODERN_BACKBONES:
        pytest.skip("this Detectron2 has no ViT/MViT/Swin (v0.6): the test above checks the error")
    cfg = _yacs(builder, *BUILDERS[builder][1], *SMALL[builder])
    model = build_model(cfg)
    batch = make_batch(num_images=2, size=128)
    losses = train_losses(model, batch)
    assert {"loss_mask_stage2", "loss_sem_seg"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    net = getattr(model.backbone, "bottom_up", None) or model.backbone.net  # FPN or ViTDet's
    first = next(p for p in net.parameters() if p.requires_grad)
    assert first.grad is not None and first.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": batch[0]["image"], "height": 128, "width": 128}])
    assert out["instances"].pred_masks.shape[1:] == (128, 128)


@pytest.mark.parametrize("builder", BUILDERS)
def test_a_square_shorter_than_the_inputs_is_refused(builder):
    """ViTDet's 1024 px square under yacs inputs of up to 1333 px cropped a lone image silently
    and failed on a batch (the ViT's default was 1024)."""
    if not HAS_MODERN_BACKBONES:
        pytest.skip("this Detectron2 has no ViT/MViT/Swin (v0.6): the test above checks the error")
    key = {"build_vit_sfp_backbone": "VIT", "build_mvit_fpn_backbone": "MVIT"}.get(builder, "SWIN")
    cfg = _yacs(builder, *SMALL[builder], f"MODEL.{key}.SQUARE_PAD", 1024)
    cfg.merge_from_list(["INPUT.MAX_SIZE_TRAIN", 1333, "INPUT.MAX_SIZE_TEST", 128])
    cfg.merge_from_list(["TEST.AUG.ENABLED", True])
    longer = r"\{'INPUT.MAX_SIZE_TRAIN': 1333, 'TEST.AUG.MAX_SIZE': 4000\}"
    with pytest.raises(ValueError, match=rf"{key}.SQUARE_PAD 1024 is shorter .* \({longer}\)"):
        build_on_meta(cfg)
    cfg.merge_from_list([f"MODEL.{key}.SQUARE_PAD", 0])
    build_on_meta(cfg)


def test_a_vit_pyramid_without_a_norm_is_refused():
    """MODEL.FPN.NORM's default "" built a simple feature pyramid with a None layer, which
    failed at the first forward with "'NoneType' object is not callable"."""
    if not HAS_MODERN_BACKBONES:
        pytest.skip("this Detectron2 has no ViT (v0.6): the first test checks the error")
    cfg = _yacs("build_vit_sfp_backbone", *SMALL["build_vit_sfp_backbone"], "MODEL.FPN.NORM", "")
    assert cfg.MODEL.FPN.NORM == tiny_cfg().MODEL.FPN.NORM  # the default
    with pytest.raises(ValueError, match='MODEL.FPN.NORM "": .* set a norm, "LN" as ViTDet'):
        build_model(cfg)


@pytest.mark.parametrize(
    "name", ["htcpp_R_50_FPN_3x", "htcpp_X_101_64x4d_FPN_3x", "htcpp_swin_b_20e", "htcpp_swin_l_1x"]
)
def test_htcpp_yaml_builds_its_lazy_configs_model(name):
    cfg = load_cfg(CONFIGS / "htcpp" / f"{name}.yaml")
    if "swin" in name and not HAS_MODERN_BACKBONES:
        with pytest.raises(ImportError, match="SwinTransformer.*v0.6 release"):
            build_model(cfg)
        return
    ours = build_on_meta(cfg)
    with on_meta():
        theirs = instantiate(LazyConfig.load(str(CONFIGS / "htcpp" / f"{name}.py")).model)
    assert _shapes(ours) == _shapes(theirs)
    heads, lazy_heads = ours.roi_heads, theirs.roi_heads
    for key in ("test_nms", "soft_nms_sigma", "soft_nms_min_score"):
        assert getattr(heads, key) == getattr(lazy_heads, key), key
    for ours_p, theirs_p in zip(heads.box_predictor, lazy_heads.box_predictor):
        for key in ("box_reg_loss_type", "test_nms_thresh", "test_score_thresh"):
            assert getattr(ours_p, key) == getattr(theirs_p, key), key
        for loss in ("loss_cls", "loss_box_reg"):  # a missing weight is 1
            assert ours_p.loss_weight.get(loss, 1.0) == theirs_p.loss_weight.get(loss, 1.0)
    assert [type(m).__name__ for m in heads.box_head[0].modules()] == [
        type(m).__name__ for m in lazy_heads.box_head[0].modules()
    ]


@pytest.mark.parametrize(
    "builder, square_pad, refused",
    [
        ("build_vit_sfp_backbone", 0, "MODEL.VIT.SQUARE_PAD"),
        ("build_vit_sfp_backbone", 128, None),
        ("build_mvit_fpn_backbone", 0, "MODEL.MVIT.SQUARE_PAD"),
        ("build_swin_fpn_backbone", 0, None),
    ],
)
def test_a_backbone_whose_graph_would_hold_the_sample_size_is_refused(builder, square_pad, refused):
    """A ViT or MViT without a square pad traced at one size gave other detections at another,
    or failed in onnxruntime, while the command reported agreement on the sample image."""
    if not HAS_MODERN_BACKBONES:
        pytest.skip("this Detectron2 has no ViT/MViT/Swin (v0.6)")
    key = {"build_vit_sfp_backbone": "VIT", "build_mvit_fpn_backbone": "MVIT"}.get(builder, "SWIN")
    opts = [*BUILDERS[builder][1], *SMALL[builder], f"MODEL.{key}.SQUARE_PAD", square_pad]
    model = build_model(_yacs(builder, *opts)).eval()
    if refused is None:
        check_exportable(model, "onnx")
        return
    with pytest.raises(ValueError, match=f"without a square pad.*set {refused}"):
        check_exportable(model, "onnx")


def _small_vitdet(square_pad: int):
    """ViTDet's LazyConfig model, narrow and shallow, with a square of ``square_pad`` and 20
    proposals at inference."""
    cfg = LazyConfig.load(str(CONFIGS / "vitdet/htc_vitdet_b_100ep.py"))
    cfg.model.backbone.net.update(img_size=128, embed_dim=64, depth=2, num_heads=2, window_size=4)
    cfg.model.backbone.net.update(window_block_indexes=[0], drop_path_rate=0.0)
    cfg.model.backbone.square_pad = square_pad
    cfg.model.proposal_generator.post_nms_topk = (2000, 20)
    return instantiate(cfg.model)


@pytest.mark.parametrize("system", ["yacs", "lazy"])
def test_a_vit_without_a_square_pads_inputs_to_its_divisibility(system, monkeypatch):
    """Detectron2's SimpleFeaturePyramid misspells its padding constraint "size_divisiblity",
    which ImageList does not read: a 97x113 image went unpadded, the ViT dropped its last row
    and column of pixels, and sem_seg came back (K, 96, 112)."""
    if not HAS_MODERN_BACKBONES:
        pytest.skip("this Detectron2 has no ViT (v0.6)")
    torch.manual_seed(0)
    if system == "yacs":
        opts = [*BUILDERS["build_vit_sfp_backbone"][1], *SMALL["build_vit_sfp_backbone"]]
        model = build_model(_yacs("build_vit_sfp_backbone", *opts, "MODEL.VIT.SQUARE_PAD", 0))
    else:
        model = _small_vitdet(square_pad=0)
    model.eval()
    image = torch.randint(0, 256, (3, 97, 113)).float()
    by_hand = model.pixel_mean.expand(3, 128, 128).clone()  # 0 once normalized, as the padding
    by_hand[:, :97, :113] = image
    with torch.no_grad():
        (out,) = model([{"image": image}])
        (padded,) = model([{"image": by_hand}])
        assert model.preprocess_image([{"image": image}]).tensor.shape[-2:] == (128, 128)
        # as Detectron2 would pad with the key spelled right
        spelled_right = {"size_divisibility": 32, "square_size": 0}
        monkeypatch.setattr(type(model.backbone), "padding_constraints", spelled_right)
        (fixed,) = model([{"image": image}])
    assert out["sem_seg"].shape[1:] == out["instances"].pred_masks.shape[1:] == (97, 113)
    assert torch.equal(out["sem_seg"], padded["sem_seg"][:, :97, :113])
    assert torch.equal(out["sem_seg"], fixed["sem_seg"])


def test_an_image_longer_than_the_square_is_refused():
    """ImageList cropped a lone 129x100 image to the 128 px square silently: detections past
    the crop were lost and sem_seg came back (K, 128, 100)."""
    if not HAS_MODERN_BACKBONES:
        pytest.skip("this Detectron2 has no ViT (v0.6)")
    model = _small_vitdet(square_pad=128).eval()
    square = torch.zeros(3, 128, 100)
    assert model.preprocess_image([{"image": square}]).tensor.shape[-2:] == (128, 128)
    longer = {"image": torch.zeros(3, 129, 100), "file_name": "long.jpg"}
    with pytest.raises(ValueError, match="long.jpg is 129x100 px, longer than the backbone's "
                       "128 px square .*model.backbone.square_pad"):  # fmt: skip
        model([longer])
