"""FLOPs of one train step (forward and backward), HTC R50-FPN next to Detectron2's Cascade Mask
R-CNN R50-FPN, on the batches of ``speed.py``'s train rows: square images with 4 ground-truth
boxes each (the benchmark's batch), with 20 (a COCO-like count of positives) and with 64, and the
positive RoIs that each stage samples, per image. HTC trains a mask head on each stage's
positives, and its mask information flow runs the earlier stages' heads again, where Cascade
trains one mask head on the last stage's, so the ratio grows with the positives.

Counted by ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add is two flops;
RoIAlign, NMS and element-wise ops are not counted), on CPU: the count does not depend on the
device. Both models pool with torchvision's RoIAlign (MODEL.HTC.ROI_ALIGN "torchvision"): the
counter would take the CPU kernel's sparse-matrix backward for a dense product. Random weights
with zeroed box regression, as in ``speed.py``: the proposals are anchors, which rarely overlap
a ground-truth box well, so the positives are about the ground-truth boxes themselves.

    .venv/bin/python benchmarks/train_flops.py [--size 800] [--images 2,8] [--boxes 4,20,64]
"""

import argparse
from typing import Dict

import torch
from detectron2.utils.events import EventStorage
from speed import build, train_inputs
from torch.utils.flop_counter import FlopCounterMode

MODELS = ("cascade", "htc")


def count(name: str, size: int, images: int, boxes: int) -> Dict[str, float]:
    """GFLOPs of the forward and of the backward of one train step, and the positives per image
    of each sampling (EventStorage's ``num_fg_samples`` scalars, by name)."""
    model = build(name, "cpu", 100, roi_align="torchvision")
    inputs = train_inputs(name, "cpu", size, images, boxes)
    model.train()
    with EventStorage() as storage:
        with FlopCounterMode(display=False) as forward:
            losses = model(inputs)
        positives = {
            key: value for key, (value, _) in storage.latest().items() if "num_fg_samples" in key
        }
    model.zero_grad()
    with FlopCounterMode(display=False) as backward:
        sum(losses.values()).backward()
    out = {"forward": forward.get_total_flops() / 1e9, "backward": backward.get_total_flops() / 1e9}
    return {**out, **positives}


def sampling(key: str) -> str:
    """ "stage1/mask" for "stage1/mask/roi_head/num_fg_samples"; Cascade's first: "stage0"."""
    return key.removesuffix("num_fg_samples").removesuffix("roi_head/").rstrip("/") or "stage0"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=800, help="square images")
    parser.add_argument("--images", default="2,8", help="images per step, comma-separated")
    parser.add_argument("--boxes", default="4,20,64", help="ground-truth boxes per image")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"One train step on {args.size}x{args.size} images: GFLOPs (forward + backward)\n")
    print("| images x boxes | Cascade | HTC | FLOP ratio | Cascade positives | HTC positives |")
    print("|---|---|---|---|---|---|")
    for images in map(int, args.images.split(",")):
        for boxes in map(int, args.boxes.split(",")):
            runs = {name: count(name, args.size, images, boxes) for name in MODELS}
            total = {n: r["forward"] + r["backward"] for n, r in runs.items()}
            cells = [f"{total[n]:.0f} ({runs[n]['forward']:.0f} + {runs[n]['backward']:.0f})"
                     for n in MODELS]  # fmt: skip
            positives = [", ".join(f"{sampling(k)}: {v:.0f}" for k, v in sorted(runs[n].items())
                                   if "num_fg" in k) for n in MODELS]  # fmt: skip
            ratio = total["htc"] / total["cascade"]
            print(f"| {images} x {boxes} | {cells[0]} | {cells[1]} | {ratio:.2f} "
                  f"| {positives[0]} | {positives[1]} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
