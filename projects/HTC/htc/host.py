"""Tensors made on a device from values the host holds, without stalling the device's stream.

``torch.tensor(values, device="cuda")`` copies from pageable memory, which waits for the stream
to drain: a host sync as costly as ``.item()``, which a CPU profile does not show. Here the
values go through pinned memory with a non-blocking copy (PyTorch's pinned-memory cache keeps
the buffer until the copy is done)."""

from typing import List, Optional, Sequence, Union

import torch


def host_tensor(
    values: Sequence, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)``, sent without a sync on CUDA."""
    tensor = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def repeat_rows(values: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """(sum(counts), ...): row i of ``values`` repeated ``counts[i]`` times, host counts, so no
    host sync (``repeat_interleave`` reads its output size from the device unless told)."""
    repeats = host_tensor(counts, values.device)
    return torch.repeat_interleave(values, repeats, dim=0, output_size=sum(counts))
