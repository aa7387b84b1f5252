"""Dev only (run in .venv-mmdet): MMDetection 3.3's HTC inference on a parity fixture's weights
and image, timed on request (torch threads fixed), for benchmarks/vs_mmdet.py to interleave with
ours. Prints "ready", then for every line read from stdin runs one inference and prints
"<seconds> <detections>".

    .venv-mmdet/bin/python dev/parity/time_mmdet.py FIXTURE [--threads 2]
"""

import argparse
import sys
import time

import mmdet
import torch
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.utils import register_all_modules
from mmengine.config import Config
from narrow import SMALL, narrow


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("fixture")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = torch.load(args.fixture, map_location="cpu", weights_only=True)
    register_all_modules()
    cfg = Config.fromfile(f"{mmdet.__path__[0]}/.mim/configs/htc/htc_r50_fpn_1x_coco.py")
    cfg.model.backbone.init_cfg = None
    if ref["config"] == "small":
        narrow(cfg, SMALL)
    model = MODELS.build(cfg.model)
    model.load_state_dict(ref["state_dict"])
    model.eval()
    rgb = ref["image_rgb"]
    h, w = rgb.shape[1:]
    meta = dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0))
    data = {"inputs": [rgb.flip(0)], "data_samples": [DetDataSample(metainfo=meta)]}
    print("ready", flush=True)
    with torch.no_grad():
        for _ in sys.stdin:
            start = time.perf_counter()
            out = model.test_step(data)
            print(f"{time.perf_counter() - start:.4f} {len(out[0].pred_instances)}", flush=True)


if __name__ == "__main__":
    main()
