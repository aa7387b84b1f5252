"""train_net.py end to end on a small copy of the demo dataset: train, --eval-only, --resume."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT
from htc.demo_data import VERSION, generate_split

CONFIG = ROOT / "configs/demo/htc_R_18_FPN_demo.yaml"
SMALL = [
    "MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
    "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",  # an untrained model still predicts something
]  # fmt: skip


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A demo dataset of 6 train / 3 val images under its own DETECTRON2_DATASETS."""
    datasets = tmp_path_factory.mktemp("datasets")
    root = datasets / "htc_demo"
    generate_split(root, "train", 6, seed=0)
    generate_split(root, "val", 3, seed=1)
    (root / "VERSION").write_text(VERSION)
    return datasets


def run_train_net(workspace, *args):
    env = dict(os.environ, DETECTRON2_DATASETS=str(workspace))
    cmd = [sys.executable, str(ROOT / "train_net.py"), "--config-file", str(CONFIG), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _iterations(output):
    """Iterations of the training entries of metrics.json."""
    with open(output / "metrics.json") as f:
        entries = [json.loads(line) for line in f if line.strip()]
    return [e["iteration"] for e in entries if "total_loss" in e]


def test_train_eval_only_and_resume(workspace, tmp_path):
    output = tmp_path / "out"
    log = run_train_net(workspace, *SMALL, "SOLVER.MAX_ITER", "4", "OUTPUT_DIR", str(output))
    for name in ["model_final.pth", "model_0000001.pth", "last_checkpoint", "metrics.json"]:
        assert (output / name).is_file(), name
    assert list(output.glob("events.out.tfevents.*"))
    for task in ["bbox", "segm", "sem_seg"]:
        assert f"copypaste: Task: {task}" in log
    assert max(_iterations(output)) == 3

    log = run_train_net(
        workspace, "--eval-only", *SMALL, "MODEL.WEIGHTS", str(output / "model_final.pth"),
        "OUTPUT_DIR", str(tmp_path / "eval"),
    )  # fmt: skip
    for task in ["bbox", "segm", "sem_seg"]:
        assert f"copypaste: Task: {task}" in log

    # the README's htc.demo command on the trained checkpoint
    vis = tmp_path / "vis"
    demo = subprocess.run(
        [
            sys.executable, "-m", "htc.demo", "--config-file", str(CONFIG),
            "--input", str(workspace / "htc_demo" / "val"), "--output", str(vis),
            "--opts", "MODEL.WEIGHTS", str(output / "model_final.pth"),
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        ],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, DETECTRON2_DATASETS=str(workspace)),
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr[-2000:]
    pictures = sorted(vis.glob("*.png"))
    assert [p.name for p in pictures] == ["00001.png", "00002.png", "00003.png"]
    width, height = Image.open(pictures[0]).size
    assert (width, height) == (2 * 256, 256)  # instances | semantic map

    log = run_train_net(
        workspace, "--resume", *SMALL, "SOLVER.MAX_ITER", "6", "OUTPUT_DIR", str(output)
    )
    assert "Starting training from iteration 4" in log
    assert max(_iterations(output)) == 5


def test_custom_dataset_entry_script_of_the_readme(workspace, tmp_path):
    """The README's my_train.py pattern: register a COCO-format dataset, then train_net."""
    demo = workspace / "htc_demo"
    script = tmp_path / "my_train.py"
    script.write_text(
        "import train_net\n"
        "from htc import register_htc_instances\n\n"
        f"register_htc_instances('mine_train', '{demo}/train.json', '{demo}/train', "
        f"sem_seg_root='{demo}/train_sem')\n"
        f"register_htc_instances('mine_val', '{demo}/val.json', '{demo}/val', "
        f"sem_seg_root='{demo}/val_sem')\n\n"
        "if __name__ == '__main__':\n"
        "    train_net.invoke_main()\n"
    )
    cmd = [
        sys.executable, str(script), "--config-file", str(CONFIG), *SMALL,
        "DATASETS.TRAIN", "('mine_train',)", "DATASETS.TEST", "('mine_val',)",
        "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(tmp_path / "out"),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "Loaded 6 images in COCO format" in log and "copypaste: Task: segm" in log
