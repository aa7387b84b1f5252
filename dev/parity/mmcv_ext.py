"""Dev only: the compiled mmcv ops MMDetection's HTC uses, through torchvision (installed as
``mmcv/_ext.py`` in the reference venv). mmcv's ``ext_loader`` only checks that the names exist;
any other op raises NotImplementedError when called."""

import torch
import torchvision


def roi_align_forward(
    input, rois, output, argmax_y, argmax_x,
    aligned_height, aligned_width, spatial_scale, sampling_ratio, pool_mode, aligned,
):  # fmt: skip
    assert pool_mode == 1, "only pool_mode='avg'"
    out = torchvision.ops.roi_align(
        input, rois, (aligned_height, aligned_width), spatial_scale, sampling_ratio, aligned
    )
    output.copy_(out)


def roi_align_backward(
    grad_output, rois, argmax_y, argmax_x, grad_input,
    aligned_height, aligned_width, spatial_scale, sampling_ratio, pool_mode, aligned,
):  # fmt: skip
    assert pool_mode == 1, "only pool_mode='avg'"
    n, c, h, w = grad_input.shape
    grad = torch.ops.torchvision._roi_align_backward(
        grad_output, rois, spatial_scale, aligned_height, aligned_width, n, c, h, w,
        sampling_ratio, aligned,
    )  # fmt: skip
    grad_input.copy_(grad)


def nms(boxes, scores, iou_threshold, offset):
    """mmcv's CPU NMS order: an (unstable) descending sort of the scores, then greedy."""
    assert offset == 0
    order = scores.sort(0, descending=True)[1]
    keep = torchvision.ops.nms(boxes[order], scores[order], iou_threshold)  # stable: keeps it
    return order[keep]


def __getattr__(name):
    def missing(*args, **kwargs):
        raise NotImplementedError(f"mmcv op {name} is not provided by dev/parity/mmcv_ext.py")

    return missing
