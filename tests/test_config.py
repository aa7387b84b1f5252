"""configs/ and htc.config: every shipped config builds, config errors name the key, and the R-50
model has the reference's parameter count; FLOAT32_PRECISION on every Detectron2 version;
DETERMINISTIC."""

import os

import pytest
import torch
from detectron2.config import LazyConfig
from detectron2.modeling import build_model
from omegaconf import OmegaConf

import lazyconfig_train_net  # the repository root is on sys.path (conftest)
import train_net
from conftest import (
    CONFIGS,
    HAS_MODERN_BACKBONES,
    build_on_meta,
    load_cfg,
    make_batch,
    reference_parameter_count,
    tiny_cfg,
    train_losses,
)
from htc import set_deterministic, set_float32_precision
from htc.config import apply_overrides, check_links_resolve
from htc.roi_heads import HAS_FED_LOSS


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.HTC.STAGE_LOSS_WEIGHTS", [1.0, 0.5]], "STAGE_LOSS_WEIGHTS"),
        (["MODEL.ROI_BOX_CASCADE_HEAD.IOUS", [0.5, 0.6]], "2 IOUS but 3 BBOX_REG_WEIGHTS"),
        (["MODEL.HTC.SEMANTIC_ON", False], "SEMANTIC_FUSION"),
        (["MODEL.HTC.SEMANTIC_FUSION", ["box"]], "unknown"),
        (["MODEL.HTC.MASK_MERGE", "max"], "MASK_MERGE"),
        (["MODEL.HTC.TEST_NMS", "soft"], "TEST_NMS"),
        (["MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead"], "HTCMaskHead"),
        (["MODEL.SEM_SEG_HEAD.COMMON_STRIDE", 6], "COMMON_STRIDE"),
        (["MODEL.SEM_SEG_HEAD.EMBED_DIM", 16], "EMBED_DIM"),
        (["MODEL.SEM_SEG_HEAD.NAME", "SemSegFPNHead"], "must be a FusedSemanticHead"),
        (["MODEL.KEYPOINT_ON", True], "no keypoint head"),
        (["MODEL.HTC.STAGE_LOSS_WEIGHTS", [1.0, -0.5, 0.25]], "cannot be negative"),
        (["MODEL.HTC.TEST_NMS", "soft_gaussian", "MODEL.HTC.SOFT_NMS_SIGMA", 0.0], "SIGMA"),
        (["MODEL.ROI_BOX_CASCADE_HEAD.IOUS", [0.5, 1.5, 0.7]], "stage 1's IoU .* outside"),
        (["MODEL.ROI_HEADS.NAME", "CascadeROIHeads"], "must be HybridTaskCascadeROIHeads"),
        (["MODEL.SEM_SEG_HEAD.NUM_CONVS", -2], "num_convs -2 \\(MODEL.SEM_SEG_HEAD.NUM_CONVS\\)"),
        (["MODEL.SEM_SEG_HEAD.CONVS_DIM", 0], "conv_dim 0 \\(CONVS_DIM\\)"),
        (["MODEL.HTC.SOFT_NMS_MIN_SCORE", 2.0], "SOFT_NMS_MIN_SCORE=2.0: a score"),
        (["MODEL.HTC.STAGE_LOSS_WEIGHTS", ["a", 0.5, 0.25]], "give a number per stage"),
        (["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 50.0], "SCORE_THRESH_TEST .*=50.0: give a value"),
        (["MODEL.ROI_HEADS.NMS_THRESH_TEST", -0.5], "NMS_THRESH_TEST .*=-0.5: give a value"),
        (
            ["MODEL.PIXEL_MEAN", [1.0] * 4, "MODEL.PIXEL_STD", [1.0] * 4],
            "4 values, .*3-channel images",
        ),
        (["MODEL.SEM_SEG_HEAD.NUM_CLASSES", 300], "IGNORE_VALUE .* 255 is one of the 300 classes"),
        (["INPUT.FORMAT", "L"], "PIXEL_MEAN .* 3 values, .* 'L' gives 1-channel images"),
    ],
)
def test_config_errors_are_clear(opts, message):
    cfg = tiny_cfg()
    cfg.merge_from_list(opts)
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


