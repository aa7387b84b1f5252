"""Our HTC vs MMDetection 3.3's HTC: inference latency on the same weights and image (a parity
fixture), measured in turns in this run (MMDetection in a process of the dev venv, see
dev/parity/, answering one inference per request), medians after a warm-up.

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


class Theirs:
    """MMDetection's HTC in its venv, one timed inference per call."""

    def __init__(self, fixture: str, threads: int):
        self.process = subprocess.Popen(
            [str(ROOT / ".venv-mmdet/bin/python"), str(ROOT / "dev/parity/time_mmdet.py"),
             fixture, "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT / "dev/parity",
        )  # fmt: skip
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("MMDetection's timing process did not start")

    def __call__(self):
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        seconds, detections = self.process.stdout.readline().split()
        return float(seconds), int(detections)


def ours(model, batch, semantic_output: bool):
    model.semantic_output = semantic_output
    with torch.no_grad():
        start = time.perf_counter()
        out = model(batch)
        return time.perf_counter() - start, len(out[0]["instances"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fixture")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = torch.load(args.fixture, map_location="cpu", weights_only=True)
    model = build(ref)
    image = ref["image_rgb"]
    batch = [{"image": image, "height": image.shape[1], "width": image.shape[2]}]
    runs = {
        "MMDetection 3.3 HTC (instances)": Theirs(args.fixture, args.threads),
        "htc-detectron2 (instances + sem_seg)": lambda: ours(model, batch, True),
        "htc-detectron2 (instances only, SEMANTIC_OUTPUT False)": lambda: ours(model, batch, False),
    }
    times, detections = {name: [] for name in runs}, {}
    for i in range(args.repeats + 1):
        for name, run in runs.items():
            seconds, detections[name] = run()
            if i:  # the first round warms up
                times[name].append(seconds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    theirs = next(iter(medians.values()))
    print(f"{image.shape[1]}x{image.shape[2]}, {args.threads} threads, median of {args.repeats}")
    print("| implementation | inference (s) | detections | MMDetection / ours |")
    print("|---|---|---|---|")
    for i, (name, seconds) in enumerate(medians.items()):
        ratio = f"{theirs / seconds:.2f}x" if i else ""
        print(f"| {name} | {seconds:.3f} | {detections[name]} | {ratio} |")


if __name__ == "__main__":
    main()
