"""Distributed data parallel training with 2 CPU processes (gloo)."""

import json
import subprocess
import sys

import torch

from conftest import DEMO_CONFIG, ROOT, SMALL, child_env
from htc.data.demo_data import generate_split


def test_two_processes_train_to_identical_weights_using_every_parameter(tmp_path):
    data = tmp_path / "data"
    generate_split(data, "train", 6, seed=0)
    coco = json.loads((data / "train.json").read_text())
    empty = {image["id"] for image in coco["images"][::2]}  # half the images: no positive RoI
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] not in empty]
    (data / "train.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(ROOT / "tests/ddp_job.py"), "--config-file", str(DEMO_CONFIG),
        "--num-gpus", "2", "--data", str(data),
        *SMALL,
        "DATASETS.TRAIN", "('ddp_train',)", "DATASETS.TEST", "()",
        "MODEL.HTC.PANOPTIC_ON", "False",  # panoptic output names DATASETS.TEST[0]'s categories
        "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False",
        "MODEL.RESNETS.NORM", "naiveSyncBN",  # batch statistics shared, so buffers agree too
        "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "100", "OUTPUT_DIR", str(out),
    ]  # fmt: skip
    env = child_env(CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in reports] == [2, 2]
    steps = [step for report in reports for step in report["steps"]]
    assert len(steps) == 8
    assert all(step["no_grad"] == [] for step in steps), steps
    assert any(step["gt_instances"] == 0 for step in steps)  # a batch without positives
    assert any(step["gt_instances"] > 0 for step in steps)

    weights = [torch.load(out / f"rank{r}.pth", weights_only=True) for r in range(2)]
    assert weights[0].keys() == weights[1].keys()
    different = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    assert different == []
    start = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert all(torch.equal(start[k], weights[0]["module." + k]) for k in start)
