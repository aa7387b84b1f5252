"""RoIAlign as Triton kernels, for :class:`htc.layers.FastROIAlign` on CUDA.

* Forward: one program per output cell and block of channels gathers the cell's bilinear
  samples from a channels-last copy of the feature, as torchvision's kernel computes them, in
  fp32 whatever the feature's dtype (fp16/bf16 stay fp16/bf16 in memory: no round-trip casts;
  the RoI coordinates stay fp32). With ``pool`` = k it averages kxk cells of the full-size
  output at once: the 7x7 box feature comes straight from the 14x14 geometry.
* Backward: no atomics. One kernel writes the interpolation entries (feature pixel, output
  cell, weight: four per sample point, in the order of :func:`htc.layers.roi_align.
  interpolation_entries`); they are sorted by pixel (a stable sort), and one program per pixel
  sums its entries' output gradients, eight at a time, in the order of that sort, so gradients
  are bit-identical from run to run. The number of entries is counted in the forward pass and reaches the host
  without stalling the stream, so the backward is a handful of launches and no host sync.

Importing this module imports Triton; ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors.
"""

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .roi_align import ROIAlignFunction


@triton.jit
def _geometry(box, mask, spatial_scale, offset, sampling_ratio, pooled_h, pooled_w,
              ALIGNED: tl.constexpr):  # fmt: skip
    """Of the RoIs at ``box`` (pointers to rows of 5), as torchvision computes them: start
    (y, x), bin size (y, x) and samples per bin (y, x; <= 0 for an empty RoI)."""
    start_w = tl.load(box + 1, mask=mask, other=0.0) * spatial_scale - offset
    start_h = tl.load(box + 2, mask=mask, other=0.0) * spatial_scale - offset
    roi_w = tl.load(box + 3, mask=mask, other=0.0) * spatial_scale - offset - start_w
    roi_h = tl.load(box + 4, mask=mask, other=0.0) * spatial_scale - offset - start_h
    if not ALIGNED:
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    bin_h = roi_h / pooled_h
    bin_w = roi_w / pooled_w
    grid_h = tl.where(sampling_ratio > 0, sampling_ratio, tl.ceil(bin_h).to(tl.int32))
    grid_w = tl.where(sampling_ratio > 0, sampling_ratio, tl.ceil(bin_w).to(tl.int32))
    return start_h, start_w, bin_h, bin_w, grid_h, grid_w


@triton.jit
def _taps(pos, size):
    """Bilinear neighbours (low, high) of positions along one axis, their weights, and whether
    a sample counts (inside [-1, size]), as torchvision's kernel treats them."""
    valid = (pos >= -1.0) & (pos <= size)
    pos = tl.maximum(pos, 0.0)
    low = pos.to(tl.int32)
    edge = low >= size - 1
    low = tl.where(edge, size - 1, low)
    high = tl.where(edge, low, low + 1)
    frac = tl.where(edge, 0.0, pos - low.to(tl.float32))
    return low, high, 1.0 - frac, frac, valid


@triton.jit
def _bilinear(base, y, x, height, width, channels, channel_mask, C):
    """The bilinear sample at (y, x) of the (H, W, C) feature at ``base``, as fp32 (BLOCK_C,)."""
    y_low, y_high, hy, ly, y_valid = _taps(y, height)
    x_low, x_high, hx, lx, x_valid = _taps(x, width)
    mask = tl.where(y_valid & x_valid, channel_mask, False)
    row_low = y_low.to(tl.int64) * width
    row_high = y_high.to(tl.int64) * width
    v1 = tl.load(base + (row_low + x_low) * C + channels, mask=mask, other=0.0).to(tl.float32)
    v2 = tl.load(base + (row_low + x_high) * C + channels, mask=mask, other=0.0).to(tl.float32)
    v3 = tl.load(base + (row_high + x_low) * C + channels, mask=mask, other=0.0).to(tl.float32)
    v4 = tl.load(base + (row_high + x_high) * C + channels, mask=mask, other=0.0).to(tl.float32)
    return hy * hx * v1 + hy * lx * v2 + ly * hx * v3 + ly * lx * v4


