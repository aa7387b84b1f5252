"""Images per second of ``htc.predict`` over a folder of demo images, against the loop it
replaces (one image at a time: read, ``DefaultPredictor``, COCO results, one record written).

    .venv/bin/python benchmarks/predict_speed.py [--images 500] [--json FILE]

The demo model (configs/demo/htc_R_18_FPN_demo.yaml, 256-pixel images resized to 128) with
random weights saved as a checkpoint, so that every variant, in this process or in others, runs
the same weights; the score threshold is the config's 0.05. Every variant writes its own output
folder and its COCO results are checked against the loop's.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from htc.data.demo_data import generate_split
from htc.demo import load_predictor_cfg
from htc.predict import coco_results, predict

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/demo/htc_R_18_FPN_demo.yaml"
VARIANTS = {  # name: (batch size, data-loader workers, processes)
    "htc.predict, batch 1, no workers": (1, 0, 1),
    "htc.predict, batch 1, 1 worker": (1, 1, 1),
    "htc.predict, batch 1, 2 workers (default)": (1, 2, 1),
    "htc.predict, batch 4, 2 workers": (4, 2, 1),
    "htc.predict, 2 processes of 1 thread, batch 1, 1 worker each": (1, 1, 2),
}


def one_at_a_time(folder: Path, output: Path, opts: list) -> None:
    """The loop htc.predict replaces."""
    predictor = DefaultPredictor(load_predictor_cfg(str(CONFIG), opts))
    output.mkdir(parents=True)
    with open(output / "predictions.jsonl", "w") as records:
        for image_id, path in enumerate(sorted(folder.glob("*.png")), start=1):
            results = coco_results(predictor(read_image(str(path), "BGR")), image_id, None)
            records.write(json.dumps({"file_name": str(path), "results": results}) + "\n")
            records.flush()
            os.fsync(records.fileno())


def run_predict(folder: Path, output: Path, opts: list, variant: tuple) -> None:
    batch_size, workers, processes = variant
    args = argparse.Namespace(
        config_file=str(CONFIG), input=[str(folder)], output=str(output),
        confidence_threshold=None, image_ids=None, draw=False, draw_threshold=0.5, semantic=False,
        panoptic=False,
        batch_size=batch_size, workers=workers, num_gpus=processes, num_machines=1,
        machine_rank=0, dist_url="auto", dist_timeout=1800.0, opts=opts,
    )  # fmt: skip
    predict(args)


def detections(output: Path) -> int:
    """The results in every process's records."""
    lines = [line for f in output.glob("predictions*.jsonl") for line in f.read_text().splitlines()]
    return sum(len(json.loads(line)["results"]) for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="htc_predict_speed_"))
    generate_split(work / "data", "bench", args.images, seed=0)
    folder = work / "data" / "bench"
    cfg = load_predictor_cfg(str(CONFIG), ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, work / "model.pth")
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(work / "model.pth")]

    results = {"images": args.images, "cores": os.cpu_count(), "torch": torch.__version__}
    runs = {"one image at a time (DefaultPredictor)": lambda out: one_at_a_time(folder, out, opts)}
    for name, variant in VARIANTS.items():
        runs[name] = lambda out, variant=variant: run_predict(folder, out, opts, variant)
    for k, (name, run) in enumerate(runs.items()):
        start = time.perf_counter()
        run(work / f"out{k}")
        seconds = time.perf_counter() - start
        results[name] = {"seconds": seconds, "images/s": args.images / seconds}
        results[name]["detections"] = detections(work / f"out{k}")
        print(name, results[name], flush=True)
    loop = results["one image at a time (DefaultPredictor)"]["images/s"]
    for name in VARIANTS:
        results[name]["speed-up"] = results[name]["images/s"] / loop
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
