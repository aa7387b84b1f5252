"""What each extension option costs on CPU: train step and inference time of HTC R-50-FPN with
the option, as a ratio to the plain model, measured side by side in one run.

    .venv/bin/python benchmarks/options_cost.py [--size 320] [--repeats 2]

Random weights with BN (GN/SyncBN rows replace it), 2 images, torch threads fixed, the
semantic branch on. TTA and Soft-NMS change inference only.
"""

import argparse
import time
from pathlib import Path

import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from step_time import batch, htc_cfg, median_time

from htc.tta import HybridTaskCascadeWithTTA

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NORMS = [
    "MODEL.RESNETS.NORM",
    "MODEL.FPN.NORM",
    "MODEL.ROI_MASK_HEAD.NORM",
    "MODEL.SEM_SEG_HEAD.NORM",
]
OPTIONS = {
    "plain (BN)": [],
    "GN (backbone, FPN, mask and semantic heads)": [x for k in NORMS for x in (k, "GN")],
    "SyncBN (1 process)": [x for k in NORMS for x in (k, "SyncBN")],
    "DCN v1 c3-c5": ["MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, True, True, True]],
    "DCN v2 c3-c5": ["MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, True, True, True],
                     "MODEL.RESNETS.DEFORM_MODULATED", True],
    "ResNeXt-101 32x4d": ["MODEL.RESNETS.DEPTH", 101, "MODEL.RESNETS.NUM_GROUPS", 32,
                          "MODEL.RESNETS.WIDTH_PER_GROUP", 4],
    "Soft-NMS (gaussian)": ["MODEL.HTC.TEST_NMS", "soft_gaussian"],
    "TTA: 2 scales x flip": ["TEST.AUG.MIN_SIZES", (320, 400), "TEST.AUG.MAX_SIZE", 1000],
}  # fmt: skip
INFERENCE_ONLY = {"Soft-NMS (gaussian)", "TTA: 2 scales x flip"}


def measure(name, opts, args):
    cfg = htc_cfg("htc_R_50_FPN_1x.yaml")
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.NORM", "BN"])
    cfg.merge_from_list(opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    inputs = batch(args.images, args.size, True)
    predictor = HybridTaskCascadeWithTTA(cfg, model) if name.startswith("TTA") else model

    def train_step():
        model.train()
        with EventStorage():
            losses = model(inputs)
        model.zero_grad()
        sum(losses.values()).backward()

    def inference():
        model.eval()
        with torch.no_grad():
            predictor([{k: x[k] for k in ("image", "height", "width")} for x in inputs])

    train = None if name in INFERENCE_ONLY else median_time(train_step, args.repeats)
    return train, median_time(inference, args.repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    rows = {name: measure(name, opts, args) for name, opts in OPTIONS.items()}
    base_train, base_infer = rows["plain (BN)"]
    print("| option | train step (s) | ratio | inference (s) | ratio |")
    print("|---|---|---|---|---|")
    for name, (train, infer) in rows.items():
        train_cells = "| - | - " if train is None else f"| {train:.2f} | {train / base_train:.2f} "
        print(f"| {name} {train_cells}| {infer:.2f} | {infer / base_infer:.2f} |")
    print(
        f"({args.images} images {args.size}px, {args.threads} threads, {time.time() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
