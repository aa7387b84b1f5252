"""The README's main job: generate the demo data, train the small HTC with train_net.py,
evaluate it, and write pictures (predictions next to the ground truth, training curves).

    .venv/bin/python scripts/main_job.py [--config-file CFG] [--output DIR] [KEY VALUE ...]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402
from PIL import Image  # noqa: E402

from htc.data import ensure_demo_data, register_builtin  # noqa: E402
from htc.demo import draw_prediction, load_predictor_cfg, titled  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/demo/htc_R_18_FPN_demo.yaml"
NUM_PICTURES = 6


def train(config: Path, output: Path, opts: list) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cmd = [
        sys.executable, str(ROOT / "train_net.py"), "--config-file", str(config), "--resume",
        "OUTPUT_DIR", str(output), "MODEL.DEVICE", device, *opts,
    ]  # fmt: skip
    print("[main job]", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def read_metrics(output: Path) -> list:
    with open(output / "metrics.json") as f:
        return [json.loads(line) for line in f if line.strip()]


def final_results(metrics: list) -> dict:
    evaluations = [m for m in metrics if "segm/AP" in m]
    if not evaluations:
        raise RuntimeError("metrics.json has no evaluation: did training finish?")
    return evaluations[-1]


def plot_curves(metrics: list, target: Path) -> None:
    losses = [m for m in metrics if "total_loss" in m]
    evals = [m for m in metrics if "segm/AP" in m]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(13, 4.5))
    for key in ["total_loss", "loss_sem_seg", "loss_rpn_cls"] + [
        f"loss_{n}_stage{t}" for n in ("cls", "mask") for t in range(3)
    ]:
        ax_loss.plot([m["iteration"] for m in losses], [m[key] for m in losses], label=key)
    ax_loss.set(xlabel="iteration", ylabel="loss", title="training losses", yscale="log")
    ax_loss.legend(fontsize=7)
    for key in ["bbox/AP", "segm/AP", "sem_seg/mIoU", "panoptic_seg/PQ"]:
        points = [(m["iteration"], m[key]) for m in evals if key in m]
        ax_ap.plot(*zip(*points), marker="o", label=key)
    ax_ap.set(
        xlabel="iteration", ylabel="AP / mIoU / PQ (0-100)", title="evaluation on htc_demo_val"
    )
    ax_ap.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)


def draw_ground_truth(record: dict, metadata) -> np.ndarray:
    image = read_image(record["file_name"], format="RGB")
    instances = Visualizer(image, metadata).draw_dataset_dict(record).get_image()
    labels = np.asarray(Image.open(record["sem_seg_file_name"]))
    semantic = Visualizer(image, metadata).draw_sem_seg(labels, alpha=0.6).get_image()
    count = len(record["annotations"])
    panels = [(image, "image"), (instances, f"ground truth: {count} instances")]
    panels.append((semantic, "ground truth: semantic"))
    return np.concatenate([titled(panel, title) for panel, title in panels], axis=1)


def draw_pictures(config: Path, output: Path) -> list:
    cfg = load_predictor_cfg(
        str(config), ["MODEL.WEIGHTS", str(output / "model_final.pth"), "OUTPUT_DIR", str(output)]
    )
    predictor = DefaultPredictor(cfg)
    dataset = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(dataset)
    folder = output / "pictures"
    folder.mkdir(exist_ok=True)
    paths = []
    for record in DatasetCatalog.get(dataset)[:NUM_PICTURES]:
        image_bgr = read_image(record["file_name"], format="BGR")
        truth = draw_ground_truth(record, metadata)
        prediction = draw_prediction(image_bgr[:, :, ::-1], predictor(image_bgr), metadata)
        picture = np.concatenate([truth, prediction], axis=1)
        paths.append(folder / f"{Path(record['file_name']).stem}.png")
        Image.fromarray(picture).save(paths[-1])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=str(CONFIG))
    parser.add_argument("--output", help="default: the config's OUTPUT_DIR")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    config = Path(args.config_file)
    output = Path(args.output or load_predictor_cfg(str(config)).OUTPUT_DIR).resolve()
    start = time.time()

    ensure_demo_data()
    register_builtin()  # for the pictures drawn here; train_net.py registers for itself
    train(config, output, args.opts)
    metrics = read_metrics(output)
    results = final_results(metrics)
    plot_curves(metrics, output / "training_curves.png")
    pictures = draw_pictures(config, output)

    print(f"\n[main job] done in {time.time() - start:.0f} s")
    print("  each picture: image, ground truth, prediction (instances, semantic, panoptic), titled")
    keys = ["bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50", "sem_seg/mIoU"]
    for key in keys + ["panoptic_seg/PQ", "panoptic_seg/PQ_th", "panoptic_seg/PQ_st"]:
        print(f"  {key:18s} {results.get(key, float('nan')):.1f}")
    print(f"  pictures:            {pictures[0].parent}/ ({len(pictures)} PNGs)")
    print(f"  training curves:     {output / 'training_curves.png'}")
    print(f"  metrics:             {output / 'metrics.json'}")


if __name__ == "__main__":
    main()
