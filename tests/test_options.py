"""Each option of the paper's extension table builds, trains a step and runs inference on CPU."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import make_batch, tiny_cfg

NARROW_R50 = [
    "MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.STEM_OUT_CHANNELS", 32,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.RESNETS.WIDTH_PER_GROUP", 32,
]  # fmt: skip
NORMS = [
    "MODEL.RESNETS.NORM",
    "MODEL.FPN.NORM",
    "MODEL.ROI_MASK_HEAD.NORM",
    "MODEL.SEM_SEG_HEAD.NORM",
]


def norm(kind):
    return NARROW_R50 + [x for key in NORMS for x in (key, kind)]


OPTIONS = {
    "GN": norm("GN"),
    "SyncBN": norm("SyncBN"),
    "naiveSyncBN": norm("naiveSyncBN"),
    "ResNeXt": NARROW_R50[:-2]
    + ["MODEL.RESNETS.NUM_GROUPS", 8, "MODEL.RESNETS.WIDTH_PER_GROUP", 4],
    "DCN-c3-c5": NARROW_R50 + ["MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, True, True, True]],
    "DCNv2-c5": NARROW_R50 + [
        "MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, False, False, True],
        "MODEL.RESNETS.DEFORM_MODULATED", True,
    ],
    "soft-NMS": ["MODEL.HTC.TEST_NMS", "soft_gaussian"],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_trains_a_step_and_infers(name):
    cfg = tiny_cfg()
    cfg.merge_from_list(OPTIONS[name])
    model = build_model(cfg).train()
    with EventStorage():
        losses = model(make_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    model.eval()
    with torch.no_grad():
        out = model(make_batch(num_images=1))[0]
    assert {"instances", "sem_seg"} <= set(out)
