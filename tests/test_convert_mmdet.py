"""htc.convert_mmdet: every official HTC checkpoint layout maps onto our configs exactly, and
bad input is refused with a clear message."""

import json
import pickletools
import re

import pytest
import torch
import torchvision
from detectron2.modeling import build_backbone

from conftest import (
    CONFIGS,
    HAS_MODERN_BACKBONES,
    ROOT,
    PrintsWhenUnpickled,
    dev_parity_module,
    load_cfg,
    on_meta,
    save_cut_off,
)
from htc.checkpoint import HTCCheckpointer
from htc.convert_mmdet import (
    PROVEN_FAMILIES,
    ConversionError,
    backbone_as_mmdet,
    check_against_model,
    convert,
    family_of,
    main,
)

WITHOUT_SEMANTIC = "htc-without-semantic_r50_fpn_1x_coco"
KEYS = json.loads((ROOT / "tests/fixtures/mmdet_htc_keys.json").read_text())
PAIRS = {
    "htc_r50_fpn_1x_coco": "htc_R_50_FPN_1x.yaml",
    "htc-without-semantic_r50_fpn_1x_coco": "htc_without_semantic_R_50_FPN_1x.yaml",
    "htc_r101_fpn_20e_coco": "htc_R_101_FPN_20e.yaml",
    "htc_x101-32x4d_fpn_16xb1-20e_coco": "htc_X_101_32x4d_FPN_20e.yaml",
    "htc_x101-64x4d-dconv-c3-c5_fpn_ms-400-1400-16xb1-20e_coco": (
        "htc_X_101_64x4d_dconv_c3-c5_FPN_ms_400-1400_20e.yaml"
    ),
}


def state_of(name):
    """Zeros of each shape of the reference's ``name``, views of one number: a full-size state
    without its hundreds of MB, in memory or in the files that the command reads and writes."""
    zero = torch.zeros(())
    return {k: zero.expand(shape) for k, shape in KEYS[name].items()}


@pytest.mark.parametrize("mmdet_name", sorted(PAIRS))
def test_reference_layouts_fit_our_configs(mmdet_name):
    converted, rows = convert(state_of(mmdet_name))
    dropped = [k for k in KEYS[mmdet_name] if k.endswith("num_batches_tracked")]
    assert len(rows) == len(KEYS[mmdet_name]) - len(dropped)
    check_against_model(converted, str(CONFIGS / PAIRS[mmdet_name]))


FAMILIES = {
    "htc_r50_fpn_1x_coco": "ResNet-50, semantic branch, 2fc box heads",
    "htc-without-semantic_r50_fpn_1x_coco": "ResNet-50, 2fc box heads",
    "htc_r101_fpn_20e_coco": "ResNet-101, semantic branch, 2fc box heads",
    "htc_x101-32x4d_fpn_16xb1-20e_coco": "ResNeXt-101, semantic branch, 2fc box heads",
    "htc_x101-64x4d-dconv-c3-c5_fpn_ms-400-1400-16xb1-20e_coco": (
        "ResNeXt-101 with DCN in res3-res5, semantic branch, 2fc box heads"
    ),
}


@pytest.mark.parametrize("mmdet_name", sorted(FAMILIES))
def test_each_official_layout_is_named(mmdet_name):
    assert family_of(state_of(mmdet_name)) == FAMILIES[mmdet_name]


def test_the_proven_families_are_those_of_the_parity_fixtures():
    """PROVEN_FAMILIES claims no more and no less than tests/test_parity.py's fixtures cover."""
    load = dev_parity_module("fixtures").load_reference
    fixtures = sorted((ROOT / "tests/fixtures").glob("htc_parity_*.pth"))
    assert len(fixtures) == 7
    assert {family_of(load(path)["state_dict"]) for path in fixtures} == PROVEN_FAMILIES


@pytest.mark.parametrize("semantic", [True, False])
def test_cli_warns_for_a_family_without_parity_test(tmp_path, capsys, semantic):
    """The R-101 of the parity fixture (narrow), as it is and without its semantic branch, a
    family that no fixture covers."""
    path = ROOT / "tests/fixtures/htc_parity_r101.pth"
    state = dev_parity_module("fixtures").load_reference(path)["state_dict"]
    if not semantic:
        state = {k: v for k, v in state.items() if not k.startswith("roi_head.semantic_")}
    warns = not semantic
    assert main([str(_save(tmp_path, state)), str(tmp_path / "out.pth")]) == 0
    err = capsys.readouterr().err
    assert ("no parity test" in err) == warns
    assert not warns or "warning: ResNet-101, 2fc box heads: no parity test" in err
    assert (tmp_path / "out.pth").exists()


