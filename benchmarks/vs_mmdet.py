"""Our HTC vs MMDetection 3.3's HTC: inference latency on the same weights and image (a parity
fixture), both measured in this run (MMDetection in the dev venv, see dev/parity/).

    bash dev/parity/setup_mmdet_env.sh   # once
    .venv-mmdet/bin/python dev/parity/make_fixture.py --size r50 --height 480 --width 640 \\
        --out /tmp/htc_parity_r50.pth
    .venv/bin/python benchmarks/vs_mmdet.py /tmp/htc_parity_r50.pth
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "dev/parity"))
from report import build  # noqa: E402


def ours(fixture: str, repeats: int):
    ref = torch.load(fixture, map_location="cpu", weights_only=True)
    model = build(ref)
    image = ref["image_rgb"]
    batch = [{"image": image, "height": image.shape[1], "width": image.shape[2]}]
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            start = time.perf_counter()
            out = model(batch)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times), len(out[0]["instances"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fixture")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    theirs = subprocess.run(
        [str(ROOT / ".venv-mmdet/bin/python"), str(ROOT / "dev/parity/time_mmdet.py"), args.fixture,
         "--repeats", str(args.repeats), "--threads", str(args.threads)],
        capture_output=True, text=True, check=True, cwd=ROOT / "dev/parity",
    ).stdout.split()  # fmt: skip
    t_theirs, n_theirs = float(theirs[0]), int(theirs[1])
    t_ours, n_ours = ours(args.fixture, args.repeats)
    print("| implementation | inference (s) | detections | MMDetection / ours |")
    print("|---|---|---|---|")
    print(f"| MMDetection 3.3 HTC | {t_theirs:.3f} | {n_theirs} | |")
    print(f"| htc-detectron2 | {t_ours:.3f} | {n_ours} | {t_theirs / t_ours:.2f}x |")


if __name__ == "__main__":
    main()
