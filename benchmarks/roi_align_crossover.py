"""RoIAlign per call of the ROI heads, by each value of MODEL.HTC.ROI_ALIGN: "torchvision"
(Detectron2's ROIAlign), "triton" (htc.layers' Triton kernels on CUDA; torchvision's on CPU)
and "auto" (the per-call choice: on CUDA one of the two; on CPU the parallel forward and sparse
backward), on the calls that HTC makes at 800x1344: the box
and mask poolers (P2-P5) and the semantic poolers (stride 8, pooled to 7x7 for the box branch),
at the RoI counts of inference (1 image) and training (2 and 8 images), forward alone and
forward + backward, fp32 and under fp16 autocast. Each call is timed alone: the Triton route
copies the levels to its layout in every call (in the ROI heads' forward, that copy is shared
by all calls). Medians of ``--repeats`` runs after a warm-up, the two kernels in turns.

    .venv/bin/python benchmarks/roi_align_crossover.py [--device cpu|cuda] [--repeats 10]
        [--scale 1.0] [--json FILE]
"""

import argparse
import json
from pathlib import Path
from typing import Callable, List, Tuple

import torch
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes
from speed import alternate, medians

from htc.poolers import HTCROIPooler

KERNELS = ("torchvision", "triton", "auto")
# call -> (levels' strides, output size, pooled size or None)
CALLS = {
    "box": ((4, 8, 16, 32), 7, None),
    "mask": ((4, 8, 16, 32), 14, None),
    "semantic for boxes": ((8,), 14, 7),
    "semantic for masks": ((8,), 14, None),
}
# (images, RoIs per image, mode) per call: inference of one image; training at 2 and 8 images
# (512 sampled RoIs per image for boxes, positives for masks)
COUNTS = {
    "box": [(1, 1000, "infer"), (2, 512, "train"), (8, 512, "train")],
    "mask": [(1, 100, "infer"), (2, 32, "train"), (2, 128, "train"), (8, 64, "train")],
}


def feature_levels(images: int, strides, scale: float, device: str, g) -> List[torch.Tensor]:
    height, width = int(800 * scale), int(1344 * scale)
    return [
        torch.randn(images, 256, height // s, width // s, generator=g).to(device) for s in strides
    ]


def random_boxes(images: int, per_image: int, scale: float, device: str, g) -> List[Boxes]:
    """COCO-like boxes: sizes from 8 px to most of the image, small ones most often."""
    out = []
    for _ in range(images):
        xy = torch.rand(per_image, 2, generator=g) * torch.tensor([1300.0, 760.0]) * scale
        wh = (torch.rand(per_image, 2, generator=g) ** 2 * 600 + 8) * scale
        out.append(Boxes(torch.cat([xy, xy + wh], dim=1).to(device)))
    return out


def pooler(call: str, kernel: str) -> HTCROIPooler:
    strides, size, _ = CALLS[call]
    base = ROIPooler((size, size), tuple(1 / s for s in strides), 0, "ROIAlignV2")
    return HTCROIPooler.from_pooler(base, kernel)


def run_fn(call: str, kernel: str, features, boxes, mode: str, dtype) -> Callable[[], object]:
    """One call of the pooler as the ROI heads make it (under autocast for half precision)."""
    module = pooler(call, kernel)
    pooled = CALLS[call][2]
    # under autocast the FPN's features are in the autocast dtype
    leaves = [f.detach().to(dtype or f.dtype).requires_grad_(mode == "train") for f in features]

    def forward():
        if pooled:
            return module.pooled(leaves, boxes, (pooled, pooled))
        return module(leaves, boxes)

    def run():
        device = features[0].device.type
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            if mode == "infer":
                with torch.no_grad():
                    return forward()
            out = forward()
        return torch.autograd.grad(out.float().sum(), leaves)

    return run


def cases() -> List[Tuple[str, int, int, str]]:
    """(call, images, RoIs per image, mode): the semantic calls at the box and mask counts."""
    out = []
    for call in CALLS:
        counts = COUNTS["mask" if "mask" in call else "box"]
        out += [(call, images, per_image, mode) for images, per_image, mode in counts]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--scale", type=float, default=1.0, help="of the 800x1344 input (CPU)")
    parser.add_argument("--precisions", default="fp32,fp16")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    dtypes = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    rows = []
    print(
        "| call | images | RoIs | mode | precision | torchvision (ms) | triton (ms) | auto (ms) "
        "| triton speed-up | auto / the faster |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for call, images, per_image, mode in cases():
        g = torch.Generator().manual_seed(0)
        features = feature_levels(images, CALLS[call][0], args.scale, args.device, g)
        boxes = random_boxes(images, per_image, args.scale, args.device, g)
        for precision in args.precisions.split(","):
            dtype = dtypes[precision]
            fns = {k: run_fn(call, k, features, boxes, mode, dtype) for k in KERNELS}
            t = medians(alternate(fns, args.repeats, args.device))
            row = dict(call=call, images=images, rois=images * per_image, mode=mode,
                       precision=precision, **{k: v * 1e3 for k, v in t.items()})  # fmt: skip
            rows.append(row)
            print(
                f"| {call} | {images} | {row['rois']} | {mode} | {precision} "
                f"| {row['torchvision']:.3f} | {row['triton']:.3f} | {row['auto']:.3f} "
                f"| {row['torchvision'] / row['triton']:.2f}x "
                f"| {row['auto'] / min(row['torchvision'], row['triton']):.2f} |",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
