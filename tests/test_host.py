"""htc.host: tensors from host values equal ``torch.tensor``'s, on the device asked for."""

import pytest
import torch

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
