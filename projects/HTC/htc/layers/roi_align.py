"""RoIAlign kernels that also answer "pooled to a smaller size", chosen by MODEL.HTC.ROI_ALIGN.

* :class:`ROIAlign` ("torchvision"): Detectron2's RoIAlign (torchvision's op); ``pooled``
  average-pools its output.
* :class:`AutoROIAlign` ("auto", the default): torchvision's results, by the kernel measured
  faster for the call's device and shape (:func:`triton_is_faster`); :class:`TritonROIAlign`
  ("triton") and :class:`ParallelCPUROIAlign` ("cpu_parallel") take one of its kernels always.
  On CPU it runs the kernels of :mod:`htc.layers.roi_align_cpu` (a parallel forward and a
  sparse-matrix backward: in an HTC training step on CPU, torchvision's single-threaded
  backward took more than half of the step). The Triton route (CUDA, with Triton
  installed) runs the kernels of :mod:`htc.layers.roi_align_triton`: a backward without
  atomics (bit-identical gradients from run to run; torchvision's atomicAdds are neither
  deterministic nor fast where thousands of RoIs overlap), pooled outputs computed directly,
  fp16/bf16 computed natively (torchvision's casts to fp32 under autocast: where "auto" moves
  a call from one to the other, its rounding changes), and all levels of a multi-level pooler
  in one pass (:meth:`AutoROIAlign.all_levels`). Elsewhere, and under tracing (export), it is
  :class:`ROIAlign`. The names "fast" and "detectron2" of earlier releases still work, with a
  deprecation warning (:func:`roi_align_kernel`).
"""

import contextlib
import functools
import warnings
from contextvars import ContextVar
from types import ModuleType
from typing import Dict, Iterator, List, Optional, Tuple, Type

import torch
from detectron2 import layers as d2_layers
from torch.nn import functional as F
from torch.nn.modules.utils import _pair

from .roi_align_cpu import parallel_roi_align, sparse_grad_roi_align

TRITON_DEVICES = ("cuda",)  # devices on which AutoROIAlign runs htc.layers.roi_align_triton
_SHARED_LEVELS: ContextVar[Optional[dict]] = ContextVar("htc_shared_levels", default=None)


def half_on_cpu(input: torch.Tensor) -> bool:
    """Whether ``input`` is float16 or bfloat16 on CPU (CPU autocast's features), which
    torchvision's CPU RoIAlign does not take: the kernels pool them in float32 and return their
    dtype, as torchvision's CUDA autocast does."""
    return input.device.type == "cpu" and input.dtype in (torch.float16, torch.bfloat16)


class ROIAlign(d2_layers.ROIAlign):
    """Detectron2's RoIAlign, which also answers :meth:`pooled`."""

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """The parent's, for half-precision features on CPU too (:func:`half_on_cpu`)."""
        if half_on_cpu(input):
            return super().forward(input.float(), rois).to(input.dtype)
        return super().forward(input, rois)

    def pooled(
        self, input: torch.Tensor, rois: torch.Tensor, size: Tuple[int, int]
    ) -> torch.Tensor:
        """(R, C, *size): ``adaptive_avg_pool2d(self(input, rois), size)``."""
        return F.adaptive_avg_pool2d(self(input, rois), size)

    @classmethod
    def like(cls, other: d2_layers.ROIAlign) -> "ROIAlign":
        """This kernel with the geometry of ``other``."""
        return cls(other.output_size, other.spatial_scale, other.sampling_ratio, other.aligned)


@contextlib.contextmanager
def shared_levels() -> Iterator[None]:
    """Within it, the Triton route of :class:`AutoROIAlign` copies a list of feature levels to
    its channels-last buffer once for all its calls on them, and sums their gradients there
    (:func:`htc.layers.roi_align_triton.joint_levels`; not for ``torch.inference_mode``'s
    tensors, copied per call); the buffers go when it ends. Elsewhere it changes nothing."""
    token = _SHARED_LEVELS.set({})
    try:
        yield
    finally:
        _SHARED_LEVELS.reset(token)


