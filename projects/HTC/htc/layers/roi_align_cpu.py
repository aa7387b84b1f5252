"""The CPU kernels of :class:`htc.layers.AutoROIAlign` ("auto" and "cpu_parallel" on CPU).

torchvision's CPU ``roi_align`` runs in one thread, forward and backward, and its backward
recomputes the bilinear weights for every channel. Here the forward is torchvision's kernel run
on chunks of RoIs by a thread pool (:func:`parallel_roi_align`: each RoI is computed
independently, so the output is bit-identical), and the backward builds the interpolation
weights once, vectorised, as a sparse (N*H*W, R*Sh*Sw) matrix (:func:`interpolation_matrix`)
and multiplies the output gradient by it (:func:`sparse_backward`). The sampling geometry
(:func:`interpolation_entries`) is the one that the Triton kernels
(:mod:`htc.layers.roi_align_triton`) compute per element.
"""

import functools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Tuple

import torch
from torch.nn import functional as F
from torchvision.ops import roi_align

CHUNK = 64  # RoIs per task: a 14x14 output of 256 channels stays within a few MB


def _bins(
    rois: torch.Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tuple[torch.Tensor, ...]:
    """Per RoI, as torchvision computes them: start (y, x), bin size (y, x) in feature-map
    pixels and samples per bin (y, x; 0 for an empty RoI). Each (R,)."""
    offset = 0.5 if aligned else 0.0
    start_w, start_h = rois[:, 1] * spatial_scale - offset, rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - start_w
    roi_h = rois[:, 4] * spatial_scale - offset - start_h
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    pooled_h, pooled_w = output_size
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full_like(roi_h, sampling_ratio, dtype=torch.long)
    else:
        grid_h, grid_w = torch.ceil(roi_h / pooled_h).long(), torch.ceil(roi_w / pooled_w).long()
    bins = (roi_h / pooled_h, roi_w / pooled_w)
    return start_h, start_w, *bins, grid_h.clamp(min=0), grid_w.clamp(min=0)


def _taps(
    pos: torch.Tensor, size: int, bounds: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
) -> Tuple[torch.Tensor, ...]:
    """Bilinear neighbours (low, high) of sample positions along one axis and their weights,
    zero for samples outside [-1, size], as torchvision's kernel treats them. With ``bounds``
    (per sample), ``low`` is kept in [bounds[0], bounds[1]] and the weights follow it (see
    :func:`_axis_taps`)."""
    valid = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    if bounds is not None:
        low = torch.minimum(torch.maximum(low, bounds[0]), bounds[1])
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - low.to(pos.dtype))
    return low, high, (1 - frac) * valid, frac * valid


