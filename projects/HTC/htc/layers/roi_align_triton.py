"""RoIAlign as Triton kernels, for :class:`htc.layers.AutoROIAlign` on CUDA.

* Levels: the RoIs of a multi-level pooler are computed in one pass, each on its own level's
  feature (:func:`multi_level_roi_align`): the levels are copied into one channels-last buffer
  and a small table gives each level's first pixel, size and spatial scale; one level is the
  special case (:func:`roi_align`). Calls on the same levels may share that buffer
  (:func:`joint_levels`): HTC pools the same FPN levels six times per train step.
* Forward: one program per output cell and block of channels gathers the cell's bilinear
  samples, as torchvision's kernel computes them, in fp32 whatever the feature's dtype
  (fp16/bf16 stay fp16/bf16 in memory: no round-trip casts; the RoI coordinates stay fp32).
  With ``pool`` = k it averages kxk cells of the full-size output at once: the 7x7 box feature
  comes straight from the 14x14 geometry.
* Backward: no atomics. One kernel writes the interpolation entries (feature pixel, output
  cell, weight: a cell's y taps times its x taps, each tap summed over the cell's samples, in
  the order of :func:`htc.layers.roi_align_cpu.interpolation_entries`: (n+1)^2 per cell of n x n
  samples, not 4n^2); they are sorted by pixel (a stable sort), and one program per pixel
  sums its entries' output gradients, eight at a time, in the order of that sort (read through
  it, not gathered), so gradients are bit-identical from run to run. The number of entries is
  counted in the forward pass and reaches the host without stalling the stream, so the
  backward is a handful of launches and no host sync.

The geometry is written twice, vectorised over all RoIs in torch for the CPU route
(:mod:`htc.layers.roi_align_cpu`) and per element here (Triton cannot call Python code). The pairs:

==========================================  =============================  ====================
quantity (along one axis where it says so)  CPU (``roi_align_cpu.py``)      Triton (this module)
==========================================  =============================  ====================
RoI start, bin size, samples per bin        ``_bins``                       ``_geometry``
position of sample k of a RoI (one axis)    ``_sample_positions``           ``_sample``
bilinear rows and weights of a position     ``_taps`` (with ``bounds``)     ``_taps``, and
                                                                            ``_neighbours`` for
                                                                            a given low row
merged taps?, taps per output cell          ``taps_per_cell``               ``_taps_per_cell``
rows and summed weights of a cell's taps    ``_axis_taps`` (every tap)      ``_axis_tap`` (one)
a backward's entries (pixel, cell, weight)  ``interpolation_entries``       ``_entries_kernel``
==========================================  =============================  ====================

``tests/layers/test_roi_align_triton.py::test_entries_equal_the_vectorised_builders`` pins them
together: the entry kernel must write the CPU builder's entries, in its order.

Importing this module imports Triton; ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors.
"""

import itertools
import struct
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..host import host_tensor


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
    low, high, w_low, w_high = _neighbours(pos, pos.to(tl.int32), size)
    return low, high, w_low, w_high, valid


@triton.jit
def _neighbours(pos, low, size):
    """Of positions ``pos`` >= 0 with low rows ``low``: the low and high rows and their
    weights, a low row at the last row or past it clamped to it (high = low, weight 1)."""
    edge = low >= size - 1
    low = tl.where(edge, size - 1, low)
    high = tl.where(edge, low, low + 1)
    frac = tl.where(edge, 0.0, pos - low.to(tl.float32))
    return low, high, 1.0 - frac, frac


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


@triton.jit
def _level(levels, table, scales, r, mask, LEVELS: tl.constexpr):
    """Of the feature level of RoIs ``r`` (level 0 without ``LEVELS``): its first pixel in the
    levels' joint buffer, its height, width and spatial scale (rows of ``table``)."""
    if LEVELS:
        level = tl.load(levels + r, mask=mask, other=0).to(tl.int32)
    else:
        level = (r * 0).to(tl.int32)
    row = level * 4
    first = tl.load(table + row, mask=mask, other=0).to(tl.int64)
    height = tl.load(table + row + 1, mask=mask, other=1)
    width = tl.load(table + row + 2, mask=mask, other=1)
    scale = tl.load(scales + row + 3, mask=mask, other=0.0)
    return first, height, width, scale


