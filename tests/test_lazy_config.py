"""LazyConfig: configs/htc_R_50_FPN_1x.py builds the yaml config's model (same parameter names,
shapes and count); its small variant (a test-only override of htc_fpn's widths) builds the demo
yaml's model and, through lazyconfig_train_net.py, trains, checkpoints and evaluates on CPU. The
ViTDet, MViTv2 and HTC++ configs: parameter counts and schedules, a training step and inference
of their small variants, the HTC++ recipes' settings; on Detectron2 v0.6, an immediate error
naming what they need (the ResNet HTC++ configs run there too)."""

import functools
import inspect
import itertools
import json
import logging
import pickle
import re
import runpy
import subprocess
import sys
from types import SimpleNamespace

import detectron2.data.transforms as T
import numpy as np
import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.layers import NaiveSyncBatchNorm, ShapeSpec
from detectron2.modeling import FPN
from omegaconf import ListConfig, OmegaConf
from PIL import Image

import lazyconfig_train_net  # the repository root is on sys.path (conftest)
from conftest import (
    CONFIGS,
    DEMO_CONFIG,
    HAS_MODERN_BACKBONES,
    ROOT,
    build_on_meta,
    child_env,
    heuristics_file,
    load_cfg,
    make_batch,
    on_meta,
    reference_parameter_count,
    train_losses,
)
from htc import register_htc_instances
from htc.checkpoint import HTCCheckpointer
from htc.config import apply_overrides

LAZY_R50 = CONFIGS / "htc_R_50_FPN_1x.py"
htc_fpn = runpy.run_path(str(CONFIGS / "common" / "htc_model.py"))["htc_fpn"]
to_htc = runpy.run_path(str(CONFIGS / "common" / "htc_heads.py"))["to_htc"]
# the demo yaml's model (configs/demo/htc_R_18_FPN_demo.yaml) in htc_fpn's terms
DEMO_MODEL = dict(
    depth=18, norm="BN", freeze_at=0, width=64, fc_dim=128, mask_convs=2, mask_width=64,
    num_classes=3, semantic_classes=6, semantic_width=64, rpn_pre_topk=(400, 200),
    rpn_post_topk=(200, 100), rois_per_image=64,
)  # fmt: skip


def _shapes(model) -> dict:
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def _learnable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "lazy_model, yaml_config",
    [
        ("r50", CONFIGS / "htc_R_50_FPN_1x.yaml"),
        ("demo", DEMO_CONFIG),
        ("x101", CONFIGS / "htc_X_101_64x4d_FPN_20e.yaml"),
    ],
)
def test_lazy_config_builds_the_yaml_configs_model(lazy_model, yaml_config):
    if lazy_model == "r50":
        cfg_model = LazyConfig.load(str(LAZY_R50)).model
    elif lazy_model == "x101":
        cfg_model = htc_fpn(depth=101, num_groups=64, width_per_group=4)
    else:
        cfg_model = htc_fpn(**DEMO_MODEL)
    with on_meta():
        lazy = instantiate(cfg_model)
    reference = build_on_meta(load_cfg(yaml_config))
    assert _shapes(lazy) == _shapes(reference)
    assert _learnable(lazy) == _learnable(reference)
    if lazy_model == "r50":
        assert reference_parameter_count(lazy) == 80_258_293
    lazy_heads, heads = lazy.roi_heads, reference.roi_heads
    assert [p.box2box_transform.weights for p in lazy_heads.box_predictor] == [
        p.box2box_transform.weights for p in heads.box_predictor
    ]
    for key in ("stage_loss_weights", "semantic_fusion", "interleaved", "mask_info_flow"):
        assert getattr(lazy_heads, key) == getattr(heads, key), key
    assert type(lazy_heads.semantic_pooler) is type(heads.semantic_pooler)


def _information_flow(flow: bool, *with_res_conv: bool):
    """Sets roi_heads.mask_info_flow, and each mask head's with_res_conv in its place of the
    value the configs derive from it."""

    def edit(model) -> None:
        model.roi_heads.mask_info_flow = flow
        for head, value in zip(model.roi_heads.mask_head, with_res_conv):
            head.with_res_conv = value

    return edit


def _mask_fusion_without_masks(model) -> None:
    model.roi_heads.update(mask_in_features=None, mask_pooler=None, mask_head=None)
    model.roi_heads.semantic_fusion = ["mask"]


def _with_cls_score(predictor, logits: int):
    """``predictor`` with its classifier swapped for one of ``logits`` outputs."""
    predictor.cls_score = torch.nn.Linear(predictor.cls_score.in_features, logits)
    return predictor


def _a_classifier_of_other_logits(model) -> None:
    """Stage 1's predictor of the model's 3 classes, its cls_score of COCO's 81 logits."""
    predictor = model.roi_heads.box_predictors[1]
    predictor.num_classes = 3
    model.roi_heads.box_predictors[1] = L(_with_cls_score)(predictor=predictor, logits=81)


