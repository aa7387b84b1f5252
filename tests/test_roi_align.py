"""The parallel RoIAlign forward and the sparse-matrix backward equal torchvision's, and HTC's
poolers use them."""

import pytest
import torch
from detectron2.modeling import build_model
from torch.nn import functional as F
from torchvision.ops import roi_align

from conftest import tiny_cfg
from htc.roi_align import CHUNK, FastROIAlign, _ROIAlignSparseGrad


def _case(seed, scale, num_rois=40):
    g = torch.Generator().manual_seed(seed)
    h, w = (int(v) for v in torch.randint(4, 24, (2,), generator=g))
    x = torch.randn(3, 5, h, w, generator=g, dtype=torch.float64)
    extent = max(h, w) / scale
    boxes = torch.rand(num_rois, 4, generator=g, dtype=torch.float64) * extent * 1.3 - 0.2 * extent
    boxes[:, 2:] = boxes[:, :2] + torch.rand(num_rois, 2, generator=g, dtype=torch.float64) * extent
    boxes[:3, 2:] = boxes[:3, :2]  # empty RoIs
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
    ours = _ROIAlignSparseGrad.apply(leaf, rois, *args)
    want = roi_align(x.clone().requires_grad_(), rois, *args)
    torch.testing.assert_close(ours, want.detach(), rtol=0, atol=0)  # same forward
    grad = torch.randn_like(ours)
    (got,) = torch.autograd.grad(ours, leaf, grad)
    ref_leaf = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(roi_align(ref_leaf, rois, *args), ref_leaf, grad)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_parallel_forward_is_bit_identical(threads):
    module = FastROIAlign((14, 14), 0.25, 0, True)
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


def test_htc_poolers_use_fast_roi_align():
    heads = build_model(tiny_cfg()).roi_heads
    for pooler in (heads.box_pooler, heads.mask_pooler, heads.semantic_pooler):
        assert all(type(m) is FastROIAlign for m in pooler.level_poolers)


def test_pooled_gradient_equals_pooling_after_roi_align():
    module = FastROIAlign((14, 14), 0.125, 0, True)
    x, rois = _case(seed=5, scale=0.125, num_rois=CHUNK + 9)
    leaf, ref_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = module.pooled(leaf, rois, (7, 7))
    want = F.adaptive_avg_pool2d(roi_align(ref_leaf, rois, (14, 14), 0.125, 0, True), (7, 7))
    assert torch.equal(ours.detach(), want.detach())
    grad = torch.randn_like(ours)
    (got,) = torch.autograd.grad(ours, leaf, grad)
    (expected,) = torch.autograd.grad(want, ref_leaf, grad)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