@pytest.mark.parametrize(
    "opts, channels",
    [
        (["INPUT.FORMAT", "L", "MODEL.PIXEL_MEAN", [120.0], "MODEL.PIXEL_STD", [1.0]], 1),
        (["INPUT.FORMAT", "RGBA", "MODEL.PIXEL_MEAN", [1.0] * 4, "MODEL.PIXEL_STD", [1.0] * 4], 4),
        (["MODEL.SEM_SEG_HEAD.IGNORE_VALUE", 0], 3),  # 0 ignored, classes 1..K-1
    ],
)
def test_other_channels_and_an_ignored_class_0_build(opts, channels):
    cfg = tiny_cfg()
    cfg.merge_from_list(opts)
    assert build_model(cfg).backbone.bottom_up.stem.conv1.weight.shape[1] == channels


@pytest.mark.parametrize("info_flow", [True, False])
def test_mask_heads_without_convs_train_and_infer(info_flow):
    """NUM_CONV 0: the deconv takes the RoI features, and so does the next stage's 1x1 conv."""
    cfg = tiny_cfg(MASK_INFO_FLOW=info_flow)
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 0
    model = build_model(cfg)
    assert not model.roi_heads.mask_head[1].conv_norm_relus
    losses = train_losses(model, make_batch(1))
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        (out,) = model.eval()(make_batch(1, with_gt=False))
    assert out["instances"].pred_masks.shape[1:] == (96, 96)


SHIPPED = sorted(p.relative_to(CONFIGS) for p in CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED, ids=str)
def test_shipped_config_builds(name):
    cfg = load_cfg(CONFIGS / name)
    if "swin" in str(name) and not HAS_MODERN_BACKBONES:
        with pytest.raises(ImportError, match="SwinTransformer.*v0.6 release"):
            build_model(cfg)
        return
    if cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS and not HAS_FED_LOSS:
        with pytest.raises(ValueError, match="USE_FED_LOSS.*after v0.6"):
            build_model(cfg)
        return
    model = build_on_meta(cfg)
    assert type(model).__name__ == "HybridTaskCascade"
    assert len(model.roi_heads.mask_head) == 3


def test_r50_parameter_count_matches_reference():
    model = build_on_meta(load_cfg(CONFIGS / "htc_R_50_FPN_1x.yaml"))
    assert reference_parameter_count(model) == 80_258_293


@pytest.fixture
def float32_settings():
    """PyTorch's process-wide fp32 settings, restored after the test."""
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]


@pytest.mark.parametrize(
    "precision, matmul, cudnn_tf32",
    [("highest", "highest", False), ("high", "high", True), ("medium", "medium", True)],
)
def test_float32_precision_switch(monkeypatch, float32_settings, precision, matmul, cudnn_tf32):
    """FLOAT32_PRECISION exists on every Detectron2 version, sets TF32 for matmuls and convs where
    CUDA is, and leaves everything alone when empty (the default) or without CUDA."""
    cfg = tiny_cfg()
    assert cfg.FLOAT32_PRECISION == ""
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = not cudnn_tf32
    set_float32_precision(cfg)  # "": nothing changes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg.FLOAT32_PRECISION = precision
    set_float32_precision(cfg)  # no CUDA: nothing changes
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cudnn.allow_tf32 is not cudnn_tf32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    set_float32_precision(cfg)
    assert torch.get_float32_matmul_precision() == matmul
    assert torch.backends.cudnn.allow_tf32 is cudnn_tf32


def test_float32_precision_refuses_unknown_values():
    cfg = tiny_cfg()
    cfg.FLOAT32_PRECISION = "tf32"
    with pytest.raises(ValueError, match="FLOAT32_PRECISION='tf32'"):
        set_float32_precision(cfg)


