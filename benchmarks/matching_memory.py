"""Matching RoI candidates to the GT boxes of crowded images: peak memory and time of HTC's
batched matching (``htc.sampling.match``) beside Detectron2's matching image by image
(``pairwise_iou`` + ``Matcher``, as ``ROIHeads.label_and_sample_proposals`` runs it) and beside
all images in one padded group (``GROUP_ENTRIES`` unbounded).

    .venv/bin/python benchmarks/matching_memory.py [--device cpu|cuda] [--images 16]
        [--candidates 2000] [--gt 50 200 700] [--repeats 5]

Peak memory is what one call adds over what the process held before it: on CUDA the allocated
tensors; on CPU the resident set's high-water mark (reset through /proc/self/clear_refs) in a
fresh process whose allocator returns every block of 64 KiB or more to the system at once
(MALLOC_MMAP_THRESHOLD_), each method alone.
"""

import argparse
import json
from typing import Callable, Dict, List, Tuple

import torch
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes, pairwise_iou
from speed import alternate, fresh_process_peak_mb, medians, peak_memory_mb

from htc import sampling

MATCHER = Matcher([0.5], [0, 1], allow_low_quality_matches=False)
METHODS = ("detectron2", "htc", "htc_one_group")
GROUP_ENTRIES = sampling.GROUP_ENTRIES


def crowded_images(images: int, candidates: int, gt: int, device: str):
    """Per image (candidates (C, 4), GT boxes (G, 4)) in a 1333x800 image: GT boxes of 10-200
    pixels, half the candidates jittered GT boxes, half anywhere."""
    g = torch.Generator().manual_seed(gt)

    def boxes(n: int) -> torch.Tensor:
        xy = torch.rand(n, 2, generator=g) * torch.tensor([1133.0, 600.0])
        return torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 190], dim=1)

    out = []
    for _ in range(images):
        gt_boxes = boxes(gt)
        near = gt_boxes[torch.randint(0, gt, (candidates // 2,), generator=g)]
        near = near + torch.randn(near.shape, generator=g) * 8
        pairs = torch.cat([near, boxes(candidates - len(near))]).to(device), gt_boxes.to(device)
        out.append(pairs)
    return out


def detectron2_matching(images) -> Tuple[torch.Tensor, torch.Tensor]:
    """Detectron2's matches, image by image, as indices into all images' GT boxes."""
    indices, labels, first = [], [], 0
    for candidates, gt in images:
        index, label = MATCHER(pairwise_iou(Boxes(gt), Boxes(candidates)))
        indices.append(index + first)
        labels.append(label)
        first += len(gt)
    return torch.cat(indices), torch.cat(labels)


def method(name: str, images) -> Callable[[], Tuple[torch.Tensor, torch.Tensor]]:
    if name == "detectron2":
        return lambda: detectron2_matching(images)
    boxes = torch.cat([c for c, _ in images])
    counts, gt = [len(c) for c, _ in images], [g for _, g in images]

    def htc():
        sampling.GROUP_ENTRIES = 1 << 62 if name == "htc_one_group" else GROUP_ENTRIES
        return sampling.match(MATCHER, boxes, counts, gt)

    return htc


def peak_mb(fn: Callable, device: str) -> float:
    """Memory one call of ``fn`` adds at its peak, after a warm-up call."""
    fn()
    return peak_memory_mb(fn, device)


def measured_peak(args, name: str, gt: int) -> float:
    """``peak_mb`` of one method in a fresh process (CPU) or here (CUDA)."""
    if args.device == "cuda":
        images = crowded_images(args.images, args.candidates, gt, args.device)
        return peak_mb(method(name, images), args.device)
    sizes = ["--images", str(args.images), "--candidates", str(args.candidates)]
    return fresh_process_peak_mb(__file__, "--peak-of", name, "--gt", str(gt), *sizes)


def row(args, gt: int) -> Dict[str, float]:
    images = crowded_images(args.images, args.candidates, gt, args.device)
    fns = {name: method(name, images) for name in METHODS}
    want, got = fns["detectron2"](), fns["htc"]()
    if not (torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])):
        raise AssertionError(f"HTC's matches differ from Detectron2's at {gt} GT boxes")
    times = medians(alternate(fns, args.repeats, args.device))
    peaks = {name: measured_peak(args, name, gt) for name in METHODS}
    return {"gt": gt, **{f"{n} ms": times[n] * 1e3 for n in METHODS}, **{
        f"{n} MB": peaks[n] for n in METHODS
    }}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=2000)
    parser.add_argument("--gt", type=int, nargs="+", default=[50, 200, 700])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peak-of", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_of:
        images = crowded_images(args.images, args.candidates, args.gt[0], "cpu")
        print(json.dumps({"peak_mb": peak_mb(method(args.peak_of, images), "cpu")}))
        return
    rows: List[dict] = [row(args, gt) for gt in args.gt]
    print(f"{args.images} images x {args.candidates} candidates, {args.device}, "
          f"{args.threads} threads, median of {args.repeats}")  # fmt: skip
    print("| GT boxes per image | Detectron2 ms | HTC ms | one group ms "
          "| Detectron2 MB | HTC MB | one group MB | HTC / Detectron2 memory |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r[f"{n} ms"] for n in METHODS] + [r[f"{n} MB"] for n in METHODS]
        # a small CPU peak can read 0: the resident set grows in whole pages, often reused
        ratio = f"{r['htc MB'] / r['detectron2 MB']:.2f}" if r["detectron2 MB"] > 0 else "-"
        print(f"| {r['gt']} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {ratio} |")


if __name__ == "__main__":
    main()
