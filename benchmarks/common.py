"""Helpers shared by the benchmarks: the two models' configs, synthetic training batches, timing
and the training step."""

import argparse
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
