"""Kernel launches and host reads of one training step on the CUDA code path, counted on CPU:
HTC next to Detectron2's Cascade Mask R-CNN (R50-FPN, 2 images, random weights).

Every op dispatched to PyTorch is counted, views and allocations aside (on CUDA nearly each of
the rest launches one kernel), and every launch of a Triton kernel. AutoROIAlign takes its CUDA
route (HTC's Triton kernels) on CPU tensors, with the kernels replaced by stand-ins that write
zeros (ones for the sample counts): the ops around them are those of a GPU run; the values are
not computed. Host reads, each a wait for the GPU on CUDA: ``aten::_local_scalar_dense``
(``.item()``, ``float(tensor)``), ``aten::nonzero`` and ``Tensor.tolist``; and the tensors
made from host values (``torch.tensor(values)``, seen as ``aten::lift_fresh``), which on CUDA
are copies from pageable memory, a wait for the GPU each, except those of ``htc.host``, which
go through pinned memory without one. With ``--regions``,
the ops of each part of the step: each op goes to the innermost of the functions in
:data:`REGIONS` that it runs under (any op of the backward pass to "backward").

    .venv/bin/python benchmarks/dispatch_counts.py [--size 320] [--images 2,8] [--regions]
"""

import argparse
import traceback
from collections import Counter
from contextlib import ExitStack
from typing import Dict, Tuple
from unittest import mock

import torch
from common import PARTS, train_step
from speed import build, train_inputs
from torch.utils._python_dispatch import TorchDispatchMode

import htc.layers.roi_align as kernels

ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "detach", "lift_fresh"}
OUTPUTS = {"out", "pixel", "cell", "weight", "grad_in"}  # the kernels' outputs, by argument name
REGIONS = {function: part for part, functions in PARTS.items() for function in functions}
MODELS = ("cascade", "htc")
HOST_COPIES = {"(pageable copy)", "(pinned copy)"}
HOST_READS = {"tolist", "(pinned read)", *HOST_COPIES}  # counted, but not as launches
OTHER = "the rest of the forward pass (backbone, FPN, heads' layers)"


def region(stack: traceback.StackSummary) -> str:
    """The part of the step that the innermost frame of ``stack`` found in :data:`REGIONS` is."""
    if any(frame.name == "_engine_run_backward" for frame in stack):
        return "backward"
    for frame in reversed(stack):
        name = REGIONS.get((frame.filename.rsplit("/", 1)[-1], frame.name))
        if name is not None:
            return name
    return OTHER


def host_copy(stack: traceback.StackSummary) -> str:
    """How a tensor made from host values reaches a CUDA device: "(pinned copy)" within
    ``htc.host.host_tensor``, else "(pageable copy)"."""
    pinned = any(f.name == "host_tensor" and f.filename.endswith("host.py") for f in stack)
    return "(pinned copy)" if pinned else "(pageable copy)"


class Counts(TorchDispatchMode):
    """Counts the ops dispatched while it is active and not paused, and with ``regions`` the
    launches of each part of the step (:func:`region`)."""

    def __init__(self, regions: bool = False):
        super().__init__()
        self.ops = Counter()
        self.regions = Counter() if regions else None
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        # a Python number wrapped for an op (``torch.where(c, x, 0.0)``) is a host tensor on
        # CUDA too: no launch
        wrapped = name == "scalar_tensor" and str((kwargs or {}).get("device")) == "cpu"
        if name == "lift_fresh":
            self.count(host_copy(traceback.extract_stack()))
        elif not func.is_view and name not in ALLOCATIONS and not wrapped:
            self.count(name)
        return func(*args, **(kwargs or {}))

    def count(self, name: str) -> None:
        if self.paused:
            return
        self.ops[name] += 1
        if self.regions is not None and name not in HOST_READS:
            self.regions[region(traceback.extract_stack())] += 1

    def add(self, name: str, fn, *args):
        """``fn(*args)`` counted as one ``name``."""
        self.count(name)
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


def count_step(name: str, size: int, images: int, regions: bool = False) -> Counts:
    """The counts of one train step of model ``name`` on ``images`` images (after a warm-up
    step)."""
    triton = kernels.triton_kernels()
    counts = Counts(regions)
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
        if regions:
            counts.regions.clear()
        with counts:
            train_step(model, inputs)
    return counts


def table(title: str, rows: Dict[str, Tuple[int, int]]) -> None:
    """A markdown table of ``rows`` (title -> counts of Cascade and of HTC), with the ratio."""
    print(f"| {title} | Cascade Mask R-CNN | HTC | HTC / Cascade |")
    print("|---|---|---|---|")
    for name, (cascade, htc) in rows.items():
        ratio = f"{htc / cascade:.2f}" if cascade else "-"
        print(f"| {name} | {cascade} | {htc} | {ratio} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320, help="square images")
    parser.add_argument("--images", default="2,8", help="images per step, comma-separated")
    parser.add_argument("--regions", action="store_true", help="the ops of each part of a step")
    args = parser.parse_args()
    torch.set_num_threads(2)
    measures = {
        "ops dispatched (about one kernel launch each on CUDA)": lambda c: sum(
            v for k, v in c.items() if k not in HOST_READS
        ),
        "of which Triton launches": lambda c: c["Triton launch"],
        "host reads: `_local_scalar_dense`": lambda c: c["_local_scalar_dense"],
        "host reads: `nonzero`": lambda c: c["nonzero"],
        "host reads: `tolist`": lambda c: c["tolist"],
        "host-to-device copies from pageable memory (a sync each)": lambda c: c["(pageable copy)"],
        "host-to-device copies from pinned memory (no sync)": lambda c: c["(pinned copy)"],
        "syncs in all (reads and pageable copies)": lambda c: sum(
            c[k] for k in ("_local_scalar_dense", "nonzero", "tolist", "(pageable copy)")
        ),
    }
    for images in map(int, args.images.split(",")):
        cascade, htc = (count_step(name, args.size, images, args.regions) for name in MODELS)
        print(f"\nOne train step, {images} images of {args.size}x{args.size}, the CUDA code path\n")
        table("count", {k: (f(cascade.ops), f(htc.ops)) for k, f in measures.items()})
        if args.regions:
            print()
            parts = sorted(set(cascade.regions) | set(htc.regions))
            table("ops of", {k: (cascade.regions[k], htc.regions[k]) for k in parts})


if __name__ == "__main__":
    main()
