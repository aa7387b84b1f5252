"""The mask heads computing each RoI's class alone beside every class's logits, then picking one
(as Detectron2's ``mask_rcnn_inference`` and ``mask_rcnn_loss`` do, and HTC did before): peak
memory and time of the test-time masks of the 3 stages, and of a train step's mask loss of one
stage (forward and backward), for COCO (80 classes) and LVIS v1 (1203 classes).

    .venv/bin/python benchmarks/mask_classes.py [--device cpu|cuda] [--repeats 3]
        [--rows coco lvis]

The ROI heads are htc_R_50_FPN_1x's (random weights) with the row's number of classes, on
random FPN and semantic features of an 800x1333 image: at test time on the row's number of
detections (COCO 100, LVIS 300, as their configs keep), in training on 256 foreground RoIs
(a batch of 2 images x 128, the most that 512 RoIs at 25 % positive give) with their GT masks.
fp32 matmuls and convolutions are strict on CUDA (TF32 in cuDNN's convolution but not in the
matmul would compare unlike arithmetic). Peak memory is measured as in ``matching_memory.py``:
a fresh process per method on CPU.
"""

import argparse
import json
from typing import Callable, Dict, List, Tuple

import torch
from common import htc_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from speed import alternate, fresh_process_peak_mb, medians, peak_memory_mb

from htc import SEMANTIC_FEATURE
from htc.mask_head import mask_loss
from htc.roi_heads import HybridTaskCascadeROIHeads

ROWS = {"coco": (80, 100), "lvis": (1203, 300)}  # classes, detections
METHODS = ("every class", "its class")
STEPS = ("inference", "train")
TRAIN_ROIS = 2 * 128
HEIGHT, WIDTH = 800, 1344


def roi_heads(classes: int, device: str) -> HybridTaskCascadeROIHeads:
    cfg = htc_cfg("htc_R_50_FPN_1x.yaml")
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = classes
    torch.manual_seed(0)
    return build_model(cfg).roi_heads


def inputs(rois: int, classes: int, device: str, masks: bool) -> Tuple[dict, Instances]:
    """Random features (p2-p5 and the semantic feature, 256 channels) and ``rois`` boxes of
    16-400 px in one image with their classes, and with ``masks`` their GT masks (rectangles)."""
    g = torch.Generator().manual_seed(0)
    features = {
        f"p{level}": torch.randn(1, 256, HEIGHT >> level, WIDTH >> level, generator=g)
        for level in (2, 3, 4, 5)
    }
    features[SEMANTIC_FEATURE] = torch.randn(1, 256, HEIGHT // 8, WIDTH // 8, generator=g)
    xy = torch.rand(rois, 2, generator=g) * torch.tensor([WIDTH - 400.0, HEIGHT - 400.0])
    boxes = torch.cat([xy, xy + 16 + torch.rand(rois, 2, generator=g) * 384], dim=1)
    labels = torch.randint(0, classes, (rois,), generator=g)
    instances = Instances((HEIGHT, WIDTH), proposal_boxes=Boxes(boxes), gt_classes=labels)
    if masks:
        bits = torch.zeros(rois, HEIGHT, WIDTH, dtype=torch.bool)
        for mask, (x0, y0, x1, y1) in zip(bits, boxes.int().tolist()):
            mask[y0 + (y1 - y0) // 4 : y1, x0:x1] = True
        instances.gt_masks = BitMasks(bits)
    features = {k: v.to(device) for k, v in features.items()}
    return features, instances.to(device)


def test_masks(
    heads: HybridTaskCascadeROIHeads, features: dict, instances: Instances, name: str
) -> torch.Tensor:
    """(R, 1, 28, 28) the mean of the 3 stages' sigmoid masks of each RoI's class."""
    boxes, classes = [instances.proposal_boxes], instances.gt_classes
    if name == "its class":
        return torch.stack(heads.stage_mask_probabilities(features, boxes, classes)).mean(0)
    every = heads._run_mask_heads(features, boxes, 2, keep_all=True)
    rows = torch.arange(len(classes), device=classes.device)
    return torch.stack([x[rows, classes][:, None].sigmoid() for x in every]).mean(0)


def train_mask_loss(
    heads: HybridTaskCascadeROIHeads, features: dict, instances: Instances, name: str
) -> torch.Tensor:
    """The last stage's mask loss (its mask information flow included), then its backward."""
    classes = instances.gt_classes if name == "its class" else None
    (logits,) = heads._run_mask_heads(features, [instances.proposal_boxes], 2, False, classes)
    loss, _ = mask_loss(logits, [instances])
    loss.backward()
    return loss.detach()


def method(step: str, row: str, name: str, device: str) -> Callable[[], torch.Tensor]:
    classes, detections = ROWS[row]
    heads = roi_heads(classes, device)
    if step == "inference":
        heads.eval()
        features, instances = inputs(detections, classes, device, masks=False)
        return torch.no_grad()(lambda: test_masks(heads, features, instances, name))
    features, instances = inputs(TRAIN_ROIS, classes, device, masks=True)
    return lambda: train_mask_loss(heads, features, instances, name)


def measured_peak(args, step: str, row: str, name: str) -> float:
    """Memory one call adds at its peak after a warm-up call, in a fresh process on CPU."""
    if args.device == "cuda":
        fn = method(step, row, name, args.device)
        fn()
        return peak_memory_mb(fn, args.device)
    return fresh_process_peak_mb(__file__, "--peak-of", step, row, name)


def measure(args, step: str, row: str) -> Dict[str, Tuple[float, float]]:
    """Per method (median seconds, peak MB); the methods' outputs must agree."""
    fns = {name: method(step, row, name, args.device) for name in METHODS}
    want, got = (fns[name]() for name in METHODS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    times = medians(alternate(fns, args.repeats, args.device))
    return {name: (times[name], measured_peak(args, step, row, name)) for name in METHODS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--peak-of", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    if args.peak_of:
        fn = method(*args.peak_of, "cpu")
        fn()
        print(json.dumps({"peak_mb": peak_memory_mb(fn, "cpu")}))
        return
    results: List[tuple] = [
        (step, row, measure(args, step, row)) for step in STEPS for row in args.rows
    ]
    print(f"{args.device}, {args.threads} threads, median of {args.repeats}")
    print("| step | classes, RoIs | every class: s / MB | its class: s / MB | time | memory |")
    print("|---|---|---|---|---|---|")
    for step, row, r in results:
        classes, detections = ROWS[row]
        rois = detections if step == "inference" else TRAIN_ROIS
        (t0, m0), (t1, m1) = r["every class"], r["its class"]
        print(
            f"| {step} | {row} {classes}, {rois} | {t0:.2f} / {m0:.0f} | {t1:.2f} / {m1:.0f} "
            f"| {t1 / t0:.2f}x | {m1 / m0:.2f}x |"
        )


if __name__ == "__main__":
    main()
