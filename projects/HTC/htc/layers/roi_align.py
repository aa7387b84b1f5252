"""RoIAlign kernels that also answer "pooled to a smaller size", chosen by MODEL.HTC.ROI_ALIGN.

* :class:`ROIAlign` ("detectron2"): Detectron2's RoIAlign; ``pooled`` average-pools its output.
* :class:`FastROIAlign` ("fast", the default): torchvision's results, faster, by device.
  On CPU, torchvision's ``roi_align`` runs in one thread, forward and backward, and its backward
  recomputes the bilinear weights for every channel: in an HTC training step on CPU the backward
  took more than half of the step. Here the forward is torchvision's kernel run on chunks of RoIs
  by a thread pool (each RoI is computed independently, so the output is bit-identical), and the
  backward builds the interpolation weights once, vectorised, as a sparse (N*H*W, R*Sh*Sw)
  matrix and multiplies the output gradient by it. On CUDA (with Triton installed), the kernels
  of :mod:`htc.layers.roi_align_triton`: a backward without atomics (bit-identical gradients
  from run to run; torchvision's atomicAdds are neither deterministic nor fast where thousands
  of RoIs overlap), pooled outputs computed directly, fp16/bf16 computed natively, and all
  levels of a multi-level pooler in one pass (:meth:`FastROIAlign.all_levels`). Elsewhere, and
  under tracing (export), it is :class:`ROIAlign`.
"""

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Callable, Dict, List, Optional, Tuple, Type

import torch
from detectron2 import layers as d2_layers
from torch.nn import functional as F
from torch.nn.modules.utils import _pair
from torchvision.ops import roi_align

CHUNK = 64  # RoIs per task: a 14x14 output of 256 channels stays within a few MB
TRITON_DEVICES = ("cuda",)  # devices on which FastROIAlign runs htc.layers.roi_align_triton


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


