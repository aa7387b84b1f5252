"""Instance masks at the output resolution as COCO RLE, one chunk of masks at a time.

Full-resolution masks cost H x W bytes each: 100 detections on a 12-megapixel photo are 1.2 GB.
With ``MODEL.HTC.MASK_OUTPUT "rle"`` each mask is pasted and encoded in chunks, so memory stays
at a chunk's worth of full-size masks whatever the number of detections.
"""

from typing import List

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.structures import Boxes

MASK_OUTPUTS = ("bitmask", "rle")


def paste_masks_as_rle(
    masks: torch.Tensor, boxes: Boxes, height: int, width: int, chunk: int = 4
) -> List[dict]:
    """
    Args:
        masks: (N, 1, M, M) mask probabilities in box coordinates (the ROI heads' ``pred_masks``).
        boxes: the N boxes at the output resolution.
        height, width: the output resolution.

    Returns:
        N COCO RLEs (``size``, ``counts`` as str) of the masks pasted and thresholded at 0.5, as
        Detectron2's ``detector_postprocess`` pastes them.
    """
    rles = []
    for start in range(0, len(masks), chunk):
        pasted = paste_masks_in_image(
            masks[start : start + chunk, 0], boxes[start : start + chunk], (height, width)
        )
        # (n, W, H) in C order is (H, W, n) in Fortran order, as pycocotools wants it: one copy
        columns = pasted.transpose(1, 2).contiguous().cpu().numpy().view(np.uint8)
        for rle in mask_util.encode(columns.transpose(2, 1, 0)):
            rle["counts"] = rle["counts"].decode("ascii")
            rles.append(rle)
    return rles
