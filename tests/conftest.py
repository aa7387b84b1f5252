"""Shared helpers: a tiny HTC (same architecture, small widths) and synthetic batches."""

from pathlib import Path

import pytest
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.structures import BitMasks, Boxes, Instances

from htc import add_htc_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def load_cfg(path: Path) -> CfgNode:
    cfg = get_cfg()
    add_htc_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def tiny_cfg(**htc) -> CfgNode:
    """htc_R_50_FPN_1x with small widths, a ResNet-18 with BN, 3 thing and 5 semantic classes."""
    cfg = load_cfg(CONFIGS / "htc_R_50_FPN_1x.yaml")
    cfg.merge_from_list(
        [
            "MODEL.RESNETS.DEPTH", 18,
            "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
            "MODEL.RESNETS.NORM", "BN",
            "MODEL.BACKBONE.FREEZE_AT", 0,
            "MODEL.FPN.OUT_CHANNELS", 32,
            "MODEL.RPN.POST_NMS_TOPK_TRAIN", 200,
            "MODEL.RPN.POST_NMS_TOPK_TEST", 100,
            "MODEL.ROI_HEADS.NUM_CLASSES", 3,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64,
            "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
            "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 5,
            "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32,
            "MODEL.SEM_SEG_HEAD.EMBED_DIM", 32,
        ]
    )  # fmt: skip
    for key, value in htc.items():
        cfg.MODEL.HTC[key.upper()] = value
    return cfg


def make_batch(num_images: int = 2, size: int = 96, with_gt: bool = True, seed: int = 0) -> list:
    """Images with rectangles of 3 classes on a 2-region background; masks and semantic labels
    agree with the picture (background classes 3 and 4, things 0..2)."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(num_images):
        image = torch.zeros(3, size, size)
        sem = torch.full((size, size), 3, dtype=torch.long)
        sem[size // 2 :] = 4
        image[:, size // 2 :] = 0.3
        boxes, classes, masks = [], [], []
        for _ in range(3 if with_gt else 0):
            x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
            w, h = torch.randint(size // 6, size // 2, (2,), generator=g).tolist()
            c = int(torch.randint(0, 3, (1,), generator=g))
            mask = torch.zeros(size, size, dtype=torch.bool)
            mask[y0 : y0 + h, x0 : x0 + w] = True
            image[c, mask] = 1.0
            sem[mask] = c
            boxes.append([x0, y0, x0 + w, y0 + h])
            classes.append(c)
            masks.append(mask)
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.gt_classes = torch.tensor(classes, dtype=torch.long)
        inst.gt_masks = BitMasks(torch.stack(masks) if masks else torch.zeros(0, size, size))
        batch.append(
            {
                "image": (image * 255).to(torch.uint8),
                "instances": inst,
                "sem_seg": sem,
                "height": size,
                "width": size,
            }
        )
    return batch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
