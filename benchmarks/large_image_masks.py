"""Memory of the instance masks of a 12-megapixel photo (4000x3000) with 100 detections, with
MODEL.HTC.MASK_OUTPUT "bitmask" (Detectron2's full-size masks) and "rle", each mode measured in
a fresh process (peak RSS) on the demo's small HTC with random weights; the semantic output is
off (at this size it would add K x 12 M floats).

    .venv/bin/python benchmarks/large_image_masks.py
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from common import ROOT, htc_cfg
from detectron2.modeling import build_model

SIZE = (3000, 4000)  # height, width of the photo; the model sees it at 600x800


def measure(mode: str) -> dict:
    cfg = htc_cfg("demo/htc_R_18_FPN_demo.yaml")
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.HTC.MASK_OUTPUT", mode, "MODEL.HTC.SEMANTIC_OUTPUT", "False",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "100",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "1000",
    ])  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = torch.randint(0, 255, (3, 600, 800), dtype=torch.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    with torch.no_grad():
        (out,) = model([{"image": image, "height": SIZE[0], "width": SIZE[1]}])
    seconds = time.perf_counter() - start
    inst = out["instances"]
    if mode == "bitmask":
        size = inst.pred_masks.numel() * inst.pred_masks.element_size()
    else:
        size = sum(len(r["counts"]) for r in inst.pred_masks_rle)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(mode=mode, detections=len(inst), mask_mb=size / 2**20, peak_mb=peak,
                growth_mb=peak - before, seconds=seconds)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", help="measure one mode in this process (internal)")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode)))
        return
    print("| MASK_OUTPUT | detections | masks (MB) | peak RSS (MB) | RSS growth in inference (MB) "
          "| inference (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for mode in ("bitmask", "rle"):
        cmd = [sys.executable, __file__, "--mode", mode]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        r = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"| {r['mode']} | {r['detections']} | {r['mask_mb']:.1f} | {r['peak_mb']:.0f} | "
              f"{r['growth_mb']:.0f} | {r['seconds']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
