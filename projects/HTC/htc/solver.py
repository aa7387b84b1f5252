"""The optimizer of yacs configs: Detectron2's SGD, or AdamW (what HTC++ trains with)."""

import logging

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
    _check_solver(solver, model)
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


def _check_solver(solver, model: torch.nn.Module) -> None:
    """Refuse the ``SOLVER`` settings that failed deep in torch or Detectron2 (betas of another
    length, "bias" named twice) and warn of ``ZERO_WEIGHT_DECAY`` names that match no parameter's
    own name (a typo, or a dotted path: every parameter kept its weight decay, silently)."""
    if solver.OPTIMIZER not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER={solver.OPTIMIZER!r}: use one of {OPTIMIZERS}")
    if solver.OPTIMIZER == "AdamW" and len(solver.BETAS) != 2:
        raise ValueError(f"SOLVER.BETAS={tuple(solver.BETAS)}: AdamW takes two, e.g. (0.9, 0.999)")
    bias_set = solver.WEIGHT_DECAY_BIAS is not None or solver.BIAS_LR_FACTOR not in (None, 1.0)
    if "bias" in solver.ZERO_WEIGHT_DECAY and bias_set:  # Detectron2: "Conflicting overrides"
        raise ValueError(
            "SOLVER.ZERO_WEIGHT_DECAY names 'bias' beside SOLVER.WEIGHT_DECAY_BIAS or "
            "BIAS_LR_FACTOR: give the biases' weight decay by SOLVER.WEIGHT_DECAY_BIAS 0.0 instead"
        )
    own_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_parameters()}
    for name in solver.ZERO_WEIGHT_DECAY:
        if name not in own_names:
            logging.getLogger(__name__).warning(
                f"SOLVER.ZERO_WEIGHT_DECAY: no parameter of the model is named {name!r} in its "
                "module (names are a parameter's own, as 'relative_position_bias_table', not "
                "dotted paths): it changes nothing"
            )
