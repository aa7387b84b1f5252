"""Dev only: the compiled mmcv ops MMDetection's HTC uses (installed as ``mmcv/_ext.py`` in the
reference venv). RoIAlign and NMS go through torchvision. Deformable conv v1 and Soft-NMS are
written here from mmcv's C++ CPU kernels (mmcv/ops/csrc/pytorch/cpu/deform_conv.cpp and nms.cpp),
independently of what htc computes with (torchvision's deform_conv2d, htc.soft_nms), so that a
parity test compares two implementations. mmcv's ``ext_loader`` only checks that the names
exist; any other op raises NotImplementedError when called."""

import numpy as np
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


def _bilinear(image, h, w):
    """mmcv's ``deformable_im2col_bilinear``: image (N, C, H, W), positions h, w (N, P) ->
    (N, C, P). 0 unless -1 < h < H and -1 < w < W; a corner outside the image counts 0."""
    n, c, height, width = image.shape
    inside = (h > -1) & (w > -1) & (h < height) & (w < width)
    h_low, w_low = h.floor(), w.floor()
    lh, lw = h - h_low, w - w_low
    hh, hw = 1 - lh, 1 - lw
    flat = image.reshape(n, c, height * width)
    value = 0
    for dy, dx, weight in ((0, 0, hh * hw), (0, 1, hh * lw), (1, 0, lh * hw), (1, 1, lh * lw)):
        y, x = h_low + dy, w_low + dx
        valid = inside & (y >= 0) & (y <= height - 1) & (x >= 0) & (x <= width - 1)
        index = (y.clamp(0, height - 1) * width + x.clamp(0, width - 1)).long()
        corner = flat.gather(2, index[:, None].expand(n, c, -1))
        value = value + (weight * valid)[:, None] * corner
    return value


def deform_conv_forward(
    input, weight, offset, output, columns, ones, kW, kH, dW, dH, padW, padH,
    dilationW, dilationH, group, deformable_group, im2col_step,
):  # fmt: skip
    """DCNv1: offset (N, deformable_group * 2 * kH * kW, H', W'); for kernel point k = i * kW + j
    of a deformable group, channel 2k is the y (row) offset and 2k + 1 the x offset."""
    n, channels, _, _ = input.shape
    out_h, out_w = output.shape[2:]
    rows = (torch.arange(out_h) * dH - padH)[:, None].to(input)
    cols = (torch.arange(out_w) * dW - padW)[None, :].to(input)
    offset = offset.reshape(n, deformable_group, kH * kW, 2, out_h, out_w)
    per_group = channels // deformable_group
    sampled = []
    for g in range(deformable_group):
        image = input[:, g * per_group : (g + 1) * per_group]
        points = []
        for k in range(kH * kW):
            i, j = divmod(k, kW)
            h = rows + i * dilationH + offset[:, g, k, 0]
            w = cols + j * dilationW + offset[:, g, k, 1]
            points.append(_bilinear(image, h.reshape(n, -1), w.reshape(n, -1)))
        sampled.append(torch.stack(points, dim=2))  # (N, C/dg, K, P)
    im2col = torch.cat(sampled, dim=1).reshape(n, group, channels // group * kH * kW, -1)
    weights = weight.reshape(group, weight.shape[0] // group, -1)
    result = torch.einsum("gok,ngkp->ngop", weights, im2col)
    output.copy_(result.reshape(output.shape))


def softnms(boxes, scores, dets, iou_threshold, sigma, min_score, method, offset):
    """mmcv's ``softnms_cpu`` step by step in float32: pick the highest score (the first of equal
    ones in the current order), swap it to the front, decay the rest (0 naive, 1 linear when IoU
    >= threshold, 2 gaussian), and drop a box under ``min_score`` by moving the last box into
    its place. Writes the picks into ``dets`` (N, 5); returns their original indices."""
    x1, y1, x2, y2 = (boxes[:, i].numpy().astype(np.float32).copy() for i in range(4))
    sc = scores.numpy().astype(np.float32).copy()
    one, zero, off = np.float32(1), np.float32(0), np.float32(offset)
    areas = (x2 - x1 + off) * (y2 - y1 + off)
    inds = np.arange(len(sc))
    arrays = (x1, y1, x2, y2, sc, areas, inds)
    count, i = len(sc), 0
    while i < count:
        best = i + int(np.argmax(sc[i:count]))
        for a in arrays:
            a[i], a[best] = a[best], a[i]
        dets[i] = torch.tensor([x1[i], y1[i], x2[i], y2[i], sc[i]])
        xx1, yy1 = np.maximum(x1[i], x1[i + 1 : count]), np.maximum(y1[i], y1[i + 1 : count])
        xx2, yy2 = np.minimum(x2[i], x2[i + 1 : count]), np.minimum(y2[i], y2[i + 1 : count])
        inter = np.maximum(zero, xx2 - xx1 + off) * np.maximum(zero, yy2 - yy1 + off)
        iou = inter / (areas[i] + areas[i + 1 : count] - inter)
        if method == 0:
            decay = np.where(iou >= np.float32(iou_threshold), zero, one)
        elif method == 1:
            decay = np.where(iou >= np.float32(iou_threshold), one - iou, one)
        else:
            decay = np.exp(-(iou * iou) / np.float32(sigma)).astype(np.float32)
        sc[i + 1 : count] *= decay.astype(np.float32)
        pos = i + 1
        while pos < count:
            if sc[pos] < np.float32(min_score):
                for a in arrays:
                    a[pos] = a[count - 1]
                count -= 1
                continue  # the box moved here is checked next
            pos += 1
        i += 1
    return torch.from_numpy(inds[:count].copy())


def __getattr__(name):
    def missing(*args, **kwargs):
        raise NotImplementedError(f"mmcv op {name} is not provided by dev/parity/mmcv_ext.py")

    return missing
