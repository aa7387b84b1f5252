"""Nothing lost: atomic checkpoint writes, and a training run killed with SIGKILL resumes."""

import logging
import random
import signal
import subprocess
import time

import pytest
import torch
from detectron2.modeling import build_model

from conftest import SMALL, child_env, tiny_cfg, train_net_command, training_iterations
from htc.checkpoint import HTCCheckpointer, atomic_open


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


def test_sigkill_at_a_random_point_then_resume(workspace, tmp_path):
    output = tmp_path / "out"
    env = child_env(DETECTRON2_DATASETS=str(workspace))
    opts = [
        *SMALL,
        "SOLVER.MAX_ITER",
        "12",
        "SOLVER.CHECKPOINT_PERIOD",
        "1",
        "OUTPUT_DIR",
        str(output),
    ]
    cmd = train_net_command(*opts)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tag = output / "last_checkpoint"
    deadline = time.time() + 300
    while not tag.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 2.0))  # somewhere in the middle of training and saving
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training ended before the kill"

    last = output / tag.read_text().strip()
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)  # complete file
    saved_iter = checkpoint["iteration"]

    result = subprocess.run(
        train_net_command("--resume", *opts), env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Starting training from iteration {saved_iter + 1}" in result.stdout + result.stderr
    assert (output / "model_final.pth").is_file()
    assert max(training_iterations(output)) == 11


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


def test_weights_of_another_model_are_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"encoder.layer1.weight": torch.zeros(3)}}, path)
    with pytest.raises(ValueError, match="none of this model's parameters"):
        HTCCheckpointer(_model()).load(str(path))


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