def taps_per_cell(
    bin_size: torch.Tensor, grid: torch.Tensor, pool: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per RoI along one axis: whether the n = pool*grid samples of an output cell run forward
    at most one pixel apart (then their taps merge: n + 1 consecutive rows hold them all), and
    the number of taps per output cell (n + 1 merged, else two per sample; 0 without samples).
    (Samples run backwards in an inverted RoI, aligned, at a fixed sampling ratio.)"""
    merged = (bin_size >= 0) & (bin_size <= grid)
    n = grid * pool
    return merged, torch.where(n == 0, 0, torch.where(merged, n + 1, 2 * n))


def _axis_taps(
    start: torch.Tensor,
    bin_size: torch.Tensor,
    grid: torch.Tensor,
    pool: int,
    cells: int,
    size: int,
    totals: Tuple[int, int],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bilinear taps along one axis of every output cell of every RoI: the feature rows
    that the cell's pool*grid samples touch and the sum of their weights there (not divided
    by the samples' count), ``taps_per_cell`` per cell, RoI-major then cell-major.

    Merged taps are the rows L..L+n of a cell whose first sample's low row is L: the k-th
    sample's low row is kept in [L, L+k] (exact for samples at most one pixel apart; where
    rounding puts one past it, its weights follow it continuously, an error of that rounding).
    ``totals``: the samples and the taps of all RoIs.

    Returns:
        of each tap: its RoI (T,), its cell in the RoI (T,), its row (T,) in [0, size) and its
        weight (T,).
    """
    merged, per_cell = taps_per_cell(bin_size, grid, pool)
    n = grid * pool
    roi, k = _ragged(n * cells, totals[0])
    pos = _sample_positions(start, bin_size, grid, roi, k)
    cell, s, sample_merged = k // n[roi], k % n[roi], merged[roi]
    first = pos[torch.arange(len(k), device=k.device) - s].clamp(min=0).floor().long()
    first = first.clamp(max=size - 1)  # the low row of the cell's first sample
    bounds = (torch.where(sample_merged, first, 0), torch.where(sample_merged, first + s, size))
    low, high, w_low, w_high = _taps(pos, size, bounds)
    tap_start = (per_cell * cells).cumsum(0) - per_cell * cells
    slot = tap_start[roi] + cell * per_cell[roi] + torch.where(sample_merged, low - first, 2 * s)
    weight = pos.new_zeros(totals[1]).index_add_(
        0, torch.stack([slot, slot + 1], 1).flatten(), torch.stack([w_low, w_high], 1).flatten()
    )
    tap_roi, t = _ragged(per_cell * cells, totals[1])
    tap_cell, t, tap_merged = t // per_cell[tap_roi], t % per_cell[tap_roi], merged[tap_roi]
    # the cell's first sample (merged), or the tap's own sample
    sample = ((n * cells).cumsum(0) - n * cells)[tap_roi] + tap_cell * n[tap_roi]
    sample = sample + torch.where(tap_merged, 0, t // 2)
    own = torch.where(t % 2 == 1, high[sample], low[sample])
    row = torch.where(tap_merged, (low[sample] + t).clamp(max=size - 1), own)
    return tap_roi, tap_cell, row, weight


def interpolation_entries(
    rois: torch.Tensor,
    input_shape: Tuple[int, int, int, int],
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    pool: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entries of :func:`interpolation_matrix`, built without a loop over RoIs or grid
    sizes, with one host sync (the numbers of samples, taps and entries).

    An output cell's weight on a feature pixel is a sum over the cell's samples of products of
    a weight along y and one along x: it is the product of the sums along each axis. So the
    entries of a cell are its y taps times its x taps (:func:`_axis_taps`): (n+1)^2 for n x n
    samples, where one entry per sample and bilinear tap makes 4n^2.

    Returns:
        pixel (E,) rows in [0, N*H*W), cell (E,) columns in [0, R*(Sh/pool)*(Sw/pool)) and
        weight (E,): per RoI, its y taps times its x taps, y-major; zero weights included.
    """
    num, _, height, width = input_shape
    pooled_h, pooled_w = output_size
    out_h, out_w = pooled_h // pool, pooled_w // pool
    start_h, start_w, bin_h, bin_w, grid_h, grid_w = _bins(
        rois, output_size, spatial_scale, sampling_ratio, aligned
    )
    y_taps = taps_per_cell(bin_h, grid_h, pool)[1] * out_h  # per RoI
    x_taps = taps_per_cell(bin_w, grid_w, pool)[1] * out_w
    counts = [grid_h * pooled_h, y_taps, grid_w * pooled_w, x_taps, y_taps * x_taps]
    totals = torch.stack([c.sum() for c in counts]).tolist()
    y_axis = _axis_taps(start_h, bin_h, grid_h, pool, out_h, height, totals[:2])
    _, x_cell, x_row, x_weight = _axis_taps(start_w, bin_w, grid_w, pool, out_w, width, totals[2:4])
    # what each y tap gives its entries, the RoI's terms folded in
    y_roi, y_cell, y_row, y_weight = y_axis
    y_pixel = rois[y_roi, 0].long() * (height * width) + y_row * width
    y_cell = y_roi * (out_h * out_w) + y_cell * out_w
    y_weight = y_weight / (grid_h * grid_w * (pool * pool)).to(y_weight.dtype)[y_roi]
    y, x = _tap_pairs(y_roi, x_taps, totals[4])
    return y_pixel[y] + x_row[x], y_cell[y] + x_cell[x], y_weight[y] * x_weight[x]


def _tap_pairs(
    y_roi: torch.Tensor, x_taps: torch.Tensor, total: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each y tap (of RoI ``y_roi``) paired with every x tap of its RoI (``x_taps`` per RoI,
    laid end to end), y-major: the y tap (total,) and the x tap (total,) of each pair."""
    device = y_roi.device
    per_y = x_taps[y_roi]
    y = torch.repeat_interleave(torch.arange(len(y_roi), device=device), per_y, output_size=total)
    x_first = (x_taps.cumsum(0) - x_taps)[y_roi] - (per_y.cumsum(0) - per_y)
    return y, torch.arange(total, device=device) + x_first[y]


def _ragged(count: torch.Tensor, total: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Items of segments laid end to end, segment r holding ``count[r]`` (``total`` in all):
    each item's segment (total,) and its index in the segment (total,)."""
    device = count.device
    segment = torch.repeat_interleave(
        torch.arange(len(count), device=device), count, output_size=total
    )
    return segment, torch.arange(total, device=device) - (count.cumsum(0) - count)[segment]


def _sample_positions(
    start: torch.Tensor,
    bin_size: torch.Tensor,
    grid: torch.Tensor,
    roi: torch.Tensor,
    index: torch.Tensor,
) -> torch.Tensor:
    """Positions along one axis of the samples ``index`` (bin-major: bin ``index // grid``,
    sample ``index % grid`` in it) of RoIs ``roi``, as torchvision computes them."""
    grid, size = grid[roi], bin_size[roi]
    return (start[roi] + (index // grid) * size) + (index % grid + 0.5) * size / grid


def interpolation_matrix(
    rois: torch.Tensor,
    input_shape: Tuple[int, int, int, int],
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    pool: int = 1,
) -> torch.Tensor:
    """The sparse (N*H*W, R*Sh*Sw) matrix ``M`` with ``roi_align(x) = M^T x`` per channel
    (x laid out as (N*H*W, C)), following torchvision's CPU kernel; with ``pool`` = k, the
    (N*H*W, R*(Sh/k)*(Sw/k)) matrix of ``avg_pool2d(roi_align(x), k)``. In CSR: its product
    sums each pixel's entries in one thread, in a fixed order."""
    args = (output_size, spatial_scale, sampling_ratio, aligned, pool)
    pixel, cell, weight = interpolation_entries(rois, input_shape, *args)
    num, _, height, width = input_shape
    pixels = num * height * width
    cells = rois.shape[0] * (output_size[0] // pool) * (output_size[1] // pool)
    # a stable sort: the order within a pixel is the entries' own (int32 keys sort faster)
    pixel, order = torch.sort(pixel.int() if pixels < 2**31 else pixel, stable=True)
    row_start = torch.searchsorted(pixel, torch.arange(pixels + 1).to(pixel))
    with warnings.catch_warnings():  # PyTorch calls CSR "beta"; construction and mm are not
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        # indices are in range by construction (clamped taps)
        return torch.sparse_csr_tensor(
            row_start, cell[order], weight[order], (pixels, cells), check_invariants=False
        )


@functools.cache
def _executor(threads: int) -> ThreadPoolExecutor:
    _forget_pools_in_forked_children()
    return ThreadPoolExecutor(threads, thread_name_prefix="roi_align")


@functools.cache
def _forget_pools_in_forked_children() -> None:
    """Registered with the first pool, not at import: a forked child has none of its threads."""
    os.register_at_fork(after_in_child=_executor.cache_clear)


def in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
    """``fn(rois)`` for (R, 5) ``rois`` and an ``fn`` whose output has a row per RoI (R, ...),
    computed as ``cat([fn(chunk) ...])`` over chunks of :data:`CHUNK` RoIs, on
    ``torch.get_num_threads()`` threads (torchvision's kernels release the GIL). A tracer
    records only its own thread, so under ``torch.jit`` tracing it runs in one."""
    chunks: List[torch.Tensor] = list(rois.split(CHUNK))
    threads = min(torch.get_num_threads(), len(chunks))
    if threads <= 1 or torch.jit.is_tracing():
        return fn(rois)
    grad_mode = torch.is_grad_enabled()  # per thread: the pool's threads start with it on

    def run(chunk: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(grad_mode):
            return fn(chunk)

    return torch.cat(list(_executor(threads).map(run, chunks)))


def parallel_roi_align(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    pool: int = 1,
) -> torch.Tensor:
    """torchvision's CPU ``roi_align``, bit for bit, on all threads: (N, C, H, W) ``input`` and
    (R, 5) ``rois`` -> (R, C, *output_size); with ``pool`` > 1 followed by ``avg_pool2d(pool)``
    chunk by chunk (the full-size RoI features never exist at once), (R, C, *output_size / pool)."""

    def run(part: torch.Tensor) -> torch.Tensor:
        out = roi_align(input, part, output_size, spatial_scale, sampling_ratio, aligned)
        return F.avg_pool2d(out, pool) if pool > 1 else out

    return in_chunks(run, rois)


class ROIAlignFunction(torch.autograd.Function):
    """RoIAlign (then kxk average pooling) computed by given kernels: the output is
    ``forward_fn(input, rois, *geometry)`` and the input's gradient
    ``backward_fn(grad_output, rois, input.shape, *geometry)``, where geometry is
    (output_size, spatial_scale, sampling_ratio, aligned, pool)."""

    @staticmethod
    def forward(ctx, input, rois, geometry, forward_fn, backward_fn):
        ctx.save_for_backward(rois)
        ctx.input_shape, ctx.geometry, ctx.backward_fn = tuple(input.shape), geometry, backward_fn
        return forward_fn(input, rois, *geometry)

    @staticmethod
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        grad = ctx.backward_fn(grad_output, rois, ctx.input_shape, *ctx.geometry)
        return grad, None, None, None, None


def sparse_backward(
    grad_output: torch.Tensor,
    rois: torch.Tensor,
    input_shape: Tuple[int, int, int, int],
    *geometry,
) -> torch.Tensor:
    """(N, C, H, W) input gradient of RoIAlign: the output gradient times the sparse
    :func:`interpolation_matrix` (geometry: output_size, spatial_scale, sampling_ratio,
    aligned, pool)."""
    num, channels, height, width = input_shape
    matrix = interpolation_matrix(rois, input_shape, *geometry)
    grad = grad_output.permute(0, 2, 3, 1).reshape(-1, channels)
    grad = matrix @ grad.to(matrix.dtype)
    return grad.view(num, height, width, channels).permute(0, 3, 1, 2).contiguous()


def sparse_grad_roi_align(input: torch.Tensor, rois: torch.Tensor, *geometry) -> torch.Tensor:
    """:func:`parallel_roi_align` (same shapes) with the :func:`sparse_backward` gradient."""
    return ROIAlignFunction.apply(input, rois, geometry, parallel_roi_align, sparse_backward)
