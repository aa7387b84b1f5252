"""Kernel launches and host reads of one training step on the CUDA code path, counted on CPU:
HTC next to Detectron2's Cascade Mask R-CNN (R50-FPN, 2 images, random weights).

Every op dispatched to PyTorch is counted, views and allocations aside (on CUDA nearly each of
the rest launches one kernel), and every launch of a Triton kernel. FastROIAlign takes its CUDA
route (HTC's Triton kernels) on CPU tensors, with the kernels replaced by stand-ins that write
zeros (ones for the sample counts): the ops around them are those of a GPU run; the values are
not computed. Host reads, each a wait for the GPU on CUDA: ``aten::_local_scalar_dense``
(``.item()``, ``float(tensor)``), ``aten::nonzero`` and ``Tensor.tolist``.

    .venv/bin/python benchmarks/dispatch_counts.py [--size 320] [--images 2,8]
"""

import argparse
from collections import Counter
from contextlib import ExitStack
from unittest import mock

import torch
from common import train_step
from speed import build, train_inputs
from torch.utils._python_dispatch import TorchDispatchMode

import htc.layers.roi_align as kernels

ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "detach", "lift_fresh"}
OUTPUTS = {"out", "pixel", "cell", "weight", "grad_in"}  # the kernels' outputs, by argument name


class Counts(TorchDispatchMode):
    """Counts the ops dispatched while it is active and not paused."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if not self.paused and not func.is_view and name not in ALLOCATIONS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    def add(self, name: str, fn, *args):
        """``fn(*args)`` counted as one ``name``."""
        if not self.paused:
            self.ops[name] += 1
        self.paused += 1
        try:
            return fn(*args)
        finally:
            self.paused -= 1


class StandIn:
    """A Triton kernel's stand-in: writes zeros to its outputs (ones to ``entries``)."""

    def __init__(self, kernel, counts: Counts):
        self.names, self.counts = kernel.arg_names, counts

    def __getitem__(self, grid):
        def fill(*args):
            for name, value in zip(self.names, args):
                if name in OUTPUTS:
                    value.zero_()
                elif name == "entries":
                    value.fill_(1)

        return lambda *args, **kwargs: self.counts.add("Triton launch", fill, *args)


def count_step(name: str, size: int, images: int) -> Counter:
    """The counts of one train step of model ``name`` on ``images`` images (after a warm-up
    step)."""
    triton = kernels.triton_kernels()
    counts = Counts()
    tolist = torch.Tensor.tolist
    with ExitStack() as patches:

        def patch(target, attr: str, new) -> None:  # undone when the stack closes
            patches.enter_context(mock.patch.object(target, attr, new))

        patch(kernels, "TRITON_DEVICES", ("cpu",))
        for attr in dir(triton):
            if attr.endswith("_kernel"):
                patch(triton, attr, StandIn(getattr(triton, attr), counts))
        model = build(name, "cpu", 100)
        inputs = train_inputs(name, "cpu", size, images)
        train_step(model, inputs)
        patch(torch.Tensor, "tolist", lambda t: counts.add("tolist", tolist, t))
        if hasattr(triton, "EntryCount"):  # reads pinned memory after an event: no wait
            total = triton.EntryCount.total
            patch(triton.EntryCount, "total", lambda c: counts.add("(pinned read)", total, c))
        counts.ops.clear()  # the warm-up's launches
        with counts:
            train_step(model, inputs)
    return counts.ops


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320, help="square images")
    parser.add_argument("--images", default="2,8", help="images per step, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(2)
    measures = {
        "ops dispatched (about one kernel launch each on CUDA)": lambda c: sum(
            v for k, v in c.items() if k not in {"tolist", "(pinned read)"}
        ),
        "of which Triton launches": lambda c: c["Triton launch"],
        "host reads: `_local_scalar_dense`": lambda c: c["_local_scalar_dense"],
        "host reads: `nonzero`": lambda c: c["nonzero"],
        "host reads: `tolist`": lambda c: c["tolist"],
    }
    for images in map(int, args.images.split(",")):
        rows = {name: count_step(name, args.size, images) for name in ("cascade", "htc")}
        print(f"\nOne train step, {images} images of {args.size}x{args.size}, the CUDA code path\n")
        print("| count | Cascade Mask R-CNN | HTC | HTC / Cascade |")
        print("|---|---|---|---|")
        for title, measure in measures.items():
            cascade, htc = measure(rows["cascade"]), measure(rows["htc"])
            ratio = f"{htc / cascade:.2f}" if cascade else "-"
            print(f"| {title} | {cascade} | {htc} | {ratio} |")


if __name__ == "__main__":
    main()