@pytest.fixture
def deterministic_settings(monkeypatch):
    """PyTorch's determinism settings and the cuBLAS variable, restored after the test."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark = before[1]


@pytest.mark.parametrize("roi_align", ["auto", "triton", "fast"])
def test_deterministic_on_cuda_takes_the_atomic_free_kernels(
    monkeypatch, deterministic_settings, roi_align
):
    """On CUDA, DETERMINISTIC accepts the RoIAlign values that run Triton under deterministic
    algorithms ("fast": the old name of "auto")."""
    pytest.importorskip("triton")
    import htc.layers.roi_align as kernels

    monkeypatch.setattr(kernels, "_WARNED_DEPRECATED", {"fast"})  # its warning: test_poolers
    cfg = tiny_cfg()
    cfg.merge_from_list(
        ["DETERMINISTIC", True, "SEED", 3, "MODEL.DEVICE", "cuda", "MODEL.HTC.ROI_ALIGN", roi_align]
    )
    set_deterministic(cfg)
    assert torch.are_deterministic_algorithms_enabled()


def test_deterministic_on_cuda_refuses_a_gpu_that_triton_does_not_compile_for(
    monkeypatch, deterministic_settings
):
    """A GPU older than Volta takes torchvision's RoIAlign (Triton cannot compile for it),
    whose backward accumulates with atomics."""
    pytest.importorskip("triton")
    import htc.layers.roi_align as kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "triton_runs_on", lambda device: device.type != "cuda")
    cfg = tiny_cfg()
    cfg.merge_from_list(["DETERMINISTIC", True, "SEED", 3, "MODEL.DEVICE", "cuda"])
    with pytest.raises(ValueError, match="compute capability 7.0 and newer, not cuda's"):
        set_deterministic(cfg)
    assert not torch.are_deterministic_algorithms_enabled()


def test_deterministic_on_cuda_refuses_where_triton_is_missing(monkeypatch, deterministic_settings):
    import htc.layers.roi_align as kernels

    monkeypatch.setattr(kernels, "triton_kernels", lambda: None)
    cfg = tiny_cfg()
    cfg.merge_from_list(["DETERMINISTIC", True, "SEED", 3, "MODEL.DEVICE", "cuda"])
    with pytest.raises(ValueError, match=r"Triton is not installed \(pip install triton\)"):
        set_deterministic(cfg)
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize(
    "opts, message",
    [
        (["SEED", -1], "fixed SEED"),
        (["CUDNN_BENCHMARK", True], "CUDNN_BENCHMARK"),
        (["MODEL.DEVICE", "cuda", "MODEL.HTC.ROI_ALIGN", "torchvision"], "'torchvision' runs"),
        (["MODEL.DEVICE", "cuda", "MODEL.HTC.ROI_ALIGN", "cpu_parallel"], "'cpu_parallel' runs"),
    ],
)
def test_deterministic_refuses_what_would_not_be(deterministic_settings, opts, message):
    cfg = tiny_cfg()
    cfg.merge_from_list(["DETERMINISTIC", True, "SEED", 3, *opts])
    with pytest.raises(ValueError, match=message):
        set_deterministic(cfg)
    assert not torch.are_deterministic_algorithms_enabled()


def _lazy_cfg(**settings):
    """configs/htc_R_50_FPN_1x.py with ``settings`` (dotted keys) set, as command-line overrides
    set them."""
    cfg = LazyConfig.load(str(CONFIGS / "htc_R_50_FPN_1x.py"))
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value, merge=True)
    return cfg


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"train.device": "cpu"}, "fixed train.seed"),
        ({"train.seed": 3, "train.device": "cpu", "train.cudnn_benchmark": True},
         "train.deterministic and train.cudnn_benchmark"),
        ({"train.seed": 3, "model.roi_heads.roi_align": "torchvision"},
         "model.roi_heads.roi_align 'torchvision' runs torchvision's kernels"),
        ({"train.seed": 3, "model.roi_heads.roi_align": "cpu_parallel"},
         "model.roi_heads.roi_align 'cpu_parallel' runs torchvision's kernels"),
    ],
)  # fmt: skip
def test_lazy_config_deterministic_refuses_what_would_not_be(
    deterministic_settings, settings, message
):
    """A LazyConfig's train.deterministic, checked against its train.* keys (train.device is
    "cuda" in the shipped configs)."""
    with pytest.raises(ValueError, match=message):
        set_deterministic(_lazy_cfg(**{"train.deterministic": True, **settings}))
    assert not torch.are_deterministic_algorithms_enabled()


def test_lazy_config_settings(deterministic_settings):
    """train.deterministic and train.float32_precision: off by default; applied; checked."""
    set_deterministic(_lazy_cfg())
    set_float32_precision(_lazy_cfg())
    assert not torch.are_deterministic_algorithms_enabled()
    set_deterministic(_lazy_cfg(**{"train.deterministic": True, "train.seed": 3,
                                   "train.device": "cpu"}))  # fmt: skip
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark is False
    with pytest.raises(ValueError, match="train.float32_precision='tf32'"):
        set_float32_precision(_lazy_cfg(**{"train.float32_precision": "tf32"}))


@pytest.mark.parametrize(
    "overrides, refused",
    [
        (["train.max_iterr=10"], "train has no 'max_iterr' \\(did you mean max_iter\\?\\)"),
        (["model.roi_heads.stage_loss_weight=[1,1,1]"], "did you mean stage_loss_weights"),
        (["model.roi_heads.mask_on=True"], "model.roi_heads has no 'mask_on'"),
        (["trian.max_iter=10"], "the config has no 'trian'"),
        (["train.ampp.enabled=True"], "train has no 'ampp'"),
        (["train.amp.enabledd=True"], "train.amp has no 'enabledd' \\(did you mean enabled\\?\\)"),
        (["train.ddp.fp16_compresion=True"], "train.ddp has no .* mean fp16_compression\\?"),
        (["train.ddp.static_grap=True"], "train.ddp has no 'static_grap' .* mean static_graph"),
        (["train.checkpointer.periodd=5"], "train.checkpointer has no .* mean period\\?"),
        (["train.checkpointer.max_iter=5"], "train.checkpointer has no 'max_iter'"),  # D2 sets it
        (["model.roi_headz.num_classes=3"], "model has no 'roi_headz'"),
        (["optimizer.nesterov=True"], None),  # an argument of torch's SGD that the config leaves
        (["optimizer._target_=torch.optim.AdamW", "optimizer.betas=[0.9,0.99]"], None),
        (["train.ddp.static_graph=True", "train.checkpointer.file_prefix=m"], None),  # arguments
        (["train.deterministic=False", "optimizer.params.overrides={}", "+train.note=mine"], None),
        (["train.max_iter=10", "model.roi_heads.box_heads.0.fc_dims=[64]"], None),
    ],
)
def test_lazy_overrides_of_keys_that_nothing_reads_are_refused(overrides, refused):
    """Detectron2's apply_overrides adds them: ``train.max_iterr=1`` trained the config's
    schedule, silently; so did ``train.amp.enabledd=True`` (no AMP) and the like in train's
    dicts. Arguments that the config leaves at their defaults (of the calls that train.ddp and
    train.checkpointer are handed to too) and the settings read with defaults pass."""
    cfg = LazyConfig.load(str(CONFIGS / "htc_R_50_FPN_1x.py"))
    assert "nesterov" not in cfg.optimizer and "ddp" in cfg.train
    if refused:
        with pytest.raises(KeyError, match=refused):
            apply_overrides(cfg, overrides)
    else:
        key = overrides[-1].split("=")[0].lstrip("+")
        assert OmegaConf.select(apply_overrides(cfg, overrides), key)


def test_a_top_level_key_whose_links_do_not_resolve_is_named():
    """A config file's loop variable over the stages' predictors is kept as a top-level key,
    whose ``${...num_classes}`` points nowhere: LazyConfig.save, in default_setup, raised a bare
    OmegaConf error."""
    cfg = LazyConfig.load(str(CONFIGS / "htc_R_50_FPN_1x.py"))
    check_links_resolve(cfg)
    cfg.predictor = cfg.model.roi_heads.box_predictors[0]
    with pytest.raises(ValueError, match="top-level 'predictor' .* a leading '_'"):
        check_links_resolve(cfg)


def test_a_lazy_evaluation_without_an_evaluator_is_refused(tmp_path, monkeypatch):
    """It evaluated nothing and exited 0."""
    config = tmp_path / "no_evaluator.py"
    config.write_text(
        "from detectron2.config import LazyConfig\n"
        f"globals().update(LazyConfig.load({str(CONFIGS / 'htc_R_50_FPN_1x.py')!r}))\n"
        "del dataloader.evaluator\n"
    )
    args = lazyconfig_train_net.argument_parser().parse_args([
        "--config-file", str(config), "--eval-only", f"train.output_dir={tmp_path}",
        "train.device=cpu",
    ])  # fmt: skip
    monkeypatch.setattr(lazyconfig_train_net, "default_setup", lambda cfg, args: None)  # loggers
    monkeypatch.setattr(lazyconfig_train_net, "instantiate", None)  # nothing built
    with pytest.raises(ValueError, match="no dataloader.evaluator to evaluate with"):
        lazyconfig_train_net.main(args)


class _Stopped(Exception):
    pass


def _stop(*args) -> None:
    raise _Stopped


def test_a_cuda_device_without_cuda_is_named_before_anything_is_built(tmp_path, monkeypatch):
    """Both training scripts stop at once on a CUDA device that the machine lacks (Detectron2's
    default MODEL.DEVICE) or on AMP in training, naming the key and the override that runs on
    the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for script in (train_net, lazyconfig_train_net):
        monkeypatch.setattr(script, "default_setup", None)  # nothing set up
    args = train_net.argument_parser().parse_args(
        ["--config-file", str(CONFIGS / "htc_R_50_FPN_1x.yaml"), "OUTPUT_DIR", str(tmp_path)]
    )
    with pytest.raises(ValueError, match="MODEL.DEVICE='cuda'.*'MODEL.DEVICE cpu'"):
        train_net.setup(args)
    args = lazyconfig_train_net.argument_parser().parse_args(
        ["--config-file", str(CONFIGS / "htc_R_50_FPN_1x.py"), "train.device=cuda:1"]
    )
    with pytest.raises(ValueError, match="train.device='cuda:1'.*'train.device=cpu'"):
        lazyconfig_train_net.main(args)
    # AMP, which Detectron2's AMPTrainer refused at the first step, after the datasets loaded
    args = train_net.argument_parser().parse_args(
        ["--config-file", str(CONFIGS / "htc_R_50_FPN_1x.yaml"), "OUTPUT_DIR", str(tmp_path),
         "MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", "True"]
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"SOLVER.AMP.ENABLED=True .*'SOLVER.AMP.ENABLED False'"):
        train_net.setup(args)
    args = lazyconfig_train_net.argument_parser().parse_args(
        ["--config-file", str(CONFIGS / "htc_R_50_FPN_1x.py"), "train.device=cpu",
         "train.amp.enabled=True"]
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"train.amp.enabled=True .*'train.amp.enabled=False'"):
        lazyconfig_train_net.main(args)
    args.eval_only = True  # evaluation does not read it
    monkeypatch.setattr(lazyconfig_train_net, "default_setup", _stop)
    with pytest.raises(_Stopped):
        lazyconfig_train_net.main(args)


