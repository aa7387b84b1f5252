"""Nothing lost: atomic checkpoint writes (a run killed with SIGKILL and resumed:
tests/test_resume.py)."""

import logging
import os
import pickle
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

from conftest import CONFIGS, TINY_OPTS, heuristics_file, tiny_cfg
from htc import demo
from htc.checkpoint import HTCCheckpointer, atomic_open, load_for_evaluation, load_weights
from htc.export import build_for_export


def test_interrupted_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"previous complete checkpoint")
    with pytest.raises(RuntimeError):
        with atomic_open(str(path), "wb") as f:
            f.write(b"half a new chec")
            raise RuntimeError("killed while saving")
    assert path.read_bytes() == b"previous complete checkpoint"
    assert list(tmp_path.iterdir()) == [path]
    with atomic_open(str(path), "wb") as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"


def test_writes_of_killed_processes_are_removed_by_the_next_save(tmp_path):
    """A SIGKILL mid-write leaves atomic_open's temporary file (no cleanup runs); a training's next
    save removes those of this machine's processes that no longer run, and nothing else (a
    checkpointer that only loads, as --eval-only's beside a running training, removes nothing)."""
    host, pid_max = socket.gethostname(), int(Path("/proc/sys/kernel/pid_max").read_text())
    orphan = tmp_path / f"model_0000999.pth.tmp.{host}.{pid_max}"  # no process has this pid
    kept = [
        tmp_path / f"model_0001999.pth.tmp.{host}.{os.getpid()}",  # a write in progress
        tmp_path / f"model_0001999.pth.tmp.another-{host}.{pid_max}",  # another machine's
        tmp_path / "train_log.tmp.20261207",  # not atomic_open's
    ]
    for path in [orphan, *kept]:
        path.write_bytes(b"x")
    checkpointer = HTCCheckpointer(torch.nn.Linear(1, 1), save_dir=str(tmp_path))
    checkpointer.resume_or_load("", resume=True)
    assert orphan.exists()
    checkpointer.save("model_0002999")
    assert sorted(tmp_path.iterdir()) == sorted([*kept, tmp_path / "model_0002999.pth",
                                                 tmp_path / "last_checkpoint"])  # fmt: skip


def _model(**opts):
    cfg = tiny_cfg()
    for key, value in opts.items():
        cfg.merge_from_list([key, value])
    return build_model(cfg)


def test_weights_of_other_shapes_are_refused_or_skipped_on_request(tmp_path):
    path = tmp_path / "five_classes.pth"
    torch.save({"model": _model(**{"MODEL.ROI_HEADS.NUM_CLASSES": 5}).state_dict()}, path)
    model = _model()
    with pytest.raises(ValueError, match=r"12 parameters .* do not fit.*\n.*cls_score.weight: "
                       r"checkpoint \(6, 64\), model \(4, 64\)"):  # fmt: skip
        HTCCheckpointer(model).load(str(path))
    model = _model()
    before = model.roi_heads.box_predictor[0].cls_score.weight.clone()
    HTCCheckpointer(model, skip_mismatched=True).load(str(path))
    assert torch.equal(model.roi_heads.box_predictor[0].cls_score.weight, before)


def test_inference_refuses_a_checkpoint_that_leaves_parts_of_the_model_out(tmp_path):
    """A cascade of two stages in a model of three: training starts the third at random (as
    from ImageNet weights), inference refuses it (Detectron2 logged the keys and inferred with a
    random third stage)."""
    state = _model().state_dict()
    path = tmp_path / "two_stages.pth"
    third = ("box_head.2.", "box_predictor.2.", "mask_head.2.")
    torch.save({"model": {k: v for k, v in state.items() if not any(t in k for t in third)}}, path)
    HTCCheckpointer(_model()).load(str(path))
    with pytest.raises(ValueError, match=r"parameters and buffers of the model are not in the "
                       r"checkpoint, in \d+ modules: .*roi_heads.mask_head.2.deconv"):  # fmt: skip
        HTCCheckpointer(_model(), complete=True).load(str(path))
    cfg = tiny_cfg()
    cfg.MODEL.WEIGHTS = str(path)
    with pytest.raises(ValueError, match="Inference would run them at random"):
        load_weights(_model(), cfg, announce=pytest.fail)


