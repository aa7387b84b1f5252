"""Box decoding as the reference decodes: Detectron2's ``Box2BoxTransform`` clamps the log-scale
deltas dw, dh only from above (how much a box may grow); MMDetection's ``DeltaXYWHBBoxCoder``
clamps them on both sides at log(1000 / 16), so a box shrunk more than 62.5 times decodes
differently (up to 0.37 px on the fixture's rare boxes, tests/test_reference_pieces.py)."""

import torch
from detectron2.modeling.box_regression import Box2BoxTransform
from torch import nn

from .host import host_tensor


class ReferenceBox2BoxTransform(Box2BoxTransform):
    """``Box2BoxTransform`` with dw, dh (after their weights) clamped to [-scale_clamp,
    scale_clamp]."""

    def apply_deltas(self, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """deltas (N, k*4), boxes (N, 4) XYXY -> (N, k*4) decoded boxes."""
        _, _, ww, wh = self.weights
        inf = float("inf")
        bounds = [-inf, -inf, -self.scale_clamp * ww, -self.scale_clamp * wh]
        lower = host_tensor(bounds, deltas.device, deltas.dtype)  # no sync: 8 calls a step
        # one row of bounds for all k boxes: no reshape of the rows (exporters keep them dynamic)
        deltas = torch.maximum(deltas, lower.repeat(deltas.shape[1] // 4))
        return super().apply_deltas(deltas, boxes)


def use_reference_decoding(model: nn.Module) -> nn.Module:
    """Switch every ``Box2BoxTransform`` held by ``model``'s modules (the RPN's, each stage's box
    predictor's) to :class:`ReferenceBox2BoxTransform`, in place; returns ``model``."""
    for module in model.modules():
        transform = getattr(module, "box2box_transform", None)
        if type(transform) is Box2BoxTransform:
            transform.__class__ = ReferenceBox2BoxTransform  # a subclass that only clamps more
    return model
