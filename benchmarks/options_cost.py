"""What each extension option costs on CPU: train step and inference time of HTC R-50-FPN with
the option, as a ratio to the plain model, measured side by side in one run.

    .venv/bin/python benchmarks/options_cost.py [--size 320] [--repeats 3]

Random weights with BN (GN/SyncBN rows replace it), 2 images, torch threads fixed, the
semantic branch on. TTA and Soft-NMS change inference only.
"""

import time
from pathlib import Path

import torch
from common import arguments, batch, htc_cfg, median_time, train_step
from detectron2.modeling import build_model

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

    def inference():
        model.eval()
        with torch.no_grad():
            predictor([{k: x[k] for k in ("image", "height", "width")} for x in inputs])

    train = None
    if name not in INFERENCE_ONLY:
        train = median_time(lambda: train_step(model, inputs), args.repeats)
    return train, median_time(inference, args.repeats)


def main():
    args = arguments(__doc__.splitlines()[0])
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
