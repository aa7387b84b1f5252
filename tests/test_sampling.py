"""htc.sampling: Detectron2's matching and RoI sample for all images at once (the same IoUs and
labels to the bit; sizes, positives first, never an ignored RoI, uniform draws), with one host
sync for all images, and HTC's ROI heads sampling with it."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import ROIHeads
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks, pairwise_iou
from detectron2.utils.events import EventStorage

from conftest import tiny_cfg
from htc import sampling
from htc.sampling import foreground_rois, label_proposals, match, subsample_labels

BG = 5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the GPU machine's run checks CUDA


def _boxes(n: int, g: torch.Generator, size: float = 100.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2
    return torch.cat([xy, xy + wh], dim=1)


def _images(gt_counts, num_candidates=(60, 30, 45, 60, 20), seed=0):
    """Per image: (candidates, GT boxes); some candidates are GT boxes, some GT boxes repeat
    (equal IoUs: the first GT box must win), some candidates are empty boxes."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for count, n in zip(gt_counts, num_candidates):
        gt = _boxes(count, g)
        if count >= 2:
            gt[1] = gt[0]
        candidates = _boxes(n, g)
        candidates[: min(count, 5)] = gt[:5]
        candidates[-1] = torch.tensor([10.0, 10.0, 10.0, 30.0])  # empty: IoU 0
        images.append((candidates.to(DEVICE), gt.to(DEVICE)))
    return images


@pytest.mark.parametrize("group_entries", [1, 1 << 16])  # images alone or in groups; all at once
@pytest.mark.parametrize(
    "thresholds, labels", [([0.5], [0, 1]), ([0.3, 0.7], [0, -1, 1]), ([0.4], [-1, 1])]
)
def test_match_is_detectron2s_matcher_on_each_image(thresholds, labels, group_entries, monkeypatch):
    monkeypatch.setattr(sampling, "GROUP_ENTRIES", group_entries)
    images = _images([3, 0, 7, 1, 12])
    matcher = Matcher(thresholds, labels, allow_low_quality_matches=False)
    boxes = torch.cat([c for c, _ in images])
    index, got = match(matcher, boxes, [len(c) for c, _ in images], [gt for _, gt in images])
    start, offsets = 0, [0]
    for _, gt in images:
        offsets.append(offsets[-1] + len(gt))
    for i, (candidates, gt) in enumerate(images):
        rows = slice(start, start + len(candidates))
        want_index, want = matcher(pairwise_iou(Boxes(gt), Boxes(candidates)))
        assert torch.equal(got[rows], want)
        if len(gt):
            assert torch.equal(index[rows], want_index + offsets[i])
        else:
            assert (index[rows] == -1).all()
        start += len(candidates)
    assert set(got.tolist()) == set(labels)  # every interval occurs


@pytest.mark.parametrize(
    "thresholds, labels",
    [([0.5], [0, 1]), ([0.4], [-1, 1]), ([0.3, 0.7], [0, -1, 1]), ([0.3, 0.6], [-1, 0, 1]),
     ([0.2, 0.5], [1, -1, 0]), ([0.5], [1, 0])],
)  # fmt: skip
def test_labels_are_detectron2s_for_any_matcher(thresholds, labels):
    """Per image, the labelled candidates are those Detectron2's ``_sample_proposals`` keeps
    when it keeps all (an image without GT boxes: all background, whatever the lowest label)."""
    images = _images([3, 0, 7, 0, 12])
    matcher = Matcher(thresholds, labels, allow_low_quality_matches=False)
    detectron2 = ROIHeads(
        num_classes=BG, batch_size_per_image=10**6, positive_fraction=1.0,
        proposal_matcher=matcher,
    )  # fmt: skip
    gt_classes = [torch.arange(len(gt), device=DEVICE) % BG for _, gt in images]
    boxes = torch.cat([c for c, _ in images])
    index, matcher_labels = match(
        matcher, boxes, [len(c) for c, _ in images], [g for _, g in images]
    )
    ours = label_proposals(index, matcher_labels, torch.cat(gt_classes), BG)
    for (candidates, gt), classes, got in zip(
        images, gt_classes, ours.split([len(c) for c, _ in images])
    ):
        kept, want = detectron2._sample_proposals(
            *matcher(pairwise_iou(Boxes(gt), Boxes(candidates))), classes
        )
        assert sorted(zip(kept.tolist(), want.tolist())) == [
            (i, c) for i, c in enumerate(got.tolist()) if c >= 0
        ]


