"""Cost of Soft-NMS for the final detections at 1000 candidates per class (every proposal above
the score threshold in every class, the worst case at SCORE_THRESH_TEST 0.001), with the loop
stopped after TEST.DETECTIONS_PER_IMAGE picks (ours) and run to the end (no bound).

    .venv/bin/python benchmarks/soft_nms_cost.py [--classes 1 10 80] [--unbounded-up-to 10]
"""

import argparse
import time

import torch

from htc.soft_nms import soft_nms_inference


def candidates(num_boxes: int, num_classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num_boxes, 2, generator=g) * 1200
    boxes = torch.cat([xy, xy + 20 + torch.rand(num_boxes, 2, generator=g) * 200], dim=1)
    scores = torch.rand(num_boxes, num_classes + 1, generator=g) * 0.99 + 0.01  # all > 0.001
    return boxes, scores


def timed(boxes, scores, topk: int) -> tuple:
    start = time.perf_counter()
    (result,) = soft_nms_inference(
        [boxes], [scores], [(1400, 1400)], 0.001, 0.5, topk, "linear", 0.5, 0.001
    )
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=1000)
    parser.add_argument("--classes", type=int, nargs="+", default=[1, 10, 80])
    parser.add_argument("--unbounded-up-to", type=int, default=10, help="classes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| classes | candidates | bounded (100 picks) s | unbounded s | same top 100 |")
    print("|---|---|---|---|---|")
    for k in args.classes:
        boxes, scores = candidates(args.boxes, k)
        bounded, top = timed(boxes, scores, 100)
        unbounded, same = "-", "-"
        if k <= args.unbounded_up_to:
            seconds, full = timed(boxes, scores, -1)
            unbounded = f"{seconds:.3f}"
            same = torch.equal(full.scores[:100], top.scores) and torch.equal(
                full.pred_boxes.tensor[:100], top.pred_boxes.tensor
            )
        print(f"| {k} | {args.boxes * k} | {bounded:.3f} | {unbounded} | {same} |")


if __name__ == "__main__":
    main()