def test_r50_reference_has_426_entries():
    assert len(KEYS["htc_r50_fpn_1x_coco"]) == 426


def _save(tmp_path, state, name="in.pth", wrap=True):
    path = tmp_path / name
    torch.save({"meta": {"mmdet_version": "2.0", "CLASSES": ("a", "b")}, "state_dict": state}
               if wrap else state, path)  # fmt: skip
    return path


def test_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    src = _save(tmp_path, state_of("htc-without-semantic_r50_fpn_1x_coco"))
    out = tmp_path / "out.pth"
    config = str(CONFIGS / "htc_without_semantic_R_50_FPN_1x.yaml")
    assert main([str(src), str(out), "--config", config]) == 0
    printed = capsys.readouterr().out
    assert re.search(
        r"neck\.lateral_convs\.0\.conv\.weight +->  backbone\.fpn_lateral2\.weight", printed
    )
    assert "roi_head.mask_head.2.conv_res.conv.weight" in printed and "tensors mapped" in printed
    checkpoint = torch.load(out, weights_only=True)
    assert "roi_heads.mask_head.2.res_conv.weight" in checkpoint["model"]


@pytest.mark.parametrize(
    "state, message",
    [
        ({"bbox_head.0.fc_cls.weight": torch.zeros(81, 4)}, "1.x"),
        ({"roi_head.bbox_head.0.fc_cls.weight": torch.zeros(81, 4), "foo.bar": torch.zeros(1)},
         "no Detectron2 name.*foo.bar"),
    ],
)  # fmt: skip
def test_cli_refuses_bad_checkpoints(tmp_path, capsys, state, message):
    out = tmp_path / "out.pth"
    assert main([str(_save(tmp_path, state)), str(out)]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_cli_refuses_a_cascade_mask_rcnn_checkpoint(tmp_path, capsys):
    """MMDetection's Cascade Mask R-CNN is HTC without semantic less the later heads' conv_res:
    it converted as a proven family, and loaded with the information flow at random; refused
    unless --config names the model it fits."""
    state = {k: v for k, v in state_of(WITHOUT_SEMANTIC).items() if ".conv_res." not in k}
    out, src = tmp_path / "out.pth", str(_save(tmp_path, state))
    assert main([src, str(out)]) == 1
    assert "is a Cascade Mask R-CNN checkpoint, not HTC's" in capsys.readouterr().err
    assert main([src, str(out), "--config", str(CONFIGS / PAIRS[WITHOUT_SEMANTIC])]) == 1
    assert "missing for the model: ['roi_heads.mask_head.1.res_conv" in capsys.readouterr().err
    assert not out.exists()
    cascade = str(CONFIGS / "ablations/cascade_mask_rcnn_R_50_FPN_1x.yaml")
    assert main([src, str(out), "--config", cascade]) == 0  # the model it is for
    family = "ResNet-50, 2fc box heads, no mask information flow"
    assert f"warning: {family}: no parity test" in capsys.readouterr().err  # HTC's is proven


@pytest.mark.parametrize(
    "meta, backbone",
    [({"cfg": "model = dict(\n    backbone=dict(\n        style='caffe',\n        type='ResNet'))"},
      False),
     ({"config": "model = dict(backbone=dict(type='ResNet', style = 'caffe'))"}, False),
     ({"config": '{"backbone": {"style": "caffe"}}'}, True)],
)  # fmt: skip
def test_cli_refuses_a_caffe_style_resnet_that_its_meta_names(tmp_path, capsys, meta, backbone):
    """A caffe-style checkpoint (stride in the 1x1, BGR, std 1) has the pytorch style's names and
    shapes: it converted and computed something else. Its config in the meta (mmengine's
    ``cfg``, MMDetection 2.x's ``config``; of an ImageNet backbone too) tells it; pytorch's
    converts."""
    state = {"conv1.weight": torch.zeros(1), "layer1.0.conv1.weight": torch.zeros(1)}
    state = state if backbone else state_of(WITHOUT_SEMANTIC)
    out, path = tmp_path / "out.pth", tmp_path / "in.pth"
    torch.save({"meta": meta, "state_dict": state}, path)
    assert main([str(path), str(out)]) == 1
    assert "is of a caffe-style ResNet (style='caffe'" in capsys.readouterr().err
    assert not out.exists()
    pytorch = {k: v.replace("caffe", "pytorch") for k, v in meta.items()}
    torch.save({"meta": pytorch, "state_dict": state_of(WITHOUT_SEMANTIC)}, path)
    assert main([str(path), str(out)]) == 0
    capsys.readouterr()


def _without(name: str, *parts: str) -> dict:
    return {k: v for k, v in state_of(name).items() if not any(p in k for p in parts)}


DCN = "htc_x101-64x4d-dconv-c3-c5_fpn_ms-400-1400-16xb1-20e_coco"


def _modulated(offset: torch.Size) -> torch.Size:
    """A DCNv2's offset shape for DCNv1's: 3 channels a kernel tap (x, y, mask), not 2."""
    return torch.Size([offset[0] // 2 * 3, *offset[1:]])


@pytest.mark.parametrize(
    "state, family",
    [(_without(WITHOUT_SEMANTIC, ".conv_res."),
      "ResNet-50, 2fc box heads, no mask information flow"),
     ({k: torch.zeros(_modulated(v.shape)) if ".conv_offset.weight" in k else v
       for k, v in state_of(DCN).items()},
      "ResNeXt-101 with modulated DCN (DCNv2) in res3-res5, semantic branch, 2fc box heads")],
)  # fmt: skip
def test_families_that_no_parity_test_covers_are_named_apart(state, family):
    """A Cascade Mask R-CNN (no conv_res) and a DCNv2 (27 offset channels) ResNeXt were named as
    the proven HTC R-50 without semantic branch and DCNv1 ResNeXt: no warning."""
    assert family_of(state) == family
    assert family not in PROVEN_FAMILIES


@pytest.mark.parametrize(
    "state, message",
    [
        (_without(WITHOUT_SEMANTIC, "mask_head"), "has no mask heads: a box-only model"),
        ({"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(1)}},
         "holds a 'model' entry, as Detectron2's checkpoints do"),
        ({"roi_head.bbox_head.0.fc_cls.weight": [1, 2]}, "fc_cls.weight is a list, not a tensor"),
        ({k.replace(".bbox_head.0.", ".bbox_head.").replace(".mask_head.0.", ".mask_head."): v
          for k, v in _without(WITHOUT_SEMANTIC, "_head.1.", "_head.2.").items()},
         "is a (non-cascade) Mask R-CNN or Faster R-CNN checkpoint, which HTC cannot use"),
    ],
)  # fmt: skip
def test_cli_refuses_what_is_not_an_htc_checkpoint(tmp_path, capsys, state, message):
    """A Cascade R-CNN of boxes only (it converted, and left every mask head at random), a
    Detectron2 checkpoint, a value that is no tensor (an AttributeError), a Mask R-CNN (its one
    box and mask head named only as tensors without a Detectron2 name)."""
    out = tmp_path / "out.pth"
    assert main([str(_save(tmp_path, state, wrap="model" not in state)), str(out)]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_names_a_detectron2_pkl_as_needing_no_conversion(tmp_path, capsys):
    """The converter's own .pkl output, given back to it, was refused with torch's weights_only
    advice (MMDetection's publish_model.py)."""
    src, pkl = _save(tmp_path, state_of(WITHOUT_SEMANTIC)), tmp_path / "R-50.pkl"
    assert main([str(src), str(pkl)]) == 0
    capsys.readouterr()
    assert main([str(pkl), str(tmp_path / "again.pth")]) == 1
    err = capsys.readouterr().err
    assert "R-50.pkl is in Detectron2's pickle format" in err and "needs no conversion" in err
    assert "publish_model" not in err and not (tmp_path / "again.pth").exists()


def test_cli_names_the_stages_of_a_cascade_other_than_htcs(tmp_path, capsys):
    """Two stages (or four) converted as the proven 3-stage family, without a warning."""
    state = _without("htc_r50_fpn_1x_coco", ".bbox_head.2.", ".mask_head.2.")
    assert main([str(_save(tmp_path, state)), str(tmp_path / "out.pth")]) == 0
    family = "ResNet-50, semantic branch, 2fc box heads, 2 box and 2 mask stages"
    assert f"warning: {family}: no parity test" in capsys.readouterr().err


def test_cli_takes_a_checkpoint_saved_from_data_parallel(tmp_path, capsys):
    state = {f"module.{k}": v for k, v in state_of(WITHOUT_SEMANTIC).items()}
    config = str(CONFIGS / PAIRS[WITHOUT_SEMANTIC])
    assert main([str(_save(tmp_path, state)), str(tmp_path / "out.pth"), "--config", config]) == 0
    capsys.readouterr()


@pytest.mark.parametrize(
    "content, kind",
    [(b"", "empty"), (b"notes, not weights\n", "text"), (None, "the first half of a checkpoint")],
)
def test_cli_names_a_file_that_is_no_checkpoint(tmp_path, capsys, content, kind):
    """An empty, a text or a half-written file ended in a traceback (EOFError, KeyError,
    OSError), not the CLI's error line."""
    path = _save(tmp_path, state_of("htc_r50_fpn_1x_coco"))
    if content is None:
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    assert main([str(path), str(tmp_path / "out.pth")]) == 1, kind
    assert f"error: {path} is not a complete PyTorch checkpoint" in capsys.readouterr().err


def test_cli_fits_a_lazy_config(tmp_path, capsys):
    """--config takes the LazyConfig (.py) configs as the yacs ones (it crashed on them)."""
    src = _save(tmp_path, state_of("htc_r50_fpn_1x_coco"))
    lazy = str(CONFIGS / "htc_R_50_FPN_1x.py")
    assert main([str(src), str(tmp_path / "out.pth"), "--config", lazy]) == 0
    wrong = _save(tmp_path, state_of("htc-without-semantic_r50_fpn_1x_coco"), "wrong.pth")
    assert main([str(wrong), str(tmp_path / "wrong_out.pth"), "--config", lazy]) == 1
    assert "missing for the model: ['semantic_head." in capsys.readouterr().err


@pytest.mark.parametrize(
    "config",
    ["vitdet/htc_vitdet_b_100ep.py", "mvitv2/htc_mvitv2_s_3x.py", "htcpp/htcpp_swin_b_20e.py"],
)
def test_cli_names_what_a_transformer_backbone_config_lacks(tmp_path, capsys, config):
    """The ViT, MViTv2 and Swin configs build on the meta device too (their drop-path schedules
    read ``.item()``, which crashed there); an official checkpoint does not fit them, and the
    refusal names the backbone's tensors. On v0.6 the config's error names the Detectron2 it
    needs."""
    src = _save(tmp_path, state_of("htc_r50_fpn_1x_coco"))
    assert main([str(src), str(tmp_path / "out.pth"), "--config", str(CONFIGS / config)]) == 1
    err = capsys.readouterr().err
    if HAS_MODERN_BACKBONES:
        assert "missing for the model: ['backbone." in err, err
        assert "not in the model: ['backbone.bottom_up.stem.conv1.weight'" in err, err
    else:
        assert re.search(r"^error: .*v0\.6 release", err, re.M), err
    assert not (tmp_path / "out.pth").exists()


def _torchvision_stages(classifier, x) -> list:
    x = classifier.maxpool(classifier.relu(classifier.bn1(classifier.conv1(x))))
    stages = []
    for layer in (classifier.layer1, classifier.layer2, classifier.layer3, classifier.layer4):
        x = layer(x)
        stages.append(x)
    return stages


def test_an_imagenet_resnet_becomes_the_backbone_of_the_configs(tmp_path, capsys):
    """torchvision's ResNet-50, converted to the configs' pretrained/R-50.pkl, loads into HTC's
    backbone through Detectron2's checkpointer; res2-res5 then compute torchvision's layer1-4
    (the 3x3 conv strides, as STRIDE_IN_1X1 False says)."""
    torch.manual_seed(0)
    classifier = torchvision.models.resnet50().eval()
    with torch.no_grad():
        for bn in (m for m in classifier.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            for stat, low, high in ((bn.running_mean, -0.2, 0.2), (bn.running_var, 0.5, 2.0)):
                stat.uniform_(low, high)
            bn.weight.uniform_(0.2, 0.6)
    src, out = tmp_path / "resnet50.pth", tmp_path / "pretrained" / "R-50.pkl"  # a new folder
    torch.save(classifier.state_dict(), src)
    config = CONFIGS / "htc_R_50_FPN_1x.yaml"
    assert main([str(src), str(out), "--config", str(config)]) == 0
    assert "an ImageNet ResNet-50: the backbone's weights alone" in capsys.readouterr().out
    # NumPy 2's pickles do not load under the NumPy 1 of Detectron2 v0.6: none is named
    names = {arg for _, arg, _ in pickletools.genops(out.read_bytes()) if isinstance(arg, str)}
    assert names and not any(name.startswith("numpy") for name in names)
    holder = torch.nn.Module()
    holder.backbone = build_backbone(load_cfg(config))
    HTCCheckpointer(holder).load(str(out), checkpointables=[])
    bottom_up = holder.backbone.bottom_up.eval()
    image = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        got, want = bottom_up(image), _torchvision_stages(classifier, image)
    for name, stage in zip(["res2", "res3", "res4", "res5"], want):
        torch.testing.assert_close(got[name], stage, rtol=1e-4, atol=1e-4 * stage.abs().max())


@pytest.mark.parametrize(
    "config",
    ["htc_X_101_64x4d_FPN_20e.yaml", "htc_X_101_64x4d_dconv_c3-c5_FPN_ms_400-1400_20e.yaml"],
)
def test_an_imagenet_resnext_fits_its_configs(config):
    """A ResNeXt-101 64x4d classifier fills the backbone of its configs (deformable offsets
    start at zero); the R-50's does not fit the R-101's, and the refusal names the blocks."""
    with on_meta():
        resnext = torchvision.models.resnext101_64x4d().state_dict()
        resnet50 = torchvision.models.resnet50().state_dict()
    converted, _ = convert(backbone_as_mmdet(resnext))
    assert not any(k.startswith("backbone.bottom_up.fc") for k in converted)
    check_against_model(converted, str(CONFIGS / config), backbone=True)
    with pytest.raises(
        ConversionError, match=r"missing for the model: \['backbone.bottom_up.res4.6"
    ):
        check_against_model(convert(backbone_as_mmdet(resnet50))[0], str(CONFIGS / config), True)


@pytest.mark.parametrize(
    "name, family",
    [("resnet18", "ResNet-18"), ("resnet34", "ResNet-34"), ("resnet101", "ResNet-101"),
     ("resnext101_32x8d", "ResNeXt-101")],
)  # fmt: skip
def test_imagenet_classifiers_are_named_by_their_depth(name, family):
    """Basic blocks (ResNet-18, 34) are told apart from bottlenecks, 34 and 50 having the same
    block counts."""
    with on_meta():
        state = getattr(torchvision.models, name)().state_dict()
    assert family_of(backbone_as_mmdet(state)).split(",")[0] == family


def test_an_interrupted_write_leaves_no_output(tmp_path, monkeypatch):
    """The converted checkpoint appears only whole (atomic_open), as training's do."""
    monkeypatch.setattr(torch, "save", save_cut_off)
    src = tmp_path / "in.pth"
    torch.serialization.save({"state_dict": state_of("htc-without-semantic_r50_fpn_1x_coco")}, src)
    with pytest.raises(OSError, match="no space left"):
        main([str(src), str(tmp_path / "out.pth")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pth"]


def test_cli_refuses_shape_mismatch_and_missing(tmp_path, capsys):
    state = state_of("htc_r50_fpn_1x_coco")
    state["roi_head.bbox_head.0.fc_cls.weight"] = torch.zeros(11, 1024)  # 10 classes
    del state["roi_head.semantic_head.conv_logits.bias"]
    out = tmp_path / "out.pth"
    assert (
        main(
            [
                str(_save(tmp_path, state)),
                str(out),
                "--config",
                str(CONFIGS / "htc_R_50_FPN_1x.yaml"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "box_predictor.0.cls_score.weight: (11, 1024) vs model (81, 1024)" in err
    assert "missing for the model: ['semantic_head.conv_logits.bias']" in err
    assert not out.exists()


def test_cli_loads_safely(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "meta": PrintsWhenUnpickled()}, path)
    assert main([str(path), str(tmp_path / "out.pth")]) == 1
    captured = capsys.readouterr()
    assert "weights_only" in captured.err and "unpickled!" not in captured.out


@pytest.mark.parametrize(
    "name, reason", [("nope.pth", "No such file or directory"), ("", "Is a directory")]
)
def test_cli_names_an_input_that_cannot_be_read(tmp_path, capsys, name, reason):
    """A folder given as the input raised IsADirectoryError (only FileNotFoundError was caught)."""
    path = tmp_path / name
    assert main([str(path), str(tmp_path / "out.pth")]) == 1
    assert (
        f"error: {path} cannot be read as a checkpoint file: {reason}\n" in capsys.readouterr().err
    )