def test_inference_skips_no_weights(tmp_path):
    """SKIP_MISMATCHED_WEIGHTS, which the Cityscapes config sets for its fine-tuning, is for
    training: htc.demo, htc.predict and --eval-only ran a COCO checkpoint in that config with
    every class layer at random, warnings aside."""
    five = tmp_path / "five_classes.pth"
    torch.save({"model": _model(**{"MODEL.ROI_HEADS.NUM_CLASSES": 5}).state_dict()}, five)
    cfg = tiny_cfg()
    cfg.merge_from_list(["MODEL.WEIGHTS", str(five), "MODEL.HTC.SKIP_MISMATCHED_WEIGHTS", True])
    with pytest.raises(ValueError, match=r"12 parameters .* do not fit.*\n(.*\n)*Inference would "
                       r"run them at random \(MODEL.HTC.SKIP_MISMATCHED_WEIGHTS, .* skips "
                       r"weights only for training\)"):  # fmt: skip
        load_weights(_model(), cfg, announce=pytest.fail)


def test_inference_refuses_a_checkpoint_with_weights_the_model_has_no_place_for(tmp_path):
    """A checkpoint of a richer model (a semantic branch, deformable convs, a deeper backbone)
    in a config without: Detectron2 logs the unused keys and infers with another model
    (DCN offsets dropped: 85 detections became 0 in a probe). Mask heads in a model without
    masks are kept apart (its boxes do not read them), as training keeps all of them."""
    path = tmp_path / "semantic.pth"
    torch.save({"model": _model().state_dict()}, path)
    without = {"MODEL.HTC.SEMANTIC_ON": False, "MODEL.HTC.SEMANTIC_FUSION": []}
    HTCCheckpointer(_model(**without)).load(str(path))
    with pytest.raises(ValueError, match=r"\d+ parameters and buffers of the checkpoint have no "
                       r"place in the model, in \d+ modules: semantic_head.*Inference would "
                       r"run without them"):  # fmt: skip
        HTCCheckpointer(_model(**without), complete=True).load(str(path))
    boxes = _model(**{"MODEL.MASK_ON": False, "MODEL.HTC.SEMANTIC_FUSION": ["bbox"]})
    HTCCheckpointer(boxes, complete=True).load(str(path))
    pixels = {"pixel_mean": torch.zeros(3, 1, 1), "pixel_std": torch.ones(3, 1, 1)}
    old = dict(_model().state_dict(), **pixels)
    torch.save({"model": old}, path)  # as Detectron2 saved them once: the config gives them
    HTCCheckpointer(_model(), complete=True).load(str(path))


