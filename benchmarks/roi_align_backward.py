"""RoIAlign backward: torchvision's kernel (as Detectron2's ROIAlign), htc.layers'
TritonROIAlign (CUDA: the Triton kernels, entry build included; CPU: torchvision's) and
AutoROIAlign ("auto": CPU, the sparse-matrix backward; CUDA, the one of the two that its rule
picks), side by side in one run (same inputs, same output gradient), with the max gradient
difference of "auto" and the number of interpolation entries (the sparse matrix's, the Triton
backward's);
a 4-level box pooler, forward and backward (Detectron2's, level by level, vs HTC's); on CUDA also
the pooled 7x7 box feature (torchvision 14x14 + average pool vs computed directly) and whether
two backward passes agree bit for bit.

    .venv/bin/python benchmarks/roi_align_backward.py [--device cpu|cuda] [--repeats 5]
"""

import argparse
import statistics
import time

import torch
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes
from torch.nn import functional as F
from torchvision.ops import roi_align

from htc.layers import AutoROIAlign, ROIAlign, TritonROIAlign
from htc.layers.roi_align_cpu import interpolation_entries
from htc.poolers import HTCROIPooler

# (images, channels, feature H, W, stride, RoIs, output): demo training, COCO-size training;
# the last is the shape of the GPU issue (semantic feature of 800x1333, 2000 RoIs)
CASES = [
    (16, 64, 32, 32, 4, 1024, 14),
    (16, 64, 16, 16, 8, 1024, 14),
    (16, 64, 32, 32, 4, 1024, 7),
    (2, 256, 200, 336, 4, 1024, 7),
    (2, 256, 100, 168, 8, 1024, 14),
    (2, 256, 100, 167, 8, 2000, 14),
]


def timed(fn, device: str, repeats: int):
    """Median seconds of ``fn()`` and its last result (one warm-up run first)."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def case_inputs(case, device: str):
    n, c, h, w, stride, r, out = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g)
    size = torch.tensor([w * stride, h * stride], dtype=torch.float32)
    xy = torch.rand(r, 2, generator=g) * size * 0.8
    boxes = torch.cat([xy, xy + torch.rand(r, 2, generator=g) * size * 0.3 + 4], dim=1)
    rois = torch.cat([torch.randint(0, n, (r, 1), generator=g).float(), boxes], dim=1)
    return x.to(device).requires_grad_(), rois.to(device)


def backward_time(fn, x, rois, device: str, repeats: int):
    y = fn(x, rois)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    return timed(lambda: torch.autograd.grad(y, x, grad, retain_graph=True)[0], device, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    device = args.device
    print(
        "| N, C, H, W, stride, RoIs, out | torchvision (ms) | triton (ms) | auto (ms) "
        "| auto speed-up | max diff | entries (M), nonzero |"
    )
    print("|---|---|---|---|---|---|---|")
    for case in CASES:
        n, c, h, w, stride, r, out = case
        x, rois = case_inputs(case, device)
        geometry = ((out, out), 1.0 / stride, 0, True)
        t_tv, g_tv = backward_time(ROIAlign(*geometry), x, rois, device, args.repeats)
        t_tr, _ = backward_time(TritonROIAlign(*geometry), x, rois, device, args.repeats)
        t_fa, g_fa = backward_time(AutoROIAlign(*geometry), x, rois, device, args.repeats)
        weight = interpolation_entries(rois.cpu(), tuple(x.shape), *geometry)[2]
        print(
            f"| {n}, {c}, {h}, {w}, {stride}, {r}, {out} | {t_tv * 1e3:.2f} | {t_tr * 1e3:.2f} "
            f"| {t_fa * 1e3:.2f} | {t_tv / t_fa:.1f}x | {(g_tv - g_fa).abs().max():.1e} "
            f"| {len(weight) / 1e6:.2f}, {(weight != 0).sum() / 1e6:.2f} |"
        )
    pooler_row(device, args.repeats)
    if device == "cuda":
        gpu_extras(args.repeats)


def pooler_row(device: str, repeats: int) -> None:
    """Forward + backward of a box pooler of 4 levels (P2-P5 of two 800x1344 images, 1000 RoIs,
    7x7): Detectron2's ROIPooler (level by level) vs HTC's with AutoROIAlign (CUDA: all levels
    in one pass)."""
    g = torch.Generator().manual_seed(2)
    features = [torch.randn(2, 256, 800 // s, 1344 // s, generator=g).to(device)
                for s in (4, 8, 16, 32)]  # fmt: skip
    xy = torch.rand(2, 500, 2, generator=g) * torch.tensor([1300.0, 760.0])
    sizes = torch.rand(2, 500, 2, generator=g) ** 2 * 600 + 8
    boxes = [Boxes(torch.cat([a, a + b], dim=1).to(device)) for a, b in zip(xy, sizes)]
    original = ROIPooler((7, 7), (1 / 4, 1 / 8, 1 / 16, 1 / 32), 0, "ROIAlignV2")
    fast = HTCROIPooler.from_pooler(original, "auto")
    leaves = [f.requires_grad_() for f in features]
    grad = torch.randn(1000, 256, 7, 7, generator=g).to(device)

    def step(pooler):
        return lambda: torch.autograd.grad(pooler(leaves, boxes), leaves, grad)

    t_d2, g_d2 = timed(step(original), device, repeats)
    t_htc, g_htc = timed(step(fast), device, repeats)
    diff = max((a - b).abs().max().item() for a, b in zip(g_d2, g_htc))
    print(
        f"\nbox pooler, 4 levels, 1000 RoIs, forward + backward: Detectron2 {t_d2 * 1e3:.2f} ms, "
        f"HTC {t_htc * 1e3:.2f} ms ({t_d2 / t_htc:.1f}x), max gradient diff {diff:.1e}"
    )


def gpu_extras(repeats: int) -> None:
    """The pooled 7x7 box feature and the run-to-run agreement of gradients, on the issue's
    shape."""
    x, rois = case_inputs(CASES[-1], "cuda")
    geometry = ((14, 14), 1.0 / 8, 0, True)
    fast = TritonROIAlign(*geometry)
    with torch.no_grad():
        t_tv, want = timed(lambda: F.avg_pool2d(roi_align(x, rois, *geometry), 2), "cuda", repeats)
        t_fa, got = timed(lambda: fast.pooled(x, rois, (7, 7)), "cuda", repeats)
    print(
        f"\npooled 7x7 box feature: torchvision 14x14 + average pool {t_tv * 1e3:.2f} ms, "
        f"fast {t_fa * 1e3:.2f} ms, max diff {(want - got).abs().max():.1e}"
    )
    grads = [backward_time(fast, x, rois, "cuda", 1)[1] for _ in range(2)]
    tv = [backward_time(ROIAlign(*geometry), x, rois, "cuda", 1)[1] for _ in range(2)]
    print(
        f"gradients of two runs bit-identical: fast {torch.equal(*grads)}, "
        f"torchvision {torch.equal(*tv)}"
    )


if __name__ == "__main__":
    main()