def _taps(pos: torch.Tensor, size: int) -> Tuple[torch.Tensor, ...]:
    """Bilinear neighbours (low, high) of sample positions along one axis and their weights,
    zero for samples outside [-1, size], as torchvision's kernel treats them."""
    valid = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - low.to(pos.dtype))
    return low, high, (1 - frac) * valid, frac * valid


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
    sizes, with one host sync (the numbers of sample rows, columns and points).

    Returns:
        pixel (E,) rows in [0, N*H*W), cell (E,) columns in [0, R*(Sh/pool)*(Sw/pool)) and
        weight (E,), four entries (the bilinear taps) per sample point, sample-major; entries
        of one (pixel, cell) pair are not merged.
    """
    num, _, height, width = input_shape
    pooled_h, pooled_w = output_size
    out_h, out_w = pooled_h // pool, pooled_w // pool
    start_h, start_w, bin_h, bin_w, grid_h, grid_w = _bins(
        rois, output_size, spatial_scale, sampling_ratio, aligned
    )
    rows, cols = grid_h * pooled_h, grid_w * pooled_w  # sample rows and columns per RoI
    samples = rows * cols
    totals = torch.stack([rows.sum(), cols.sum(), samples.sum()]).tolist()
    y_roi, y_index = _ragged(rows, totals[0])
    x_roi, x_index = _ragged(cols, totals[1])
    y_taps = _taps(_sample_positions(start_h, bin_h, grid_h, y_roi, y_index), height)
    x_taps = _taps(_sample_positions(start_w, bin_w, grid_w, x_roi, x_index), width)
    # sample points, RoI-major, row-major: a sample row of RoI r times one of its columns
    roi, k = _ragged(samples, totals[2])
    row_in_roi, col_in_roi = k // cols[roi], k % cols[roi]
    row = (rows.cumsum(0) - rows)[roi] + row_in_roi
    col = (cols.cumsum(0) - cols)[roi] + col_in_roi
    y_low, y_high, wy_low, wy_high = (t[row] for t in y_taps)
    x_low, x_high, wx_low, wx_high = (t[col] for t in x_taps)
    base = rois[roi, 0].long() * (height * width)
    pixel = torch.stack(
        [y_low * width + x_low, y_low * width + x_high, y_high * width + x_low,
         y_high * width + x_high], dim=1,
    ) + base[:, None]  # fmt: skip
    count = (grid_h * grid_w * (pool * pool)).to(wy_low.dtype)[roi]
    weight = (
        torch.stack([wy_low * wx_low, wy_low * wx_high, wy_high * wx_low, wy_high * wx_high], dim=1)
        / count[:, None]
    )
    i, j = row_in_roi // grid_h[roi], col_in_roi // grid_w[roi]
    cell = roi * (out_h * out_w) + (i // pool) * out_w + j // pool
    return pixel.reshape(-1), cell[:, None].expand(-1, 4).reshape(-1), weight.reshape(-1)


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
    (N*H*W, R*(Sh/k)*(Sw/k)) matrix of ``avg_pool2d(roi_align(x), k)``."""
    args = (output_size, spatial_scale, sampling_ratio, aligned, pool)
    pixel, cell, weight = interpolation_entries(rois, input_shape, *args)
    num, _, height, width = input_shape
    cells = rois.shape[0] * (output_size[0] // pool) * (output_size[1] // pool)
    # indices are in range by construction (clamped taps, RoI-major columns)
    return torch.sparse_coo_tensor(
        torch.stack([pixel, cell]), weight, (num * height * width, cells), check_invariants=False
    )


@functools.cache
def _executor(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="roi_align")


os.register_at_fork(after_in_child=_executor.cache_clear)  # a forked child has no pool threads


def in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
    """``fn(rois)`` computed as ``cat([fn(chunk) ...])`` over chunks of :data:`CHUNK` RoIs, on
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
    """torchvision's CPU ``roi_align``, bit for bit, on all threads; with ``pool`` > 1 followed
    by ``avg_pool2d(pool)`` chunk by chunk (the full-size RoI features never exist at once)."""

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
    grad = torch.sparse.mm(matrix, grad.to(matrix.dtype))
    return grad.view(num, height, width, channels).permute(0, 3, 1, 2).contiguous()


def sparse_grad_roi_align(input: torch.Tensor, rois: torch.Tensor, *geometry) -> torch.Tensor:
    """:func:`parallel_roi_align` with the :func:`sparse_backward` gradient."""
    return ROIAlignFunction.apply(input, rois, geometry, parallel_roi_align, sparse_backward)


class ROIAlign(d2_layers.ROIAlign):
    """Detectron2's RoIAlign, which also answers :meth:`pooled`."""

    def pooled(
        self, input: torch.Tensor, rois: torch.Tensor, size: Tuple[int, int]
    ) -> torch.Tensor:
        """(R, C, *size): ``adaptive_avg_pool2d(self(input, rois), size)``."""
        return F.adaptive_avg_pool2d(self(input, rois), size)

    @classmethod
    def like(cls, other: d2_layers.ROIAlign) -> "ROIAlign":
        """This kernel with the geometry of ``other``."""
        return cls(other.output_size, other.spatial_scale, other.sampling_ratio, other.aligned)


@functools.cache
def triton_kernels() -> Optional[ModuleType]:
    """:mod:`htc.layers.roi_align_triton`, or None where Triton is not installed (imported on
    first use: importing Triton takes a while and CPU runs never need it)."""
    try:
        from . import roi_align_triton
    except ImportError:
        return None
    return roi_align_triton


class FastROIAlign(ROIAlign):
    """:class:`ROIAlign` with faster kernels on CPU (parallel forward, sparse-matrix backward)
    and on CUDA (Triton: deterministic backward, native half precision)."""

    def _arguments(self) -> tuple:
        return (_pair(self.output_size), self.spatial_scale, self.sampling_ratio, self.aligned)

    def _route(self, input: torch.Tensor) -> str:
        """ "triton" or "cpu" (this class's kernels), or "detectron2" (the parent's): on other
        devices, and under tracing or scripting, which must record torchvision's op rather
        than a thread pool or a Triton launch."""
        if torch.jit.is_tracing() or torch.jit.is_scripting():
            return "detectron2"
        if input.device.type in TRITON_DEVICES and triton_kernels() is not None:
            return "triton"
        return "cpu" if input.device.type == "cpu" else "detectron2"

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        assert rois.dim() == 2 and rois.size(1) == 5
        route = self._route(input)
        if route == "triton":
            return triton_kernels().roi_align(input, rois, *self._arguments(), 1)
        if route == "cpu":
            return self._on_cpu(input, rois, pool=1)
        return super().forward(input, rois)

    def pooled(
        self, input: torch.Tensor, rois: torch.Tensor, size: Tuple[int, int]
    ) -> torch.Tensor:
        """When ``size`` divides the output size by an integer k, the pooling (an exact kxk
        average) is computed with the RoIAlign (CPU: chunk by chunk; Triton: in the kernel), so
        the full-size RoI features are neither materialized nor kept for backward."""
        pooled_h, pooled_w = _pair(self.output_size)
        k = pooled_h // size[0]
        route = self._route(input)
        if route == "detectron2" or (pooled_h, pooled_w) != (size[0] * k, size[1] * k):
            return super().pooled(input, rois, size)
        if route == "triton":
            return triton_kernels().roi_align(input, rois, *self._arguments(), k)
        return self._on_cpu(input, rois, pool=k)

    def all_levels(
        self,
        features: List[torch.Tensor],
        rois: torch.Tensor,
        levels: torch.Tensor,
        scales: List[float],
    ) -> Optional[torch.Tensor]:
        """(R, C, *output_size): RoI r pooled from ``features[levels[r]]`` at ``scales[levels[r]]``
        with this kernel's geometry, all levels in one pass, where this kernel runs Triton; else
        None (a pooler then pools level by level)."""
        if self._route(features[0]) != "triton":
            return None
        size, _, sampling_ratio, aligned = self._arguments()
        return triton_kernels().multi_level_roi_align(
            features, rois, levels, scales, size, sampling_ratio, aligned
        )

    def _on_cpu(self, input: torch.Tensor, rois: torch.Tensor, pool: int) -> torch.Tensor:
        """The parallel forward (then ``avg_pool2d(pool)``), with the sparse backward when a
        gradient is wanted."""
        rois = rois.to(dtype=input.dtype)
        if torch.is_grad_enabled() and input.requires_grad:
            return sparse_grad_roi_align(input, rois, *self._arguments(), pool)
        return parallel_roi_align(input, rois, *self._arguments(), pool)


# MODEL.HTC.ROI_ALIGN -> kernel
ROI_ALIGN_KERNELS: Dict[str, Type[ROIAlign]] = {"detectron2": ROIAlign, "fast": FastROIAlign}
