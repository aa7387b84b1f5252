"""Soft-NMS (Bodla et al., 2017) for the final detections, as mmcv's ``soft_nms``: instead of
removing the boxes that overlap a kept box, their scores are decayed (linear: by 1 - IoU when
IoU >= threshold; gaussian: by exp(-IoU^2 / sigma)), and boxes whose score falls under a
minimum are dropped. The order in which mmcv keeps the boxes left is followed too, so that
equal scores are picked in the same order."""

from typing import List, Optional, Tuple

import torch
from detectron2.structures import Boxes, Instances, pairwise_iou

METHODS = ("linear", "gaussian")


def _drop_as_mmcv(order: torch.Tensor, survives: torch.Tensor) -> torch.Tensor:
    """mmcv drops the box at a position by moving the last box into it: the survivors in front
    stay in place and the holes among them are filled with the survivors behind, last first."""
    count = int(survives.sum())
    holes = (~survives[:count]).nonzero().flatten()
    fillers = count + survives[count:].nonzero().flatten().flip(0)
    kept = order[:count].clone()
    kept[holes] = order[fillers]
    return kept


def soft_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    method: str,
    iou_threshold: float,
    sigma: float,
    min_score: float,
    max_picks: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Args:
        boxes: (N, 4) XYXY; scores: (N,).
        max_picks: stop after this many picks. Exact for the top ``max_picks``: each pick is
            the highest score left and scores only decay, so later picks score no higher.

    Returns:
        (P,) indices of the kept boxes in the order they were picked (scores non-increasing),
        and their (P,) decayed scores.
    """
    if method not in METHODS:
        raise ValueError(f"Soft-NMS method {method!r}: use one of {METHODS}")
    scores = scores.clone()
    order = torch.arange(len(boxes), device=boxes.device)  # mmcv's order of the boxes left
    keep, kept_scores = [], []
    while len(order) and (max_picks is None or len(keep) < max_picks):
        best = int(scores[order].argmax())  # the first of equal scores, as mmcv
        pick = order[best].clone()
        keep.append(pick)
        kept_scores.append(scores[pick])
        order[best] = order[0]  # mmcv swaps the pick with the front box
        order = order[1:]
        iou = pairwise_iou(Boxes(boxes[pick][None]), Boxes(boxes[order]))[0]
        if method == "linear":
            decay = torch.where(iou >= iou_threshold, 1 - iou, torch.ones_like(iou))
        else:
            decay = torch.exp(-(iou * iou) / sigma)
        scores[order] *= decay
        order = _drop_as_mmcv(order, scores[order] >= min_score)
    if not keep:
        return order[:0], scores[:0]  # no boxes, or max_picks 0
    return torch.stack(keep), torch.stack(kept_scores)


def soft_nms_inference(
    boxes: List[torch.Tensor],
    scores: List[torch.Tensor],
    image_sizes: List[Tuple[int, int]],
    score_thresh: float,
    iou_threshold: float,
    topk: int,
    method: str,
    sigma: float,
    min_score: float,
) -> List[Instances]:
    """Per image, like Detectron2's ``fast_rcnn_inference`` with class-wise Soft-NMS in place
    of NMS. ``boxes`` are (R, 4) class-agnostic, ``scores`` (R, K+1) with background last;
    rows with a non-finite box or score are dropped; candidates score above ``score_thresh``,
    Soft-NMS drops those decayed under ``min_score``. The loop picks one box at a time,
    ``topk`` at most: its cost is bounded by ``topk`` times the candidates (a test-time option,
    as in the paper's extensions)."""
    results = []
    for image_boxes, image_scores, size in zip(boxes, scores, image_sizes):
        # as Detectron2's hard NMS, drop rows with a non-finite box or score (an fp16 overflow)
        finite = torch.isfinite(image_boxes).all(dim=1) & torch.isfinite(image_scores).all(dim=1)
        if not finite.all():
            image_boxes, image_scores = image_boxes[finite], image_scores[finite]
        image_boxes = Boxes(image_boxes.clone())
        image_boxes.clip(size)
        fg = image_scores[:, :-1]
        rows, classes = (fg > score_thresh).nonzero(as_tuple=True)
        candidates, candidate_scores = image_boxes.tensor[rows], fg[rows, classes]
        # boxes of different classes never overlap after this shift: one Soft-NMS for all. It is
        # mmcv's batched_nms shift; from 10,000 candidates mmcv runs the classes one by one
        # unshifted, which differs from this only by the rounding of the shifted coordinates.
        shift = classes[:, None].to(candidates) * (candidates.max() + 1) if len(rows) else 0
        keep, kept_scores = soft_nms(
            candidates + shift, candidate_scores, method, iou_threshold, sigma, min_score,
            max_picks=topk if topk >= 0 else None,
        )  # fmt: skip
        result = Instances(size)
        result.pred_boxes = Boxes(candidates[keep])
        result.scores = kept_scores
        result.pred_classes = classes[keep]
        results.append(result)
    return results
