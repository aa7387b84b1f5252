"""htc.poolers: Detectron2's ROIPooler with the RoIAlign kernel of MODEL.HTC.ROI_ALIGN, the same
output whichever kernel, and "pooled to a smaller size" from every kernel."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.poolers import ROIPooler, convert_boxes_to_pooler_format
from detectron2.structures import Boxes
from torch.nn import functional as F

from conftest import tiny_cfg
from htc.layers import AutoROIAlign, ParallelCPUROIAlign, ROIAlign, TritonROIAlign
from htc.poolers import HTCROIPooler, pooler_format


def _features_and_boxes():
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(2, 4, 64 // s, 64 // s, generator=g) for s in (4, 8, 16, 32)]
    xy = torch.rand(2, 30, 2, generator=g) * 40
    boxes = [Boxes(torch.cat([b, b + 4 + torch.rand(30, 2, generator=g) * 40], 1)) for b in xy]
    return features, boxes


KERNELS = [
    ("auto", AutoROIAlign),
    ("triton", TritonROIAlign),
    ("cpu_parallel", ParallelCPUROIAlign),
    ("torchvision", ROIAlign),
]


@pytest.mark.parametrize("kernel, cls", KERNELS)
def test_kernel_is_chosen_and_output_unchanged(kernel, cls):
    original = ROIPooler((14, 14), (1 / 4, 1 / 8, 1 / 16, 1 / 32), 0, "ROIAlignV2")
    pooler = HTCROIPooler.from_pooler(original, kernel)
    assert all(type(level) is cls for level in pooler.level_poolers)
    assert all(type(level) is not cls for level in original.level_poolers)  # a new pooler
    features, boxes = _features_and_boxes()
    with torch.no_grad():
        assert torch.equal(pooler(features, boxes), original(features, boxes))


@pytest.mark.parametrize("kernel", [name for name, _ in KERNELS])
def test_pooled_is_the_average_pool_of_the_output(kernel):
    one_level = ROIPooler((14, 14), (1 / 8,), 0, "ROIAlignV2")
    pooler = HTCROIPooler.from_pooler(one_level, kernel)
    features, boxes = _features_and_boxes()
    with torch.no_grad():
        want = F.adaptive_avg_pool2d(one_level(features[1:2], boxes), (7, 7))
        assert torch.equal(pooler.pooled(features[1:2], boxes, (7, 7)), want)


def test_unknown_kernel_is_named():
    pooler = ROIPooler((7, 7), (1 / 4,), 0, "ROIAlignV2")
    with pytest.raises(ValueError, match="MODEL.HTC.ROI_ALIGN='cuda'.*auto, triton, cpu_parallel"):
        HTCROIPooler.from_pooler(pooler, "cuda")


@pytest.mark.parametrize("old, cls", [("fast", AutoROIAlign), ("detectron2", ROIAlign)])
def test_deprecated_kernel_names_still_work_and_say_their_successor(monkeypatch, old, cls):
    """An old name builds its successor's kernel and warns, once per process."""
    import htc.layers.roi_align as kernels

    monkeypatch.setattr(kernels, "_WARNED_DEPRECATED", set())
    cfg = tiny_cfg()
    cfg.MODEL.HTC.ROI_ALIGN = old
    new = {"fast": "auto", "detectron2": "torchvision"}[old]
    with pytest.warns(FutureWarning, match=f"ROI_ALIGN='{old}' is deprecated: it is '{new}'") as w:
        heads = build_model(cfg).roi_heads
        build_model(cfg)
    assert len([x for x in w if issubclass(x.category, FutureWarning)]) == 1
    assert all(type(m) is cls for m in heads.box_pooler.level_poolers)


@pytest.mark.parametrize("kernel, cls", KERNELS)
def test_htc_poolers_follow_the_config(kernel, cls):
    cfg = tiny_cfg()
    cfg.MODEL.HTC.ROI_ALIGN = kernel
    heads = build_model(cfg).roi_heads
    for pooler in (heads.box_pooler, heads.mask_pooler, heads.semantic_pooler):
        assert isinstance(pooler, HTCROIPooler)
        assert all(type(m) is cls for m in pooler.level_poolers)


@pytest.mark.parametrize("kernel", [name for name, _ in KERNELS])
def test_boxes_of_every_level_pool_as_the_parents(kernel):
    """Boxes grouped by level in one pass give the parent's output and gradients, boxes in the
    order given, with a level left empty; no per-level ``nonzero``."""
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(2, 3, 256 // s, 256 // s, generator=g) for s in (4, 8, 16, 32)]
    sizes = torch.tensor([20.0, 30.0, 250.0, 240.0, 120.0, 25.0])  # levels 2-4; none at 5
    xy = torch.rand(2, 6, 2, generator=g) * 4
    boxes = [Boxes(torch.cat([b, b + sizes[:, None]], 1)) for b in xy]
    original = ROIPooler((7, 7), (1 / 4, 1 / 8, 1 / 16, 1 / 32), 0, "ROIAlignV2")
    pooler = HTCROIPooler.from_pooler(original, kernel)
    leaves = [[f.clone().requires_grad_() for f in features] for _ in range(2)]
    with torch.profiler.profile() as prof:
        ours = pooler(leaves[0], boxes)
    want = original(leaves[1], boxes)
    assert not [e for e in prof.events() if e.name == "aten::nonzero"]
    torch.testing.assert_close(ours, want, rtol=0, atol=0)
    grad = torch.randn(want.shape, generator=g)
    got = torch.autograd.grad(ours, leaves[0], grad)
    expected = torch.autograd.grad(want, leaves[1], grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_pooler_format_is_detectron2s_without_a_sync():
    _, boxes = _features_and_boxes()
    box_lists = [boxes[0], Boxes(torch.zeros(0, 4)), boxes[1]]
    with torch.profiler.profile() as prof:
        ours = pooler_format(box_lists)
    assert not [e for e in prof.events() if e.name == "aten::item"]
    assert torch.equal(ours, convert_boxes_to_pooler_format(box_lists))


def test_levels_are_pooled_in_one_pass_where_the_kernel_can(monkeypatch):
    """Where AutoROIAlign runs Triton (CUDA; here its interpreter on CPU), a multi-level pooler
    (which "auto" always gives to Triton) pools every level in one pass, no per-level call and
    no host sync, with the parent's output and gradients."""
    import htc.layers.roi_align as kernels
    import htc.layers.roi_align_triton as triton_roi_align

    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(kernels, "TRITON_DEVICES", (device,))
    monkeypatch.setattr(kernels, "triton_kernels", lambda: triton_roi_align)
    original = ROIPooler((7, 7), (1 / 4, 1 / 8, 1 / 16, 1 / 32), 0, "ROIAlignV2")
    pooler = HTCROIPooler.from_pooler(original, "auto")
    features, boxes = _features_and_boxes()
    features = [f.to(device) for f in features]
    boxes = [b[:6].to(device) for b in boxes]
    leaves = [f.clone().requires_grad_() for f in features]
    for level in pooler.level_poolers:
        monkeypatch.setattr(level, "forward", lambda *a: pytest.fail("pooled level by level"))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda *a: pytest.fail("a host sync"))
    got = pooler(leaves, boxes)
    monkeypatch.undo()
    parent_leaves = [f.clone().requires_grad_() for f in features]
    want = original(parent_leaves, boxes)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(2)).to(device)
    grads = torch.autograd.grad(got, leaves, grad)
    for a, b in zip(grads, torch.autograd.grad(want, parent_leaves, grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
