"""htc.solver: SOLVER.OPTIMIZER picks Detectron2's SGD or AdamW with the same parameter groups;
SOLVER.ZERO_WEIGHT_DECAY names parameters without weight decay."""

import logging

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from conftest import tiny_cfg
from htc.solver import build_optimizer


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.pos_embed = nn.Parameter(torch.zeros(4))


def _decay_of(optimizer, model) -> dict:
    """Parameter name -> the weight decay of its group."""
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return {name: decay[id(p)] for name, p in model.named_parameters()}


def test_sgd_is_detectron2s():
    cfg = tiny_cfg()
    assert type(build_optimizer(cfg, build_model(cfg))) is torch.optim.SGD


def test_adamw_with_its_parameter_groups():
    cfg = tiny_cfg()
    cfg.merge_from_list(
        ["SOLVER.OPTIMIZER", "AdamW", "SOLVER.BASE_LR", 1e-4, "SOLVER.WEIGHT_DECAY", 0.05,
         "SOLVER.WEIGHT_DECAY_NORM", 0.0, "SOLVER.BETAS", (0.9, 0.98),
         "SOLVER.ZERO_WEIGHT_DECAY", ["pos_embed"], "SOLVER.CLIP_GRADIENTS.ENABLED", True]
    )  # fmt: skip
    model = _Toy()
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert type(optimizer) is not torch.optim.AdamW  # with Detectron2's gradient clipping
    assert all(g["betas"] == (0.9, 0.98) and g["lr"] == 1e-4 for g in optimizer.param_groups)
    assert _decay_of(optimizer, model) == {
        "linear.weight": 0.05,
        "linear.bias": 0.05,
        "norm.weight": 0.0,
        "norm.bias": 0.0,
        "pos_embed": 0.0,
    }


def test_sgd_without_weight_decay_where_named():
    """SOLVER.ZERO_WEIGHT_DECAY under SGD (Detectron2's builder takes no overrides: it was
    ignored); otherwise the SGD of Detectron2's builder, group for group."""
    cfg = tiny_cfg()
    cfg.merge_from_list(
        ["SOLVER.WEIGHT_DECAY", 0.05, "SOLVER.WEIGHT_DECAY_NORM", 0.0, "SOLVER.MOMENTUM", 0.8,
         "SOLVER.NESTEROV", True, "SOLVER.CLIP_GRADIENTS.ENABLED", True]
    )  # fmt: skip
    model = _Toy()
    plain = build_optimizer(cfg, model)
    cfg.SOLVER.ZERO_WEIGHT_DECAY = ["pos_embed"]
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.SGD) and type(optimizer) is not torch.optim.SGD
    assert _decay_of(optimizer, model) == dict(_decay_of(plain, model), pos_embed=0.0)
    assert _decay_of(plain, model)["pos_embed"] == 0.05
    for group in optimizer.param_groups:
        assert (group["lr"], group["momentum"], group["nesterov"]) == (0.02, 0.8, True)


def test_unknown_optimizer_is_refused():
    cfg = tiny_cfg()
    cfg.SOLVER.OPTIMIZER = "Adam"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER='Adam'"):
        build_optimizer(cfg, _Toy())


def test_settings_that_failed_deep_in_torch_are_named(caplog):
    """Betas of one value (an IndexError in torch), "bias" in ZERO_WEIGHT_DECAY beside
    WEIGHT_DECAY_BIAS (Detectron2's "Conflicting overrides for 'bias'"); a ZERO_WEIGHT_DECAY name
    that matches no parameter's own name changed nothing, silently: it is warned of."""
    cfg = tiny_cfg()
    cfg.merge_from_list(["SOLVER.OPTIMIZER", "AdamW", "SOLVER.BETAS", (0.9,)])
    with pytest.raises(ValueError, match=r"SOLVER.BETAS=\(0.9,\): AdamW takes two"):
        build_optimizer(cfg, _Toy())
    cfg.merge_from_list(["SOLVER.BETAS", (0.9, 0.999), "SOLVER.WEIGHT_DECAY_BIAS", 0.0])
    cfg.SOLVER.ZERO_WEIGHT_DECAY = ["bias"]
    with pytest.raises(ValueError, match="names 'bias' beside SOLVER.WEIGHT_DECAY_BIAS"):
        build_optimizer(cfg, _Toy())
    cfg.SOLVER.ZERO_WEIGHT_DECAY = ["pos_embed", "model.pos_embed", "pos_embd"]
    with caplog.at_level(logging.WARNING, logger="htc.solver"):
        build_optimizer(cfg, _Toy())
    unmatched = [r.getMessage() for r in caplog.records if "ZERO_WEIGHT_DECAY" in r.getMessage()]
    assert len(unmatched) == 2
    assert "'model.pos_embed'" in unmatched[0] and "'pos_embd'" in unmatched[1]