# what the yacs configs derive from one key and a LazyConfig sets in several places, set apart
DISAGREEING = {
    "semantic pooler at stride 4, feature at 8": (
        lambda model: model.roi_heads.semantic_pooler.update(scales=(1 / 4,)),
        r"semantic_pooler.scales \(0.25,\) must be \(1/8,\).*fusion_feature 'p3'",
    ),
    "feature at stride 4, semantic pooler at 8": (
        lambda model: model.semantic_head.update(fusion_feature="p2"),
        r"semantic_pooler.scales \(0.125,\) must be \(1/4,\).*fusion_feature 'p2'",
    ),
    "embedding narrower than the RoI features": (
        lambda model: model.semantic_head.update(embed_dim=32),
        r"EMBED_DIM \(semantic_head.embed_dim\) 32 must equal .* RoI features \[64\]",
    ),
    "semantic RoIs coarser than the mask RoIs": (
        lambda model: model.roi_heads.semantic_pooler.update(output_size=7),
        r"semantic_pooler.output_size \(7, 7\) must be the mask pooler's \(14, 14\)",
    ),
    "fusion without an embedding": (
        lambda model: model.semantic_head.update(embed_dim=None),
        r"\['bbox', 'mask'\] RoI features .*makes none \(semantic_head.embed_dim None\)",
    ),
    "an embedding without fusion": (
        lambda model: model.roi_heads.update(semantic_fusion=[]),
        r"semantic_fusion \[\]\), so .*conv_embedding would get no gradient.*embed_dim=None",
    ),
    "an embedding fused into masks of a model without": (
        _mask_fusion_without_masks,
        r"semantic_fusion \['mask'\] \(the model has no masks\)\), so .*conv_embedding",
    ),
    "information flow off, later heads with res_conv": (
        _information_flow(False, False, True, True),
        r"stages \[1, 2\] have a res_conv .*mask_info_flow=False.*or set mask_info_flow=True",
    ),
    "information flow on, later heads without res_conv": (
        _information_flow(True, False, False, False),
        r"MASK_INFO_FLOW \(roi_heads.mask_info_flow\) True .*stages \[1, 2\] have no res_conv",
    ),
    "the first head with a res_conv": (
        _information_flow(True, True, True, True),
        r"stages \[0\] have a res_conv .*first stage's head never receives one",
    ),
    "a box predictor of other classes": (
        lambda model: model.roi_heads.box_predictors[2].update(num_classes=5),
        r"stage 2's box predictor has 5 classes \(roi_heads.box_predictors.2.num_classes\) and 6 "
        r"class logits .* K=3 \(roi_heads.num_classes, MODEL.ROI_HEADS.NUM_CLASSES\)",
    ),
    "a classifier of other classes": (
        _a_classifier_of_other_logits,
        r"stage 1's box predictor has 3 classes \(.*\) and 81 class logits .* K=3",
    ),
    "a mask head of other classes": (
        lambda model: model.roi_heads.mask_head[1].update(num_classes=5),
        r"stage 1's mask head predicts 5 masks per RoI \(roi_heads.mask_head.1.num_classes\) but "
        r"the ROI heads have 3 classes",
    ),
}


@pytest.mark.parametrize("edit, refused", DISAGREEING.values(), ids=DISAGREEING)
def test_lazy_model_parts_that_disagree_are_refused_at_build(edit, refused):
    """Each disagreement built: a semantic pooler at another scale than the feature's stride
    pooled from the wrong place, silently; shapes that do not sum crashed in torch at the first
    forward; a conv that nothing feeds got no gradient (DDP failed at the second iteration); a
    predictor of more classes than the ROI heads trained their background label as a class
    and failed at evaluation."""
    model = htc_fpn(**DEMO_MODEL)
    edit(model)
    with on_meta(), pytest.raises(ValueError, match=refused):
        instantiate(model)


def test_a_lazy_semantic_branch_that_nothing_fuses_is_built_without_embedding():
    model = htc_fpn(**DEMO_MODEL)
    model.roi_heads.semantic_fusion = []
    model.semantic_head.embed_dim = None
    with on_meta():
        assert instantiate(model).semantic_head.conv_embedding is None


def test_the_information_flow_key_alone_gives_the_mask_heads_their_res_conv():
    """In both config families: htc_fpn's, and to_htc's on a model zoo Mask R-CNN (the ViTDet
    configs'; mask heads without LN, which Detectron2 v0.6 lacks), each mask head after the
    first has a res_conv exactly with roi_heads.mask_info_flow (else the ROI heads refuse the
    model)."""
    zoo_model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    for model in (htc_fpn(**DEMO_MODEL), to_htc(zoo_model, mask_norm="")):
        for flow in (True, False):
            model.roi_heads.mask_info_flow = flow
            with on_meta():
                heads = instantiate(model).roi_heads.mask_head
            assert [head.res_conv is not None for head in heads] == [False, flow, flow]


def test_class_agnostic_lazy_mask_heads_are_built():
    model = htc_fpn(**DEMO_MODEL)
    for head in model.roi_heads.mask_head:
        head.num_classes = 1
    with on_meta():
        heads = instantiate(model).roi_heads.mask_head
    assert [head.predictor.out_channels for head in heads] == [1, 1, 1]


# each way the configs make their ROI heads: htc_fpn's (R-50, HTC++ on, Swin) and
# to_htc's on Detectron2's Mask R-CNNs (ViTDet, MViTv2)
CLASS_COUNT_CONFIGS = [
    "htc_R_50_FPN_1x.py",
    "htcpp/htcpp_R_50_FPN_3x.py",
    "htcpp/htcpp_X_101_64x4d_FPN_3x.py",
    "htcpp/htcpp_swin_b_20e.py",
    "vitdet/htc_vitdet_b_100ep.py",
    "mvitv2/htc_mvitv2_t_3x.py",
]


def _saved_and_loaded(cfg, path):
    """``cfg`` saved with ``LazyConfig.save``, as the training script saves it, and loaded: from
    the yaml, or from the pickle that Detectron2 writes where the yaml cannot be loaded (the
    Swin and MViT configs' norm layers)."""
    LazyConfig.save(cfg, str(path))
    pickled = path.with_name(path.name + ".pkl")
    return pickle.loads(pickled.read_bytes()) if pickled.exists() else LazyConfig.load(str(path))


@pytest.mark.parametrize("name", CLASS_COUNT_CONFIGS)
def test_the_class_count_key_alone_sets_every_stages_classes(name, tmp_path):
    """``model.roi_heads.num_classes=5``, as for Detectron2's model zoo configs, on the config
    and on it saved and loaded: each stage's box predictor has 5 classes and 6 class logits,
    each mask head 5 masks. The htc_fpn configs' kept COCO's 80 and 81, trained the background
    label 5 as a class and failed only at evaluation."""
    if name in MODERN and MODERN[name][1] and not HAS_MODERN_BACKBONES:
        pytest.skip("this Detectron2 has no ViT/MViT/Swin (v0.6)")
    cfg = LazyConfig.load(str(CONFIGS / name))
    for loaded in (cfg, _saved_and_loaded(cfg, tmp_path / "config.yaml")):
        loaded = apply_overrides(loaded, ["model.roi_heads.num_classes=5"])
        with on_meta():
            heads = instantiate(loaded.model).roi_heads
        predictors = [(p.num_classes, p.cls_score.out_features) for p in heads.box_predictor]
        assert predictors == [(5, 6)] * 3
        assert [head.predictor.out_channels for head in heads.mask_head] == [5] * 3


