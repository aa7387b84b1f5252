"""Nothing lost: atomic checkpoint writes, and a training run killed with SIGKILL resumes."""

import random
import signal
import subprocess
import time

import pytest
import torch

from conftest import SMALL, child_env, train_net_command, training_iterations
from htc.checkpoint import atomic_open


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