# do_not_specialize: arguments that change from call to call (feature sizes, RoI and sample
# counts), for which Triton would compile a kernel per residue mod 16 (and for 1), mid-training
@triton.jit(do_not_specialize=["height", "width"])
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
    start_h, start_w, bin_h, bin_w, grid_h, grid_w = _geometry(
        box, r >= 0, spatial_scale, offset, sampling_ratio, out_h * POOL, out_w * POOL, ALIGNED
    )
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


@triton.jit(do_not_specialize=["num_rois"])
def _samples_kernel(
    rois,  # (R, 5) fp32
    samples,  # (R,) int64 out: sample points per RoI
    num_rois,
    pooled_h,
    pooled_w,
    spatial_scale,
    sampling_ratio,
    offset,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = r < num_rois
    *_, grid_h, grid_w = _geometry(
        rois + r * 5, mask, spatial_scale, offset, sampling_ratio, pooled_h, pooled_w, ALIGNED
    )
    rows = tl.maximum(grid_h, 0) * pooled_h
    cols = tl.maximum(grid_w, 0) * pooled_w
    tl.store(samples + r, rows.to(tl.int64) * cols, mask=mask)


@triton.jit(do_not_specialize=["num_rois", "search_steps", "total", "height", "width"])
def _entries_kernel(
    rois,  # (R, 5) fp32
    ends,  # (R,) int64: cumulative sample points of the RoIs
    pixel,  # (4 * total,) int32 out: feature pixel in [0, N*H*W)
    cell,  # (4 * total,) int32 out: output cell in [0, R*out_h*out_w)
    weight,  # (4 * total,) fp32 out
    num_rois,
    search_steps,  # >= log2(R + 1)
    total,  # sample points of all RoIs
    height,
    width,
    out_h,
    out_w,
    spatial_scale,
    sampling_ratio,
    offset,
    ALIGNED: tl.constexpr,
    POOL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = s < total
    # the sample's RoI: the first whose end is past it (binary search)
    low = tl.zeros((BLOCK,), dtype=tl.int32)
    high = tl.zeros((BLOCK,), dtype=tl.int32) + num_rois
    for _ in range(search_steps):
        active = low < high
        mid = (low + high) // 2
        end = tl.load(ends + mid, mask=mask & active, other=0)
        right = active & (end <= s)
        low = tl.where(right, mid + 1, low)
        high = tl.where(active & ~right, mid, high)
    roi = tl.minimum(low, num_rois - 1)
    k = s - tl.load(ends + roi - 1, mask=mask & (roi > 0), other=0)
    box = rois + roi * 5
    pooled_h = out_h * POOL
    pooled_w = out_w * POOL
    start_h, start_w, bin_h, bin_w, grid_h, grid_w = _geometry(
        box, mask, spatial_scale, offset, sampling_ratio, pooled_h, pooled_w, ALIGNED
    )
    grid_h = tl.maximum(grid_h, 1)  # a RoI that owns sample points has grid >= 1
    grid_w = tl.maximum(grid_w, 1)
    cols = grid_w * pooled_w
    row = (k // cols).to(tl.int32)
    col = (k % cols).to(tl.int32)
    i = row // grid_h
    j = col // grid_w
    y = start_h + i * bin_h + (row % grid_h + 0.5) * bin_h / grid_h
    x = start_w + j * bin_w + (col % grid_w + 0.5) * bin_w / grid_w
    y_low, y_high, hy, ly, y_valid = _taps(y, height)
    x_low, x_high, hx, lx, x_valid = _taps(x, width)
    scale = tl.where(y_valid & x_valid, 1.0, 0.0) / (grid_h * grid_w * POOL * POOL).to(tl.float32)
    base = tl.load(box, mask=mask, other=0.0).to(tl.int32) * (height * width)
    target = roi * (out_h * out_w) + (i // POOL) * out_w + j // POOL
    e = s * 4
    tl.store(pixel + e, base + y_low * width + x_low, mask=mask)
    tl.store(pixel + e + 1, base + y_low * width + x_high, mask=mask)
    tl.store(pixel + e + 2, base + y_high * width + x_low, mask=mask)
    tl.store(pixel + e + 3, base + y_high * width + x_high, mask=mask)
    for t in tl.static_range(4):
        tl.store(cell + e + t, target, mask=mask)
    tl.store(weight + e, hy * hx * scale, mask=mask)
    tl.store(weight + e + 1, hy * lx * scale, mask=mask)
    tl.store(weight + e + 2, ly * hx * scale, mask=mask)
    tl.store(weight + e + 3, ly * lx * scale, mask=mask)


@triton.jit
def _backward_kernel(
    row_start,  # (N*H*W + 1,) int64: CSR row pointers of the entries sorted by pixel
    cells,  # (E,) int32: each entry's output cell
    weights,  # (E,) fp32
    grad_out,  # (cells, C) contiguous
    grad_in,  # (N*H*W, C) contiguous
    C,
    BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pixel = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    first = tl.load(row_start + pixel)
    last = tl.load(row_start + pixel + 1)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    # BLOCK_E entries at a time: their loads are in flight together, and they are summed in
    # the same fixed order on every run
    for start in range(first, last, BLOCK_E):
        e = start + tl.arange(0, BLOCK_E)
        entry_mask = e < last
        cell = tl.load(cells + e, mask=entry_mask, other=0).to(tl.int64)
        weight = tl.load(weights + e, mask=entry_mask, other=0.0)
        rows = grad_out + cell[:, None] * C + channels[None, :]
        grad = tl.load(rows, mask=entry_mask[:, None] & channel_mask[None, :], other=0.0)
        acc += tl.sum(weight[:, None] * grad.to(tl.float32), axis=0)
    target = grad_in + pixel.to(tl.int64) * C + channels
    tl.store(target, acc.to(grad_in.dtype.element_ty), mask=channel_mask)


BLOCK = 256  # RoIs or sample points per program of the counting and entry kernels
BLOCK_E = 8  # entries summed at once by a program of the backward


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


def sample_ends(
    rois: torch.Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """(R,) int64 on the RoIs' device: cumulative numbers of sample points of the RoIs (the
    last is the number of all, a quarter of the interpolation entries)."""
    samples = torch.empty(rois.shape[0], dtype=torch.int64, device=rois.device)
    if len(samples) > 0:
        _samples_kernel[(triton.cdiv(len(samples), BLOCK),)](
            rois.float().contiguous(), samples, len(samples), *output_size,
            float(spatial_scale), int(sampling_ratio), 0.5 if aligned else 0.0,
            ALIGNED=bool(aligned), BLOCK=BLOCK,
        )  # fmt: skip
    return samples.cumsum(0)


def interpolation_entries(
    rois: torch.Tensor,
    input_shape: Tuple[int, int, int, int],
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    pool: int,
    ends: torch.Tensor,
    total: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entries of :func:`htc.layers.roi_align.interpolation_entries`, in its order, from one
    kernel: pixel (E,) int32, cell (E,) int32 and weight (E,) fp32, E = 4 * ``total``, where
    ``ends`` are the :func:`sample_ends` and ``total`` is their last."""
    num, _, height, width = input_shape
    out_h, out_w = output_size[0] // pool, output_size[1] // pool
    if max(num * height * width, len(rois) * out_h * out_w) >= 2**31:
        raise ValueError(
            f"RoIAlign backward: {num}x{height}x{width} feature pixels or {len(rois)}x{out_h}x"
            f"{out_w} output cells do not fit the int32 entries"
        )
    device = rois.device
    pixel = torch.empty(4 * total, dtype=torch.int32, device=device)
    cell = torch.empty(4 * total, dtype=torch.int32, device=device)
    weight = torch.empty(4 * total, dtype=torch.float32, device=device)
    if total > 0:
        _entries_kernel[(triton.cdiv(total, BLOCK),)](
            rois.float().contiguous(), ends, pixel, cell, weight, len(ends),
            len(ends).bit_length(), total, height, width, out_h, out_w, float(spatial_scale),
            int(sampling_ratio), 0.5 if aligned else 0.0, ALIGNED=bool(aligned), POOL=pool,
            BLOCK=BLOCK,
        )  # fmt: skip
    return pixel, cell, weight


def roi_align_backward(
    grad_output: torch.Tensor,
    rois: torch.Tensor,
    input_shape: Tuple[int, int, int, int],
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    pool: int = 1,
    samples: Optional["SampleCount"] = None,
) -> torch.Tensor:
    """(N, C, H, W) gradient of the input of :func:`roi_align_forward`, in ``grad_output``'s
    dtype, deterministic (sorted entries, one program per feature pixel). ``samples``: the
    sample points counted in the forward pass (else counted here, with a host sync)."""
    num, channels, height, width = input_shape
    if samples is None:
        samples = SampleCount(rois, output_size, spatial_scale, sampling_ratio, aligned)
    args = (output_size, spatial_scale, sampling_ratio, aligned, pool)
    pixel, cell, weight = interpolation_entries(
        rois, input_shape, *args, samples.ends, samples.total()
    )
    pixel, order = torch.sort(pixel, stable=True)
    pixels = torch.arange(num * height * width + 1, dtype=pixel.dtype, device=pixel.device)
    row_start = torch.searchsorted(pixel, pixels)
    grad = grad_output.permute(0, 2, 3, 1).contiguous()
    grad_in = grad.new_empty((num, height, width, channels))
    if grad_in.numel() > 0:
        block, warps = _block(channels)
        grid = (num * height * width, triton.cdiv(channels, block))
        _backward_kernel[grid](
            row_start, cell[order], weight[order], grad, grad_in, channels, BLOCK_C=block,
            BLOCK_E=BLOCK_E, num_warps=warps,
        )  # fmt: skip
    return grad_in.permute(0, 3, 1, 2)


class SampleCount:
    """The :func:`sample_ends` of RoIs, with their total copied to the host without waiting
    (pinned memory, an event): read in the backward pass, long after the copy finished, it
    costs no stall of the stream."""

    def __init__(self, rois: torch.Tensor, *geometry):
        self.ends = sample_ends(rois, *geometry)
        last = self.ends[-1:] if len(self.ends) else self.ends.new_zeros(1)
        self._event = None
        if last.is_cuda:
            self._total = torch.empty(1, dtype=last.dtype, pin_memory=True)
            self._total.copy_(last, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._total = last

    def total(self) -> int:
        if self._event is not None:
            self._event.synchronize()
        return self._total.tolist()[0]  # not int(): its aten::item would count as a sync


def roi_align(input: torch.Tensor, rois: torch.Tensor, *geometry) -> torch.Tensor:
    """(R, C, Sh/pool, Sw/pool): :func:`roi_align_forward`, differentiable by
    :func:`roi_align_backward` (geometry: output_size, spatial_scale, sampling_ratio, aligned,
    pool). When a gradient will be wanted, the sample points are counted now, so the backward
    does not wait on the GPU to learn how many entries to allocate."""
    backward = roi_align_backward
    if torch.is_grad_enabled() and input.requires_grad:
        samples = SampleCount(rois, *geometry[:4])
        backward = functools.partial(roi_align_backward, samples=samples)
    return ROIAlignFunction.apply(input, rois, geometry, roi_align_forward, backward)
