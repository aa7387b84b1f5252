"""The dataset mapper of HTC: Detectron2's :class:`DatasetMapper` (which already transforms
``sem_seg`` with the image, nearest-neighbour) plus checks of the semantic map and derived labels.
"""

import copy
from typing import List, Optional, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, PolygonMasks
from PIL import Image

from .checks import check_derived_classes
from .inputs import wide_pixels
from .label_map import check_same_size, read_label_map

_EXIF_ORIENTATION = 0x0112


def _check_label_padding(augmentations: List[T.Augmentation], ignore_value: int) -> None:
    """Refuse a FixedSizeCrop that pads the semantic labels with another value than the ignored
    one: the padding would be learned as a class, or refused as a label of the map (Detectron2
    v0.6's pads them with 0; later ones with ``seg_pad_value``, 255 by default)."""
    for aug in augmentations:
        _check_label_padding(_wrapped(aug), ignore_value)
        value = getattr(aug, "seg_pad_value", 0)
        if isinstance(aug, T.FixedSizeCrop) and aug.pad and value != ignore_value:
            fix = (
                f"give it seg_pad_value={ignore_value}"
                if hasattr(aug, "seg_pad_value")
                else "Detectron2 v0.6's takes no seg_pad_value: give it pad=False"
            )
            raise ValueError(
                f"FixedSizeCrop(pad=True) pads the semantic labels with {value}, not with the "
                f"ignored label {ignore_value} (MODEL.SEM_SEG_HEAD.IGNORE_VALUE, the mapper's "
                f"ignore_value): {fix}"
            )


def _wrapped(aug: T.Augmentation) -> List[T.Augmentation]:
    """The augmentations that ``aug`` applies: an AugmentationList's, a RandomApply's."""
    inner = getattr(aug, "aug", None)
    return [*getattr(aug, "augs", []), *([inner] if inner is not None else [])]


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
        if is_train and num_semantic_classes is not None and not self.derive_semantic:
            _check_label_padding(self.augmentations.augs, ignore_value)  # maps read and padded

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_names: Optional[List[str]] = None):
        ret = super().from_config(cfg, is_train)
        names = dataset_names or (cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST)
        derive = {bool(MetadataCatalog.get(n).get("derive_semantic", False)) for n in names}
        if len(derive) > 1:
            raise ValueError(f"datasets {names} mix derived and file semantic labels")
        ret["derive_semantic"] = derive.pop() if derive else False
        if ret["derive_semantic"]:
            things, semantic = cfg.MODEL.ROI_HEADS.NUM_CLASSES, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
            check_derived_classes(things, semantic, "MODEL.SEM_SEG_HEAD.NUM_CLASSES")
        if cfg.MODEL.HTC.SEMANTIC_ON:
            ret["num_semantic_classes"] = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        ret["ignore_value"] = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        return ret

    def __call__(self, dataset_dict: dict) -> dict:
        """The parent's steps, with the label map read by :func:`read_label_map` (the parent
        reads it as luminance, turning palette indices into grey levels) and every failure of
        the files named."""
        dataset_dict = copy.deepcopy(dataset_dict)
        image, sem_seg = self._read(dataset_dict)
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        image, sem_seg = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg.astype(np.int64))
            self._check_labels(dataset_dict["sem_seg"], dataset_dict["sem_seg_file_name"])
        if self.proposal_topk is not None:
            utils.transform_proposals(
                dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk
            )
        dataset_dict.pop("sem_seg_file_name", None)
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        crowds = None
        if "annotations" in dataset_dict:
            try:
                if self.derive_semantic and "sem_seg" not in dataset_dict:
                    crowds = self._crowd_masks(dataset_dict, transforms, image_shape)
                self._transform_annotations(dataset_dict, transforms, image_shape)
            except (AssertionError, ValueError, IndexError) as e:
                raise ValueError(
                    f"{dataset_dict['file_name']}: its annotations cannot be transformed: {e!r}"
                ) from e
        if "sem_seg" not in dataset_dict and self.derive_semantic:
            dataset_dict["sem_seg"] = self._derived_semantic(dataset_dict, crowds)
        return dataset_dict

    def _read(self, dataset_dict: dict) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """The image (H, W, C) in the model's format and its label map (H, W) or None."""
        file_name, sem_file = dataset_dict["file_name"], dataset_dict.get("sem_seg_file_name")
        try:
            mode = wide_pixels(file_name)
            if mode:
                raise ValueError(
                    f"{file_name}: {mode} pixels, which Detectron2's reader clips to 8 bits: "
                    "convert the images to 8 bits per channel"
                )
            image = utils.read_image(file_name, format=self.image_format)
        except OSError as e:  # PIL's messages do not always name the file
            raise OSError(f"cannot read {file_name}: {e}") from e
        try:
            utils.check_image_size(dataset_dict, image)
        except utils.SizeMismatchError as e:
            raise utils.SizeMismatchError(f"{e}{_swap_hint(dataset_dict, image)}") from e
        if not sem_file:
            return image, None
        sem_seg = read_label_map(sem_file, dtype=None)
        check_same_size(sem_file, sem_seg.shape, file_name, image.shape[:2])
        if sem_seg.dtype != np.uint8:  # Detectron2's transforms resize uint8 maps with PIL
            sem_seg = sem_seg.astype(np.float32)  # exact for labels below 2**24
        return image, sem_seg

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

    @staticmethod
    def _crowd_masks(dataset_dict: dict, transforms, image_shape) -> Optional[torch.Tensor]:
        """(N, H, W) bool masks of the crowd annotations, transformed as the image; None if
        none. The parent drops crowds from the targets; a derived map still needs them."""
        keys = ("bbox", "bbox_mode", "category_id", "segmentation")  # no keypoints to flip
        crowds = [
            {k: obj[k] for k in keys}
            for obj in dataset_dict["annotations"]
            if obj.get("iscrowd", 0) and obj.get("segmentation")
        ]
        if not crowds:
            return None
        crowds = [utils.transform_instance_annotations(c, transforms, image_shape) for c in crowds]
        return utils.annotations_to_instances(crowds, image_shape, "bitmask").gt_masks.tensor

    def _derived_semantic(self, out: dict, crowds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(H, W) labels: the class of the last instance (annotation order) covering a pixel,
        else the ignore value in a crowd region (``crowds``, (N, H, W) bool: its class is known,
        which of its pixels show it is not), else background (= K, the last semantic class)."""
        height, width = out["image"].shape[-2:]
        sem = torch.full((height, width), self.num_semantic_classes - 1, dtype=torch.long)
        if crowds is not None:
            sem[crowds.any(dim=0)] = self.ignore_value
        instances = out.get("instances")
        if instances is None or len(instances) == 0:
            return sem
        masks = instances.gt_masks
        if isinstance(masks, PolygonMasks):
            masks = BitMasks.from_polygon_masks(masks, height, width)
        for mask, cls in zip(masks.tensor, instances.gt_classes):
            sem[mask] = int(cls)
        return sem


def _swap_hint(dataset_dict: dict, image: np.ndarray) -> str:
    """The likely cause when the image is the json's size with width and height swapped."""
    if tuple(image.shape[:2]) != (dataset_dict.get("width"), dataset_dict.get("height")):
        return ""
    with Image.open(dataset_dict["file_name"]) as pil:
        orientation = pil.getexif().get(_EXIF_ORIENTATION)
    if orientation in (5, 6, 7, 8):
        return (
            f". Width and height are swapped: the file's EXIF orientation ({orientation}) "
            "rotates it when read; the json gives its size before that rotation"
        )
    return ". Width and height are swapped in the json"