def test_fine_tuning_skips_no_weights_of_the_backbone_body(tmp_path):
    """SKIP_MISMATCHED_WEIGHTS starts the class layers anew; a COCO checkpoint of another
    backbone width in the Cityscapes config (which sets it) trained on a backbone partly at
    random, warnings aside. The image's input layer (the stem: RGB-D inputs) may start anew."""
    state = _model().state_dict()
    state["backbone.bottom_up.stem.conv1.weight"] = torch.zeros(64, 4, 7, 7)
    torch.save({"model": state}, tmp_path / "rgbd.pth")
    model = _model()
    HTCCheckpointer(model, skip_mismatched=True).load(str(tmp_path / "rgbd.pth"))
    assert model.backbone.bottom_up.stem.conv1.weight.abs().sum() > 0
    state["backbone.bottom_up.res3.0.conv1.weight"] = torch.zeros(128, 32, 1, 1)
    torch.save({"model": state}, tmp_path / "narrower.pth")
    refused = r"^1 parameters .*\n  backbone.bottom_up.res3.0.conv1.weight: .*\nA backbone of"
    with pytest.raises(ValueError, match=refused):
        HTCCheckpointer(_model(), skip_mismatched=True).load(str(tmp_path / "narrower.pth"))
    # deformable convs' offsets start at zero, as Detectron2 starts them: DCN v1 weights as v2
    dcn = {"MODEL.RESNETS.DEPTH": 50, "MODEL.RESNETS.RES2_OUT_CHANNELS": 32,
           "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, False, False, True]}  # fmt: skip
    torch.save({"model": _model(**dcn).state_dict()}, tmp_path / "dcn_v1.pth")
    model = _model(**dcn, **{"MODEL.RESNETS.DEFORM_MODULATED": True})
    HTCCheckpointer(model, skip_mismatched=True).load(str(tmp_path / "dcn_v1.pth"))
    assert not model.backbone.bottom_up.res5[0].conv2_offset.weight.any()


def test_an_evaluation_with_nothing_to_load_is_refused(tmp_path):
    """--eval-only with empty weights (and, with --resume, no checkpoint in OUTPUT_DIR) scored
    the randomly initialized model, silently."""
    model = torch.nn.Linear(2, 2)
    checkpointer = HTCCheckpointer(model, str(tmp_path), complete=True)
    for resume, holds in ((False, ""), (True, f" and {tmp_path} holds no checkpoint")):
        with pytest.raises(ValueError, match=f"KEY is empty{holds}: the model would be scored"):
            load_for_evaluation(checkpointer, "", resume, "KEY")
    trained = torch.nn.Linear(2, 2)
    HTCCheckpointer(trained, str(tmp_path)).save("model_final")
    load_for_evaluation(checkpointer, "", True, "KEY")
    assert torch.equal(model.weight, trained.weight)


def test_a_resume_onto_the_run_of_another_model_is_refused(tmp_path):
    """An OUTPUT_DIR holding another config's run (another class count, even with
    SKIP_MISMATCHED_WEIGHTS; another stage count) failed in torch's optimizer, after loading."""
    HTCCheckpointer(_model(**{"MODEL.ROI_HEADS.NUM_CLASSES": 5}), str(tmp_path)).save("model_final")
    resumed = HTCCheckpointer(_model(), str(tmp_path), skip_mismatched=True)
    other = f"--resume: the last checkpoint of {tmp_path} is not of this model .*12 parameters"
    with pytest.raises(ValueError, match=other) as refused:
        resumed.resume_or_load("", resume=True)
    assert "Resume with the config of that run" in str(refused.value)
    assert "SKIP_MISMATCHED_WEIGHTS True" not in str(refused.value)  # which a resume ignores
    assert resumed.skip_mismatched  # as it was, for the loads that are no resume
    skipping = HTCCheckpointer(_model(), str(tmp_path), skip_mismatched=True)
    skipping.resume_or_load(str(tmp_path / "model_final.pth"), resume=False)
    third = ("box_head.2.", "box_predictor.2.", "mask_head.2.")
    state = {k: v for k, v in _model().state_dict().items() if not any(t in k for t in third)}
    torch.save({"model": state}, tmp_path / "model_final.pth")
    with pytest.raises(ValueError, match="not of this model .* not in the checkpoint"):
        HTCCheckpointer(_model(), str(tmp_path)).resume_or_load("", resume=True)
    HTCCheckpointer(_model(), str(tmp_path)).save("model_final")
    HTCCheckpointer(_model(), str(tmp_path)).resume_or_load("", resume=True)


@pytest.mark.parametrize(
    "break_it, problem",
    [
        (lambda d: (d / "last_checkpoint").write_text(""), "names no file"),
        (lambda d: (d / "last_checkpoint").write_text("model_0000009.pth"), "which is missing"),
        (lambda d: (d / "model_final.pth").write_bytes(b"half a checkpoint"), "no complete"),
    ],
)
def test_a_last_checkpoint_that_names_no_readable_file_is_named(tmp_path, break_it, problem):
    """fvcore said "Checkpoint .../ not found!" or torch "failed reading zip archive", without
    the checkpoints there were to resume from."""
    model = torch.nn.Linear(2, 2)
    HTCCheckpointer(model, str(tmp_path)).save("model_0000004")
    HTCCheckpointer(model, str(tmp_path)).save("model_final")
    break_it(tmp_path)
    with pytest.raises(ValueError, match=f"last_checkpoint .*{problem}.*'model_0000004.pth'"):
        HTCCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)


