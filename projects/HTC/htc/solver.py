"""The optimizer of yacs configs: Detectron2's SGD, or AdamW (what HTC++ trains with)."""

import torch
from detectron2.solver import build_optimizer as build_sgd
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

OPTIMIZERS = ("SGD", "AdamW")


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER`` "SGD": Detectron2's :func:`build_optimizer`; "AdamW": torch's AdamW
    (``SOLVER.BETAS``) over the same parameter groups (``SOLVER.WEIGHT_DECAY_NORM`` and
    ``_BIAS``, ``BIAS_LR_FACTOR``); either without weight decay on the parameters whose own
    names (in their module) are in ``SOLVER.ZERO_WEIGHT_DECAY`` (e.g. Swin's
    relative_position_bias_table), with Detectron2's gradient clipping."""
    solver = cfg.SOLVER
    if solver.OPTIMIZER not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER={solver.OPTIMIZER!r}: use one of {OPTIMIZERS}")
    if solver.OPTIMIZER == "SGD" and not solver.ZERO_WEIGHT_DECAY:
        return build_sgd(cfg, model)
    params = get_default_optimizer_params(
        model,
        base_lr=solver.BASE_LR,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        bias_lr_factor=solver.BIAS_LR_FACTOR,
        weight_decay_bias=solver.WEIGHT_DECAY_BIAS,
        overrides={name: {"weight_decay": 0.0} for name in solver.ZERO_WEIGHT_DECAY},
    )
    if solver.OPTIMIZER == "SGD":  # Detectron2's, which takes no overrides
        return maybe_add_gradient_clipping(cfg, torch.optim.SGD)(
            params, lr=solver.BASE_LR, momentum=solver.MOMENTUM, nesterov=solver.NESTEROV,
            weight_decay=solver.WEIGHT_DECAY, foreach=True,
        )  # fmt: skip
    return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
        params, lr=solver.BASE_LR, betas=tuple(solver.BETAS), weight_decay=solver.WEIGHT_DECAY
    )