def test_groups_hold_at_most_the_budget():
    counts, gt_counts = [2000, 2000, 10, 10, 10, 500, 0, 0], [700, 3, 5, 1, 0, 200, 0, 0]
    groups = sampling._groups(counts, gt_counts, budget=2000 * 700)
    assert groups == [(0, 1), (1, 5), (5, 8)]
    for first, end in groups:
        padded = (end - first) * max(counts[first:end]) * max(gt_counts[first:end])
        assert padded <= 2000 * 700


def test_match_without_any_gt_labels_everything_with_the_first_label():
    matcher = Matcher([0.5], [0, 1], allow_low_quality_matches=False)
    boxes = _boxes(10, torch.Generator().manual_seed(0))
    index, labels = match(matcher, boxes, [10], [boxes[:0]])
    assert (index == -1).all() and (labels == 0).all()


def test_match_refuses_low_quality_matches():
    matcher = Matcher([0.5], [0, 1], allow_low_quality_matches=True)
    boxes = _boxes(4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="low-quality"):
        match(matcher, boxes, [4], [boxes[:2]])


def test_roi_heads_refuse_low_quality_matchers_when_built():
    cfg = tiny_cfg()
    model = build_model(cfg)
    args = type(model.roi_heads).from_config(cfg, model.backbone.output_shape())
    args["proposal_matchers"] = [Matcher([0.5], [0, 1], allow_low_quality_matches=True)] * 3
    with pytest.raises(ValueError, match="allow_low_quality_matches=False"):
        type(model.roi_heads)(**args)