@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
def test_weights_the_name_matching_skips_for_their_shape_are_refused(tmp_path, caplog, norm):
    """A file that Detectron2 loads by its name-matching heuristics (Caffe2's and pycls' ImageNet
    backbones, "matching_heuristics" files) has its misfit weights skipped with only a warning:
    they are refused as the others, also where none fits, and listed once. A backbone that fits
    loads, also where a short name of the file matches weights elsewhere by chance (FrozenBN
    fills in the running statistics it is not given: they do not count as loaded)."""
    opts = {"MODEL.RESNETS.NORM": norm}
    narrow = _model(**opts, **{"MODEL.RESNETS.STEM_OUT_CHANNELS": 16}).state_dict()
    bottom_up = "backbone.bottom_up."
    weights = {k[len(bottom_up) :]: v.numpy() for k, v in narrow.items() if k.startswith(bottom_up)}
    path = heuristics_file(tmp_path / "backbone.pkl", weights)
    with pytest.raises(ValueError, match="6 parameters .* do not fit") as error:
        HTCCheckpointer(_model(**opts)).load(path)
    lines = str(error.value).splitlines()
    assert "  backbone.bottom_up.stem.conv1.norm.bias: checkpoint (16,), model (64,)" in lines
    stem = "  backbone.bottom_up.stem.conv1.weight: checkpoint (16, 3, 7, 7), model (64, 3, 7, 7)"
    assert stem in lines
    with pytest.raises(ValueError, match="res2.0.conv1.weight: .*\nA backbone of another depth"):
        HTCCheckpointer(_model(**opts), skip_mismatched=True).load(path)  # res2 reads the stem

    stem_only = {k: v for k, v in weights.items() if k.startswith("stem.")}
    with pytest.raises(ValueError, match="5 parameters .* do not fit"):
        HTCCheckpointer(_model(**opts)).load(heuristics_file(tmp_path / "stem.pkl", stem_only))

    # without the stem and res2.0, but with a classifier's final norm, whose name the stem's
    # and res2.0's norms end with: chance matches, which Detectron2 skips and so does this
    fitting = {k: v for k, v in weights.items() if not k.startswith(("stem.", "res2.0."))}
    fitting["norm.weight"] = np.ones(768, dtype=np.float32)
    with caplog.at_level(logging.WARNING):
        HTCCheckpointer(_model(**opts)).load(heuristics_file(tmp_path / "fit.pkl", fitting))
    assert "Shape of norm.weight in checkpoint is" in caplog.text

    # the names of the model itself: each misfit listed once (Detectron2 hands a skipped weight
    # back under its name, which fvcore then reports too)
    five = _model(**opts, **{"MODEL.ROI_HEADS.NUM_CLASSES": 5}).state_dict()
    path = heuristics_file(tmp_path / "five.pkl", {k: v.numpy() for k, v in five.items()})
    with pytest.raises(ValueError, match="12 parameters .* do not fit"):
        HTCCheckpointer(_model(**opts)).load(path)


def _caffe2_names(state: dict) -> dict:
    """The ResNet of ``state`` named as the MSRA ImageNet files of Detectron2's model zoo (no
    author: Detectron2 renames them with its Caffe2 conversion), FrozenBN's scale and shift only,
    with the classifier and a solver blob."""
    blobs = {"fc1000_w": np.ones((1000, 512)), "fc1000_b": np.zeros(1000), "conv1_w_momentum": 0}
    parts = {"conv1": "branch2a", "conv2": "branch2b", "shortcut": "branch1"}
    suffixes = {"weight": "_w", "norm.weight": "_bn_s", "norm.bias": "_bn_b"}
    blob = r"(weight|norm\.weight|norm\.bias)"
    for key, value in state.items():
        key = key.removeprefix("backbone.bottom_up.")
        if stem := re.fullmatch(rf"stem\.conv1\.{blob}", key):
            name = "conv1_w" if stem[1] == "weight" else f"res_conv1{suffixes[stem[1]]}"
        elif block := re.fullmatch(rf"res(\d)\.(\d+)\.(conv1|conv2|shortcut)\.{blob}", key):
            name = f"res{block[1]}_{block[2]}_{parts[block[3]]}{suffixes[block[4]]}"
        else:
            continue
        blobs[name] = value.numpy()
    return blobs


def test_an_msra_imagenet_file_loads_and_one_of_another_width_is_refused(tmp_path):
    """Detectron2's Caffe2 conversion of a model-zoo ImageNet file (R-50.pkl's layout) loads
    into FrozenBN backbones; the same file of a narrower stem is refused, not half-loaded."""
    frozen = {"MODEL.RESNETS.NORM": "FrozenBN"}
    source = _model(**frozen).state_dict()
    for value in source.values():
        value.add_(torch.rand_like(value))  # FrozenBN's shifts start at 0, as a new model's
    path = tmp_path / "R-18.pkl"
    with open(path, "wb") as f:
        pickle.dump(_caffe2_names(source), f)
    model = _model(**frozen)
    HTCCheckpointer(model).load(str(path))
    for key in (
        "backbone.bottom_up.res3.1.conv2.weight",
        "backbone.bottom_up.stem.conv1.norm.bias",
    ):
        assert torch.equal(model.state_dict()[key], source[key]), key
    narrow = _model(**frozen, **{"MODEL.RESNETS.STEM_OUT_CHANNELS": 16}).state_dict()
    with open(path, "wb") as f:
        pickle.dump(_caffe2_names(narrow), f)
    with pytest.raises(ValueError, match="stem.conv1.weight: checkpoint \\(16, 3, 7, 7\\)"):
        HTCCheckpointer(_model(**frozen)).load(str(path))


