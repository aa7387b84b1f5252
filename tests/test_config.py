"""configs/ and htc.config: every shipped config builds, config errors name the key, and the R-50
model has the reference's parameter count."""

import pytest
from detectron2.modeling import build_model

from conftest import CONFIGS, load_cfg, tiny_cfg


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.HTC.STAGE_LOSS_WEIGHTS", [1.0, 0.5]], "STAGE_LOSS_WEIGHTS"),
        (["MODEL.ROI_BOX_CASCADE_HEAD.IOUS", [0.5, 0.6]], "2 IOUS but 3 BBOX_REG_WEIGHTS"),
        (["MODEL.HTC.SEMANTIC_ON", False], "SEMANTIC_FUSION"),
        (["MODEL.HTC.SEMANTIC_FUSION", ["box"]], "unknown"),
        (["MODEL.HTC.MASK_MERGE", "max"], "MASK_MERGE"),
        (["MODEL.HTC.TEST_NMS", "soft"], "TEST_NMS"),
        (["MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead"], "HTCMaskHead"),
        (["MODEL.SEM_SEG_HEAD.COMMON_STRIDE", 6], "COMMON_STRIDE"),
        (["MODEL.SEM_SEG_HEAD.EMBED_DIM", 16], "EMBED_DIM"),
    ],
)
def test_config_errors_are_clear(opts, message):
    cfg = tiny_cfg()
    cfg.merge_from_list(opts)
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


SHIPPED = sorted(p.relative_to(CONFIGS) for p in CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED, ids=str)
def test_shipped_config_builds(name):
    cfg = load_cfg(CONFIGS / name)
    model = build_model(cfg)
    assert type(model).__name__ == "HybridTaskCascade"
    assert len(model.roi_heads.mask_head) == 3


def _reference_parameter_count(model) -> int:
    """Learnable parameters as the reference counts them: its BN affine parameters are
    parameters, our FrozenBN keeps them as buffers."""
    frozen_affine = sum(
        b.numel() for n, b in model.named_buffers() if n.endswith((".weight", ".bias"))
    )
    return sum(p.numel() for p in model.parameters()) + frozen_affine


def test_r50_parameter_count_matches_reference():
    model = build_model(load_cfg(CONFIGS / "htc_R_50_FPN_1x.yaml"))
    assert _reference_parameter_count(model) == 80_258_293
