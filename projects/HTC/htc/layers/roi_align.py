"""RoIAlign kernels that also answer "pooled to a smaller size", chosen by MODEL.HTC.ROI_ALIGN.

* :class:`ROIAlign` ("detectron2"): Detectron2's RoIAlign; ``pooled`` average-pools its output.
* :class:`FastROIAlign` ("fast", the default): the same results on CPU, faster. torchvision's CPU
  ``roi_align`` runs in one thread, forward and backward, and its backward recomputes the
  bilinear weights for every channel: in an HTC training step on CPU the backward took more than
  half of the step. Here the forward is torchvision's kernel run on chunks of RoIs by a thread
  pool (each RoI is computed independently, so the output is bit-identical), and the backward
  builds the same interpolation weights once, vectorised, as a sparse (N*H*W, R*Sh*Sw) matrix and
  multiplies the output gradient by it. On other devices it is :class:`ROIAlign`.
"""

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Tuple, Type

import torch
from detectron2 import layers as d2_layers
from torch.nn import functional as F
from torch.nn.modules.utils import _pair
from torchvision.ops import roi_align

CHUNK = 64  # RoIs per task: a 14x14 output of 256 channels stays within a few MB


def _axis_samples(
    start: torch.Tensor, bin_size: torch.Tensor, pooled: int, grid: int, size: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps of RoIAlign's sample points along one axis, as torchvision computes them.

    Args:
        start, bin_size: (R,) RoI start and bin size on this axis, in feature-map pixels.
        pooled: output bins; grid: samples per bin; size: feature-map size on this axis.

    Returns:
        indices (R, pooled, grid, 2) of the low/high neighbours and their weights (zero for
        samples outside [-1, size]).
    """
    bins = torch.arange(pooled, dtype=start.dtype, device=start.device)
    steps = torch.arange(grid, dtype=start.dtype, device=start.device) + 0.5
    pos = (start[:, None, None] + bins[None, :, None] * bin_size[:, None, None]) + (
        steps[None, None, :] * bin_size[:, None, None] / grid
    )
    valid = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - low.to(pos.dtype))
    weights = torch.stack([1 - frac, frac], dim=-1) * valid[..., None]
    return torch.stack([low, high], dim=-1), weights


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
    num, _, height, width = input_shape
    pooled_h, pooled_w = output_size
    out_h, out_w = pooled_h // pool, pooled_w // pool
    offset = 0.5 if aligned else 0.0
    start_w, start_h = rois[:, 1] * spatial_scale - offset, rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - start_w
    roi_h = rois[:, 4] * spatial_scale - offset - start_h
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full_like(roi_h, sampling_ratio, dtype=torch.long)
    else:
        grid_h, grid_w = torch.ceil(roi_h / pooled_h).long(), torch.ceil(roi_w / pooled_w).long()
    grids = torch.stack([grid_h.clamp(min=0), grid_w.clamp(min=0)], dim=1)
    rows, cols, vals = [], [], []
    for gh, gw in torch.unique(grids, dim=0).tolist():
        if gh == 0 or gw == 0:
            continue  # an empty RoI: torchvision outputs zeros, no gradient
        idx = ((grids[:, 0] == gh) & (grids[:, 1] == gw)).nonzero()[:, 0]
        ys, wy = _axis_samples(start_h[idx], bin_h[idx], pooled_h, gh, height)
        xs, wx = _axis_samples(start_w[idx], bin_w[idx], pooled_w, gw, width)
        # dims: (R, Sh, Sw, gh, gw, 2 y-taps, 2 x-taps)
        ys, wy = ys[:, :, None, :, None, :, None], wy[:, :, None, :, None, :, None]
        xs, wx = xs[:, None, :, None, :, None, :], wx[:, None, :, None, :, None, :]
        base = rois[idx, 0].long() * (height * width)
        row = base[:, None, None, None, None, None, None] + ys * width + xs
        col = (
            idx[:, None, None] * (out_h * out_w)
            + (torch.arange(pooled_h, device=rois.device) // pool)[None, :, None] * out_w
            + (torch.arange(pooled_w, device=rois.device) // pool)[None, None, :]
        )[..., None, None, None, None]
        val = wy * wx / (gh * gw * pool * pool)
        shape = torch.broadcast_shapes(row.shape, col.shape, val.shape)
        rows.append(row.expand(shape).reshape(-1))
        cols.append(col.expand(shape).reshape(-1))
        vals.append(val.expand(shape).reshape(-1))
    size = (num * height * width, rois.shape[0] * out_h * out_w)
    if rows:
        indices, values = torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals)
    else:
        indices = torch.zeros(2, 0, dtype=torch.long, device=rois.device)
        values = rois.new_zeros(0)
    # indices are in range by construction (clamped taps, RoI-major columns)
    return torch.sparse_coo_tensor(indices, values, size, check_invariants=False)


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


class _ROIAlignSparseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, rois, output_size, spatial_scale, sampling_ratio, aligned, pool=1):
        ctx.save_for_backward(rois)
        ctx.config = (tuple(input.shape), output_size, spatial_scale, sampling_ratio, aligned)
        ctx.pool = pool
        args = (output_size, spatial_scale, sampling_ratio, aligned, pool)
        return parallel_roi_align(input, rois, *args)

    @staticmethod
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        shape, output_size, spatial_scale, sampling_ratio, aligned = ctx.config
        num, channels, height, width = shape
        matrix = interpolation_matrix(
            rois, shape, output_size, spatial_scale, sampling_ratio, aligned, ctx.pool
        )
        grad = grad_output.permute(0, 2, 3, 1).reshape(-1, channels)
        grad = torch.sparse.mm(matrix, grad.to(matrix.dtype))
        grad = grad.view(num, height, width, channels).permute(0, 3, 1, 2).contiguous()
        return grad, None, None, None, None, None, None


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


class FastROIAlign(ROIAlign):
    """:class:`ROIAlign` with the parallel forward and the sparse-matrix backward on CPU."""

    def _arguments(self) -> tuple:
        return (_pair(self.output_size), self.spatial_scale, self.sampling_ratio, self.aligned)

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        if input.device.type != "cpu":
            return super().forward(input, rois)
        assert rois.dim() == 2 and rois.size(1) == 5
        return self._on_cpu(input, rois, pool=1)

    def pooled(
        self, input: torch.Tensor, rois: torch.Tensor, size: Tuple[int, int]
    ) -> torch.Tensor:
        """On CPU, when ``size`` divides the output size by an integer k, the pooling (an exact
        kxk average) is done chunk by chunk, so the full-size RoI features are neither
        materialized nor kept for backward."""
        pooled_h, pooled_w = _pair(self.output_size)
        k = pooled_h // size[0]
        if input.device.type != "cpu" or (pooled_h, pooled_w) != (size[0] * k, size[1] * k):
            return super().pooled(input, rois, size)
        return self._on_cpu(input, rois, pool=k)

    def _on_cpu(self, input: torch.Tensor, rois: torch.Tensor, pool: int) -> torch.Tensor:
        """The parallel forward (then ``avg_pool2d(pool)``), with the sparse backward when a
        gradient is wanted."""
        rois = rois.to(dtype=input.dtype)
        if torch.is_grad_enabled() and input.requires_grad:
            return _ROIAlignSparseGrad.apply(input, rois, *self._arguments(), pool)
        return parallel_roi_align(input, rois, *self._arguments(), pool)


# MODEL.HTC.ROI_ALIGN -> kernel
ROI_ALIGN_KERNELS: Dict[str, Type[ROIAlign]] = {"detectron2": ROIAlign, "fast": FastROIAlign}
