"""scripts/detectron2_C.py, our pure-Python ``detectron2._C``: its deformable convolutions equal
torchvision's, and the entry points it lacks say what is missing."""

import importlib.util

import pytest
import torch
from torch.autograd import Function
from torchvision.ops import deform_conv2d

from conftest import ROOT


def _load_stand_in():
    spec = importlib.util.spec_from_file_location("stand_in_C", ROOT / "scripts/detectron2_C.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


C = _load_stand_in()


def _dcn_inputs(modulated, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 7, 6, generator=g, dtype=dtype)
    w = torch.randn(6, 2, 3, 3, generator=g, dtype=dtype)  # groups = 2
    offset = torch.randn(2, 18, 4, 3, generator=g, dtype=dtype)  # stride 2, padding 1
    mask = torch.rand(2, 9, 4, 3, generator=g, dtype=dtype) if modulated else None
    bias = torch.randn(6, generator=g, dtype=dtype) if modulated else None
    return x, w, offset, mask, bias


GEOMETRY = dict(kW=3, kH=3, dW=2, dH=2, padW=1, padH=1, dilationW=1, dilationH=1)


def _v1_args(geometry=GEOMETRY):
    g = geometry
    return (
        g["kW"],
        g["kH"],
        g["dW"],
        g["dH"],
        g["padW"],
        g["padH"],
        g["dilationW"],
        g["dilationH"],
    )


def _v2_args():
    return (3, 3, 2, 2, 1, 1, 1, 1)


class _DeformV1(Function):
    """DCNv1 built only from the stand-in's entry points, as v0.6's CUDA path calls them."""

    @staticmethod
    def forward(ctx, x, offset, w):
        ctx.save_for_backward(x, offset, w)
        out = x.new_empty(0)
        C.deform_conv_forward(x, w, offset, out, None, None, *_v1_args(), 2, 1, 64)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, offset, w = ctx.saved_tensors
        gx, goff, gw = torch.zeros_like(x), torch.zeros_like(offset), torch.zeros_like(w)
        C.deform_conv_backward_input(x, offset, grad, gx, goff, w, None, *_v1_args(), 2, 1, 64)
        C.deform_conv_backward_filter(x, offset, grad, gw, None, None, *_v1_args(), 2, 1, 1.0, 64)
        return gx, goff, gw


class _DeformV2(Function):
    @staticmethod
    def forward(ctx, x, offset, mask, w, b):
        ctx.save_for_backward(x, offset, mask, w, b)
        out = x.new_empty(0)
        C.modulated_deform_conv_forward(
            x, w, b, None, offset, mask, out, None, *_v2_args(), 2, 1, True
        )
        return out

    @staticmethod
    def backward(ctx, grad):
        x, offset, mask, w, b = ctx.saved_tensors
        grads = [torch.zeros_like(t) for t in (x, w, b, offset, mask)]
        gx, gw, gb, goff, gmask = grads
        C.modulated_deform_conv_backward(
            x, w, b, None, offset, mask, None, gx, gw, gb, goff, gmask, grad,
            *_v2_args(), 2, 1, True,
        )  # fmt: skip
        return gx, goff, gmask, gw, gb


def test_deform_conv_v1_equals_torchvision():
    x, w, offset, _, _ = _dcn_inputs(False)
    want = deform_conv2d(x, offset, w, stride=2, padding=1)
    torch.testing.assert_close(_DeformV1.apply(x, offset, w), want, rtol=0, atol=0)
    leaves = [t.clone().requires_grad_() for t in (x, offset, w)]
    deform_conv2d(leaves[0], leaves[1], leaves[2], stride=2, padding=1).sum().backward()
    ours = [t.clone().requires_grad_() for t in (x, offset, w)]
    _DeformV1.apply(*ours).sum().backward()
    for a, b in zip(ours, leaves):
        torch.testing.assert_close(a.grad, b.grad)


def test_deform_conv_v1_gradcheck():
    x, w, offset, _, _ = _dcn_inputs(False)
    inputs = [t.requires_grad_() for t in (x, offset, w)]
    assert torch.autograd.gradcheck(_DeformV1.apply, inputs, eps=1e-6, atol=1e-5)


def test_modulated_deform_conv_equals_torchvision_and_gradcheck():
    x, w, offset, mask, b = _dcn_inputs(True)
    want = deform_conv2d(x, offset, w, b, stride=2, padding=1, mask=mask)
    torch.testing.assert_close(_DeformV2.apply(x, offset, mask, w, b), want, rtol=0, atol=0)
    inputs = [t.requires_grad_() for t in (x, offset, mask, w, b)]
    assert torch.autograd.gradcheck(_DeformV2.apply, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "name, hint",
    [
        ("COCOevalEvaluateImages", "use_fast_impl=False"),
        ("COCOevalAccumulate", "use_fast_impl=False"),
        ("InstanceAnnotation", "use_fast_impl=False"),
        ("ImageEvaluation", "use_fast_impl=False"),
        ("box_iou_rotated", "rotated"),
        ("nms_rotated", "rotated"),
        ("roi_align_rotated_forward", "rotated"),
        ("roi_align_rotated_backward", "rotated"),
    ],
)
def test_unsupported_entry_points_raise_named_error(name, hint):
    with pytest.raises(NotImplementedError, match=f"(?s){name}.*compiled.*{hint}"):
        getattr(C, name)(torch.zeros(1))


def test_build_information():
    assert C.has_cuda() is False
    assert "stand-in" in C.get_compiler_version() and "stand-in" in C.get_cuda_version()