SMALL_LAZY_CONFIG = """
from detectron2.config import LazyCall as L, LazyConfig
import detectron2.data.transforms as T
import runpy

base = LazyConfig.load("{r50}")
model = runpy.run_path("{model_file}")["htc_fpn"](**{demo_model})
# an untrained model still predicts something ("_": the config's other names are its keys, and
# a predictor's num_classes, linked to its ROI heads', resolves within the model only)
for _predictor in model.roi_heads.box_predictors:
    _predictor.test_score_thresh = 0.0
    _predictor.test_topk_per_image = 20  # every route as with 100, at a fraction of the time
dataloader, optimizer, lr_multiplier, train = (
    base.dataloader, base.optimizer, base.lr_multiplier, base.train
)
for split, name in (("train", "htc_demo_train"), ("test", "htc_demo_val")):
    loader = dataloader[split]
    loader.dataset.names = name
    loader.num_workers = 0
    loader.mapper.num_semantic_classes = 6
    loader.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=128, max_size=128)]
dataloader.train.total_batch_size = 2
dataloader.train.mapper.instance_mask_format = "bitmask"
dataloader.evaluator.evaluators[1].num_classes = 6
optimizer.lr = 0.005
train.update(
    output_dir="{output}", init_checkpoint="", max_iter=3, device="cpu", eval_period=3,
    log_period=1, checkpointer=dict(period=2, max_to_keep=10),
)
"""


def _small_lazy_config(tmp_path, output):
    config = tmp_path / "small.py"
    config.write_text(
        SMALL_LAZY_CONFIG.format(
            r50=LAZY_R50,
            model_file=CONFIGS / "common" / "htc_model.py",
            demo_model=DEMO_MODEL,
            output=output,
        )  # fmt: skip
    )
    return config


def _lazyconfig_train_net(workspace, config, *args: str) -> str:
    command = [sys.executable, str(ROOT / "lazyconfig_train_net.py"), "--config-file", str(config)]
    env = child_env(DETECTRON2_DATASETS=str(workspace))
    result = subprocess.run(
        command + list(args), capture_output=True, text=True, env=env, timeout=900
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


@pytest.mark.heavy
def test_small_lazy_config_trains_and_evaluates(workspace, tmp_path, monkeypatch):
    """lazyconfig_train_net.py on the demo data in 2 CPU processes (DDP on gloo): 3 iterations,
    checkpoints, COCO AP + mIoU; then ``--eval-only --resume`` evaluates its last checkpoint."""
    output = tmp_path / "out"
    config = _small_lazy_config(tmp_path, output)
    log = _lazyconfig_train_net(workspace, config, "--num-gpus", "2")
    for name in ("model_0000001.pth", "model_final.pth", "last_checkpoint", "metrics.json"):
        assert (output / name).is_file(), name
    for task in ("bbox", "segm", "sem_seg"):
        assert f"copypaste: Task: {task}" in log
    with open(output / "metrics.json") as f:
        entries = [json.loads(line) for line in f if line.strip()]
    assert max(e["iteration"] for e in entries if "total_loss" in e) == 2
    assert any("loss_mask_stage2" in e and "loss_sem_seg" in e for e in entries)

    evaluated = []
    monkeypatch.setattr(
        lazyconfig_train_net, "evaluate", lambda model, built: evaluated.append(model)
    )
    monkeypatch.setattr(lazyconfig_train_net, "build_evaluation", lambda cfg, model: None)
    # in this process: no loggers set up (they would stop propagating to pytest's capture)
    monkeypatch.setattr(lazyconfig_train_net, "default_setup", lambda cfg, args: None)
    args = lazyconfig_train_net.argument_parser().parse_args(
        ["--config-file", str(config), "--eval-only", "--resume"]
    )
    lazyconfig_train_net.main(args)
    want = torch.load(output / "model_final.pth", weights_only=False)["model"]
    assert all(torch.equal(v, want[k]) for k, v in evaluated[0].state_dict().items())


def test_lazy_training_data_that_does_not_fit_the_model_is_refused(tiny_dataset, tmp_path):
    """train_net.py's checks: the class count, and RLE masks under the polygon format."""
    name = "test_lazy_data"
    register_htc_instances(name, str(tiny_dataset / "train.json"), str(tiny_dataset / "train"))
    DatasetCatalog.get(name)  # as the loader loads it
    cfg = LazyConfig.load(str(_small_lazy_config(tmp_path, tmp_path / "out")))
    cfg.dataloader.train.dataset.names = name
    model = SimpleNamespace(roi_heads=SimpleNamespace(num_classes=3), backbone=None)
    lazyconfig_train_net.check_training_data(cfg, model)
    cfg.dataloader.train.mapper.instance_mask_format = "polygon"
    with pytest.raises(
        ValueError, match="set dataloader.train.mapper.instance_mask_format bitmask"
    ):
        lazyconfig_train_net.check_training_data(cfg, model)
    model.roi_heads.num_classes = 2
    with pytest.raises(ValueError, match="3 thing classes but model.roi_heads.num_classes is 2"):
        lazyconfig_train_net.check_training_data(cfg, model)


_NAMES = itertools.count()


def _registered(tiny_dataset, prefix: str, json_file=None, **kwargs) -> str:
    """A dataset of a name of its own (``prefix`` and a number: tmp_path's name repeats across
    pytest versions) registered on the tiny dataset (its json, or ``json_file``)."""
    name = f"{prefix}_{next(_NAMES)}"
    json_file = json_file or tiny_dataset / "train.json"
    register_htc_instances(name, str(json_file), str(tiny_dataset / "train"), **kwargs)
    return name


@pytest.mark.parametrize(
    "mapper, refused",
    [
        ({"num_semantic_classes": 183}, "mapper.num_semantic_classes is 183 but model.semantic_"),
        ({"ignore_value": 0}, "mapper.ignore_value is 0 but model.semantic_head.ignore_value"),
        ({"derive_semantic": True}, "mapper.num_semantic_classes to 4 \\(it is 6\\)"),
    ],
)
def test_lazy_semantic_mapper_that_does_not_fit_the_model_is_refused(
    tiny_dataset, tmp_path, mapper, refused
):
    """The mapper's semantic settings are set apart from the model's: labels past the head's
    classes failed in torch (IndexError, a device-side assert on CUDA)."""
    name = _registered(tiny_dataset, "lazy_sem")
    cfg = LazyConfig.load(str(_small_lazy_config(tmp_path, tmp_path / "out")))
    cfg.dataloader.train.dataset.names = name
    with on_meta():
        model = instantiate(cfg.model)
    lazyconfig_train_net.check_training_data(cfg, model)
    cfg.dataloader.train.mapper.num_semantic_classes = None  # checks no labels, as Detectron2's
    lazyconfig_train_net.check_training_data(cfg, model)
    cfg.dataloader.train.mapper.update(mapper)
    with pytest.raises(ValueError, match=f"dataloader.train.{refused}"):
        lazyconfig_train_net.check_training_data(cfg, model)


def test_lazy_semantic_metadata_of_the_dataset_is_checked(tiny_dataset, tmp_path):
    """A dataset registered with derive_semantic=True (the mapper ignored it: no sem_seg), and
    one marking unlabeled pixels otherwise than the model (it learned them as a class)."""
    cfg = LazyConfig.load(str(_small_lazy_config(tmp_path, tmp_path / "out")))
    cfg.model.semantic_head.num_classes = cfg.dataloader.train.mapper.num_semantic_classes = 4
    with on_meta():
        model = instantiate(cfg.model)
    derived = _registered(tiny_dataset, "lazy_derived", derive_semantic=True)
    cfg.dataloader.train.dataset.names = derived
    with pytest.raises(
        ValueError, match="derive_semantic=True: set dataloader.train.mapper.derive_semantic=True"
    ):
        lazyconfig_train_net.check_training_data(cfg, model)
    cfg.dataloader.train.mapper.derive_semantic = True
    lazyconfig_train_net.check_training_data(cfg, model)
    marked = {"ignore_label": 0}
    zero = _registered(tiny_dataset, "lazy_ignore0", metadata=marked)
    cfg.dataloader.train.dataset.names = zero
    with pytest.raises(ValueError, match="pixels 0 \\(its ignore_label\\) but model.semantic_head"):
        lazyconfig_train_net.check_training_data(cfg, model)


def _test_json(tiny_dataset, tmp_path, change: str) -> str:
    """The tiny dataset's json with ``change``: "classes" (2 of its 3), "area" (none)."""
    coco = json.loads((tiny_dataset / "train.json").read_text())
    if change == "classes":
        coco["categories"] = coco["categories"][:2]
        kept = {c["id"] for c in coco["categories"]}
        coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] in kept]
    for annotation in coco["annotations"] if change == "area" else ():
        annotation.pop("area", None)
    path = tmp_path / f"{change}.json"
    path.write_text(json.dumps(coco))
    return str(path)


