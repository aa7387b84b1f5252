"""htc.layers.resize_bilinear: the bilinear resize of deterministic runs equals F.interpolate's,
values and gradients, with and without align_corners; interpolate_bilinear picks it."""

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from htc.layers import interpolate_bilinear, resize_bilinear

SHAPES_AND_SIZES = [
    ((2, 3, 20, 34), (10, 17)),  # down, as P2 to the stride-8 fusion level
    ((2, 3, 5, 9), (20, 34)),  # up, as P5
    ((1, 2, 3, 7), (24, 56)),  # up by 8, as the semantic logits at inference
    ((1, 2, 3, 7), (11, 4)),  # up along one axis, down along the other
    ((1, 2, 7, 9), (5, 13)),  # by ratios that are not integers, as to an image's own size
    ((1, 2, 1, 1), (4, 5)),  # a one-pixel level
    ((1, 2, 6, 5), (1, 1)),  # to one pixel
    ((1, 2, 6, 5), (6, 5)),  # same size
]


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("shape, size", SHAPES_AND_SIZES)
def test_equals_interpolate(shape, size, align_corners):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    want = F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    got = resize_bilinear(x, size, align_corners)
    grad = torch.randn(want.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0],
        rtol=1e-12, atol=1e-12,
    )  # fmt: skip


def test_keeps_the_dtype():
    x = torch.randn(1, 2, 4, 6, dtype=torch.bfloat16)
    assert resize_bilinear(x, (8, 3), align_corners=True).dtype == torch.bfloat16


class Ops(TorchDispatchMode):
    """The names of the ops dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("align_corners", [True, False])
def test_deterministic_runs_resize_by_matrix_products(align_corners):
    """Without deterministic algorithms, PyTorch's bilinear op; with them, matrix products
    (PyTorch would replace its op by a decomposition the size of the output on CUDA)."""
    x = torch.randn(1, 3, 5, 7)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            with Ops() as ops:
                got = interpolate_bilinear(x, (40, 56), align_corners)
            assert ("upsample_bilinear2d" in ops.names) is not deterministic
            assert bool(ops.names & {"matmul", "bmm", "mm"}) is deterministic
            want = F.interpolate(x, size=(40, 56), mode="bilinear", align_corners=align_corners)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    finally:
        torch.use_deterministic_algorithms(before)
