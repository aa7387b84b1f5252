"""Dev only (run in .venv-mmdet): the state-dict names and shapes of MMDetection's HTC configs,
for the converter's tests (no weights needed).

    .venv-mmdet/bin/python dev/parity/dump_keys.py tests/fixtures/mmdet_htc_keys.json
"""

import json
import sys

import mmdet
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config

CONFIGS = [
    "htc_r50_fpn_1x_coco",
    "htc-without-semantic_r50_fpn_1x_coco",
    "htc_r101_fpn_20e_coco",
    "htc_x101-32x4d_fpn_16xb1-20e_coco",
    "htc_x101-64x4d-dconv-c3-c5_fpn_ms-400-1400-16xb1-20e_coco",
]


def main(out):
    register_all_modules()
    keys = {}
    for name in CONFIGS:
        cfg = Config.fromfile(f"{mmdet.__path__[0]}/.mim/configs/htc/{name}.py")
        cfg.model.backbone.init_cfg = None
        state = MODELS.build(cfg.model).state_dict()
        keys[name] = {k: list(v.shape) for k, v in state.items()}
        print(name, len(state))
    with open(out, "w") as f:
        json.dump(keys, f)


if __name__ == "__main__":
    main(sys.argv[1])