@pytest.mark.parametrize(
    "test_data, refused",
    [
        ("missing json", "no_such.json"),
        ("classes", "has 2 thing classes but model.roi_heads.num_classes is 3"),
        ("no maps", "has no semantic maps .*: drop the mIoU evaluator"),
        ("evaluator classes", "scores 183 classes .* but model.semantic_head.num_classes is 6"),
        ("stuff classes", "names 2 semantic classes .*stuff_classes.* scores 6"),
        ("area", "area.json: (\\d+) of its \\1 annotations have no 'area' \\(e.g. id 1\\)"),
    ],
)
def test_lazy_test_data_is_checked_before_training(
    tiny_dataset, tmp_path, monkeypatch, test_data, refused
):
    """The test datasets and the evaluator are built before training: each of these failed at
    the first evaluation, after training (the last, the box APs by size, silently wrong)."""
    cfg = LazyConfig.load(str(_small_lazy_config(tmp_path, tmp_path / "out")))
    maps = {"sem_seg_root": str(tiny_dataset / "train_sem")}
    cfg.dataloader.train.dataset.names = _registered(tiny_dataset, "lazy_tr", **maps)
    json_file = {"missing json": tmp_path / "no_such.json", "classes": None, "area": None}
    if test_data in ("classes", "area"):
        json_file[test_data] = _test_json(tiny_dataset, tmp_path, test_data)
    if test_data == "no maps":
        maps = {}
    if test_data == "stuff classes":
        maps["metadata"] = {"stuff_classes": ["things", "stuff"]}
    if test_data == "evaluator classes":
        cfg.dataloader.evaluator.evaluators[1].num_classes = 183
    cfg.dataloader.test.dataset.names = _registered(
        tiny_dataset, "lazy_te", json_file.get(test_data), **maps
    )
    monkeypatch.setattr(lazyconfig_train_net, "SimpleTrainer", None)  # nothing trained
    with pytest.raises((ValueError, OSError), match=refused):
        lazyconfig_train_net.train(cfg, resume=False)


