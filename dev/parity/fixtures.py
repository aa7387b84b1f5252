"""Reading the parity fixtures of make_fixture.py (used by report.py and tests/test_parity.py)."""

from pathlib import Path

import torch
from detectron2.structures import Boxes, Instances, pairwise_iou


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_reference(path: Path) -> dict:
    """The reference's record in ``path``. A family's fixture made ``--weights`` a base fixture
    holds what differs from it (weights as float16, exactly the reference's), the names of the
    base's entries it does not have, and ``weights_of``: merged onto the base here."""
    path = Path(path)
    ref = _load(path)
    if "weights_of" not in ref:
        return ref
    base = _load(path.parent / ref["weights_of"])
    state = {k: v for k, v in base["state_dict"].items() if k not in ref["absent_weights"]}
    state.update({k: v.float() if v.is_floating_point() else v
                  for k, v in ref["state_dict"].items()})  # fmt: skip
    merged = {k: v for k, v in base.items() if k not in ref["absent"]}
    merged.update({k: v for k, v in ref.items() if k not in ("absent", "absent_weights")})
    merged["state_dict"] = state
    return merged


def twins(detections: Instances, ref: dict) -> torch.Tensor:
    """(D,) the index in ``detections`` of each of the reference's D detections' twin: the same
    class, the closest box. Scores equal up to rounding may be ordered otherwise, so the two
    lists are paired, not compared in order."""
    iou = pairwise_iou(Boxes(ref["det_boxes"]), detections.pred_boxes)
    iou[ref["det_labels"][:, None] != detections.pred_classes[None]] = -1
    return iou.argmax(dim=1)