@triton.jit
def _forward_kernel(
    feature,  # (P, C) contiguous: the levels' pixels, channels last
    rois,  # (R, 5) fp32: batch index, x1, y1, x2, y2
    levels,  # (R,) each RoI's level (read with LEVELS)
    table,  # (L, 4) int32: per level its first pixel, height, width, scale (fp32 bits)
    scales,  # the same table as fp32
    out,  # (R, out_h, out_w, C) contiguous
    C,
    out_h,
    out_w,
    sampling_ratio,
    offset,
    ALIGNED: tl.constexpr,
    POOL: tl.constexpr,
    LEVELS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cell = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    r = cell // (out_h * out_w)
    out_i = (cell // out_w) % out_h
    out_j = cell % out_w
    first, height, width, scale = _level(levels, table, scales, r, r >= 0, LEVELS)
    box = rois + r * 5
    start_h, start_w, bin_h, bin_w, grid_h, grid_w = _geometry(
        box, r >= 0, scale, offset, sampling_ratio, out_h * POOL, out_w * POOL, ALIGNED
    )
    count = tl.maximum(grid_h * grid_w, 1).to(tl.float32)
    image = tl.load(box).to(tl.int64)
    base = feature + (first + image * height * width) * C
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
def _taps_per_cell(bin_size, grid, POOL: tl.constexpr):
    """Along one axis, as :func:`htc.layers.roi_align_cpu.taps_per_cell`: whether a cell's samples
    merge their taps, its samples and its taps."""
    n = tl.maximum(grid, 0) * POOL
    merged = (bin_size >= 0.0) & (bin_size <= grid.to(tl.float32))
    return merged, n, tl.where(n == 0, 0, tl.where(merged, n + 1, 2 * n))


@triton.jit
def _sample(start, bin_size, grid, k):
    """Position along one axis of sample ``k`` of a RoI (bin ``k // grid``, sample ``k % grid``
    in it), as torchvision computes it."""
    return start + (k // grid) * bin_size + (k % grid + 0.5) * bin_size / grid


@triton.jit
def _axis_tap(start, bin_size, grid, cell, t, size, POOL: tl.constexpr):
    """Row and weight (the sum over the cell's samples, not divided by their count) of tap
    ``t`` of output cell ``cell`` along one axis, as :func:`htc.layers.roi_align_cpu._axis_taps`
    makes them, the samples summed in the same order."""
    merged, n, _ = _taps_per_cell(bin_size, grid, POOL)
    grid = tl.maximum(grid, 1)
    k = cell * n
    first = tl.minimum(tl.maximum(_sample(start, bin_size, grid, k), 0.0).to(tl.int32), size - 1)
    weight = tl.zeros(t.shape, dtype=tl.float32)
    own = tl.zeros(t.shape, dtype=tl.int32)
    for s in range(tl.max(n, axis=0)):
        pos = _sample(start, bin_size, grid, k + s)
        valid = ((pos >= -1.0) & (pos <= size)).to(tl.float32)
        pos = tl.maximum(pos, 0.0)
        low = pos.to(tl.int32)
        low = tl.where(merged, tl.minimum(tl.maximum(low, first), first + s), low)
        low, high, w_low, w_high = _neighbours(pos, low, size)
        active = s < n
        hit_low = active & tl.where(merged, low - first == t, 2 * s == t)
        hit_high = active & tl.where(merged, low - first + 1 == t, 2 * s + 1 == t)
        weight += tl.where(hit_low, w_low * valid, 0.0) + tl.where(hit_high, w_high * valid, 0.0)
        own = tl.where(hit_low, low, tl.where(hit_high, high, own))
    return tl.where(merged, tl.minimum(first + t, size - 1), own), weight


# do_not_specialize: counts that change from call to call, for which Triton would compile a
# kernel per residue mod 16 (and for 1), mid-training
@triton.jit(do_not_specialize=["num_rois"])
def _counts_kernel(
    rois,  # (R, 5) fp32
    levels,  # (R,)
    table,  # (L, 4) int32
    scales,  # (L, 4) fp32
    entries,  # (R,) int64 out: interpolation entries per RoI
    num_rois,
    out_h,
    out_w,
    sampling_ratio,
    offset,
    ALIGNED: tl.constexpr,
    POOL: tl.constexpr,
    LEVELS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = r < num_rois
    # names, not *_: Triton's compiler pairs the targets with the values one by one
    _, _, _, scale = _level(levels, table, scales, r, mask, LEVELS)
    _, _, bin_h, bin_w, grid_h, grid_w = _geometry(
        rois + r * 5, mask, scale, offset, sampling_ratio, out_h * POOL, out_w * POOL, ALIGNED
    )
    _, _, taps_h = _taps_per_cell(bin_h, grid_h, POOL)
    _, _, taps_w = _taps_per_cell(bin_w, grid_w, POOL)
    tl.store(entries + r, (taps_h * out_h).to(tl.int64) * (taps_w * out_w), mask=mask)


@triton.jit(do_not_specialize=["num_rois", "search_steps", "total"])
def _entries_kernel(
    rois,  # (R, 5) fp32
    levels,  # (R,)
    table,  # (L, 4) int32
    scales,  # (L, 4) fp32
    ends,  # (R,) int64: cumulative entries of the RoIs
    pixel,  # (total,) int32 out: pixel of the levels' joint buffer
    cell,  # (total,) int32 out: output cell in [0, R*out_h*out_w)
    weight,  # (total,) fp32 out
    num_rois,
    search_steps,  # >= log2(R + 1)
    total,  # entries of all RoIs
    out_h,
    out_w,
    sampling_ratio,
    offset,
    ALIGNED: tl.constexpr,
    POOL: tl.constexpr,
    LEVELS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = e < total
    # the entry's RoI: the first whose end is past it (binary search)
    low = tl.zeros((BLOCK,), dtype=tl.int32)
    high = tl.zeros((BLOCK,), dtype=tl.int32) + num_rois
    for _ in range(search_steps):
        active = low < high
        mid = (low + high) // 2
        end = tl.load(ends + mid, mask=mask & active, other=0)
        right = active & (end <= e)
        low = tl.where(right, mid + 1, low)
        high = tl.where(active & ~right, mid, high)
    roi = tl.minimum(low, num_rois - 1)
    k = e - tl.load(ends + roi - 1, mask=mask & (roi > 0), other=0)
    first, height, width, scale = _level(levels, table, scales, roi, mask, LEVELS)
    box = rois + roi * 5
    start_h, start_w, bin_h, bin_w, grid_h, grid_w = _geometry(
        box, mask, scale, offset, sampling_ratio, out_h * POOL, out_w * POOL, ALIGNED
    )
    _, _, taps_h = _taps_per_cell(bin_h, grid_h, POOL)
    _, _, taps_w = _taps_per_cell(bin_w, grid_w, POOL)
    taps_h = tl.maximum(taps_h, 1)  # a RoI that owns entries has taps
    taps_w = tl.maximum(taps_w, 1)
    # per RoI: its y taps times its x taps, y-major
    y = (k // (taps_w * out_w)).to(tl.int32)
    x = (k % (taps_w * out_w)).to(tl.int32)
    i, j = y // taps_h, x // taps_w
    y_row, y_weight = _axis_tap(start_h, bin_h, grid_h, i, y % taps_h, height, POOL)
    x_row, x_weight = _axis_tap(start_w, bin_w, grid_w, j, x % taps_w, width, POOL)
    count = (tl.maximum(grid_h, 1) * tl.maximum(grid_w, 1) * POOL * POOL).to(tl.float32)
    image = tl.load(box, mask=mask, other=0.0).to(tl.int64)
    pixels = first + image * height * width + y_row * width + x_row
    tl.store(pixel + e, pixels.to(tl.int32), mask=mask)
    tl.store(cell + e, roi * (out_h * out_w) + i * out_w + j, mask=mask)
    tl.store(weight + e, y_weight / count * x_weight, mask=mask)


@triton.jit
def _backward_kernel(
    row_start,  # (N*H*W + 1,) int64: per pixel, its first position in the sorted entries
    order,  # (E,) int64: the entry at each sorted position
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
        entry = tl.load(order + e, mask=entry_mask, other=0)
        cell = tl.load(cells + entry, mask=entry_mask, other=0).to(tl.int64)
        weight = tl.load(weights + entry, mask=entry_mask, other=0.0)
        # zero weights (merged taps a cell's samples did not reach) cost no load
        load = (entry_mask & (weight != 0.0))[:, None] & channel_mask[None, :]
        rows = grad_out + cell[:, None] * C + channels[None, :]
        grad = tl.load(rows, mask=load, other=0.0)
        acc += tl.sum(weight[:, None] * grad.to(tl.float32), axis=0)
    target = grad_in + pixel.to(tl.int64) * C + channels
    tl.store(target, acc.to(grad_in.dtype.element_ty), mask=channel_mask)


BLOCK = 256  # RoIs or entries per program of the counting and entry kernels
BLOCK_E = 8  # entries summed at once by a program of the backward


def _block(channels: int) -> Tuple[int, int]:
    """Channels per program and warps: up to 256 channels at once, 4 per thread."""
    block = min(triton.next_power_of_2(channels), 256)
    return block, max(1, block // 128)


Geometry = Tuple[Tuple[int, int], int, bool, int]  # output size, sampling ratio, aligned, pool


class LevelTable:
    """The feature levels of one RoIAlign: their shapes, where their pixels lie in the joint
    channels-last buffer (P, C) of all levels, and the kernels' (L, 4) int32 table on the
    device: per level its first pixel, height, width and spatial scale (the fp32's bits)."""

    def __init__(self, features: Sequence[torch.Tensor], scales: Sequence[float]):
        self.shapes = [tuple(f.shape) for f in features]
        if len({shape[1] for shape in self.shapes}) != 1:
            raise ValueError(f"RoIAlign levels of different channels: {self.shapes}")
        self.sizes = [n * h * w for n, _, h, w in self.shapes]
        firsts = list(itertools.accumulate(self.sizes, initial=0))
        self.pixels = firsts[-1]
        bits = [struct.unpack("<i", struct.pack("<f", scale))[0] for scale in scales]
        rows = [[first, h, w, b] for first, (_, _, h, w), b in zip(firsts, self.shapes, bits)]
        self.table = host_tensor(rows, features[0].device, torch.int32)
        self.scales = self.table.view(torch.float32)

    def joint(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """(P, C): the pixels of all levels, channels last, in the first level's dtype."""
        joint = features[0].new_empty((self.pixels, self.shapes[0][1]))
        for part, feature in zip(joint.split(self.sizes), features):
            n, c, h, w = feature.shape
            part.view(n, h, w, c).copy_(feature.permute(0, 2, 3, 1))
        return joint

    def split(self, joint: torch.Tensor) -> List[torch.Tensor]:
        """(P, C) -> per level, an (N, C, H, W) view."""
        parts = zip(joint.split(self.sizes), self.shapes)
        return [x.view(n, h, w, c).permute(0, 3, 1, 2) for x, (n, c, h, w) in parts]

    def arguments(self, levels: Optional[torch.Tensor], rois: torch.Tensor) -> tuple:
        """The kernels' level arguments (``rois`` stands in for absent levels: not read)."""
        return (rois if levels is None else levels), self.table, self.scales


def _forward(
    joint: torch.Tensor,
    rois: torch.Tensor,
    levels: Optional[torch.Tensor],
    table: LevelTable,
    geometry: Geometry,
) -> torch.Tensor:
    """(R, C, Sh/pool, Sw/pool) in ``joint``'s dtype: ``avg_pool2d(roi_align(...), pool)`` of
    each RoI on its level."""
    (pooled_h, pooled_w), sampling_ratio, aligned, pool = geometry
    out_h, out_w, channels = pooled_h // pool, pooled_w // pool, joint.shape[1]
    out = joint.new_empty((rois.shape[0], out_h, out_w, channels))
    if out.numel() > 0:
        block, warps = _block(channels)
        grid = (rois.shape[0] * out_h * out_w, triton.cdiv(channels, block))
        _forward_kernel[grid](
            joint, rois, *table.arguments(levels, rois), out, channels, out_h, out_w,
            sampling_ratio, 0.5 if aligned else 0.0, ALIGNED=aligned, POOL=pool,
            LEVELS=levels is not None, BLOCK_C=block, num_warps=warps,
        )  # fmt: skip
    return out.permute(0, 3, 1, 2)


class EntryCount:
    """Per RoI, where its interpolation entries end in the list of all ((R,) int64, on the
    device), and their total, copied to the host without waiting (pinned memory, an event):
    read in the backward pass, long after the copy finished, it costs no stall of the stream."""

    def __init__(
        self,
        rois: torch.Tensor,
        levels: Optional[torch.Tensor],
        table: LevelTable,
        geometry: Geometry,
    ):
        (pooled_h, pooled_w), sampling_ratio, aligned, pool = geometry
        entries = torch.empty(rois.shape[0], dtype=torch.int64, device=rois.device)
        if len(entries) > 0:
            _counts_kernel[(triton.cdiv(len(entries), BLOCK),)](
                rois, *table.arguments(levels, rois), entries, len(entries), pooled_h // pool,
                pooled_w // pool, sampling_ratio, 0.5 if aligned else 0.0, ALIGNED=aligned,
                POOL=pool, LEVELS=levels is not None, BLOCK=BLOCK,
            )  # fmt: skip
        self.ends = entries.cumsum(0)
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


def interpolation_entries(
    rois: torch.Tensor,
    levels: Optional[torch.Tensor],
    table: LevelTable,
    geometry: Geometry,
    count: EntryCount,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entries of :func:`htc.layers.roi_align_cpu.interpolation_entries`, in its order, from one
    kernel: pixel (E,) int32 (of the levels' joint buffer), cell (E,) int32 and weight (E,)
    fp32, E = ``count.total()``."""
    (pooled_h, pooled_w), sampling_ratio, aligned, pool = geometry
    out_h, out_w = pooled_h // pool, pooled_w // pool
    if max(table.pixels, len(rois) * out_h * out_w) >= 2**31:
        raise ValueError(
            f"RoIAlign backward: {table.pixels} feature pixels or {len(rois)}x{out_h}x{out_w} "
            "output cells do not fit the int32 entries"
        )
    total = count.total()
    device = rois.device
    pixel = torch.empty(total, dtype=torch.int32, device=device)
    cell = torch.empty(total, dtype=torch.int32, device=device)
    weight = torch.empty(total, dtype=torch.float32, device=device)
    if total > 0:
        _entries_kernel[(triton.cdiv(total, BLOCK),)](
            rois, *table.arguments(levels, rois), count.ends, pixel, cell, weight, len(rois),
            len(rois).bit_length(), total, out_h, out_w, sampling_ratio,
            0.5 if aligned else 0.0, ALIGNED=aligned, POOL=pool, LEVELS=levels is not None,
            BLOCK=BLOCK,
        )  # fmt: skip
    return pixel, cell, weight


def _backward(
    grad_output: torch.Tensor,
    rois: torch.Tensor,
    levels: Optional[torch.Tensor],
    table: LevelTable,
    geometry: Geometry,
    count: EntryCount,
) -> torch.Tensor:
    """(P, C) gradient of the levels' joint buffer, in ``grad_output``'s dtype, deterministic
    (sorted entries, one program per feature pixel)."""
    pixel, cell, weight = interpolation_entries(rois, levels, table, geometry, count)
    pixel, order = torch.sort(pixel, stable=True)
    pixels = torch.arange(table.pixels + 1, dtype=pixel.dtype, device=pixel.device)
    row_start = torch.searchsorted(pixel, pixels)
    grad = grad_output.permute(0, 2, 3, 1).contiguous()
    channels = grad.shape[-1]
    grad_in = grad.new_empty((table.pixels, channels))
    if grad_in.numel() > 0:
        block, warps = _block(channels)
        grid = (table.pixels, triton.cdiv(channels, block))
        _backward_kernel[grid](
            row_start, order, cell, weight, grad, grad_in, channels, BLOCK_C=block,
            BLOCK_E=BLOCK_E, num_warps=warps,
        )  # fmt: skip
    return grad_in


class _JointLevels(torch.autograd.Function):
    """The levels' joint channels-last buffer (P, C) (:meth:`LevelTable.joint`), differentiable:
    its gradient goes back to each level as a view."""

    @staticmethod
    def forward(ctx, table, *features):
        ctx.table = table
        return table.joint(features)

    @staticmethod
    def backward(ctx, grad):
        return (None, *ctx.table.split(grad))


def joint_levels(
    features: Sequence[torch.Tensor], scales: Sequence[float], shared: Optional[dict] = None
) -> Tuple[LevelTable, torch.Tensor]:
    """The level table of ``features`` and their joint buffer; made once for all calls that pass
    the same ``shared`` dict, the same (unmodified) feature tensors and grad mode. The
    gradients of all RoIAligns on a shared buffer are summed there, then go back to the levels
    once. Inference tensors (``torch.inference_mode``) have no version counter to tell a change
    in place: they are copied in each call (a copy costs far less than the pooling)."""
    if any(f.is_inference() for f in features):
        shared = None
    if shared is not None:
        versions = tuple((id(f), f._version) for f in features)
        key = (versions, tuple(scales), torch.is_grad_enabled())
        if key in shared:
            return shared[key][1:]
    table = LevelTable(features, scales)
    joint = _JointLevels.apply(table, *features)
    if shared is not None:  # holding the features keeps their ids theirs
        shared[key] = (tuple(features), table, joint)
    return table, joint


class _ROIAlignLevels(torch.autograd.Function):
    """RoIAlign of RoIs on their levels, differentiable with respect to the levels' joint
    buffer. When a gradient will be wanted, the interpolation entries are counted in the
    forward pass, so the backward does not wait on the GPU to learn how many to allocate."""

    @staticmethod
    def forward(ctx, rois, levels, table, geometry, joint):
        ctx.count = None
        if ctx.needs_input_grad[4]:
            ctx.count = EntryCount(rois, levels, table, geometry)
        ctx.save_for_backward(rois, levels)
        ctx.table, ctx.geometry = table, geometry
        return _forward(joint, rois, levels, table, geometry)

    @staticmethod
    def backward(ctx, grad_output):
        rois, levels = ctx.saved_tensors
        grad = _backward(grad_output, rois, levels, ctx.table, ctx.geometry, ctx.count)
        return None, None, None, None, grad


def multi_level_roi_align(
    features: Sequence[torch.Tensor],
    rois: torch.Tensor,
    levels: Optional[torch.Tensor],
    scales: Sequence[float],
    output_size: Tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    pool: int = 1,
    shared: Optional[dict] = None,
) -> torch.Tensor:
    """(R, C, Sh/pool, Sw/pool): RoI r pooled from ``features[levels[r]]`` (N, C, Hl, Wl) at
    spatial scale ``scales[levels[r]]`` (``levels`` None: all on level 0), then average-pooled
    by ``pool``; in the RoIs' order. One launch per kernel for all levels; the levels' joint
    buffer is shared with the other calls of ``shared`` (:func:`joint_levels`)."""
    table, joint = joint_levels(features, scales, shared)
    size = (int(output_size[0]), int(output_size[1]))
    geometry = (size, int(sampling_ratio), bool(aligned), pool)
    rois = rois.float().contiguous()
    return _ROIAlignLevels.apply(rois, levels, table, geometry, joint)


def roi_align(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    pool: int = 1,
    shared: Optional[dict] = None,
) -> torch.Tensor:
    """(R, C, Sh/pool, Sw/pool): ``avg_pool2d(roi_align(input, rois, ...), pool)`` (torchvision's
    arguments) by these kernels."""
    return multi_level_roi_align(
        [input], rois, None, [spatial_scale], output_size, sampling_ratio, aligned, pool, shared
    )
