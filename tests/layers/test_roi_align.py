"""htc.layers.roi_align_cpu: the parallel RoIAlign forward and the sparse-matrix backward equal
torchvision's; htc.layers.roi_align: the kernels route by device and keep the caller's grad mode
in their threads."""

import json

import pytest
import torch
from torch.nn import functional as F
from torchvision.ops import roi_align

import htc.layers.roi_align_cpu as cpu_kernels
from conftest import ROOT
from htc.layers.roi_align import AutoROIAlign, ROIAlign, triton_is_faster
from htc.layers.roi_align_cpu import CHUNK, in_chunks, sparse_grad_roi_align


def _case(seed, scale, num_rois=40):
    g = torch.Generator().manual_seed(seed)
    h, w = (int(v) for v in torch.randint(4, 24, (2,), generator=g))
    x = torch.randn(3, 5, h, w, generator=g, dtype=torch.float64)
    extent = max(h, w) / scale
    boxes = torch.rand(num_rois, 4, generator=g, dtype=torch.float64) * extent * 1.3 - 0.2 * extent
    boxes[:, 2:] = boxes[:, :2] + torch.rand(num_rois, 2, generator=g, dtype=torch.float64) * extent
    boxes[:3, 2:] = boxes[:3, :2]  # empty RoIs
    boxes[3] = torch.tensor([w, h, w - 6, h - 6], dtype=torch.float64) / scale / 2  # inverted
    batch = torch.randint(0, 3, (num_rois, 1), generator=g).double()
    return x, torch.cat([batch, boxes], dim=1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("scale", [1.0, 0.25, 0.125])
@pytest.mark.parametrize("output_size", [(7, 7), (14, 14), (3, 5)])
def test_backward_equals_torchvision(aligned, sampling_ratio, scale, output_size):
    x, rois = _case(seed=int(scale * 8) + sampling_ratio, scale=scale)
    args = (output_size, scale, sampling_ratio, aligned)
    leaf = x.clone().requires_grad_()
    ours = sparse_grad_roi_align(leaf, rois, *args, 1)
    want = roi_align(x.clone().requires_grad_(), rois, *args)
    torch.testing.assert_close(ours, want.detach(), rtol=0, atol=0)  # same forward
    grad = torch.randn_like(ours)
    (got,) = torch.autograd.grad(ours, leaf, grad)
    ref_leaf = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(roi_align(ref_leaf, rois, *args), ref_leaf, grad)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_parallel_forward_is_bit_identical(threads):
    module = AutoROIAlign((14, 14), 0.25, 0, True)
    x, rois = _case(seed=3, scale=0.25, num_rois=3 * CHUNK + 5)
    x, rois = x.float(), rois.float()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            ours, pooled = module(x, rois), module.pooled(x, rois, (7, 7))
            odd = module.pooled(x, rois, (5, 3))
    finally:
        torch.set_num_threads(before)
    want = roi_align(x, rois, (14, 14), 0.25, 0, True)
    assert torch.equal(ours, want)
    assert torch.equal(pooled, F.adaptive_avg_pool2d(want, (7, 7)))
    assert torch.equal(odd, F.adaptive_avg_pool2d(want, (5, 3)))


def test_pooled_gradient_equals_pooling_after_roi_align():
    module = AutoROIAlign((14, 14), 0.125, 0, True)
    x, rois = _case(seed=5, scale=0.125, num_rois=CHUNK + 9)
    leaf, ref_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = module.pooled(leaf, rois, (7, 7))
    want = F.adaptive_avg_pool2d(roi_align(ref_leaf, rois, (14, 14), 0.125, 0, True), (7, 7))
    assert torch.equal(ours.detach(), want.detach())
    grad = torch.randn_like(ours)
    (got,) = torch.autograd.grad(ours, leaf, grad)
    (expected,) = torch.autograd.grad(want, ref_leaf, grad)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pool", [1, 2])
def test_a_cells_samples_share_their_taps(pool):
    """n x n samples per output cell make (n+1)^2 entries, a y tap times an x tap each summed
    over the cell's samples, where one entry per sample and bilinear tap made 4n^2; the matrix
    is torchvision's (its RoIAlign of the 64 unit images of an 8x8 feature)."""
    rois = torch.tensor([[0, 1.0, 2.0, 25.0, 26.0], [0, 5.0, 3.0, 17.0, 9.0]], dtype=torch.float64)
    geometry = ((4, 4), 0.25, 0, True)  # RoI 0: 6 x 6 pixels, bins of 1.5, 2 x 2 samples
    pixel, cell, weight = cpu_kernels.interpolation_entries(rois, (1, 1, 8, 8), *geometry, pool)
    n = 2 * pool
    assert (cell < (4 // pool) ** 2).sum() == (4 // pool) ** 2 * (n + 1) ** 2
    matrix = torch.zeros(64, 2 * (4 // pool) ** 2, dtype=torch.float64)
    matrix.index_put_((pixel, cell), weight, accumulate=True)
    units = torch.eye(64, dtype=torch.float64).view(1, 64, 8, 8)
    want = F.avg_pool2d(roi_align(units, rois, *geometry), pool)
    torch.testing.assert_close(matrix, want.permute(1, 0, 2, 3).reshape(64, -1), rtol=0, atol=1e-15)


def test_a_sample_rounded_past_its_taps_keeps_its_position():
    """A merged cell's k-th sample has its low row kept within k rows of the first sample's
    (exact for samples at most a pixel apart); one that rounding puts just past it keeps its
    interpolated position, with weights just outside [0, 1]."""
    pos = torch.tensor([3.0 + 2**-20], dtype=torch.float64)
    low, high, w_low, w_high = cpu_kernels._taps(pos, 10, (torch.tensor([1]), torch.tensor([2])))
    assert (low.item(), high.item()) == (2, 3)
    assert w_low + w_high == 1 and w_low < 0
    torch.testing.assert_close(low * w_low + high * w_high, pos, rtol=0, atol=1e-15)


@pytest.mark.parametrize("grad_mode", [True, False])
def test_pool_threads_run_in_the_callers_grad_mode(grad_mode):
    """Grad mode is per thread: without passing it on, the pool's threads would record graphs
    inside the sparse backward's forward."""
    rois = torch.zeros(3 * CHUNK, 5)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.set_grad_enabled(grad_mode):
            modes = in_chunks(lambda part: torch.full((1,), torch.is_grad_enabled()), rois)
    finally:
        torch.set_num_threads(before)
    assert modes.tolist() == [grad_mode] * 3


def test_sparse_backward_forward_records_no_graph_in_threads():
    x, rois = _case(seed=1, scale=0.25, num_rois=2 * CHUNK)
    out = AutoROIAlign((14, 14), 0.25, 0, True).pooled(x.requires_grad_(), rois, (7, 7))
    assert type(out.grad_fn).__name__ == "ROIAlignFunctionBackward"
    assert out.grad_fn.next_functions[0][0] is not None  # the input leaf, no inner graph


def test_devices_other_than_cpu_take_detectron2s_kernel(monkeypatch):
    """Routing is by device type: a "meta" tensor (as MPS or XPU ones) never takes the CPU path."""
    monkeypatch.setattr(AutoROIAlign, "_on_cpu", lambda *a: pytest.fail("CPU path taken"))
    module = AutoROIAlign((14, 14), 0.25, 0, True)
    x, rois = _case(seed=2, scale=0.25, num_rois=10)
    x, rois = x.float().to("meta"), rois.float().to("meta")
    assert module(x, rois).shape == (10, 5, 14, 14)
    assert module.pooled(x, rois, (7, 7)).shape == (10, 5, 7, 7)


def test_detectron2_kernel_pools_after_roi_align():
    x, rois = _case(seed=4, scale=0.5, num_rois=12)
    module = ROIAlign((14, 14), 0.5, 0, True)
    want = F.adaptive_avg_pool2d(roi_align(x, rois, (14, 14), 0.5, 0, True), (7, 7))
    assert torch.equal(module.pooled(x, rois, (7, 7)), want)


def test_auto_choice_follows_the_h200_crossover():
    """On every one-level call that the H200 timed (benchmarks/measured), the rule of "auto"
    picks the kernel that was faster; several levels and pooled outputs go to Triton, which
    was faster on each such call but one (a mask pooler of 64 RoIs: 0.88x alone; in a train
    step it shares the box pooler's copy of the levels)."""
    measured = json.loads((ROOT / "benchmarks" / "measured" / "h200_roi_align.json").read_text())
    rows = measured["rows"]
    assert len({r["source"] for r in rows}) == 2 and len(rows) >= 30
    for r in rows:
        args = (r["input_shape"], r["rois"], (r["output_size"],) * 2, r["pool"], r["levels"])
        faster = triton_is_faster(*args, r["grad"])
        if r["levels"] == 1 and r["pool"] == 1:
            assert faster == (r["triton_ms"] < r["torchvision_ms"]), r
        else:
            assert faster
    one_level = [r for r in rows if r["levels"] == 1 and r["pool"] == 1]
    assert {r["triton_ms"] < r["torchvision_ms"] for r in one_level} == {True, False}
    slower = [r for r in rows if r["levels"] > 1 and r["triton_ms"] > r["torchvision_ms"]]
    assert [(r["call"], r["rois"], r["precision"]) for r in slower] == [("mask", 64, "fp32")]