def _labels(num_pos, num_neg, num_ignored, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat(
        [
            torch.randint(0, BG, (num_pos,), generator=g),
            torch.full((num_neg,), BG),
            torch.full((num_ignored,), -1),
        ]
    )
    return labels[torch.randperm(len(labels), generator=g)]


def test_sizes_order_and_no_ignored_rois():
    cases = [(100, 900, 10), (10, 900, 0), (300, 20, 5), (0, 0, 7), (0, 50, 0), (0, 0, 0)]
    per_image = [_labels(*case, seed=i) for i, case in enumerate(cases)]
    labels = torch.cat(per_image)
    image = torch.cat([torch.full((len(x),), i) for i, x in enumerate(per_image)])
    shuffle = torch.randperm(len(labels), generator=torch.Generator().manual_seed(9))
    labels, image = labels[shuffle].to(DEVICE), image[shuffle].to(DEVICE)  # in any order
    idxs, num_pos, num_neg = subsample_labels(labels, image, len(cases), 512, 0.25, BG)
    sizes = [p + n for p, n in zip(num_pos, num_neg)]
    assert len(idxs) == len(set(idxs.tolist())) == sum(sizes)
    for i, ((pos, neg, _), image_idxs) in enumerate(zip(cases, idxs.split(sizes))):
        assert num_pos[i] == min(pos, 128)
        assert num_neg[i] == min(neg, 512 - num_pos[i])
        assert (image[image_idxs] == i).all()
        sampled = labels[image_idxs]
        assert ((sampled[: num_pos[i]] >= 0) & (sampled[: num_pos[i]] < BG)).all()
        assert (sampled[num_pos[i] :] == BG).all()
    no_images = subsample_labels(labels[:0], image[:0], 0, 512, 0.25, BG)
    assert len(no_images[0]) == 0 and no_images[1:] == ([], [])


def test_draws_are_uniform():
    first, second = _labels(40, 40, 20), _labels(30, 10, 0, seed=1)
    labels = torch.cat([first, second])
    image = torch.cat([torch.zeros(len(first)), torch.ones(len(second))]).long()
    counts = torch.zeros(len(labels))
    torch.manual_seed(0)
    for _ in range(400):
        idxs, _, _ = subsample_labels(labels.to(DEVICE), image.to(DEVICE), 2, 20, 0.5, BG)
        counts[idxs.cpu()] += 1
    # image 0: each of its 40 positives and 40 negatives is drawn 10 of 40 times, 100 in 400;
    # image 1: 10 of its 30 positives (133 in 400) and all of its 10 negatives
    kept_first = torch.zeros(len(labels), dtype=torch.bool)
    kept_first[: len(first)] = True
    for kept in (labels != -1) & (labels != BG), labels == BG:
        assert 70 < counts[kept & kept_first].min() and counts[kept & kept_first].max() < 130
    positive_second = ~kept_first & (labels != BG)
    assert 95 < counts[positive_second].min() and counts[positive_second].max() < 175
    assert (counts[~kept_first & (labels == BG)] == 400).all()
    assert counts[labels == -1].sum() == 0


def test_labels_follow_the_matcher():
    gt_classes = torch.tensor([3, 1])
    matched_idxs = torch.tensor([0, 1, 1, 0, -1])
    matched_labels = torch.tensor([1, 0, -1, 1, 0])
    labels = label_proposals(matched_idxs, matched_labels, gt_classes, BG)
    assert labels.tolist() == [3, BG, -1, 3, BG]
    no_gt = label_proposals(matched_idxs, torch.zeros(5, dtype=torch.long), gt_classes[:0], BG)
    assert no_gt.tolist() == [BG] * 5


def _square(box):
    x1, y1, x2, y2 = box.tolist()
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def _masks(kind: str, gt: torch.Tensor, size: int):
    if kind == "polygons":
        return PolygonMasks([_square(box) for box in gt])
    return BitMasks(torch.rand(len(gt), size, size) > 0.5)


@pytest.mark.parametrize("masks", ["polygons", "bitmaps", "bitmaps of one size"])
def test_roi_heads_sample_each_image_against_its_own_targets(masks):
    """HTC's ``_label_and_sample`` on two images with targets and one without (nor masks),
    some proposals not valid (refined GT boxes or empty): every sampled RoI carries its own
    image's matched GT box and class, as Detectron2's matcher finds them, and every foreground
    RoI its mask."""
    heads = build_model(tiny_cfg()).roi_heads
    heads.batch_size_per_image = 64
    g = torch.Generator().manual_seed(0)
    proposals, targets = [], []
    sizes = (120, 120, 120) if masks == "bitmaps of one size" else (120, 100, 110)
    for count, size in zip((4, 0, 9), sizes):
        gt = _boxes(count, g)
        classes = torch.randint(0, 3, (count,), generator=g)
        target = Instances((size, size), gt_boxes=Boxes(gt), gt_classes=classes)
        if count:  # Detectron2's mapper gives an image without annotations no gt_masks
            target.gt_masks = _masks(masks, gt, size)
        candidates = torch.cat([_boxes(50, g), gt + 1])  # some near the GT boxes
        valid = torch.rand(len(candidates), generator=g) > 0.3
        props = Instances((size, size), proposal_boxes=Boxes(candidates), valid=valid)
        proposals.append(props.to(DEVICE))
        targets.append(target.to(DEVICE))
    stage = 1
    with EventStorage():
        sample = heads._label_and_sample(proposals, targets, stage)
    foreground = foreground_rois(sample, targets)
    rois, num_fg = sample.rois, sample.num_fg
    matcher = heads.proposal_matchers[stage]
    for x, target, props, fg, positives in zip(rois, targets, proposals, num_fg, foreground):
        candidates = Boxes.cat([props.proposal_boxes[props.valid], target.gt_boxes])
        boxes = x.proposal_boxes.tensor
        # every RoI is a valid candidate or a GT box of this image
        is_gt = (boxes[:, None] == target.gt_boxes.tensor[None]).all(-1).any(-1)
        assert torch.equal(x.from_gt, is_gt)
        in_candidates = (boxes[:, None] == candidates.tensor[None]).all(-1).any(-1)
        assert in_candidates.all()
        assert (x.gt_classes[:fg] != heads.num_classes).all()
        assert (x.gt_classes[fg:] == heads.num_classes).all()
        assert not x.has("gt_masks")  # only the foreground needs them
        assert len(positives) == fg and torch.equal(positives.proposal_boxes.tensor, boxes[:fg])
        if len(target) == 0:
            assert not x.has("gt_boxes") and not positives.has("gt_masks")
            continue
        want_index, want_label = matcher(pairwise_iou(target.gt_boxes, x.proposal_boxes))
        want_classes = torch.where(
            want_label == 1, target.gt_classes[want_index], heads.num_classes
        )
        assert torch.equal(x.gt_classes, want_classes)
        assert torch.equal(x.gt_boxes.tensor, target.gt_boxes.tensor[want_index])
        want_index = want_index[:fg]
        assert len(positives.gt_masks) == fg
        if masks == "polygons":
            want_masks = [target.gt_masks.polygons[i] for i in want_index.tolist()]
            got_masks = positives.gt_masks.polygons
            assert all((a[0] == b[0]).all() for a, b in zip(got_masks, want_masks))
        else:
            assert torch.equal(positives.gt_masks.tensor, target.gt_masks.tensor[want_index])
    assert num_fg[0] > 0 and num_fg[2] > 0 and num_fg[1] == 0
