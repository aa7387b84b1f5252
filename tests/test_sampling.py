"""htc.sampling: the RoI sample of Detectron2's subsample_labels (sizes, positives first, never
an ignored RoI, uniform draws) and its labels, with one host sync for all images."""

import torch

from htc.sampling import label_proposals, subsample_labels

BG = 5


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
    cases = [(100, 900, 10), (10, 900, 0), (300, 20, 5), (0, 0, 7), (0, 50, 0)]
    images = [_labels(*case, seed=i) for i, case in enumerate(cases)]
    samples = subsample_labels(images, 512, 0.25, BG)
    for labels, (pos, neg, _), (idxs, num_pos, num_neg) in zip(images, cases, samples):
        assert num_pos == min(pos, 128)
        assert num_neg == min(neg, 512 - num_pos)
        assert len(idxs) == len(set(idxs.tolist())) == num_pos + num_neg
        sampled = labels[idxs]
        assert ((sampled[:num_pos] >= 0) & (sampled[:num_pos] < BG)).all()
        assert (sampled[num_pos:] == BG).all()
    assert subsample_labels([], 512, 0.25, BG) == []


def test_draws_are_uniform():
    labels = _labels(40, 40, 20)
    counts = torch.zeros(len(labels))
    torch.manual_seed(0)
    for _ in range(400):
        ((idxs, _, _),) = subsample_labels([labels], 20, 0.5, BG)
        counts[idxs] += 1
    # each positive and each negative is drawn 10 of 40 times: 100 times in 400 draws
    for kept in (labels != -1) & (labels != BG), labels == BG:
        assert 70 < counts[kept].min() and counts[kept].max() < 130
    assert counts[labels == -1].sum() == 0


def test_labels_follow_the_matcher():
    gt_classes = torch.tensor([3, 1])
    matched_idxs = torch.tensor([0, 1, 1, 0])
    matched_labels = torch.tensor([1, 0, -1, 1])
    labels = label_proposals(matched_idxs, matched_labels, gt_classes, BG)
    assert labels.tolist() == [3, BG, -1, 3]
    no_gt = label_proposals(matched_idxs, torch.zeros(4, dtype=torch.long), gt_classes[:0], BG)
    assert no_gt.tolist() == [BG] * 4