@functools.cache
def triton_kernels() -> Optional[ModuleType]:
    """:mod:`htc.layers.roi_align_triton`, or None where Triton is not installed (imported on
    first use: importing Triton takes a while and CPU runs never need it)."""
    try:
        from . import roi_align_triton
    except ImportError:
        return None
    return roi_align_triton


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton compiles for ``device``: a CUDA GPU of compute capability 7.0 (Volta) or
    newer, the bound of PyTorch's own Triton users (Inductor); ROCm; any device of Triton's
    interpreter (the tests')."""
    if device.type != "cuda" or torch.version.hip:
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_capability(index) >= (7, 0)


@functools.cache
def _cuda_capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_of(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """``tensor``'s CUDA device made current: Triton launches on the current device, which a
    model on another GPU (``MODEL.DEVICE cuda:1``) need not have made current. (The backward
    runs in autograd's thread of the tensors' device, which sets it.)"""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


# Where torchvision's CUDA kernel does more than this much work (below), the Triton kernels are
# faster: the crossover that the H200 measured (BENCHMARKS.md, "RoIAlign per call").
TRITON_CROSSOVER = 55e6


def triton_is_faster(
    input_shape: Tuple[int, int, int, int],
    rois: int,
    output_size: Tuple[int, int],
    pool: int,
    levels: int,
    grad: bool,
) -> bool:
    """Whether the Triton kernels beat torchvision's on CUDA for one call, from what the host
    knows (no sync): always for several levels (one pass, where torchvision's pooler groups
    the RoIs by level with a host sync) and for pooled outputs (no full-size output); else
    when torchvision's work is large: its bilinear samples times channels, a RoI's samples
    taken as its output cells or 1/64 of the feature map, whichever is more (at least one
    sample per cell; more in large RoIs), plus the zeroed input gradient of a backward.
    Triton's cost starts at about 0.5 ms of launches and entry sorting, whatever the size."""
    if levels > 1 or pool > 1:
        return True
    num, channels, height, width = input_shape
    samples = rois * channels * max(output_size[0] * output_size[1], height * width / 64)
    return samples + (num * channels * height * width if grad else 0) >= TRITON_CROSSOVER


def why_triton_cannot_run_on(device: torch.device) -> Optional[str]:
    """Why this module's Triton kernels cannot run on ``device`` of TRITON_DEVICES, or None. On
    a machine without CUDA (a config checked before it runs elsewhere) a CUDA device's compute
    capability cannot be read: only Triton's presence is."""
    if triton_kernels() is None:
        return "Triton is not installed (pip install triton)"
    if (device.type != "cuda" or torch.cuda.is_available()) and not triton_runs_on(device):
        return f"Triton compiles for compute capability 7.0 and newer, not {device}'s"
    return None


def _why_not_triton(input: torch.Tensor) -> Optional[str]:
    """Why this module's Triton kernels cannot pool ``input`` of TRITON_DEVICES, or None."""
    why = why_triton_cannot_run_on(input.device)
    if why is None and input.dtype == torch.float64:
        return "its kernels compute in float32, and the input is float64"
    return why


class AutoROIAlign(ROIAlign):
    """:class:`ROIAlign` that picks the faster kernel per call ("auto"): on CPU the parallel
    forward and sparse backward; on CUDA (with Triton) the Triton kernels where
    :func:`triton_is_faster` and always under ``torch.use_deterministic_algorithms``
    (torchvision's backward accumulates with atomics), else torchvision's. Under
    ``torch.compile`` its calls run eagerly, a graph break each: Dynamo cannot trace a thread
    pool, and the Triton route reads its entry count on the host."""

    cpu_kernels = True  # the CPU route on CPU

    def _arguments(self) -> tuple:
        return (_pair(self.output_size), self.spatial_scale, self.sampling_ratio, self.aligned)

    def _prefers_triton(
        self, input: torch.Tensor, rois: torch.Tensor, pool: int, levels: int
    ) -> bool:
        """Whether a call that Triton can run takes it."""
        if torch.are_deterministic_algorithms_enabled():
            return True
        grad = torch.is_grad_enabled() and input.requires_grad
        size = _pair(self.output_size)
        return triton_is_faster(tuple(input.shape), len(rois), size, pool, levels, grad)

    def _route(
        self, input: torch.Tensor, rois: torch.Tensor, pool: int = 1, levels: int = 1
    ) -> str:
        """ "triton" or "cpu" (this class's kernels), or "torchvision" (the parent's): also on
        other devices, and under tracing or scripting, which must record torchvision's op rather
        than a thread pool or a Triton launch."""
        if torch.jit.is_tracing() or torch.jit.is_scripting():
            return "torchvision"
        if input.device.type in TRITON_DEVICES and _why_not_triton(input) is None:
            return "triton" if self._prefers_triton(input, rois, pool, levels) else "torchvision"
        return "cpu" if input.device.type == "cpu" and self.cpu_kernels else "torchvision"

    @torch.compiler.disable
    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """The parent's RoIAlign, by the kernel :meth:`_route` picks (the parent has one).
        input (N, C, H, W), rois (R, 5) -> (R, C, *output_size)."""
        assert rois.dim() == 2 and rois.size(1) == 5
        if half_on_cpu(input):
            return self.forward(input.float(), rois).to(input.dtype)
        route = self._route(input, rois)
        if route == "triton":
            return self._on_triton(input, rois, pool=1)
        if route == "cpu":
            return self._on_cpu(input, rois, pool=1)
        return super().forward(input, rois)

    @torch.compiler.disable
    def pooled(
        self, input: torch.Tensor, rois: torch.Tensor, size: Tuple[int, int]
    ) -> torch.Tensor:
        """When ``size`` divides the output size by an integer k, the pooling (an exact kxk
        average) is computed with the RoIAlign (CPU: chunk by chunk; Triton: in the kernel), so
        the full-size RoI features are neither materialized nor kept for backward."""
        if half_on_cpu(input):
            return self.pooled(input.float(), rois, size).to(input.dtype)
        pooled_h, pooled_w = _pair(self.output_size)
        k = pooled_h // size[0]
        if (pooled_h, pooled_w) != (size[0] * k, size[1] * k):
            return super().pooled(input, rois, size)
        route = self._route(input, rois, pool=k)
        if route == "triton":
            return self._on_triton(input, rois, pool=k)
        if route == "cpu":
            return self._on_cpu(input, rois, pool=k)
        return super().pooled(input, rois, size)

    @torch.compiler.disable
    def all_levels(
        self,
        features: List[torch.Tensor],
        rois: torch.Tensor,
        levels: torch.Tensor,
        scales: List[float],
    ) -> Optional[torch.Tensor]:
        """(R, C, *output_size): RoI r pooled from ``features[levels[r]]`` at ``scales[levels[r]]``
        with this kernel's geometry, all levels in one pass, where this kernel runs Triton; else
        None (a pooler then pools level by level)."""
        if self._route(features[0], rois, levels=len(features)) != "triton":
            return None
        size, _, sampling_ratio, aligned = self._arguments()
        with device_of(features[0]):
            return triton_kernels().multi_level_roi_align(
                features, rois, levels, scales, size, sampling_ratio, aligned,
                shared=_SHARED_LEVELS.get(),
            )  # fmt: skip

    def _on_triton(self, input: torch.Tensor, rois: torch.Tensor, pool: int) -> torch.Tensor:
        """The Triton kernels (then ``avg_pool2d(pool)``) on ``input``'s device, sharing the
        level copy of :func:`shared_levels`."""
        shared = _SHARED_LEVELS.get()
        with device_of(input):
            return triton_kernels().roi_align(input, rois, *self._arguments(), pool, shared=shared)

    def _on_cpu(self, input: torch.Tensor, rois: torch.Tensor, pool: int) -> torch.Tensor:
        """The parallel forward (then ``avg_pool2d(pool)``), with the sparse backward when a
        gradient is wanted."""
        rois = rois.to(dtype=input.dtype)
        if torch.is_grad_enabled() and input.requires_grad:
            return sparse_grad_roi_align(input, rois, *self._arguments(), pool)
        return parallel_roi_align(input, rois, *self._arguments(), pool)


class TritonROIAlign(AutoROIAlign):
    """The Triton kernels for every call they can compute (CUDA of compute capability 7.0 and
    newer with Triton, float32 and narrower); torchvision's elsewhere, with a warning naming
    the reason on CUDA (:func:`_why_not_triton`)."""

    cpu_kernels = False

    def _prefers_triton(self, *_) -> bool:
        return True

    def _route(
        self, input: torch.Tensor, rois: torch.Tensor, pool: int = 1, levels: int = 1
    ) -> str:
        route = super()._route(input, rois, pool, levels)
        exporting = torch.jit.is_tracing() or torch.jit.is_scripting()
        if route == "torchvision" and input.device.type in TRITON_DEVICES and not exporting:
            warnings.warn(
                f"MODEL.HTC.ROI_ALIGN='triton', but {_why_not_triton(input)}: torchvision's "
                "RoIAlign runs instead",
                RuntimeWarning,
                stacklevel=2,
            )
        return route


class ParallelCPUROIAlign(AutoROIAlign):
    """The parallel forward and sparse backward on CPU; torchvision's elsewhere."""

    def _prefers_triton(self, *_) -> bool:
        return False


# MODEL.HTC.ROI_ALIGN -> kernel
ROI_ALIGN_KERNELS: Dict[str, Type[ROIAlign]] = {
    "auto": AutoROIAlign,
    "triton": TritonROIAlign,
    "cpu_parallel": ParallelCPUROIAlign,
    "torchvision": ROIAlign,
}
# the names of earlier releases -> today's
DEPRECATED_ROI_ALIGN = {"fast": "auto", "detectron2": "torchvision"}
_WARNED_DEPRECATED: set = set()  # each deprecated name warns once per process


def roi_align_kernel(name: str, key: str = "MODEL.HTC.ROI_ALIGN") -> str:
    """The :data:`ROI_ALIGN_KERNELS` name that the config value ``name`` (of ``key``) means;
    a deprecated name gives its successor, with a warning the first time; an unknown one
    raises."""
    if name in DEPRECATED_ROI_ALIGN:
        new = DEPRECATED_ROI_ALIGN[name]
        if name not in _WARNED_DEPRECATED:
            _WARNED_DEPRECATED.add(name)
            warnings.warn(
                f"{key}={name!r} is deprecated: it is {new!r} now (choices: "
                f"{', '.join(ROI_ALIGN_KERNELS)})",
                FutureWarning,
                stacklevel=2,
            )
        return new
    if name not in ROI_ALIGN_KERNELS:
        raise ValueError(f"{key}={name!r}: use one of {', '.join(ROI_ALIGN_KERNELS)}")
    return name
