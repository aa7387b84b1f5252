"""Helpers shared by the benchmarks: the two models' configs, synthetic training batches, timing
and the training step."""

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from htc import add_htc_config

ROOT = Path(__file__).resolve().parents[1]

# the parts of a train step: the (file, function) pairs of Cascade's and HTC's code in each
PARTS = {
    "RoI sampling": [
        ("roi_heads.py", "label_and_sample_proposals"),
        ("roi_heads.py", "select_foreground_proposals"),
        ("cascade_rcnn.py", "_match_and_label_boxes"),
        ("sampling.py", "sample_rois"),
        ("sampling.py", "foreground_rois"),
    ],
    "box refinement between stages": [
        ("cascade_rcnn.py", "_create_proposals_from_boxes"),
        ("roi_heads.py", "_refine"),
    ],
    "RoI pooling": [("poolers.py", "forward"), ("poolers.py", "pooled")],
    "box losses": [("fast_rcnn.py", "losses")],
    "mask losses (targets included)": [
        ("mask_head.py", "mask_rcnn_loss"),
        ("mask_head.py", "mask_loss"),
    ],
    "RPN (proposals and losses)": [("rpn.py", "forward")],
}


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


def batch(num_images: int, size: int, with_sem: bool, boxes: int = 4):
    """``num_images`` square training images with ``boxes`` ground-truth boxes each (sides of
    10-40% of the image), their rectangle masks and, ``with_sem``, a semantic map."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(num_images):
        inst = Instances((size, size))
        xy = torch.rand(boxes, 2, generator=g) * size * 0.6
        wh = torch.rand(boxes, 2, generator=g) * size * 0.3 + size * 0.1
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, 80, (boxes,), generator=g)
        masks = torch.zeros(boxes, size, size, dtype=torch.bool)
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


def train_step(model, inputs, around_backward=contextlib.nullcontext) -> None:
    """One forward and backward pass in training mode, the backward within
    ``around_backward()``."""
    model.train()
    with EventStorage():
        losses = model(inputs)
    model.zero_grad()
    with around_backward():
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