@pytest.mark.parametrize("split", ["train", "test"])
def test_lazy_resizes_longer_than_the_backbones_square_are_refused(
    tiny_dataset, tmp_path, monkeypatch, split
):
    """Detectron2 crops a lone image longer than the backbone's square to it, silently (yacs
    configs refuse a MODEL.*.SQUARE_PAD shorter than INPUT.MAX_SIZE_*): a mapper resizing to
    128 px under a 100 px square is refused before training."""
    cfg = LazyConfig.load(str(_small_lazy_config(tmp_path, tmp_path / "out")))
    maps = {"sem_seg_root": str(tiny_dataset / "train_sem")}
    cfg.dataloader.train.dataset.names = _registered(tiny_dataset, "lazy_sq_tr", **maps)
    cfg.dataloader.test.dataset.names = _registered(tiny_dataset, "lazy_sq_te", **maps)
    other = cfg.dataloader["test" if split == "train" else "train"].mapper
    other.augmentations[0].max_size = 100
    monkeypatch.setattr(FPN, "padding_constraints", {"square_size": 100}, raising=False)  # v0.6's
    monkeypatch.setattr(lazyconfig_train_net, "SimpleTrainer", None)  # nothing trained
    refused = f"dataloader.{split}.mapper.augmentations give images up to 128 px long, longer "
    with pytest.raises(ValueError, match=refused + "than the 100 px square"):
        lazyconfig_train_net.train(cfg, resume=False)


FLIP = L(T.RandomFlip)(horizontal=True)
LSJ = L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=1024, target_width=768)
TO_800 = L(T.ResizeShortestEdge)(short_edge_length=600, max_size=800)
CROP = L(T.FixedSizeCrop)(crop_size=(1024, 1024), pad=False)
PADDED_CROP = L(T.FixedSizeCrop)(crop_size=(1024, 1024))


@pytest.mark.parametrize(
    "augmentations, longest",
    [
        ([L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333), FLIP], 1333),
        ([L(T.ResizeShortestEdge)(short_edge_length=800)], sys.maxsize),  # Detectron2's default
        ([FLIP, LSJ], 2048),
        ([FLIP, LSJ, CROP], 1024),
        ([TO_800, CROP], 800),
        ([TO_800, PADDED_CROP], 1024),
        ([{"_target_": "detectron2.data.transforms.ResizeShortestEdge", "max_size": 99}], 99),
        ([FLIP], None),
    ],
)
def test_the_longest_side_that_a_mappers_augmentations_give(augmentations, longest):
    """What the square check compares with model.backbone.square_pad: the last resize's bound,
    lowered by a crop without padding, raised by one with; a saved config's targets by name."""
    assert lazyconfig_train_net.longest_side(OmegaConf.create(augmentations)) == longest


def _small_vit(cfg) -> None:
    net = cfg.model.backbone.net
    net.update(img_size=128, embed_dim=64, depth=2, num_heads=2, window_size=4)
    net.update(window_block_indexes=[0], drop_path_rate=0.0)
    cfg.model.backbone.square_pad = 128


def _small_mvit(cfg) -> None:
    cfg.model.backbone.bottom_up.update(
        embed_dim=16, depth=4, num_heads=1, last_block_indexes=(0, 1, 2, 3), drop_path_rate=0.0
    )
    cfg.model.backbone.square_pad = 128


def _small_swin_fpn(cfg) -> None:
    cfg.model.backbone.bottom_up.update(
        depths=[1, 1, 1, 1], embed_dim=16, num_heads=[1, 1, 2, 2], drop_path_rate=0.0
    )


def _small_swin(cfg) -> None:
    """The ViTDet recipe's Swin, which pads its inputs to a square."""
    _small_swin_fpn(cfg)
    cfg.model.backbone.square_pad = 128


def _small_resnet(cfg) -> None:
    """Trainable BN instead of FrozenBN (random weights under FrozenBN explode)."""
    bottom_up = cfg.model.backbone.bottom_up
    bottom_up.freeze_at = 0
    bottom_up.stem.norm = "BN"
    stages = bottom_up.stages  # make_default_stages, or a ResNeXt's list of make_stage
    for stage in stages if isinstance(stages, ListConfig) else [stages]:
        stage.norm = "BN"


# config -> (its parameters, the Detectron2 classes it needs, its test-only small override)
VIT, MVIT, SWIN = "ViT, SimpleFeaturePyramid", "MViT", "SwinTransformer"
MODERN = {
    "vitdet/htc_vitdet_b_100ep.py": (149_383_797, VIT, _small_vit),
    "vitdet/htc_vitdet_l_100ep.py": (369_172_661, VIT, _small_vit),
    "vitdet/htc_vitdet_h_75ep.py": (699_691_765, VIT, _small_vit),
    "vitdet/htc_mvitv2_b_in21k_100ep.py": (111_371_893, MVIT, _small_mvit),
    "vitdet/htc_mvitv2_l_in21k_50ep.py": (273_335_509, MVIT, _small_mvit),
    "vitdet/htc_mvitv2_h_in21k_36ep.py": (726_380_853, MVIT, _small_mvit),
    "vitdet/htc_swin_b_in21k_50ep.py": (147_534_701, SWIN, _small_swin),
    "vitdet/htc_swin_l_in21k_50ep.py": (256_033_609, SWIN, _small_swin),
    "vitdet/htc_without_semantic_vitdet_b_100ep.py": (146_581_694, VIT, _small_vit),
    "vitdet/htc_without_semantic_vitdet_l_100ep.py": (366_370_558, VIT, _small_vit),
    "vitdet/htc_without_semantic_vitdet_h_75ep.py": (696_889_662, VIT, _small_vit),
    "vitdet/htc_without_semantic_mvitv2_b_in21k_100ep.py": (108_569_790, MVIT, _small_mvit),
    "vitdet/htc_without_semantic_mvitv2_l_in21k_50ep.py": (270_533_406, MVIT, _small_mvit),
    "vitdet/htc_without_semantic_mvitv2_h_in21k_36ep.py": (723_578_750, MVIT, _small_mvit),
    "vitdet/htc_without_semantic_swin_b_in21k_50ep.py": (144_732_598, SWIN, _small_swin),
    "vitdet/htc_without_semantic_swin_l_in21k_50ep.py": (253_231_506, SWIN, _small_swin),
    "mvitv2/htc_mvitv2_t_3x.py": (84_070_421, MVIT, _small_mvit),
    "mvitv2/htc_mvitv2_s_3x.py": (94_767_317, MVIT, _small_mvit),
    "mvitv2/htc_mvitv2_b_3x.py": (111_369_845, MVIT, _small_mvit),
    "mvitv2/htc_mvitv2_b_in21k_3x.py": (111_369_845, MVIT, _small_mvit),
    "mvitv2/htc_mvitv2_l_in21k_lsj_50ep.py": (273_333_461, MVIT, _small_mvit),
    "mvitv2/htc_mvitv2_h_in21k_lsj_3x.py": (726_378_805, MVIT, _small_mvit),
    "mvitv2/htc_without_semantic_mvitv2_t_3x.py": (81_268_318, MVIT, _small_mvit),
    "mvitv2/htc_without_semantic_mvitv2_s_3x.py": (91_965_214, MVIT, _small_mvit),
    "mvitv2/htc_without_semantic_mvitv2_b_3x.py": (108_567_742, MVIT, _small_mvit),
    "mvitv2/htc_without_semantic_mvitv2_b_in21k_3x.py": (108_567_742, MVIT, _small_mvit),
    "mvitv2/htc_without_semantic_mvitv2_l_in21k_lsj_50ep.py": (270_531_358, MVIT, _small_mvit),
    "mvitv2/htc_without_semantic_mvitv2_h_in21k_lsj_3x.py": (723_576_702, MVIT, _small_mvit),
    "htcpp/htcpp_R_50_FPN_3x.py": (84_190_453, "", _small_resnet),
    "htcpp/htcpp_X_101_64x4d_FPN_3x.py": (142_088_693, "", _small_resnet),
    "htcpp/htcpp_swin_b_20e.py": (146_938_989, SWIN, _small_swin_fpn),
    "htcpp/htcpp_swin_l_1x.py": (255_437_897, SWIN, _small_swin_fpn),
}

