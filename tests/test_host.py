"""htc.host: tensors from host values equal ``torch.tensor``'s, on the device asked for."""

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from htc.box_coder import ReferenceBox2BoxTransform
from htc.host import host_tensor, repeat_rows

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "values, dtype",
    [
        ([3, 1, 2], None),
        ([0.5, 0.7], None),
        ([0.5, 0.7], torch.float64),
        ([[0, 1, -1], [2, -1, -1]], None),
        ([[1, 2, 3, 4]], torch.int32),
        ([-1, 0, 1], torch.int8),
        ([], None),
    ],
)
def test_host_tensor_is_torch_tensor_on_the_device(device, values, dtype):
    got = host_tensor(values, device, dtype)
    want = torch.tensor(values, dtype=dtype)
    assert got.device.type == device and got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_repeat_rows_without_a_host_read(device):
    values = torch.arange(6, device=device).view(3, 2)
    with torch.profiler.profile() as prof:
        got = repeat_rows(values, [2, 0, 3])
    assert not [e for e in prof.events() if e.name in ("aten::item", "aten::nonzero")]
    assert torch.equal(got.cpu(), torch.tensor([[0, 1]] * 2 + [[4, 5]] * 3))


class _PageableCopies(TorchDispatchMode):
    """The tensors made from host values outside :func:`host_tensor`: on CUDA each is a copy
    from pageable memory, a wait for the GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith("lift_fresh"):
            stack = traceback.extract_stack()
            self.count += not any(f.name == "host_tensor" for f in stack)
        return func(*args, **(kwargs or {}))


def test_box_decoding_sends_its_bounds_without_a_sync():
    """The RPN decodes once per level and each stage once: 8 syncs a train step, were the
    clamp's bounds sent from pageable memory."""
    transform = ReferenceBox2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
    deltas, boxes = torch.randn(6, 8), torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(6, 1)
    with _PageableCopies() as copies:
        decoded = transform.apply_deltas(deltas, boxes)
    assert copies.count == 0 and decoded.shape == (6, 8)
