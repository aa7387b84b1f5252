"""``torch.compile`` of the whole HTC R-50-FPN model beside eager: the first calls (compiling),
then inference and train steps taken in turns, and how far the compiled outputs are from eager's.

    .venv/bin/python benchmarks/compile_speed.py [--device cpu|cuda] [--size 320]
        [--backend inductor] [--repeats 5] [--threads 2]

The model is ``speed.build("htc")`` (random weights, BN); the train batch is 2 images of
``--size`` pixels with 4 boxes each. Inductor draws random numbers its own way unless told to
fall back to PyTorch's: the RoI sampling draws them, so ``fallback_random`` is set for the
comparison with eager. Detection models break graphs wherever a shape depends on the data (NMS,
sampling, the matches): the graphs and breaks that Dynamo counted are reported.
"""

import argparse
import copy
import json
import statistics
from typing import Callable, Dict

import torch
import torch._dynamo.utils
import torch._inductor.config
from common import batch, train_step
from detectron2.structures import pairwise_iou
from detectron2.utils.events import EventStorage
from speed import _to, alternate, build, sync, test_input, timed

TRAIN_IMAGES = 2


def differences(eager, compiled, inputs, device: str) -> Dict[str, float]:
    """How far the compiled model's outputs are from eager's (same weights, same random draws):
    each loss's difference, the largest of the gradients, and of each eager detection the
    best IoU with a compiled detection of its class (the order of near-equal scores may differ)."""
    losses, grads = [], []
    for model in (eager, compiled):
        model.train()
        torch.manual_seed(0)
        with EventStorage():
            loss = model(inputs["train"])
        model.zero_grad()
        sum(loss.values()).backward()
        losses.append({k: v.item() for k, v in loss.items()})
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
    with torch.no_grad():
        want, got = (m.eval()(inputs["test"])[0]["instances"] for m in (eager, compiled))
    sync(device)
    iou = pairwise_iou(want.pred_boxes, got.pred_boxes)
    iou[want.pred_classes[:, None] != got.pred_classes[None, :]] = 0
    return {
        "losses": {k: abs(losses[0][k] - losses[1][k]) for k in losses[0]},
        "gradients": max(float((a - b).abs().max()) for a, b in zip(*grads)),
        "largest gradient": max(float(g.abs().max()) for g in grads[0]),
        "detections": [len(want), len(got)],
        "worst best IoU": float(iou.max(dim=1).values.min()) if len(want) and len(got) else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=320, help="square images")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._inductor.config.fallback_random = True
    device = args.device
    eager = build("htc", device, 100)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=args.backend)
    inputs = {
        "test": test_input(args.size, args.size, device),
        "train": [_to(x, device) for x in batch(TRAIN_IMAGES, args.size, with_sem=True)],
    }

    def infer(model) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model.eval()(inputs["test"])

        return run

    def train(model) -> Callable[[], None]:
        return lambda: train_step(model, inputs["train"])

    results = {"args": vars(args), "torch": torch.__version__}
    results["first calls"] = {  # a compiled model compiles in them
        "inference": timed(infer(compiled), 3, device),
        "train": timed(train(compiled), 3, device),
    }
    compiled_model.load_state_dict(eager.state_dict())  # the BN statistics of its first calls
    results["differences"] = differences(eager, compiled, inputs, device)
    for name, step in (("inference", infer), ("train", train)):
        times = alternate({"eager": step(eager), "compiled": step(compiled)}, args.repeats, device)
        results[name] = {k: statistics.median(v) for k, v in times.items()}
        results[name]["ratio"] = results[name]["compiled"] / results[name]["eager"]
    counters = torch._dynamo.utils.counters
    results["graphs"] = counters["stats"]["unique_graphs"]
    results["graph breaks"] = sum(counters["graph_break"].values())
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