# iterations of 64 images as Detectron2's configs have them: 100, 75, 50 and 36 epochs (3x);
# HTC++: 36 epochs of 16 images, 20 and 12 epochs of 8. The first key a name ends with counts.
MAX_ITER = {
    "vitdet_h_75ep": 138_281, "50ep": 92_187, "36ep": 67_500, "100ep": 184_375,
    "FPN_3x": 263_880, "3x": 67_500, "20e": 293_200, "1x": 175_920,
}  # fmt: skip


# one config of each small model that the configs make (sizes and schedules apart, the others'
# are the same model: test_modern_backbone_config_counts_its_parameters checks it)
TRAINED = [
    "vitdet/htc_vitdet_b_100ep.py",
    "vitdet/htc_mvitv2_b_in21k_100ep.py",
    "vitdet/htc_mvitv2_h_in21k_36ep.py",  # activation checkpointing
    "vitdet/htc_swin_b_in21k_50ep.py",
    "vitdet/htc_without_semantic_vitdet_b_100ep.py",
    "vitdet/htc_without_semantic_mvitv2_b_in21k_100ep.py",
    "vitdet/htc_without_semantic_mvitv2_h_in21k_36ep.py",
    "vitdet/htc_without_semantic_swin_b_in21k_50ep.py",
    "mvitv2/htc_mvitv2_t_3x.py",
    "mvitv2/htc_mvitv2_h_in21k_lsj_3x.py",
    "mvitv2/htc_without_semantic_mvitv2_t_3x.py",
    "mvitv2/htc_without_semantic_mvitv2_h_in21k_lsj_3x.py",
    "htcpp/htcpp_R_50_FPN_3x.py",
    "htcpp/htcpp_X_101_64x4d_FPN_3x.py",
    "htcpp/htcpp_swin_b_20e.py",
]


def _small(name: str):
    """The config's small variant: a narrow, shallow backbone on 128 px inputs, narrow box and
    mask heads (of the same layers), few RoIs, 3 thing and 5 semantic classes."""
    cfg = LazyConfig.load(str(CONFIGS / name))
    MODERN[name][2](cfg)
    cfg.model.proposal_generator.update(pre_nms_topk=(200, 100), post_nms_topk=(100, 50))
    heads = cfg.model.roi_heads
    heads.update(num_classes=3, batch_size_per_image=32)
    for head, predictor in zip(heads.box_heads, heads.box_predictors):
        head.update(conv_dims=[32] * len(head.conv_dims), fc_dims=[64] * len(head.fc_dims))
        predictor.input_shape = ShapeSpec(channels=64)
        predictor.test_topk_per_image = 10
    for head in heads.mask_head:
        head.conv_dims = [32] * len(head.conv_dims)
    if "semantic_head" in cfg.model:
        cfg.model.semantic_head.num_classes = 5
    return cfg


def _model_key(cfg) -> str:
    """The model a LazyConfig builds, as text: interpolations resolved, functions by where they
    are written with their defaults and closures (each load of a config makes new function
    objects), classes by name; anything else is refused rather than keyed by its repr."""
    return repr(_named(OmegaConf.to_container(cfg.model, resolve=True)))


