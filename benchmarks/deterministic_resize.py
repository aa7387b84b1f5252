"""Memory and time of upsampling semantic logits at inference, by the three routes: PyTorch's
bilinear op (``F.interpolate``, what non-deterministic runs use), PyTorch's decomposition (what
``F.interpolate`` runs on CUDA under ``torch.use_deterministic_algorithms``) and HTC's matrix
products (``htc.layers.resize_bilinear``, what HTC's deterministic runs use). A 480x640 image,
seen at 800x1067 and padded to 800x1088: its logits (183 COCO-stuff classes at stride 8) go to
800x1088, are cropped to 800x1067 and go to 480x640, as ``sem_seg`` is made; each route in a
fresh process. On CPU, the peak RSS growth; PyTorch never
takes the decomposition there, so it is called directly. On CUDA, the peak allocated memory.

    .venv/bin/python benchmarks/deterministic_resize.py [--device cuda]
"""

import argparse
import importlib
import json
import resource
import subprocess
import sys
import time

import torch
from torch.nn import functional as F

from htc.layers import resize_bilinear

CLASSES, LOGITS, CROP, IMAGE = 183, (100, 136), (800, 1067), (480, 640)
ROUTES = ("interpolate", "decomposition", "matrices")


def resize(x: torch.Tensor, size, route: str) -> torch.Tensor:
    if route == "matrices":
        return resize_bilinear(x, size, align_corners=False)
    if route == "decomposition" and not x.is_cuda:
        decompositions = importlib.import_module("torch._decomp.decompositions")
        return decompositions._upsample_linear_vec(x, size, False, None)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def measure(route: str, device: str) -> dict:
    torch.use_deterministic_algorithms(route == "decomposition" and device == "cuda")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, CLASSES, *LOGITS, generator=g).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated() / 2**20
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    with torch.no_grad():
        full = resize(logits, (LOGITS[0] * 8, LOGITS[1] * 8), route)
        scores = resize(full[:, :, : CROP[0], : CROP[1]], IMAGE, route)
        checksum = scores.double().sum().item()  # waits for the GPU
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(route=route, growth_mb=peak - before, seconds=seconds, checksum=checksum,
                output_mb=full.numel() * full.element_size() / 2**20)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--route", help="measure one route in this process (internal)")
    args = parser.parse_args()
    if args.route:
        print(json.dumps(measure(args.route, args.device)))
        return
    print(f"{CLASSES} classes, {LOGITS[0]}x{LOGITS[1]} -> {LOGITS[0] * 8}x{LOGITS[1] * 8} -> "
          f"{CROP[0]}x{CROP[1]} -> {IMAGE[0]}x{IMAGE[1]}, {args.device}\n")  # fmt: skip
    print("| route | memory growth (MB) | time (s) | checksum of the scores |")
    print("|---|---|---|---|")
    for route in ROUTES:
        cmd = [sys.executable, __file__, "--route", route, "--device", args.device]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"| {r['route']} | {r['growth_mb']:.0f} | {r['seconds']:.2f} | {r['checksum']:.4f} |")
    print(f"\n(the upsampled logits alone: {r['output_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
