"""Detectron2's ROIPooler with a chosen RoIAlign kernel, answering "pooled to a smaller size"."""

import copy
from typing import List, Tuple

import torch
from detectron2 import layers as d2_layers
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.structures import Boxes
from torch import nn

from .host import repeat_rows
from .layers import ROI_ALIGN_KERNELS, roi_align_kernel


class HTCROIPooler(ROIPooler):
    """:class:`ROIPooler` whose RoIAlign levels are one of :data:`ROI_ALIGN_KERNELS`."""

    @classmethod
    def from_pooler(cls, pooler: ROIPooler, roi_align: str) -> "HTCROIPooler":
        """``pooler`` (same levels, scales and level assignment) with its RoIAlign levels computed
        by the ``roi_align`` kernel (MODEL.HTC.ROI_ALIGN). Detectron2's heads build their
        poolers inline, so the kernel is chosen on the built pooler."""
        kernel = ROI_ALIGN_KERNELS[roi_align_kernel(roi_align)]
        new = copy.deepcopy(pooler)  # holds no parameters
        new.__class__ = cls  # a subclass that adds a method: same state
        new.level_poolers = nn.ModuleList(
            kernel.like(level) if isinstance(level, d2_layers.ROIAlign) else level
            for level in pooler.level_poolers
        )
        return new

    @torch.compiler.disable
    def forward(self, x: List[torch.Tensor], box_lists: List[Boxes]) -> torch.Tensor:
        """The parent's (R, C, M, M) output with one host sync where the parent has one per
        level (a ``nonzero`` selects each level's boxes) plus one (the boxes' image indices):
        boxes are grouped by level with one count; a kernel that pools all levels in one pass
        (:meth:`AutoROIAlign.all_levels`, Triton on CUDA) needs no grouping and no sync. Eager
        under ``torch.compile``: its kernels run eagerly anyway, and the grouping is counted on
        the host (one graph break for the call rather than one for each)."""
        exporting = torch.jit.is_tracing() or torch.jit.is_scripting()
        mismatched = len(x) != len(self.level_poolers) or len(box_lists) != x[0].size(0)
        if not box_lists or exporting or mismatched:  # the parent's checks name a mismatch
            return super().forward(x, box_lists)
        rois = pooler_format(box_lists)
        if len(self.level_poolers) == 1:
            return self.level_poolers[0](x[0], rois)
        levels = assign_boxes_to_levels(  # one Boxes: the same ops for any number of images
            [Boxes(rois[:, 1:])],
            self.min_level,
            self.max_level,
            self.canonical_box_size,
            self.canonical_level,
        )
        first = self.level_poolers[0]
        if hasattr(first, "all_levels"):
            scales = [pooler.spatial_scale for pooler in self.level_poolers]
            pooled = first.all_levels(x, rois, levels, scales)
            if pooled is not None:
                return pooled
        order = torch.argsort(levels, stable=True)
        counts = torch.bincount(levels, minlength=len(self.level_poolers)).tolist()
        pooled = torch.cat(
            [
                pooler(feature, level_rois)
                for pooler, feature, level_rois in zip(
                    self.level_poolers, x, rois[order].split(counts)
                )
            ]
        )
        # back to the order of the boxes; the backward of a copy to ``order`` is a gather, that
        # of an index by its inverse a scatter-add (single-threaded on CPU)
        return torch.empty_like(pooled).index_copy_(0, order, pooled)

    @torch.compiler.disable
    def pooled(
        self, x: List[torch.Tensor], box_lists: List[Boxes], size: Tuple[int, int]
    ) -> torch.Tensor:
        """(R, C, *size): the pooler's output average-pooled to ``size``. A one-level pooler asks
        its kernel, which may pool without the full-size RoI features; not under tracing, which
        would freeze :func:`pooler_format`'s box counts into the graph. Eager under
        ``torch.compile``, as :meth:`forward`."""
        exporting = torch.jit.is_tracing() or torch.jit.is_scripting()
        if (
            exporting
            or len(self.level_poolers) != 1
            or not hasattr(self.level_poolers[0], "pooled")
        ):
            return nn.functional.adaptive_avg_pool2d(self(x, box_lists), size)
        return self.level_poolers[0].pooled(x[0], pooler_format(box_lists), size)


def pooler_format(box_lists: List[Boxes]) -> torch.Tensor:
    """(R, 5) RoIs (image index, x1, y1, x2, y2), as Detectron2's
    ``convert_boxes_to_pooler_format`` makes them, without its host sync (the image indices are
    repeated on the device from the host's box counts) and with as many ops for any number of
    images."""
    boxes = torch.cat([b.tensor for b in box_lists])
    images = torch.arange(len(box_lists), dtype=boxes.dtype, device=boxes.device)
    image = repeat_rows(images, [len(b) for b in box_lists])
    return torch.cat([image[:, None], boxes], dim=1)
