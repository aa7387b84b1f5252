"""Dev only: one HTC train step on AutoROIAlign's CUDA route (the Triton kernels, every pooler,
the shared level buffers) run on CPU in Triton's interpreter, next to the CPU route and to
Detectron2's RoIAlign: the losses and, per parameter, the largest gradient difference relative
to that gradient's largest entry. The tests check the kernels one by one; this checks the
whole model on them where no GPU is lent. The Triton kernels return channels-last RoI features,
and CPU convolutions round channels-last inputs differently: a fourth run, the CPU route with
its pooled features made channels-last, is the CUDA route's baseline (then only the RoIAlign
backward's rounding separates them, in the FPN and backbone). The tests' tiny model
(ResNet-18 with BN, 32-channel FPN); about 4.5 minutes at the defaults on 2 CPU cores.

    .venv/bin/python dev/triton_route_step.py [--size 64] [--rois 16]
"""

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Dict, Tuple

import torch

if not torch.cuda.is_available():  # read by Triton when imported (Detectron2's imports do)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from detectron2.modeling import build_model  # noqa: E402

import htc.layers.roi_align as kernels  # noqa: E402
from htc.poolers import HTCROIPooler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_batch, tiny_cfg, train_losses  # noqa: E402

Gradients = Dict[str, torch.Tensor]


def step(model, batch) -> Tuple[Dict[str, float], Gradients]:
    """The losses and the gradients of one train step (the same seed for every call)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    losses = train_losses(model, batch)
    grads = torch.autograd.grad(sum(losses.values()), [p for _, p in named], allow_unused=True)
    values = {k: float(v.detach()) for k, v in losses.items()}
    return values, {n: g for (n, _), g in zip(named, grads) if g is not None}


def worst(got: Gradients, want: Gradients, top: int = 3) -> list:
    """The ``top`` parameters whose gradients differ most, relative to the largest entry."""
    assert got.keys() == want.keys(), "the routes reach different parameters"
    rows = [
        (float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp(min=1e-30)), k)
        for k in want
    ]
    return sorted(rows, reverse=True)[:top]


def channels_last_step(model, batch) -> Tuple[Dict[str, float], Gradients]:
    """:func:`step` with the poolers' outputs made channels-last, as the Triton kernels give
    them (the same values in another memory layout)."""
    forward, pooled = HTCROIPooler.forward, HTCROIPooler.pooled
    layout = torch.channels_last
    HTCROIPooler.forward = lambda *a: forward(*a).contiguous(memory_format=layout)
    HTCROIPooler.pooled = lambda *a: pooled(*a).contiguous(memory_format=layout)
    try:
        return step(model, batch)
    finally:
        HTCROIPooler.forward, HTCROIPooler.pooled = forward, pooled


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("TRITON_INTERPRET=1 is needed: this runs the Triton kernels on CPU tensors")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="square images, 2 of them")
    parser.add_argument("--rois", type=int, default=16, help="sampled RoIs per image")
    args = parser.parse_args()
    cfg = tiny_cfg()
    cfg.merge_from_list(["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", args.rois])
    batch = make_batch(size=args.size)
    torch.manual_seed(0)
    model = build_model(cfg)
    results = {"CPU route": step(model, batch)}
    cfg.MODEL.HTC.ROI_ALIGN = "torchvision"
    reference = build_model(cfg)
    reference.load_state_dict(model.state_dict())
    results["Detectron2's RoIAlign"] = step(reference, batch)
    results["CPU route, channels-last"] = channels_last_step(model, batch)
    kernels.TRITON_DEVICES = ("cpu",)
    cfg.MODEL.HTC.ROI_ALIGN = "triton"  # every call, where "auto" would pick per shape
    triton_model = build_model(cfg)
    triton_model.load_state_dict(model.state_dict())
    start = time.perf_counter()
    results["CUDA route (interpreted)"] = step(triton_model, batch)
    print(f"CUDA route step: {time.perf_counter() - start:.0f} s")
    for name, (losses, _) in results.items():
        print(f"{name:26s}", " ".join(f"{k}={v:.7g}" for k, v in losses.items()))
    pairs = [
        ("Detectron2's RoIAlign", "CPU route"),
        ("CPU route, channels-last", "CPU route"),
        ("CUDA route (interpreted)", "CPU route"),
        ("CUDA route (interpreted)", "CPU route, channels-last"),
    ]
    for got, want in pairs:
        print(f"gradients, {got} vs {want}, worst:", worst(results[got][1], results[want][1]))


if __name__ == "__main__":
    main()