def test_weights_of_another_model_are_refused(tmp_path):
    """Also in a file that Detectron2 matches by name heuristics (it only warns)."""
    path = tmp_path / "other.pth"
    torch.save({"model": {"encoder.layer1.weight": torch.zeros(3)}}, path)
    with pytest.raises(ValueError, match="none of this model's parameters"):
        HTCCheckpointer(_model()).load(str(path))
    path = heuristics_file(tmp_path / "other.pkl", {"encoder.layer1.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="none of this model's parameters"):
        HTCCheckpointer(_model(), skip_mismatched=True).load(path)


def test_missing_and_unexpected_keys_are_reported(tmp_path, caplog):
    state = _model().state_dict()
    state.pop("semantic_head.conv_logits.weight")
    state["semantic_head.extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save({"model": state}, path)
    with caplog.at_level(logging.WARNING):
        HTCCheckpointer(_model()).load(str(path))
    assert "semantic_head.conv_logits.weight" in caplog.text
    assert "semantic_head.extra.weight" in caplog.text


def test_a_checkpoint_with_the_semantic_embedding_loads_into_a_model_without(tmp_path, caplog):
    """A model whose semantic feature nothing fuses has no conv_embedding (those built before
    had one, untrained): a checkpoint with it loads, also for inference (``complete``), and
    the unused weights are noted."""
    state = _model().state_dict()
    path = tmp_path / "fused.pth"
    torch.save({"model": state}, path)
    model = _model(**{"MODEL.HTC.SEMANTIC_FUSION": []})
    with caplog.at_level(logging.WARNING):
        HTCCheckpointer(model, complete=True).load(str(path))
    assert "semantic_head.conv_embedding" in caplog.text
    loaded = model.semantic_head.conv_logits.weight
    assert torch.equal(loaded, state["semantic_head.conv_logits.weight"])


@pytest.mark.parametrize("entry", ["htc.demo", "htc.export"])
def test_inference_entries_check_the_weights_as_training_does(entry, tmp_path, capsys):
    """Both loaded MODEL.WEIGHTS with Detectron2's checkpointer (htc.demo through
    DefaultPredictor), which leaves a class layer of another shape at random with a warning: now
    refused as in training and htc.predict, and random weights are said."""
    path = tmp_path / "five_classes.pth"
    torch.save({"model": _model(**{"MODEL.ROI_HEADS.NUM_CLASSES": 5}).state_dict()}, path)
    image = tmp_path / "photo.png"
    Image.fromarray(np.full((64, 80, 3), 128, np.uint8)).save(image)

    def run(weights: str) -> None:
        if entry == "htc.export":
            cfg = tiny_cfg()
            cfg.MODEL.WEIGHTS = weights
            build_for_export(cfg, "torchscript")
            return
        opts = [str(v) for v in TINY_OPTS] + ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", weights]
        opts += ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "80"]
        config = str(CONFIGS / "htc_R_50_FPN_1x.yaml")
        output = str(tmp_path / "pictures")
        demo.main(
            ["--config-file", config, "--input", str(image), "--output", output, "--opts", *opts]
        )

    with pytest.raises(ValueError, match=r"12 parameters .* do not fit"):
        run(str(path))
    if entry == "htc.demo":  # beside it, images that htc.predict skips too are skipped by name
        Image.fromarray(np.full((64, 80), 40000, np.uint16)).save(tmp_path / "wide.png")
        (tmp_path / "cut.png").write_bytes(image.read_bytes()[:40])
        Image.fromarray(np.full((1, 400, 3), 128, np.uint8)).save(tmp_path / "thin.png")
        image = tmp_path
    run("")
    out, err = capsys.readouterr()
    assert "MODEL.WEIGHTS is empty: the model runs on randomly initialized weights" in out
    if entry == "htc.demo":
        assert re.search(r"wide.png: skipped, I(;16)? pixels: the model reads 8 bits", err)
        assert "cut.png: skipped, " in err
        assert "thin.png: skipped, 400x1 pixels resize to 80x0 (" in err
        assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == ["photo.png"]


@pytest.mark.parametrize(
    "name, content, named",
    [
        ("lfs.pth", b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n", "LFS"),
        ("page.pth", b"<!DOCTYPE html><html><body>Sign in</body></html>", "a web page"),
        ("notes.pkl", b"model weights are on the server", "neither a zip archive nor a pickle"),
        ("cut.pth", None, "cut short"),
    ],
)
def test_a_file_that_is_no_checkpoint_is_named(tmp_path, name, content, named):
    """torch said "KeyError: 105" for a text file, or advised weights_only=False (which runs the
    file's code) for a Git LFS pointer; neither named the file."""
    path = tmp_path / name
    if content is None:
        torch.save({"model": {"weight": torch.zeros(64, 64)}}, path)
        path.write_bytes(path.read_bytes()[:-200])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: .*{named}"):
        HTCCheckpointer(torch.nn.Linear(64, 64)).load(str(path))
