"""RoI matching and sampling for all images of a batch at once.

Detectron2 matches and samples image by image: its ``Matcher`` checks the IoU matrix with a host
sync, and ``ROIHeads._sample_proposals`` syncs four more times per image. HTC samples at every
stage, twice per stage when interleaved. Here the candidates of all images are matched in groups
of images no larger than the largest image's IoU matrix, and sampled with one host sync for all
images. The labels are Detectron2's (the same IoU values, the same thresholds, every proposal
background in an image without GT boxes) and the sample is the same in law: per image,
min(#positives, int(fraction * num_samples)) positives and min(#negatives, num_samples - that)
negatives, each uniformly without replacement, positives first.
"""

from itertools import accumulate
from typing import List, NamedTuple, Optional, Tuple

import torch
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes, Instances
from torch.nn import functional as F

from .host import host_tensor, repeat_rows


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of (..., 4) boxes ``a`` and ``b`` (broadcast), computed as Detectron2's
    ``pairwise_iou(a, b)`` computes each entry, so it is the same to the bit."""
    wh = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return torch.where(inter > 0, inter / (area_a + area_b - inter), 0.0)


# Candidates x GT boxes of one group of images, in entries: at most the largest image's IoU
# matrix (Detectron2's own peak), or this many when that is smaller (small images go together).
GROUP_ENTRIES = 1 << 16


def match(
    matcher: Matcher, boxes: torch.Tensor, counts: List[int], gt_boxes: List[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``matcher`` applied to each image's IoU matrix (its GT boxes x its candidates), images
    in groups with no host sync: each group's candidates are compared with the GT boxes of their
    own image only, padded to the group's most. A group holds no more entries than the largest
    image's matrix (or :data:`GROUP_ENTRIES`), so memory stays that of matching image by image
    however crowded the images.

    Args:
        matcher: Detectron2's Matcher, without low-quality matches.
        boxes: (N, 4) the candidate boxes of all images, image after image.
        counts: the number of candidates of each image, summing to N.
        gt_boxes: per image, its (G_i, 4) GT boxes.

    Returns:
        (N,) int64 index of each candidate's matched GT box in ``torch.cat(gt_boxes)``, -1 in an
        image without GT boxes, and (N,) int8 the matcher's label of each candidate.
    """
    if matcher.allow_low_quality_matches:
        raise ValueError("HTC's RoI sampling does not support low-quality matches in its matchers")
    gt_counts = [len(g) for g in gt_boxes]
    budget = max([GROUP_ENTRIES, *(n * g for n, g in zip(counts, gt_counts))])
    rows, gt_rows = [0, *accumulate(counts)], [0, *accumulate(gt_counts)]
    index, quality = [], []
    for first, end in _groups(counts, gt_counts, budget):
        group = slice(first, end)
        i, q = _match_group(
            boxes[rows[first] : rows[end]], counts[group], gt_boxes[group], gt_rows[group]
        )
        index.append(i)
        quality.append(q)
    bounds = host_tensor(matcher.thresholds[1:-1], boxes.device, boxes.dtype)
    labels = host_tensor(matcher.labels, boxes.device, torch.int8)
    interval = torch.bucketize(torch.cat(quality), bounds, right=True)  # [i] <= q < [i+1]
    return torch.cat(index), labels[interval]


def _groups(counts: List[int], gt_counts: List[int], budget: int) -> List[Tuple[int, int]]:
    """Consecutive images [first, end) whose padded matrix, images x most candidates x most GT
    boxes, holds at most ``budget`` entries (an image alone always makes a group)."""
    groups, first = [], 0
    while first < len(counts):
        end = first + 1
        while end < len(counts):
            most_rows, most_gt = max(counts[first : end + 1]), max(gt_counts[first : end + 1])
            if (end + 1 - first) * most_rows * most_gt > budget:
                break
            end += 1
        groups.append((first, end))
        first = end
    return groups


