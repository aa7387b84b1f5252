"""Pure-Python stand-in for ``detectron2._C``, installed by ``scripts/install_detectron2.py``.

Detectron2 v0.6 from the ``pb1-detectron2`` sdist ships without its C++/CUDA sources, yet
``detectron2.layers``, ``detectron2.evaluation`` and ``collect_env`` import ``detectron2._C``.
This module gives them what HTC needs:

* deformable convolution (v1 and modulated v2), computed exactly with
  ``torchvision.ops.deform_conv2d`` and autograd, writing into the caller's output buffers the
  way the C++ entry points do;
* the build-information functions used by ``default_setup``;
* every other entry point (rotated boxes, rotated RoIAlign, the C++ COCOeval) raises
  ``NotImplementedError`` naming the cause and the alternative.
"""

from typing import Tuple

import torch
from torchvision.ops import deform_conv2d

STAND_IN = True  # lets the setup script tell this module from a compiled extension


def get_compiler_version() -> str:
    return "none (pure-Python detectron2._C stand-in from htc-detectron2)"


def get_cuda_version() -> str:
    return "none (pure-Python detectron2._C stand-in from htc-detectron2)"


def has_cuda() -> bool:
    return False


def _deform(
    input: torch.Tensor,
    weight: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
) -> torch.Tensor:
    return deform_conv2d(
        input, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask
    )


def _grads(out: torch.Tensor, inputs: Tuple[torch.Tensor, ...], grad_output: torch.Tensor):
    return torch.autograd.grad(out, inputs, grad_output, allow_unused=True)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


# --- DCNv1: argument order of detectron2/layers/csrc/deformable/deform_conv.h ---------------


def deform_conv_forward(
    input, weight, offset, output, columns, ones,
    kW, kH, dW, dH, padW, padH, dilationW, dilationH, group, deformable_group, im2col_step,
):  # fmt: skip
    with torch.no_grad():
        out = _deform(
            input, weight, offset, None, None, (dH, dW), (padH, padW), (dilationH, dilationW)
        )
    output.resize_as_(out).copy_(out)


def deform_conv_backward_input(
    input, offset, gradOutput, gradInput, gradOffset, weight, columns,
    kW, kH, dW, dH, padW, padH, dilationW, dilationH, group, deformable_group, im2col_step,
):  # fmt: skip
    with torch.enable_grad():
        x, off = _leaf(input), _leaf(offset)
        out = _deform(
            x, weight.detach(), off, None, None, (dH, dW), (padH, padW), (dilationH, dilationW)
        )
        grad_x, grad_off = _grads(out, (x, off), gradOutput)
    gradInput.copy_(grad_x)
    gradOffset.copy_(grad_off)


def deform_conv_backward_filter(
    input, offset, gradOutput, gradWeight, columns, ones,
    kW, kH, dW, dH, padW, padH, dilationW, dilationH, group, deformable_group, scale, im2col_step,
):  # fmt: skip
    with torch.enable_grad():
        # the output is linear in the weight: its gradient does not depend on the weight's value
        w = _leaf(torch.zeros_like(gradWeight))
        out = _deform(
            input.detach(),
            w,
            offset.detach(),
            None,
            None,
            (dH, dW),
            (padH, padW),
            (dilationH, dilationW),
        )
        (grad_w,) = _grads(out, (w,), gradOutput)
    gradWeight.add_(grad_w, alpha=scale)


# --- DCNv2 (modulated) -----------------------------------------------------------------------


def modulated_deform_conv_forward(
    input, weight, bias, ones, offset, mask, output, columns,
    kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    group, deformable_group, with_bias,
):  # fmt: skip
    with torch.no_grad():
        out = _deform(
            input, weight, offset, mask, bias if with_bias else None,
            (stride_h, stride_w), (pad_h, pad_w), (dilation_h, dilation_w),
        )  # fmt: skip
    output.resize_as_(out).copy_(out)


def modulated_deform_conv_backward(
    input, weight, bias, ones, offset, mask, columns,
    grad_input, grad_weight, grad_bias, grad_offset, grad_mask, grad_output,
    kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    group, deformable_group, with_bias,
):  # fmt: skip
    with torch.enable_grad():
        leaves = [_leaf(t) for t in (input, weight, offset, mask)]
        b = _leaf(bias) if with_bias else None
        out = _deform(
            leaves[0], leaves[1], leaves[2], leaves[3], b,
            (stride_h, stride_w), (pad_h, pad_w), (dilation_h, dilation_w),
        )  # fmt: skip
        grads = _grads(out, tuple(leaves) + ((b,) if with_bias else ()), grad_output)
    for buf, g in zip((grad_input, grad_weight, grad_offset, grad_mask), grads[:4]):
        buf.copy_(g)
    if with_bias:
        grad_bias.copy_(grads[4])


# --- not available without the compiled extension ----------------------------------------------

_COCOEVAL = (
    "use htc.evaluation.HTCCOCOEvaluator (faster-coco-eval, else pycocotools) or "
    "COCOEvaluator(..., use_fast_impl=False): the same AP"
)
_ROTATED = "rotated boxes are not used by HTC; build Detectron2 from source for them"
_ALTERNATIVES = {
    "COCOevalEvaluateImages": _COCOEVAL,
    "COCOevalAccumulate": _COCOEVAL,
    "InstanceAnnotation": _COCOEVAL,
    "ImageEvaluation": _COCOEVAL,
    "box_iou_rotated": _ROTATED,
    "nms_rotated": _ROTATED,
    "roi_align_rotated_forward": _ROTATED,
    "roi_align_rotated_backward": _ROTATED,
}


def _unavailable(name: str):
    def fn(*args, **kwargs):
        raise NotImplementedError(
            f"detectron2._C.{name} needs Detectron2's compiled C++ extension, and this Detectron2 "
            f"was installed without it (detectron2._C is htc-detectron2's pure-Python stand-in): "
            f"{_ALTERNATIVES[name]}."
        )

    fn.__name__ = name
    return fn


for _name in _ALTERNATIVES:
    globals()[_name] = _unavailable(_name)
