"""Semantic label maps: what a label file is, decided by its PIL mode, and the ONE reader that
training (the dataset mapper) and evaluation (the semantic evaluator) share.

A label map is a single-channel image of integer labels: its stored values are the labels.
* "L" (8 bit), "I;16" (16 bit, any byte order), "I" (32 bit) and "1" (0/1): the stored values;
* "P" (palette, the format of VOC- and ADE-style labels): the palette indices, not the colours
  (Detectron2's ``read_image(path, "L")`` turns them into luminance);
* anything else (RGB, RGBA, LA, PA, float "F", CMYK, ...) cannot be read unambiguously as labels
  and is refused when the dataset is loaded, naming the file and its mode.
"""

from typing import Tuple

import numpy as np
from PIL import Image

LABEL_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N", "1")


def label_map_header(path: str) -> Tuple[str, Tuple[int, int]]:
    """The PIL mode and (height, width) of a label map, from its header alone."""
    try:
        with Image.open(path) as image:
            return image.mode, (image.height, image.width)
    except OSError as e:  # PIL's messages do not always name the file
        raise OSError(f"cannot read the label map {path}: {e}") from e


def check_label_map(path: str, height: int, width: int, image_file: str) -> None:
    """Refuse a label map of a mode that holds no labels, or of another size than its image."""
    mode, size = label_map_header(path)
    _check_mode(path, mode)
    check_same_size(path, size, image_file, (height, width))


def _check_mode(path: str, mode: str) -> None:
    if mode not in LABEL_MODES:
        raise ValueError(
            f"{path}: a label map of PIL mode {mode!r} has no unambiguous labels; give "
            f"single-channel integer labels (modes {', '.join(LABEL_MODES)}: stored values; "
            "palette images: their indices)"
        )


def check_same_size(
    path: str, size: Tuple[int, int], image_file: str, image_size: Tuple[int, int]
) -> None:
    """Refuse a label map whose (height, width) ``size`` is not its image's."""
    if tuple(size) != tuple(image_size):
        raise ValueError(
            f"{path}: semantic map of size {tuple(size)} (h, w) for the image {image_file} of "
            f"size {tuple(image_size)}"
        )


def read_label_map(path: str, dtype=np.int64) -> np.ndarray:
    """(H, W) labels of ``path``: the stored values (palette indices for "P"), as ``dtype``
    (None: uint8 for 8-bit and bilevel maps, int32 for 16- and 32-bit ones)."""
    try:
        with Image.open(path) as image:
            _check_mode(path, image.mode)
            labels = np.asarray(image)
    except OSError as e:
        raise OSError(f"cannot read the label map {path}: {e}") from e
    if dtype is None:
        dtype = np.uint8 if labels.dtype in (np.uint8, np.bool_) else np.int32
    return labels.astype(dtype)
