"""Start HTC on other classes from a COCO checkpoint: each new class's rows of the class layers
copied from a COCO class.

    python -m htc.remap_classes --to cityscapes htc_coco.pth htc_coco_for_cityscapes.pth

The class layers are every stage's classifier (K+1 rows, background last) and mask predictor
(a channel a class); the cascade's box regression is class-agnostic. For Cityscapes the rows are
those of Detectron's Mask R-CNN recipe (Cityscapes from COCO, a rider starting as a person).
Detectron2's own Cityscapes recipe starts these layers at random (its loader skips what does
not fit): set MODEL.HTC.SKIP_MISMATCHED_WEIGHTS True on the COCO checkpoint for that. Other
layers that do not fit (the semantic branch's classes) are left to that setting as well.
"""

import argparse
import pickle
import zipfile
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES, _get_builtin_metadata

from .checkpoint import read_detectron2_pickle, write_checkpoint

COCO_THINGS = [c["name"] for c in COCO_CATEGORIES if c["isthing"]]
TARGETS = ("cityscapes",)  # Detectron2's metadata names their classes
NOT_IN_COCO = {"rider": "person"}  # each other class is COCO's of the same name


def coco_sources(target: str) -> List[int]:
    """The COCO class of each class of ``target``, in its order."""
    classes = _get_builtin_metadata(target)["thing_classes"]
    return [COCO_THINGS.index(NOT_IN_COCO.get(name, name)) for name in classes]


def class_count(model: Dict[str, torch.Tensor]) -> int:
    """K, the classes of ``model``'s box classifiers (``...cls_score.weight``: K+1 rows)."""
    classifiers = [k for k in model if k.endswith("cls_score.weight")]
    if not classifiers:
        raise ValueError("no box classifier (a ...cls_score.weight) in the checkpoint")
    return model[classifiers[0]].shape[0] - 1


def remap_class_rows(
    model: Dict[str, torch.Tensor], sources: Sequence[int]
) -> Dict[str, torch.Tensor]:
    """``model`` with its class layers cut to ``len(sources)`` classes, class ``k`` taking the
    rows of class ``sources[k]``; the classifiers keep their background row (the last). The
    class count is read from the classifiers (``...cls_score.weight``: K+1 rows)."""
    num_classes = class_count(model)
    if max(sources) >= num_classes:
        raise ValueError(f"class {max(sources)} asked for, the checkpoint has {num_classes}")
    index = torch.as_tensor(list(sources))
    out = {}
    for key, value in model.items():
        rows = value.shape[0] if value.ndim else 0
        if ".cls_score." in key and rows == num_classes + 1:
            value = value[torch.cat([index, torch.tensor([num_classes])])]
        elif "mask_head" in key and ".predictor." in key and rows == num_classes:
            value = value[index]
        out[key] = value.clone()
    return out


def _load(path: str, parser: argparse.ArgumentParser) -> Any:
    """The checkpoint ``path``, a ``.pkl`` in Detectron2's pickle format (as its checkpointer
    reads it) or else ``torch.save``'s (also a zip named ``.pkl``, as this tool wrote them),
    unpickling tensors, arrays and plain containers only."""
    pkl = path.endswith(".pkl") and not zipfile.is_zipfile(path)  # torch.save's, named .pkl
    try:
        if pkl:
            return read_detectron2_pickle(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        load = "pickle.load(open(IN, 'rb'))" if pkl else "torch.load(IN, weights_only=False)"
        parser.error(
            f"{path}: refusing to unpickle objects other than tensors and plain containers "
            f"(weights_only=True): {str(e).splitlines()[0]}. Keep its weights alone, if you trust "
            f"the file: torch.save({{'model': {load}['model']}}, OUT)"
        )
    except (OSError, RuntimeError, EOFError, ImportError) as e:  # missing, or not complete
        parser.error(f"{path}: cannot be read as a checkpoint: {e}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--to", required=True, choices=TARGETS, help="the target's classes")
    parser.add_argument("input", help="an HTC checkpoint on COCO's 80 classes (.pth, .pkl)")
    parser.add_argument("output", help="the remapped checkpoint (.pth; .pkl: model zoo's)")
    args = parser.parse_args(argv)
    checkpoint = _load(args.input, parser)
    model = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(model, dict):
        parser.error(f"{args.input} holds a {type(checkpoint).__name__}, not a checkpoint's dict")
    model = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in model.items()}
    if "state_dict" in model:
        parser.error(
            f"{args.input} is an MMDetection checkpoint: convert it first "
            "(python -m htc.convert_mmdet IN OUT --config configs/htc_R_50_FPN_1x.yaml)"
        )
    try:
        classes = class_count(model)
    except ValueError as e:
        parser.error(f"{args.input}: {e}")
    if classes != len(COCO_THINGS):  # another dataset's, or remapped already
        parser.error(f"{args.input} has {classes} classes, not COCO's 80")
    sources = coco_sources(args.to)
    remapped = remap_class_rows(model, sources)
    write_checkpoint(remapped, args.output, "htc-detectron2 remap_classes")
    print(f"{args.output}: class layers of {args.to} ({len(sources)} classes) from COCO's")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
