"""RoIAlign backward on CPU: torchvision's kernel vs htc.layers.roi_align's sparse-matrix backward,
side by side in one run (same inputs, torch threads fixed), with the max gradient difference.

    .venv/bin/python benchmarks/roi_align_backward.py
"""

import statistics
import time

import torch
from torchvision.ops import roi_align

from htc.layers.roi_align import sparse_grad_roi_align

# (images, channels, feature H, W, stride, RoIs, output): demo training, COCO-size training
CASES = [
    (16, 64, 32, 32, 4, 1024, 14),
    (16, 64, 16, 16, 8, 1024, 14),
    (16, 64, 32, 32, 4, 1024, 7),
    (2, 256, 200, 336, 4, 1024, 7),
    (2, 256, 100, 168, 8, 1024, 14),
]


def timed_backward(fn, x, rois, args, repeats=5):
    y = fn(x, rois, *args)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))  # same for both
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        (g,) = torch.autograd.grad(y, x, grad, retain_graph=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times), g


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(
        "| N, C, H, W, stride, RoIs, out | torchvision (ms) | sparse (ms) | speed-up | max diff |"
    )
    print("|---|---|---|---|---|")
    for n, c, h, w, stride, r, out in CASES:
        x = torch.randn(n, c, h, w, requires_grad=True)
        size = torch.tensor([w * stride, h * stride], dtype=torch.float32)
        xy = torch.rand(r, 2) * size * 0.8
        boxes = torch.cat([xy, xy + torch.rand(r, 2) * size * 0.3 + 4], dim=1)
        rois = torch.cat([torch.randint(0, n, (r, 1)).float(), boxes], dim=1)
        args = ((out, out), 1.0 / stride, 0, True)
        t_tv, g_tv = timed_backward(roi_align, x, rois, args)
        t_sp, g_sp = timed_backward(sparse_grad_roi_align, x, rois, (*args, 1))
        print(
            f"| {n}, {c}, {h}, {w}, {stride}, {r}, {out} | {t_tv * 1e3:.0f} | {t_sp * 1e3:.0f} "
            f"| {t_tv / t_sp:.1f}x | {(g_tv - g_sp).abs().max():.1e} |"
        )


if __name__ == "__main__":
    main()