def _match_group(
    boxes: torch.Tensor, counts: List[int], gt_boxes: List[torch.Tensor], gt_starts: List[int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The matches of a group of images: (N,) int64 index of each candidate's best GT box in
    the GT boxes of all images (``gt_starts``: where each image's begin), -1 in an image without
    any, and (N,) its IoU (the first of equal maxima, as the matcher takes; -1 without GT)."""
    most = max(len(g) for g in gt_boxes)
    if most == 0:
        return torch.full((len(boxes),), -1, device=boxes.device), boxes.new_full((len(boxes),), -1)
    if len(counts) == 1:  # one image: no padding
        quality, best = box_iou(gt_boxes[0], boxes[:, None]).max(dim=1)
        return best + gt_starts[0], quality
    k, most_rows = len(counts), max(counts)
    # row j of image i sits at i * most_rows + j of the padded (k, most_rows) candidates
    offsets = [i * most_rows - s for i, s in enumerate(accumulate([0, *counts[:-1]]))]
    position = torch.arange(len(boxes), device=boxes.device) + repeat_rows(
        host_tensor(offsets, boxes.device), counts
    )
    padded = boxes.new_zeros(k * most_rows, 4).index_copy_(0, position, boxes).view(k, most_rows, 4)
    gt = torch.stack([F.pad(g, (0, 0, 0, most - len(g))) for g in gt_boxes])  # (k, most, 4)
    real = host_tensor([[j < len(g) for j in range(most)] for g in gt_boxes], boxes.device)
    iou = torch.where(real[:, None], box_iou(gt[:, None], padded[:, :, None]), -1.0)
    quality, best = iou.max(dim=2)  # (k, most_rows)
    starts = host_tensor([s if len(g) else -1 for s, g in zip(gt_starts, gt_boxes)], boxes.device)
    index = torch.where(starts[:, None] >= 0, best + starts[:, None], -1)
    return index.view(-1)[position], quality.view(-1)[position]


def label_proposals(
    matched_idxs: torch.Tensor, matched_labels: torch.Tensor, gt_classes: torch.Tensor, bg: int
) -> torch.Tensor:
    """(N,) class of each candidate from its (N,) matched index in the (G,) ``gt_classes`` and
    its matcher label: the GT's class, ``bg`` where the matcher says background (0), -1 where it
    says ignore (-1), and ``bg`` in an image without GT boxes (matched index -1) whatever the
    matcher says, as Detectron2's ``_sample_proposals``."""
    if gt_classes.numel() == 0:
        return torch.full_like(matched_idxs, bg)
    classes = gt_classes[matched_idxs.clamp(min=0)]
    classes = torch.where(matched_labels == 0, bg, classes)
    classes = torch.where(matched_labels == -1, -1, classes)
    return torch.where(matched_idxs < 0, bg, classes)


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


class RoISample(NamedTuple):
    """A stage's sampled RoIs: per image, ``rois`` (positives first) and ``num_fg`` (its number
    of positives), and ``matched`` (R,), the index of each RoI's matched target in the batch's
    targets (-1 in an image without targets)."""

    rois: List[Instances]
    num_fg: List[int]
    matched: torch.Tensor


@torch.compiler.disable
@torch.no_grad()
def sample_rois(
    proposals: List[Instances],
    targets: List[Instances],
    matcher: Matcher,
    num_classes: int,
    num_samples: int,
    positive_fraction: float,
    append_gt: bool,
) -> RoISample:
    """Detectron2's ``label_and_sample_proposals`` with any ``matcher``, all images at once:
    assigns ``proposals`` (+ the GT boxes when ``append_gt``) to ``targets`` and samples
    ``num_samples`` RoIs per image at ``positive_fraction``. Proposals with a ``valid`` field
    False are never sampled. The RoIs get ``proposal_boxes``, ``gt_classes``, ``from_gt`` and the
    matched ``gt_boxes``; the other ``gt_*`` fields (masks) only the foreground needs:
    :func:`foreground_rois` gathers them. Eager under ``torch.compile``: every step's shapes
    depend on the data, so Dynamo would only break its graphs and trace it again."""
    boxes, counts, from_gt, valid = _candidates(proposals, targets, append_gt)
    image = repeat_rows(torch.arange(len(counts), device=boxes.device), counts)
    matched, matcher_labels = match(matcher, boxes, counts, [x.gt_boxes.tensor for x in targets])
    gt_classes = torch.cat([x.gt_classes for x in targets])
    classes = label_proposals(matched, matcher_labels, gt_classes, num_classes)
    if valid is not None:
        classes = torch.where(valid, classes, -1)
    sampled, num_pos, num_neg = subsample_labels(
        classes, image, len(targets), num_samples, positive_fraction, num_classes
    )
    sizes = [p + n for p, n in zip(num_pos, num_neg)]
    rois = [
        Instances(x.image_size, proposal_boxes=Boxes(b), gt_classes=c, from_gt=g)
        for x, b, c, g in zip(
            proposals, boxes[sampled].split(sizes), classes[sampled].split(sizes),
            from_gt[sampled].split(sizes),
        )
    ]  # fmt: skip
    matched = matched[sampled]
    _set_matched_targets(rois, targets, matched, ["gt_boxes"])
    return RoISample(rois, num_pos, matched)


@torch.compiler.disable
def foreground_rois(sample: RoISample, targets: List[Instances]) -> List[Instances]:
    """Per image, the positive RoIs of ``sample`` (they come first) with every ``gt_*`` field
    of their matched targets, gathered for these RoIs only (a mask per sampled RoI would be
    a copy of the image's size for each of them). Eager under ``torch.compile``, as
    :func:`sample_rois`."""
    positives = [x[:n] for x, n in zip(sample.rois, sample.num_fg)]
    matched = sample.matched.split([len(x) for x in sample.rois])
    matched = torch.cat([m[:n] for m, n in zip(matched, sample.num_fg)])
    having = next((x for x in targets if len(x) > 0), None)
    if having is not None:
        names = [k for k in having.get_fields() if k.startswith("gt_")]
        names = [k for k in names if k not in ("gt_classes", "gt_boxes")]
        _set_matched_targets(positives, targets, matched, names)
    return positives


def _candidates(
    proposals: List[Instances], targets: List[Instances], append_gt: bool
) -> Tuple[torch.Tensor, List[int], torch.Tensor, Optional[torch.Tensor]]:
    """The RoI candidates of all images, image after image: each image's proposals, then its GT
    boxes when ``append_gt``. Returns their (N, 4) boxes, the number of each image's, (N,) bool
    "is a GT box", and (N,) bool "may be sampled", from the proposals' ``valid`` (None when the
    proposals have none: all may)."""
    parts, sizes, usable = [], [], []
    for x, target in zip(proposals, targets):
        gt = target.gt_boxes.tensor if append_gt else target.gt_boxes.tensor[:0]
        parts += [x.proposal_boxes.tensor, gt]
        sizes += [len(x), len(gt)]
        usable += [x.valid if x.has("valid") else None, None]
    boxes = torch.cat(parts)
    device = boxes.device
    from_gt = repeat_rows(torch.arange(len(sizes), device=device) % 2 == 1, sizes)
    counts = [p + g for p, g in zip(sizes[::2], sizes[1::2])]
    if all(v is None for v in usable):
        return boxes, counts, from_gt, None
    ones = torch.ones(max(sizes), dtype=torch.bool, device=device)
    valid = torch.cat([ones[:n] if v is None else v for v, n in zip(usable, sizes)])
    return boxes, counts, from_gt, valid


def _set_matched_targets(
    rois: List[Instances], targets: List[Instances], matched: torch.Tensor, names: List[str]
) -> None:
    """Sets the fields ``names`` of the matched targets on each image's ``rois``, from their
    (R,) indices ``matched`` into the targets of all images. An image without targets gets
    none, as in Detectron2 (its targets may lack the fields: Detectron2's mapper gives an image
    without annotations no ``gt_masks``)."""
    having = next((x for x in targets if len(x) > 0), None)
    if having is None:
        return
    sizes = [len(x) for x in rois]
    for name in names:
        empty = having.get(name)[:0]
        values = [x.get(name) if len(x) else empty for x in targets]
        values = _matched_values(values, matched, sizes)
        for x, value in zip(rois, values):
            if value is not None:  # an image with targets
                x.set(name, value)


def _matched_values(values: list, matched: torch.Tensor, sizes: List[int]) -> list:
    """Per image, its field ``values[i]`` (one entry per target) at the matched indices of its
    ``sizes[i]`` RoIs, ``matched`` (R,) indexing the targets of all images; None for an image
    without targets. Tensors and structures of one tensor (boxes, bitmaps) are gathered for all
    images at once where their shapes agree, else image by image; polygons and other fields
    image by image on the host, with one copy of the indices for all images (a polygon index
    on the device is a host sync per image)."""
    starts = [0, *accumulate(len(v) for v in values)]
    tensors = [v if isinstance(v, torch.Tensor) else getattr(v, "tensor", None) for v in values]
    if all(isinstance(t, torch.Tensor) for t in tensors):
        if len({t.shape[1:] for t in tensors}) > 1:  # e.g. bitmaps of images of other sizes
            per_image = matched.split(sizes)
            return [v[m - s] if len(v) else None for v, m, s in zip(values, per_image, starts)]
        gathered = torch.cat(tensors)[matched.clamp(min=0)].split(sizes)
        wrapped = [
            g if isinstance(v, torch.Tensor) else type(v)(g) for v, g in zip(values, gathered)
        ]
        return [g if len(v) else None for v, g in zip(values, wrapped)]
    on_host, firsts = matched.tolist(), [0, *accumulate(sizes)]
    return [
        v[[j - s for j in on_host[first : first + n]]] if len(v) else None
        for v, s, first, n in zip(values, starts, firsts, sizes)
    ]
