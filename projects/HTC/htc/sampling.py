"""RoI sampling for all images of a batch with one host sync.

Detectron2's ``ROIHeads._sample_proposals`` syncs four times per image (two masked label
assignments, two ``nonzero`` in ``subsample_labels``); HTC samples at every stage, twice per
stage when interleaved. The sample drawn is the same in law: per image, min(#positives,
int(fraction * num_samples)) positives and min(#negatives, num_samples - that) negatives, each
uniformly without replacement, positives first.
"""

from typing import List, Tuple

import torch


def label_proposals(
    matched_idxs: torch.Tensor, matched_labels: torch.Tensor, gt_classes: torch.Tensor, bg: int
) -> torch.Tensor:
    """(N,) class of each proposal from the matcher's (N,) GT indices and labels: its GT's
    class, ``bg`` where the matcher says background (0), -1 where it says ignore (-1)."""
    if gt_classes.numel() == 0:
        return torch.full_like(matched_idxs, bg)
    classes = gt_classes[matched_idxs]
    classes = torch.where(matched_labels == 0, bg, classes)
    return torch.where(matched_labels == -1, -1, classes)


def subsample_labels(
    labels: List[torch.Tensor], num_samples: int, positive_fraction: float, bg: int
) -> List[Tuple[torch.Tensor, int, int]]:
    """Per image of (N_i,) ``labels`` (a class, ``bg``, or -1 = ignore): the sampled indices,
    positives then negatives, and the numbers of each (host ints)."""
    orders, available = [], []
    for image_labels in labels:
        positive = (image_labels != -1) & (image_labels != bg)
        negative = image_labels == bg
        key = torch.rand(image_labels.shape, device=image_labels.device)  # [0, 1)
        key = torch.where(positive, key, torch.where(negative, key + 2, torch.full_like(key, 4)))
        orders.append(torch.argsort(key))  # random positives, random negatives, the ignored
        available.append(torch.stack([positive.sum(), negative.sum()]))
    if not labels:
        return []
    max_positives = int(num_samples * positive_fraction)
    samples = []
    for order, (positives, negatives) in zip(orders, torch.stack(available).tolist()):
        num_pos = min(positives, max_positives)
        num_neg = min(negatives, num_samples - num_pos)
        idxs = torch.cat([order[:num_pos], order[positives : positives + num_neg]])
        samples.append((idxs, num_pos, num_neg))
    return samples
