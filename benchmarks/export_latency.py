"""Latency of the exported HTC R-50-FPN: eager PyTorch, TorchScript and ONNX in onnxruntime (CPU),
side by side in one run on the same image and weights, with their agreement.

    .venv/bin/python benchmarks/export_latency.py [--size 800x1333] [--threads 2] [--repeats 3]

Random weights with BN; the class logits are scaled down (as in tests/test_export.py): random
ones are so large that every score is 1.0, and ties would decide the order of detections. The
times are of the model's raw outputs (boxes, scores, classes, 28x28 mask probabilities, stride-8
semantic logits), without htc.export.postprocess.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import htc_cfg, median_time
from detectron2.modeling import build_model

from htc.export import compare, export, load_exported, raw_inference


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="800x1333")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.size.split("x"))
    cfg = htc_cfg("htc_R_50_FPN_1x.yaml")
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS, cfg.MODEL.RESNETS.NORM = "cpu", "", "BN"
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for predictor in model.roi_heads.box_predictor:
            predictor.cls_score.weight.mul_(0.1)
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, height, width), generator=g).float()

    def eager():
        with torch.no_grad():
            return raw_inference(model, [{"image": image}])

    reference = eager()
    rows = [("PyTorch eager", median_time(eager, args.repeats), "-")]
    with tempfile.TemporaryDirectory() as folder:
        for fmt, name in (("torchscript", "TorchScript"), ("onnx", "onnxruntime (CPU)")):
            start = time.perf_counter()
            run = load_exported(export(model, image, fmt, Path(folder) / fmt))
            exported = time.perf_counter() - start
            seconds = median_time(lambda run=run: run(image), args.repeats)
            rows.append((f"{name} (export + load {exported:.0f} s)", seconds,
                         compare(run(image), reference)))  # fmt: skip
    print(f"HTC R-50-FPN, {height}x{width}, {args.threads} threads, median of {args.repeats}\n")
    print("| runtime | latency (s) | ratio to eager | agreement with eager |")
    print("|---|---|---|---|")
    for name, seconds, agreement in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / rows[0][1]:.2f} | {agreement} |")


if __name__ == "__main__":
    main()
