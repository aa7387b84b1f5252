"""Deformable convolution (DCNv1 and modulated v2) in HTC's backbone trains on CPU."""

import pytest
import torch
from detectron2.layers import DeformConv, ModulatedDeformConv
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import dev_parity_module, make_batch, tiny_cfg
from htc.layers.deform_conv import (
    TorchvisionDeformConv,
    TorchvisionModulatedDeformConv,
    use_torchvision_deform_conv,
)


def test_dcn_v1_gradients_match_numerical():
    conv = use_torchvision_deform_conv(DeformConv(4, 6, 3, stride=2, padding=1, groups=2)).double()
    assert type(conv) is TorchvisionDeformConv
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    offset = torch.randn(2, 18, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: conv(a, b), (x, offset), eps=1e-6, atol=1e-5)
    conv(x, offset).sum().backward()
    assert conv.weight.grad.abs().sum() > 0


def test_dcn_v2_gradients_match_numerical():
    conv = ModulatedDeformConv(4, 6, 3, stride=1, padding=1, bias=True)
    conv = use_torchvision_deform_conv(conv).double()
    assert type(conv) is TorchvisionModulatedDeformConv
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    offset = torch.randn(1, 18, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(1, 9, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: conv(*t), (x, offset, mask), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "groups, deformable_groups, stride, dilation", [(1, 1, 1, 1), (4, 1, 2, 1), (2, 2, 1, 2)]
)
def test_dcn_v1_agrees_with_the_reference_kernel(groups, deformable_groups, stride, dilation):
    """The parity fixtures' mmcv DeformConv2d runs dev/parity/mmcv_ext.py's kernel, written from
    mmcv's C++; ours runs torchvision's. Offsets of a few pixels reach past the border."""
    conv = DeformConv(8, 8, 3, stride, dilation, dilation, groups, deformable_groups, bias=False)
    conv = use_torchvision_deform_conv(conv)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 11, 13, generator=g)
    out_size = [(n + 2 * dilation - 2 * dilation - 1) // stride + 1 for n in (11, 13)]
    offset = torch.randn(2, deformable_groups * 18, *out_size, generator=g) * 3
    ours = conv(x, offset)
    theirs = torch.empty_like(ours)
    dev_parity_module("mmcv_ext").deform_conv_forward(
        x, conv.weight, offset, theirs, None, None, 3, 3, stride, stride, dilation, dilation,
        dilation, dilation, groups, deformable_groups, 2,
    )  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    x_before_y = offset.unflatten(1, (-1, 2)).flip(2).flatten(1, 2)  # a wrong channel order
    assert (conv(x, x_before_y) - theirs).abs().max() > 1


@pytest.mark.parametrize("modulated", [False, True], ids=["dcn-v1", "dcn-v2"])
def test_htc_with_dcn_c3_c5_trains_a_step_on_cpu(modulated):
    cfg = tiny_cfg()
    cfg.merge_from_list(
        [
            "MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.RES2_OUT_CHANNELS", 32,
            "MODEL.RESNETS.STEM_OUT_CHANNELS", 16, "MODEL.RESNETS.WIDTH_PER_GROUP", 8,
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, True, True, True],
            "MODEL.RESNETS.DEFORM_MODULATED", modulated,
        ]
    )  # fmt: skip
    model = build_model(cfg).train()
    blocks = [m for m in model.modules() if isinstance(m, DeformConv | ModulatedDeformConv)]
    assert len(blocks) == 4 + 6 + 3
    with EventStorage():
        losses = model(make_batch())
    sum(losses.values()).backward()
    offset_conv = model.backbone.bottom_up.res3[0].conv2_offset
    assert offset_conv.weight.grad is not None and offset_conv.weight.grad.abs().sum() > 0
    assert "backbone.bottom_up.res4.2.conv2_offset.weight" in model.state_dict()
