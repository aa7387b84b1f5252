"""RoI matching and sampling for all images of a batch at once.

Detectron2 matches and samples image by image: its ``Matcher`` checks the IoU matrix with a host
sync, and ``ROIHeads._sample_proposals`` syncs four more times per image. HTC samples at every
stage, twice per stage when interleaved. Here the candidates of all images go through a fixed
number of ops and one host sync, whatever the number of images. The labels are the matcher's
(the same IoU values, the same thresholds) and the sample is the same in law: per image,
min(#positives, int(fraction * num_samples)) positives and min(#negatives, num_samples - that)
negatives, each uniformly without replacement, positives first.
"""

from itertools import accumulate
from typing import List, Tuple

import torch
from detectron2.modeling.matcher import Matcher

from .host import host_tensor


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of (..., 4) boxes ``a`` and ``b`` (broadcast), computed as Detectron2's
    ``pairwise_iou(a, b)`` computes each entry, so it is the same to the bit."""
    wh = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return torch.where(inter > 0, inter / (area_a + area_b - inter), 0.0)


def match(
    matcher: Matcher, boxes: torch.Tensor, image: torch.Tensor, gt_boxes: List[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``matcher`` applied to each image's IoU matrix (its GT boxes x its candidates), for all
    images at once: each candidate is compared with the GT boxes of its image only, padded to
    the most GT boxes of an image.

    Args:
        matcher: Detectron2's Matcher, without low-quality matches.
        boxes: (N, 4) the candidate boxes of all images.
        image: (N,) int64, the image of each candidate.
        gt_boxes: per image, its (G_i, 4) GT boxes.

    Returns:
        (N,) int64 index of each candidate's matched GT box in ``torch.cat(gt_boxes)``, -1 in an
        image without GT boxes, and (N,) int8 the matcher's label of each candidate.
    """
    if matcher.allow_low_quality_matches:
        raise ValueError("HTC's RoI sampling does not support low-quality matches in its matchers")
    counts = [len(g) for g in gt_boxes]
    most = max(counts, default=0)
    if most == 0:
        unmatched = torch.full_like(image, -1)
        return unmatched, torch.full_like(image, matcher.labels[0], dtype=torch.int8)
    starts = [0, *accumulate(counts)]
    table = [[s + g if g < n else -1 for g in range(most)] for s, n in zip(starts, counts)]
    slots = host_tensor(table, boxes.device)[image]  # (N, most)
    gt = torch.cat(gt_boxes)[slots.clamp(min=0)]  # (N, most, 4)
    iou = torch.where(slots >= 0, box_iou(gt, boxes[:, None]), -1.0)
    quality, best = iou.max(dim=1)  # the first of equal maxima, as the matcher takes
    bounds = host_tensor(matcher.thresholds[1:-1], boxes.device, quality.dtype)
    labels = host_tensor(matcher.labels, boxes.device, torch.int8)
    interval = torch.bucketize(quality, bounds, right=True)  # thresholds[i] <= quality < [i+1]
    return slots.gather(1, best[:, None])[:, 0], labels[interval]


def label_proposals(
    matched_idxs: torch.Tensor, matched_labels: torch.Tensor, gt_classes: torch.Tensor, bg: int
) -> torch.Tensor:
    """(N,) class of each candidate from its (N,) matched index in the (G,) ``gt_classes`` and
    its matcher label: the GT's class, ``bg`` where the matcher says background (0), -1 where it
    says ignore (-1)."""
    if gt_classes.numel() == 0:
        return torch.full_like(matched_idxs, bg)
    classes = gt_classes[matched_idxs.clamp(min=0)]
    classes = torch.where(matched_labels == 0, bg, classes)
    return torch.where(matched_labels == -1, -1, classes)


def subsample_labels(
    labels: torch.Tensor,
    image: torch.Tensor,
    num_images: int,
    num_samples: int,
    positive_fraction: float,
    bg: int,
) -> Tuple[torch.Tensor, List[int], List[int]]:
    """Detectron2's ``subsample_labels`` in each image, with one host sync for all.

    Args:
        labels: (N,) the class of each candidate of all images, ``bg``, or -1 (ignored).
        image: (N,) int64, the image of each candidate, in [0, num_images).

    Returns:
        (S,) indices of the sampled candidates, image by image, each image's positives before
        its negatives, and per image the numbers of positives and of negatives (host ints).
    """
    if num_images == 0:
        return labels.new_zeros(0), [], []
    category = torch.where(labels == bg, 1, torch.where(labels < 0, 2, 0))  # +, -, ignored
    # float32 draws stay exact next to an integer part in float64: no key reaches the next one
    draw = torch.rand(labels.shape, device=labels.device).double()
    keys, order = torch.sort((image * 4 + category).double() + draw)
    steps = torch.arange(4 * num_images, dtype=torch.float64, device=labels.device)
    bounds = torch.searchsorted(keys, steps).view(num_images, 4).tolist()
    max_positives = int(num_samples * positive_fraction)
    pieces, num_pos, num_neg = [], [], []
    for first, negatives, ignored, _ in bounds:
        positive = min(negatives - first, max_positives)
        negative = min(ignored - negatives, num_samples - positive)
        pieces += [order[first : first + positive], order[negatives : negatives + negative]]
        num_pos.append(positive)
        num_neg.append(negative)
    return torch.cat(pieces), num_pos, num_neg
