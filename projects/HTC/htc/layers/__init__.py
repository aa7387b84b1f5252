"""HTC's kernels, apart from the model as Detectron2 keeps its own in ``detectron2/layers``.

Each is chosen by one config key (``add_htc_config``), applied where the model is built:
* ``MODEL.HTC.ROI_ALIGN``: "auto" (:class:`AutoROIAlign`: per call, the kernel that measured
  faster), "triton", "cpu_parallel" or "torchvision" (:class:`ROIAlign`), for every pooler of
  the ROI heads (:class:`htc.poolers.HTCROIPooler`); within :func:`shared_levels`, the Triton
  kernels copy each list of levels to their layout once (per call under inference mode);
* ``MODEL.HTC.DEFORM_CONV``: "torchvision" (:func:`use_torchvision_deform_conv`, trains on CPU and
  CUDA) or "detectron2" (its own kernels, CUDA only), for the backbone's deformable convs.

:func:`interpolate_bilinear` resizes the semantic branch's features and logits, by matrix
products (:func:`resize_bilinear`) in deterministic runs.
"""

from .deform_conv import (
    DEFORM_CONV_KERNELS,
    TorchvisionDeformConv,
    TorchvisionModulatedDeformConv,
    use_torchvision_deform_conv,
)
from .interpolate import interpolate_bilinear, resize_bilinear
from .roi_align import (
    ROI_ALIGN_KERNELS,
    AutoROIAlign,
    ParallelCPUROIAlign,
    ROIAlign,
    TritonROIAlign,
    roi_align_kernel,
    shared_levels,
)

__all__ = [
    "DEFORM_CONV_KERNELS",
    "AutoROIAlign",
    "ParallelCPUROIAlign",
    "ROIAlign",
    "ROI_ALIGN_KERNELS",
    "TorchvisionDeformConv",
    "TorchvisionModulatedDeformConv",
    "TritonROIAlign",
    "interpolate_bilinear",
    "resize_bilinear",
    "roi_align_kernel",
    "shared_levels",
    "use_torchvision_deform_conv",
]
