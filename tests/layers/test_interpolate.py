"""htc.layers.resize_align_corners: the bilinear resize of deterministic runs equals
F.interpolate's (align_corners=True), values and gradients."""

import pytest
import torch
from torch.nn import functional as F

from htc.layers import resize_align_corners


@pytest.mark.parametrize(
    "shape, size",
    [
        ((2, 3, 20, 34), (10, 17)),  # down, as P2 to the stride-8 fusion level
        ((2, 3, 5, 9), (20, 34)),  # up, as P5
        ((1, 2, 3, 7), (11, 4)),  # up along one axis, down along the other
        ((1, 2, 1, 1), (4, 5)),  # a one-pixel level
        ((1, 2, 6, 5), (1, 1)),  # to one pixel
        ((1, 2, 6, 5), (6, 5)),  # same size
    ],
)
def test_equals_interpolate(shape, size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    want = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    got = resize_align_corners(x, size)
    grad = torch.randn(want.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0],
        rtol=1e-12, atol=1e-12,
    )  # fmt: skip


def test_keeps_the_dtype():
    x = torch.randn(1, 2, 4, 6, dtype=torch.bfloat16)
    assert resize_align_corners(x, (8, 3)).dtype == torch.bfloat16