def _named(node):
    if isinstance(node, dict):
        return {key: _named(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return [_named(value) for value in node]
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, functools.partial):
        return ["partial", _named(node.func), _named(node.args), _named(node.keywords)]
    if inspect.isfunction(node):
        code, cells = node.__code__, [cell.cell_contents for cell in node.__closure__ or ()]
        where = f"{code.co_filename}:{code.co_firstlineno}"
        return [where, _named(node.__defaults__ or ()), _named(node.__kwdefaults__ or {}),
                _named(cells)]  # fmt: skip
    if (isinstance(node, type) or inspect.isbuiltin(node)) and "<locals>" not in node.__qualname__:
        return f"{node.__module__}.{node.__qualname__}"
    raise TypeError(f"no key for {node!r} ({type(node).__name__})")


@functools.lru_cache
def _trained_keys() -> set:
    """Of the trained configs that this Detectron2 loads."""
    loads = [name for name in TRAINED if HAS_MODERN_BACKBONES or not MODERN[name][1]]
    return {_model_key(_small(name)) for name in loads}


@pytest.mark.parametrize("name", MODERN)
def test_modern_backbone_config_counts_its_parameters(name):
    """With Detectron2's main branch: the config's parameter count, schedule, LSJ padding and
    resizes that fit its square, and its small variant is one that the next test trains. On
    v0.6: loading it fails at once, naming the missing classes and the Detectron2 it needs."""
    count, needs, _ = MODERN[name]
    if needs and not HAS_MODERN_BACKBONES:
        with pytest.raises(ImportError, match=f"{needs}.*v0.6 release"):
            LazyConfig.load(str(CONFIGS / name))
        return
    cfg = LazyConfig.load(str(CONFIGS / name))
    with on_meta():
        model = instantiate(cfg.model)
    assert reference_parameter_count(model) == count
    for split in ("train", "test"):  # no resize longer than a square
        lazyconfig_train_net.check_square_pad(model, cfg.dataloader[split].mapper, split)
    schedule = next(v for k, v in MAX_ITER.items() if name.endswith(f"{k}.py"))
    assert cfg.train.max_iter == schedule
    assert max(cfg.lr_multiplier.scheduler.milestones) <= schedule
    crops = [a for a in cfg.dataloader.train.mapper.augmentations if a._target_ is T.FixedSizeCrop]
    for crop in crops:  # LSJ: ViTDet's backbone pads its square, the MViTv2 project's crop does
        assert crop.pad == name.startswith("mvitv2/")
    semantic = "without_semantic" not in name
    assert ("semantic_head" in cfg.model) == semantic
    if not semantic:
        assert cfg.dataloader.train.dataset.names == "coco_2017_train"
    assert _model_key(_small(name)) in _trained_keys()


@pytest.mark.parametrize("name", TRAINED)
def test_modern_backbone_config_trains_a_step_and_infers(name):
    """The small variant trains a step with every loss and infers; without the semantic branch,
    on data without semantic labels."""
    if MODERN[name][1] and not HAS_MODERN_BACKBONES:
        pytest.skip("this Detectron2 has no ViT/MViT/Swin (v0.6): the test above checks the error")
    cfg = _small(name)
    semantic = "semantic_head" in cfg.model
    batch = make_batch(num_images=2, size=128)
    for x in batch:
        sem_seg = x.pop("sem_seg")
        if semantic:
            x["sem_seg"] = sem_seg.clamp(max=4)
    model = instantiate(cfg.model)
    losses = train_losses(model, batch)
    assert {"loss_mask_stage2", "loss_rpn_cls"} <= set(losses)
    assert ("loss_sem_seg" in losses) == semantic
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    first = next(p for p in model.backbone.parameters() if p.requires_grad)
    assert first.grad is not None and first.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": batch[0]["image"], "height": 128, "width": 128}])
    assert out["instances"].pred_masks.shape[1:] == (128, 128)
    if semantic:
        assert out["sem_seg"].shape == (5, 128, 128)
    else:
        assert "sem_seg" not in out


@pytest.mark.parametrize(
    "name, backbone",
    [
        ("vitdet/htc_vitdet_b_100ep.py", "backbone.net."),
        ("vitdet/htc_mvitv2_b_in21k_100ep.py", "backbone.bottom_up."),
        ("vitdet/htc_swin_b_in21k_50ep.py", "backbone.bottom_up."),
    ],
)
def test_an_imagenet_classifier_loads_by_name_matching(tmp_path, caplog, name, backbone):
    """The configs' ImageNet weights (MAE's and pycls' files) load by Detectron2's name-matching
    heuristics: the backbone's weights and a classifier's final norm and head, whose "norm.*"
    ends the names of the FPN's and heads' norms by chance. Those chance matches are skipped, as
    Detectron2 does, not refused as misfits (the refusal: tests/test_checkpoint.py)."""
    if not HAS_MODERN_BACKBONES:
        pytest.skip("this Detectron2 has no ViT/MViT/Swin (v0.6)")
    model = instantiate(_small(name).model)
    weights = {
        key[len(backbone) :]: value.numpy().copy()
        for key, value in model.state_dict().items()
        if key.startswith(backbone) and "rel_pos" not in key  # as MAE's ViT: they stay at 0
    }
    classifier = {
        "norm.weight": np.ones(999),
        "norm.bias": np.zeros(999),
        "head.weight": np.ones((9, 999)),
    }
    path = heuristics_file(tmp_path / "imagenet.pkl", {**weights, **classifier})
    with torch.no_grad():
        for parameter in model.backbone.parameters():
            parameter.zero_()
    with caplog.at_level(logging.WARNING):
        HTCCheckpointer(model).load(path)
    assert "Shape of norm.weight in checkpoint is" in caplog.text  # a chance match
    state = model.state_dict()
    for key, value in weights.items():
        assert np.array_equal(state[backbone + key].numpy(), value), key


@pytest.mark.parametrize("name", [n for n in MODERN if n.startswith("htcpp/")])
def test_htcpp_configs_are_their_recipes(name):
    """What HTC++ adds, as the recipe each config names: 4conv1fc box heads, multi-scale
    training to 1600, Soft-NMS, AdamW; for Swin (CBNetV2's recipe) SyncBN and GIoU x10."""
    if MODERN[name][1] and not HAS_MODERN_BACKBONES:
        with pytest.raises(ImportError, match="SwinTransformer.*v0.6 release"):
            LazyConfig.load(str(CONFIGS / name))
        return
    cfg = LazyConfig.load(str(CONFIGS / name))
    heads = cfg.model.roi_heads
    swin = "swin" in name
    for head in heads.box_heads:
        assert (head.conv_dims, head.fc_dims) == ([256] * 4, [1024])
        assert head.conv_norm == ("SyncBN" if swin else "")
    assert (heads.test_nms, heads.soft_nms_sigma) == ("soft_linear", 0.5)
    for predictor in heads.box_predictors:
        assert (predictor.test_nms_thresh, predictor.test_score_thresh) == (0.5, 0.001)
        assert predictor.get("box_reg_loss_type", "smooth_l1") == ("giou" if swin else "smooth_l1")
        if swin:
            assert predictor.loss_weight == {"loss_box_reg": 10.0}
    resize = cfg.dataloader.train.mapper.augmentations[0]
    assert (tuple(resize.short_edge_length), resize.max_size) == ((400, 1400), 1600)
    assert resize.sample_style == "range"
    assert cfg.dataloader.test.mapper.augmentations[0].short_edge_length == 1400
    assert cfg.optimizer._target_ is torch.optim.AdamW
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == ((5e-5 if swin else 1e-4), 0.05)
    assert cfg.dataloader.train.total_batch_size == (8 if swin else 16)


def test_a_saved_mvitv2_project_config_reloads(tmp_path):
    """default_setup saves the config as config.yaml: the MViTv2 project configs' norm was a
    function of the config, so Detectron2 pickled it into a file that did not load again. By
    its name, it is the same NaiveSyncBatchNorm with "N" statistics."""
    if not HAS_MODERN_BACKBONES:
        pytest.skip("this Detectron2 has no MViT (v0.6)")
    cfg = LazyConfig.load(str(CONFIGS / "mvitv2/htc_mvitv2_t_3x.py"))
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))
    assert not (tmp_path / "config.yaml.pkl").exists()
    with on_meta():
        model = instantiate(LazyConfig.load(str(tmp_path / "config.yaml")).model)
        assert _shapes(model) == _shapes(instantiate(cfg.model))
    norms = [m for m in model.roi_heads.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 26  # 3 box heads' 4 convs, 3 mask heads' 4 convs and 2 res convs
    assert all(type(m) is NaiveSyncBatchNorm and m._stats_mode == "N" for m in norms)


@pytest.fixture(scope="module")
def coco_layout(tmp_path_factory):
    """DETECTRON2_DATASETS with COCO 2017 and COCO-Stuff's layout: 2 images per split, each with
    one 'person' rectangle, its stuff map labelling it 0 and the rest 255. The rectangle spans
    most of the image: every crop of ViTDet's large-scale jitter keeps part of it."""
    root = tmp_path_factory.mktemp("datasets")
    categories = [
        {"id": c["id"], "name": c["name"], "supercategory": "thing"}
        for c in COCO_CATEGORIES
        if c["isthing"]
    ]
    for split in ("train2017", "val2017"):
        for folder in (f"coco/{split}", f"coco/stuffthingmaps/{split}", "coco/annotations"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for k in (1, 2):
            name = f"{k:012}.jpg"
            Image.fromarray(np.full((96, 128, 3), 40 * k, np.uint8)).save(
                root / f"coco/{split}/{name}"
            )
            labels = np.full((96, 128), 255, np.uint8)
            labels[8:80, 8:112] = 0
            Image.fromarray(labels).save(root / f"coco/stuffthingmaps/{split}/{k:012}.png")
            images.append({"id": k, "file_name": name, "height": 96, "width": 128})
            annotations.append(
                {"id": k, "image_id": k, "category_id": 1, "bbox": [8, 8, 104, 72], "area": 7488,
                 "iscrowd": 0, "segmentation": [[8, 8, 112, 8, 112, 80, 8, 80]]}
            )  # fmt: skip
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (root / f"coco/annotations/instances_{split}.json").write_text(json.dumps(coco))
    return root


# Each config in a process forked before any config is loaded: a fresh process's registries,
# without a fresh interpreter's start-up (torch and Detectron2 imported once for all).
BUILD_DATA = """
import os, sys, traceback
from detectron2.config import LazyConfig, instantiate

def build(path):
    cfg = LazyConfig.load(path)
    cfg.dataloader.train.total_batch_size = 2
    cfg.dataloader.train.num_workers = cfg.dataloader.test.num_workers = 0
    train = next(iter(instantiate(cfg.dataloader.train)))
    test = next(iter(instantiate(cfg.dataloader.test)))
    instantiate(cfg.dataloader.evaluator)
    return len(train), len(train[0]["instances"]), "sem_seg" in train[0], len(test)

for path in sys.argv[1:]:
    sys.stdout.flush()
    if os.fork() == 0:
        try:
            print(path, "built", *build(path))
        except Exception as error:
            print(f"--- {path}:", traceback.format_exc(), file=sys.stderr)
            print(path, "failed", type(error).__name__, str(error).replace(chr(10), " "))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    os.wait()
"""

BUILDS_DATA = {
    "htc_R_50_FPN_1x.py": True,  # whether its batches carry sem_seg
    "htcpp/htcpp_R_50_FPN_3x.py": True,
    "vitdet/htc_vitdet_b_100ep.py": True,  # LSJ
    "vitdet/htc_without_semantic_vitdet_b_100ep.py": False,
}


@pytest.mark.heavy
def test_a_process_that_imports_only_the_config_builds_its_data(coco_layout):
    """As Detectron2's tools/lazyconfig_train_net.py does: a process that has loaded no config
    loads one and instantiates its train and test loaders and evaluator; the datasets it names
    are registered by the config's own dataset call. On v0.6 a ViTDet config fails to load,
    naming the Detectron2 it needs."""
    result = subprocess.run(
        [sys.executable, "-c", BUILD_DATA, *(str(CONFIGS / n) for n in BUILDS_DATA)],
        capture_output=True, text=True, env=child_env(DETECTRON2_DATASETS=str(coco_layout)),
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split(maxsplit=1) for line in result.stdout.splitlines()]
    got = {line[0]: line[1] for line in lines if len(line) == 2}
    for name, semantic in BUILDS_DATA.items():
        outcome = got.get(str(CONFIGS / name), "no output")
        needs = MODERN[name][1] if name in MODERN else ""
        if needs and not HAS_MODERN_BACKBONES:
            expected = f"failed ImportError .*{re.escape(needs)}.*v0\\.6 release"
            assert re.match(expected, outcome), outcome
        else:
            assert outcome == f"built 2 1 {semantic} 1", f"{name}: {outcome}\n{result.stderr}"
