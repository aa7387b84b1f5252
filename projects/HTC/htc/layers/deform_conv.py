"""Deformable convolution through ``torchvision.ops.deform_conv2d`` for Detectron2's ResNet.

Detectron2's ``DeformConv``/``ModulatedDeformConv`` call its own CUDA kernels: on CPU the v1
backward and the whole v2 raise NotImplementedError. The subclasses here keep the parameters
(so checkpoint names stay ``res*.conv2.weight`` / ``conv2_offset``) and compute with torchvision,
which runs forward and backward on CPU and CUDA alike.
"""

from typing import Callable, Dict

import torch
from detectron2.layers import DeformConv, ModulatedDeformConv
from torch import nn
from torchvision.ops import deform_conv2d


class TorchvisionDeformConv(DeformConv):
    """DCNv1: ``forward(x, offset)``, offset (N, 2*kh*kw*deformable_groups, H', W')."""

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """torchvision's kernel: the parent's has none on CPU. (N, C, H, W) -> (N, C', H', W')."""
        x = deform_conv2d(
            x, offset, self.weight, stride=self.stride, padding=self.padding, dilation=self.dilation
        )
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class TorchvisionModulatedDeformConv(ModulatedDeformConv):
    """DCNv2: ``forward(x, offset, mask)``, mask (N, kh*kw*deformable_groups, H', W')."""

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """torchvision's kernel: the parent's has none on CPU. (N, C, H, W) -> (N, C', H', W')."""
        x = deform_conv2d(
            x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
            dilation=self.dilation, mask=mask,
        )  # fmt: skip
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


_REPLACEMENTS = {
    DeformConv: TorchvisionDeformConv,
    ModulatedDeformConv: TorchvisionModulatedDeformConv,
}


def use_torchvision_deform_conv(model: nn.Module) -> nn.Module:
    """Switch every Detectron2 deformable conv of ``model`` to its torchvision subclass, in
    place (same parameters and buffers, same state-dict names); returns ``model``."""
    for module in model.modules():
        replacement = _REPLACEMENTS.get(type(module))
        if replacement is not None:
            module.__class__ = replacement  # a subclass that only changes forward()
    return model


# MODEL.HTC.DEFORM_CONV -> what is done to the built backbone
DEFORM_CONV_KERNELS: Dict[str, Callable[[nn.Module], nn.Module]] = {
    "torchvision": use_torchvision_deform_conv,
    "detectron2": lambda model: model,
}
