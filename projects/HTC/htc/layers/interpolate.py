"""Bilinear resizing that stays deterministic and small in deterministic runs.

On CUDA, ``F.interpolate``'s bilinear backward accumulates with atomics; under
``torch.use_deterministic_algorithms`` PyTorch replaces the whole op, forward included, by a
decomposition whose backward is a sorted ``index_put_`` over index tensors the size of the
output: an HTC training step at 800 px then needs tens of GB more, and upsampling 183 classes of
semantic logits to 800x1333 at inference 5 GB more. Bilinear resizing is separable,
``out = A_y x A_x^T`` per channel with one (out, in) weight matrix per axis, so the same values
come from two batched matrix products, whose backward is two more: deterministic, and no
larger than the output.
"""

from typing import Tuple

import torch
from torch.nn import functional as F


def bilinear_weights(
    size_in: int, size_out: int, align_corners: bool, like: torch.Tensor
) -> torch.Tensor:
    """(size_out, size_in) weights of bilinear resizing along one axis, as ``F.interpolate``
    places the samples: output i at i * (size_in - 1) / (size_out - 1) with ``align_corners``,
    else at (i + 0.5) * size_in / size_out - 0.5 (at least 0); each between its two neighbours."""
    dtype = torch.promote_types(like.dtype, torch.float32)  # PyTorch's coordinate precision
    index = torch.arange(size_out, device=like.device, dtype=dtype)[:, None]
    if align_corners:
        source = index * ((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0)
    else:
        source = ((index + 0.5) * (size_in / size_out) - 0.5).clamp(min=0)
    low = source.floor().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    frac = source - low
    columns = torch.arange(size_in, device=like.device, dtype=dtype)
    weights = (columns == low) * (1 - frac) + (columns == high) * frac
    return weights.to(like.dtype)


def resize_bilinear(x: torch.Tensor, size: Tuple[int, int], align_corners: bool) -> torch.Tensor:
    """(N, C, *size): ``F.interpolate(x, size, mode="bilinear", align_corners=align_corners)``
    of the (N, C, H, W) ``x``, within rounding, as ``A_y @ x @ A_x^T``."""
    weights_y = bilinear_weights(x.shape[-2], size[0], align_corners, x)
    weights_x = bilinear_weights(x.shape[-1], size[1], align_corners, x)
    return weights_y @ x @ weights_x.T


def interpolate_bilinear(
    x: torch.Tensor, size: Tuple[int, int], align_corners: bool
) -> torch.Tensor:
    """``F.interpolate`` (bilinear) of ``x`` (N, C, H, W) to ``size``; in deterministic runs
    :func:`resize_bilinear`, which needs neither atomics nor PyTorch's memory-hungry
    deterministic replacement."""
    if torch.are_deterministic_algorithms_enabled():
        return resize_bilinear(x, size, align_corners)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
