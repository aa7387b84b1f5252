"""Bilinear resizing (``align_corners=True``) as two matrix products, for deterministic runs.

On CUDA, ``F.interpolate``'s bilinear backward accumulates with atomics; under
``torch.use_deterministic_algorithms`` PyTorch replaces it by a decomposition whose backward is
a sorted ``index_put_`` over index tensors the size of the output: an HTC training step at 800
px then needs tens of GB more. Bilinear resizing is separable, ``out = A_y x A_x^T`` per
channel with one (out, in) weight matrix per axis, so the same values come from two batched
matrix products, whose backward is two more: deterministic, and no larger than the output.
"""

from typing import Tuple

import torch


def align_corners_weights(size_in: int, size_out: int, like: torch.Tensor) -> torch.Tensor:
    """(size_out, size_in) bilinear weights with ``align_corners=True``: output i samples the
    input at i * (size_in - 1) / (size_out - 1), between its two neighbours."""
    dtype = torch.promote_types(like.dtype, torch.float32)  # PyTorch's coordinate precision
    scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    source = torch.arange(size_out, device=like.device, dtype=dtype)[:, None] * scale
    low = source.floor().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    frac = source - low
    columns = torch.arange(size_in, device=like.device, dtype=dtype)
    weights = (columns == low) * (1 - frac) + (columns == high) * frac
    return weights.to(like.dtype)


def resize_align_corners(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(N, C, *size): ``F.interpolate(x, size, mode="bilinear", align_corners=True)`` of the
    (N, C, H, W) ``x``, within rounding, as ``A_y @ x @ A_x^T``."""
    weights_y = align_corners_weights(x.shape[-2], size[0], x)
    weights_x = align_corners_weights(x.shape[-1], size[1], x)
    return weights_y @ x @ weights_x.T