def test_deterministic_training_steps_are_bit_identical(deterministic_settings):
    """DETERMINISTIC (off by default) turns on deterministic algorithms and cuBLAS's fixed
    workspace; two train steps from the same seed then give the same gradients, bit for bit,
    and the same losses as a run without it (up to rounding: the semantic branch resizes by
    matrix products)."""
    cfg = tiny_cfg()
    assert cfg.DETERMINISTIC is False
    set_deterministic(cfg)
    assert not torch.are_deterministic_algorithms_enabled()
    model = build_model(cfg)
    losses = train_losses(model, make_batch())
    cfg.merge_from_list(["DETERMINISTIC", True, "SEED", 3])
    set_deterministic(cfg)
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    runs = []
    for _ in range(2):
        model.zero_grad()
        deterministic = train_losses(model, make_batch())
        sum(deterministic.values()).backward()
        runs.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(runs[0]) > 100
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    for name, value in losses.items():
        torch.testing.assert_close(deterministic[name], value, rtol=1e-4, atol=1e-5)


def test_deterministic_inference_gives_the_same_outputs(deterministic_settings):
    """Under DETERMINISTIC, inference upsamples the semantic scores by matrix products
    (PyTorch's deterministic replacement of its bilinear op needs GBs for 183 classes at
    800x1333), as the semantic branch resizes its features: the same detections, masks and
    semantic scores, to rounding."""
    cfg = tiny_cfg()
    model = build_model(cfg).eval()
    batch = make_batch(num_images=2, size=90)  # padded to 96
    batch[1]["height"], batch[1]["width"] = 150, 120  # resized to the requested resolution
    with torch.no_grad():
        want = model(batch)
        cfg.merge_from_list(["DETERMINISTIC", True, "SEED", 3])
        set_deterministic(cfg)
        got = model(batch)
    for a, b in zip(got, want):
        torch.testing.assert_close(a["sem_seg"], b["sem_seg"], rtol=1e-4, atol=1e-4)
        x, y = a["instances"], b["instances"]
        assert len(y) > 0 and torch.equal(x.pred_classes, y.pred_classes)
        torch.testing.assert_close(x.pred_boxes.tensor, y.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(x.scores, y.scores, rtol=1e-4, atol=1e-5)
        assert (x.pred_masks == y.pred_masks).float().mean() > 0.999
