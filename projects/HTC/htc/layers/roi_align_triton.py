"""RoIAlign as Triton kernels, for :class:`htc.layers.FastROIAlign` on CUDA.

* Forward: one program per output cell and block of channels gathers the cell's bilinear
  samples from a channels-last copy of the feature, as torchvision's kernel computes them, in
  fp32 whatever the feature's dtype (fp16/bf16 stay fp16/bf16 in memory: no round-trip casts;
  the RoI coordinates stay fp32). With ``pool`` = k it averages kxk cells of the full-size
  output at once: the 7x7 box feature comes straight from the 14x14 geometry.
* Backward: no atomics. The interpolation entries (:func:`interpolation_entries`) are sorted by
  feature pixel (a stable sort), and one program per pixel sums its entries' output gradients
  in that fixed order, so gradients are bit-identical from run to run.

Importing this module imports Triton; ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors.
"""

import functools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .roi_align import ROIAlignFunction, interpolation_entries, sample_totals


@triton.jit
def _bilinear(base, y, x, height, width, channels, channel_mask, C):
    """The bilinear sample at (y, x) of the (H, W, C) feature at ``base``, as fp32 (BLOCK_C,)."""
    valid = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
    y = tl.maximum(y, 0.0)
    x = tl.maximum(x, 0.0)
    y_low = y.to(tl.int32)
    x_low = x.to(tl.int32)
    y_edge = y_low >= height - 1
    x_edge = x_low >= width - 1
    y_low = tl.where(y_edge, height - 1, y_low)
    x_low = tl.where(x_edge, width - 1, x_low)
    y_high = tl.where(y_edge, y_low, y_low + 1)
    x_high = tl.where(x_edge, x_low, x_low + 1)
    ly = tl.where(y_edge, 0.0, y - y_low.to(tl.float32))
    lx = tl.where(x_edge, 0.0, x - x_low.to(tl.float32))
    hy = 1.0 - ly
    hx = 1.0 - lx
    mask = tl.where(valid, channel_mask, False)
    row_low = y_low.to(tl.int64) * width
    row_high = y_high.to(tl.int64) * width
    v1 = tl.load(base + (row_low + x_low) * C + channels, mask=mask, other=0.0).to(tl.float32)
    v2 = tl.load(base + (row_low + x_high) * C + channels, mask=mask, other=0.0).to(tl.float32)
    v3 = tl.load(base + (row_high + x_low) * C + channels, mask=mask, other=0.0).to(tl.float32)
    v4 = tl.load(base + (row_high + x_high) * C + channels, mask=mask, other=0.0).to(tl.float32)
    return hy * hx * v1 + hy * lx * v2 + ly * hx * v3 + ly * lx * v4


