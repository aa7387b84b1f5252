"""HTC R-50-FPN vs Detectron2's Cascade Mask R-CNN R-50-FPN, measured side by side in one run:
parameter counts, train-step time (forward + backward) and inference time on CPU.

    .venv/bin/python benchmarks/step_time.py [--size 320] [--images 2] [--repeats 3]

Random weights with BN (FrozenBN explodes with random weights); both models see the same
synthetic images and boxes; torch threads fixed. Prints a markdown table.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from htc import add_htc_config
from htc.roi_align import use_fast_roi_align

ROOT = Path(__file__).resolve().parents[1]


def htc_cfg(name: str):
    cfg = get_cfg()
    add_htc_config(cfg)
    cfg.merge_from_file(str(ROOT / "configs" / name))
    return cfg


def cascade_cfg():
    cfg = get_cfg()
    add_htc_config(cfg)  # harmless extra keys; lets one loop build both
    cfg.merge_from_file(model_zoo.get_config_file("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml"))
    return cfg


def batch(num_images: int, size: int, with_sem: bool):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(num_images):
        inst = Instances((size, size))
        xy = torch.rand(4, 2, generator=g) * size * 0.6
        wh = torch.rand(4, 2, generator=g) * size * 0.3 + size * 0.1
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, 80, (4,), generator=g)
        masks = torch.zeros(4, size, size, dtype=torch.bool)
        for m, b in zip(masks, inst.gt_boxes.tensor.long()):
            m[b[1] : b[3], b[0] : b[2]] = True
        inst.gt_masks = BitMasks(masks)
        x = {"image": torch.randint(0, 255, (3, size, size), generator=g, dtype=torch.uint8)}
        x.update(instances=inst, height=size, width=size)
        if with_sem:
            x["sem_seg"] = torch.randint(0, 183, (size, size), generator=g)
        out.append(x)
    return out


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step(model, inputs) -> None:
    """One forward and backward pass in training mode."""
    model.train()
    with EventStorage():
        losses = model(inputs)
    model.zero_grad()
    sum(losses.values()).backward()


def arguments(description: str):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def measure(cfg, args, with_sem: bool, sparse_grad: bool = False) -> dict:
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.001  # HTC's; both then keep 100 detections
    torch.manual_seed(0)
    model = build_model(cfg)
    if sparse_grad:
        use_fast_roi_align(model.roi_heads.box_pooler)
        use_fast_roi_align(model.roi_heads.mask_pooler)
    inputs = batch(args.images, args.size, with_sem)
    detections = []

    def inference():
        model.eval()
        with torch.no_grad():
            detections.append(sum(len(x["instances"]) for x in model(inputs)))

    frozen = sum(b.numel() for n, b in model.named_buffers() if n.endswith((".weight", ".bias")))
    return {
        "params": sum(p.numel() for p in model.parameters()) + frozen,
        "train": median_time(lambda: train_step(model, inputs), args.repeats),
        "infer": median_time(inference, args.repeats),
        "detections": detections[-1],
    }


def main():
    args = arguments(__doc__.splitlines()[0])
    rows = {
        "Cascade Mask R-CNN R50-FPN (Detectron2)": measure(cascade_cfg(), args, False),
        "Cascade Mask R-CNN R50-FPN + our RoIAlign backward": measure(
            cascade_cfg(), args, False, sparse_grad=True
        ),
        "HTC R50-FPN (htc_R_50_FPN_1x)": measure(htc_cfg("htc_R_50_FPN_1x.yaml"), args, True),
    }
    base = next(iter(rows.values()))
    print(f"{args.images} images {args.size}px, {args.threads} threads, median of {args.repeats}")
    print("| model | parameters | train step (s) | ratio | inference (s) | ratio | detections |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['params']:,} | {r['train']:.2f} | {r['train'] / base['train']:.2f} "
            f"| {r['infer']:.2f} | {r['infer'] / base['infer']:.2f} | {r['detections']} |"
        )


if __name__ == "__main__":
    main()
