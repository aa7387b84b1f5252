"""The dataset mapper of HTC: Detectron2's :class:`DatasetMapper` (which already transforms
``sem_seg`` with the image, nearest-neighbour) plus checks of the semantic map and derived labels.
"""

from typing import List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper, MetadataCatalog
from detectron2.structures import BitMasks, PolygonMasks
from PIL import Image

_EXIF_ORIENTATION = 0x0112


class HTCDatasetMapper(DatasetMapper):
    """:class:`DatasetMapper` for HTC. The parent loads ``sem_seg`` and applies the image's
    geometric transforms to it; this mapper also checks it against the image (same size, labels
    in [0, num_classes) or the ignore value) and, for datasets registered with
    ``derive_semantic``, paints it from the instance masks."""

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        num_semantic_classes: Optional[int] = None,
        ignore_value: int = 255,
        derive_semantic: bool = False,
        **kwargs,
    ):
        """
        Args:
            num_semantic_classes: labels of the semantic maps are in [0, num_semantic_classes)
                or ``ignore_value``; None to check nothing (no semantic branch).
            ignore_value: the label the semantic loss ignores (SEM_SEG_HEAD.IGNORE_VALUE).
            derive_semantic: paint the semantic labels from the instance masks (training).
            kwargs: arguments of :class:`DatasetMapper`.
        """
        super().__init__(is_train, **kwargs)
        self.num_semantic_classes = num_semantic_classes
        self.ignore_value = ignore_value
        self.derive_semantic = derive_semantic and is_train
        if self.derive_semantic and (not self.use_instance_mask or num_semantic_classes is None):
            raise ValueError(
                "deriving semantic labels needs instance masks (MODEL.MASK_ON) and the semantic "
                "branch (MODEL.HTC.SEMANTIC_ON)"
            )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_names: Optional[List[str]] = None):
        ret = super().from_config(cfg, is_train)
        names = dataset_names or (cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST)
        derive = {bool(MetadataCatalog.get(n).get("derive_semantic", False)) for n in names}
        if len(derive) > 1:
            raise ValueError(f"datasets {names} mix derived and file semantic labels")
        ret["derive_semantic"] = derive.pop() if derive else False
        things, semantic = cfg.MODEL.ROI_HEADS.NUM_CLASSES, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        if ret["derive_semantic"] and semantic != things + 1:
            raise ValueError(
                f"derived semantic labels are the {things} thing classes + background: set "
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES to {things + 1} (it is {semantic})"
            )
        if cfg.MODEL.HTC.SEMANTIC_ON:
            ret["num_semantic_classes"] = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        ret["ignore_value"] = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        return ret

    def __call__(self, dataset_dict: dict) -> dict:
        sem_file = dataset_dict.get("sem_seg_file_name")
        files = [f for f in (dataset_dict["file_name"], sem_file) if f]
        try:
            if sem_file:
                _check_same_size(dataset_dict["file_name"], sem_file)
            out = super().__call__(dataset_dict)
        except OSError as e:  # PIL's messages do not always name the file
            raise OSError(f"cannot read {' or '.join(files)}: {e}") from e
        if "sem_seg" in out:
            self._check_labels(out["sem_seg"], sem_file)
        elif self.derive_semantic:
            out["sem_seg"] = self._derived_semantic(out)
        return out

    def _check_labels(self, sem: torch.Tensor, name: str) -> None:
        if self.num_semantic_classes is None:
            return
        bad = (sem != self.ignore_value) & ((sem < 0) | (sem >= self.num_semantic_classes))
        if bad.any():
            raise ValueError(
                f"{name}: semantic labels {sorted(sem[bad].unique().tolist())[:10]} outside "
                f"[0, {self.num_semantic_classes}) (MODEL.SEM_SEG_HEAD.NUM_CLASSES) and not "
                f"{self.ignore_value} (MODEL.SEM_SEG_HEAD.IGNORE_VALUE)"
            )

    def _derived_semantic(self, out: dict) -> torch.Tensor:
        """(H, W) labels: the class of the last instance (annotation order) covering a pixel,
        else background (= K, the last semantic class)."""
        height, width = out["image"].shape[-2:]
        sem = torch.full((height, width), self.num_semantic_classes - 1, dtype=torch.long)
        instances = out.get("instances")
        if instances is None or len(instances) == 0:
            return sem
        masks = instances.gt_masks
        if isinstance(masks, PolygonMasks):
            masks = BitMasks.from_polygon_masks(masks, height, width)
        for mask, cls in zip(masks.tensor, instances.gt_classes):
            sem[mask] = int(cls)
        return sem


def _image_size(path: str) -> Tuple[int, int]:
    """(height, width) as Detectron2's read_image returns it (EXIF orientation applied),
    read from the file header only."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
            width, height = height, width
    return height, width


def _check_same_size(image_file: str, sem_seg_file: str) -> None:
    image_size, sem_size = _image_size(image_file), _image_size(sem_seg_file)
    if image_size != sem_size:
        raise ValueError(
            f"{sem_seg_file}: semantic map of size {sem_size} (h, w) for the image {image_file} "
            f"of size {image_size}"
        )