@triton.jit
def _forward_kernel(
    feature,  # (N, H, W, C) contiguous
    rois,  # (R, 5) fp32: batch index, x1, y1, x2, y2
    out,  # (R, out_h, out_w, C) contiguous
    C,
    height,
    width,
    out_h,
    out_w,
    spatial_scale,
    sampling_ratio,
    offset,
    ALIGNED: tl.constexpr,
    POOL: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cell = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    r = cell // (out_h * out_w)
    out_i = (cell // out_w) % out_h
    out_j = cell % out_w
    box = rois + r * 5
    start_w = tl.load(box + 1) * spatial_scale - offset
    start_h = tl.load(box + 2) * spatial_scale - offset
    roi_w = tl.load(box + 3) * spatial_scale - offset - start_w
    roi_h = tl.load(box + 4) * spatial_scale - offset - start_h
    if not ALIGNED:
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    pooled_h = out_h * POOL
    pooled_w = out_w * POOL
    bin_h = roi_h / pooled_h
    bin_w = roi_w / pooled_w
    grid_h = tl.where(sampling_ratio > 0, sampling_ratio, tl.ceil(roi_h / pooled_h).to(tl.int32))
    grid_w = tl.where(sampling_ratio > 0, sampling_ratio, tl.ceil(roi_w / pooled_w).to(tl.int32))
    count = tl.maximum(grid_h * grid_w, 1).to(tl.float32)
    base = feature + tl.load(box).to(tl.int64) * height * width * C
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for pi in tl.static_range(POOL):
        for pj in tl.static_range(POOL):
            i = out_i * POOL + pi
            j = out_j * POOL + pj
            for sy in range(grid_h):
                y = start_h + i * bin_h + (sy + 0.5) * bin_h / grid_h
                for sx in range(grid_w):
                    x = start_w + j * bin_w + (sx + 0.5) * bin_w / grid_w
                    acc += _bilinear(base, y, x, height, width, channels, channel_mask, C)
    value = acc / count / (POOL * POOL)
    target = out + cell.to(tl.int64) * C + channels
    tl.store(target, value.to(out.dtype.element_ty), mask=channel_mask)


@triton.jit
def _backward_kernel(
    row_start,  # (N*H*W + 1,) int64: CSR row pointers of the entries sorted by pixel
    cells,  # (E,) int64: each entry's output cell
    weights,  # (E,) fp32
    grad_out,  # (cells, C) contiguous
    grad_in,  # (N*H*W, C) contiguous
    C,
    BLOCK_C: tl.constexpr,
):
    pixel = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    first = tl.load(row_start + pixel)
    last = tl.load(row_start + pixel + 1)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for e in range(first, last):
        cell = tl.load(cells + e)
        weight = tl.load(weights + e)
        grad = tl.load(grad_out + cell * C + channels, mask=channel_mask, other=0.0)
        acc += weight * grad.to(tl.float32)
    target = grad_in + pixel.to(tl.int64) * C + channels
    tl.store(target, acc.to(grad_in.dtype.element_ty), mask=channel_mask)


def _block(channels: int) -> Tuple[int, int]:
    """Channels per program and warps: up to 256 channels at once, 4 per thread."""
    block = min(triton.next_power_of_2(channels), 256)
    return block, max(1, block // 128)


def roi_align_forward(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    pool: int = 1,
) -> torch.Tensor:
    """(R, C, Sh/pool, Sw/pool) in ``input``'s dtype: ``avg_pool2d(roi_align(...), pool)``."""
    num, channels, height, width = input.shape
    out_h, out_w = output_size[0] // pool, output_size[1] // pool
    feature = input.permute(0, 2, 3, 1).contiguous()
    out = input.new_empty((rois.shape[0], out_h, out_w, channels))
    if out.numel() > 0:
        block, warps = _block(channels)
        grid = (rois.shape[0] * out_h * out_w, triton.cdiv(channels, block))
        _forward_kernel[grid](
            feature, rois.float().contiguous(), out, channels, height, width, out_h, out_w,
            float(spatial_scale), int(sampling_ratio), 0.5 if aligned else 0.0,
            ALIGNED=bool(aligned), POOL=pool, BLOCK_C=block, num_warps=warps,
        )  # fmt: skip
    return out.permute(0, 3, 1, 2)


def roi_align_backward(
    grad_output: torch.Tensor,
    rois: torch.Tensor,
    input_shape: Tuple[int, int, int, int],
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    pool: int = 1,
    totals: Optional["HostValues"] = None,
) -> torch.Tensor:
    """(N, C, H, W) gradient of the input of :func:`roi_align_forward`, in ``grad_output``'s
    dtype, deterministic (sorted entries, one program per feature pixel). ``totals``: the
    :func:`sample_totals`, copied to the host in the forward pass."""
    num, channels, height, width = input_shape
    args = (output_size, spatial_scale, sampling_ratio, aligned, pool)
    known = None if totals is None else totals.tolist()
    pixel, cell, weight = interpolation_entries(rois.float(), input_shape, *args, totals=known)
    pixel, order = torch.sort(pixel, stable=True)
    pixels = torch.arange(num * height * width + 1, device=pixel.device)
    row_start = torch.searchsorted(pixel, pixels)
    grad = grad_output.permute(0, 2, 3, 1).contiguous()
    grad_in = grad.new_empty((num, height, width, channels))
    if grad_in.numel() > 0:
        block, warps = _block(channels)
        grid = (num * height * width, triton.cdiv(channels, block))
        _backward_kernel[grid](
            row_start, cell[order].contiguous(), weight[order].float().contiguous(), grad,
            grad_in, channels, BLOCK_C=block, num_warps=warps,
        )  # fmt: skip
    return grad_in.permute(0, 3, 1, 2)


class HostValues:
    """A small device tensor copied to the host without waiting (pinned memory, an event): read
    in the backward pass, long after the copy finished, it costs no stall of the stream."""

    def __init__(self, values: torch.Tensor):
        self._event = None
        if values.is_cuda:
            self._values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._values.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._values = values

    def tolist(self) -> List:
        if self._event is not None:
            self._event.synchronize()
        return self._values.tolist()


def roi_align(input: torch.Tensor, rois: torch.Tensor, *geometry) -> torch.Tensor:
    """(R, C, Sh/pool, Sw/pool): :func:`roi_align_forward`, differentiable by
    :func:`roi_align_backward` (geometry: output_size, spatial_scale, sampling_ratio, aligned,
    pool). When a gradient will be wanted, the sizes the backward allocates are sent to the
    host now, so the backward does not wait on the GPU to learn them."""
    backward = roi_align_backward
    if torch.is_grad_enabled() and input.requires_grad:
        totals = HostValues(sample_totals(rois.float(), *geometry[:4]))
        backward = functools.partial(roi_align_backward, totals=totals)
    return ROIAlignFunction.apply(input, rois, geometry, roi_align_forward, backward)
