"""What ``htc.predict`` reads: image files, folders, glob patterns and videos, decoded and resized
in data-loader workers so that decoding overlaps the model.

The loader yields lists of items, dicts of one of four kinds, each with ``file_name``:
an image (``image_id``, ``image`` (C, H', W') resized as ``DefaultPredictor`` resizes it,
``height``, ``width``, and ``original`` (H, W, 3) RGB where asked); a video frame (the same with
``frame``, whose index is its ``image_id``); a video's end (``frames``, its count); or an input
that could not be read (``skipped``, the reason).
"""

import glob
import os
from pathlib import Path
from typing import Collection, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.utils.file_io import PathManager
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def find_inputs(inputs: Iterable[str], exclude: Sequence[Path] = ()) -> List[Path]:
    """The image and video files named by ``inputs``: files, folders (recursively, by extension,
    into linked folders too) and glob patterns, as absolute paths (a file is the same input from
    any working folder), sorted and each once. A file of another extension in a folder is left
    out, and so is what a folder or pattern finds in the folders ``exclude`` (the pictures and
    videos a run writes, which the next run would read as inputs); an input that names nothing
    raises FileNotFoundError naming it."""
    wanted = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    named, found = set(), set()
    for item in inputs:
        matches = [Path(item)] if Path(item).exists() else []
        matches = matches or [Path(p) for p in sorted(glob.glob(item, recursive=True))]
        if not matches:
            raise FileNotFoundError(f"input not found: {item}")
        for path in matches:
            if path.is_dir():
                found.update(p for p in files_under(path) if p.suffix.lower() in wanted)
            elif not glob.has_magic(item):
                named.add(path)
            elif path.suffix.lower() in wanted:
                found.add(path)
    if exclude:
        excluded = {folder.resolve() for folder in exclude}
        found = {p for p in found if excluded.isdisjoint(p.resolve().parents)}
    found |= named
    if not found:
        raise FileNotFoundError(f"no images or videos in {list(inputs)}")
    return sorted({Path(os.path.abspath(p)) for p in found})


def files_under(folder: Path) -> Iterator[Path]:
    """The files in ``folder`` and its subfolders, through links to folders (which ``rglob``
    does not follow), each folder once (a link to a folder above it would loop), walked in name
    order: a folder reached by a link and by its own path is found by the same path on every
    machine and in every run."""
    seen = set()
    for root, folders, files in os.walk(folder, followlinks=True):
        folders.sort()
        real = os.path.realpath(root)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        yield from (Path(root, name) for name in files)


# 16- and 32-bit pixels (PIL's modes): Detectron2's reader clips them to 8 bits (a 16-bit photo
# turns white); refused where images are read, here and in training
WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def wide_pixels(file_name: str) -> Optional[str]:
    """The PIL mode of the image at ``file_name`` where it is one of :data:`WIDE_MODES`, else
    None; read from its header, through ``PathManager`` as Detectron2's ``read_image``."""
    with PathManager.open(file_name, "rb") as f, Image.open(f) as header:
        return header.mode if header.mode in WIDE_MODES else None


def read_image_or_reason(path: Path) -> Tuple[Optional[np.ndarray], str]:
    """The (H, W, 3) BGR image at ``path`` and "", or None and why it cannot be read."""
    try:
        if path.stat().st_size == 0:
            return None, "empty file"
        mode = wide_pixels(str(path))
        if mode:
            return None, f"{mode} pixels: the model reads 8 bits per channel"
        return read_image(str(path), format="BGR"), ""
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return None, f"{type(error).__name__}: {error}"  # what PIL raises for bad files


def video_frames(path: Path) -> Iterator[np.ndarray]:
    """The (H, W, 3) BGR frames of the video at ``path``, in order."""
    capture = cv2.VideoCapture(str(path))
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            yield frame
    finally:
        capture.release()


def frame_count(path: Path) -> int:
    """The number of frames the video at ``path`` declares (it may be off for some codecs)."""
    capture = cv2.VideoCapture(str(path))
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    capture.release()
    return max(count, 0)


def video_fps(path: Path) -> float:
    """The frame rate the video at ``path`` declares (25 where it declares none)."""
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return fps if fps > 0 else 25.0


class PredictionInputs(IterableDataset):
    """The items of ``files`` (see the module's docstring). Each data-loader worker takes every
    ``num_workers``-th file, a video whole, so that its frames come in order.

    Args:
        files: (path, image id) of each input; a video's id is unused.
        done_frames: the frames of each video that an earlier run predicted: read, not yielded.
        min_size, max_size, image_format: the config's INPUT.MIN_SIZE_TEST, MAX_SIZE_TEST, FORMAT.
        keep_original: whether images carry ``original`` (to draw them).
        sizes: the (height, width) that images of these ids must have (--image-ids' entries):
            one decoded at another size (EXIF orientation) is skipped, its results being in
            other coordinates than the dataset's.
    """

    def __init__(
        self,
        files: Sequence[Tuple[Path, int]],
        done_frames: Dict[str, Collection[int]],
        min_size: int,
        max_size: int,
        image_format: str,
        keep_original: bool = False,
        sizes: Optional[Dict[int, Tuple[int, int]]] = None,
    ):
        self.files = list(files)
        self.done_frames = done_frames
        self.resize = T.ResizeShortestEdge([min_size, min_size], max_size)
        self.image_format = image_format
        self.keep_original = keep_original
        self.sizes = sizes or {}

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        shard = self.files[worker.id :: worker.num_workers] if worker else self.files
        for path, image_id in shard:
            yield from self._video(path) if is_video(path) else [self._image(path, image_id)]

    def _image(self, path: Path, image_id: int) -> dict:
        item = {"file_name": str(path), "image_id": image_id}
        image, reason = read_image_or_reason(path)
        if image is None:
            return dict(item, skipped=reason)
        expected = self.sizes.get(image_id, image.shape[:2])
        if tuple(expected) != image.shape[:2]:
            return dict(item, skipped=_size_mismatch(image.shape[:2], expected))
        try:
            item.update(self.model_input(image))
        except ValueError as error:
            return dict(item, skipped=str(error))
        if self.keep_original:
            item["original"] = image[:, :, ::-1]
        return item

    def _video(self, path: Path) -> Iterator[dict]:
        done = self.done_frames.get(str(path), ())
        frames = 0
        for index, frame in enumerate(video_frames(path)):
            frames = index + 1
            if index not in done:
                try:
                    resized = self.model_input(frame)
                except ValueError as error:  # too thin: every frame is
                    yield {"file_name": str(path), "skipped": str(error)}
                    return
                yield {"file_name": str(path), "frame": index, "image_id": index, **resized}
        if frames == 0:
            yield {"file_name": str(path), "skipped": "no frames could be read"}
        else:
            yield {"file_name": str(path), "frames": frames}

    def model_input(self, image_bgr: np.ndarray) -> dict:
        """The model's input for an (H, W, 3) BGR image, as ``DefaultPredictor`` makes it;
        ValueError for an image so thin that the resize leaves it no pixel across."""
        image = image_bgr[:, :, ::-1] if self.image_format == "RGB" else image_bgr
        resized = checked_resize(self.resize, image).apply_image(image)
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        return {"image": tensor, "height": image.shape[0], "width": image.shape[1]}


def _size_mismatch(decoded: Tuple[int, ...], expected: Tuple[int, int]) -> str:
    """Why an image decoded at (height, width) ``decoded`` is not its dataset entry's."""
    return (
        f"decoded at {decoded[1]}x{decoded[0]} pixels, but its --image-ids entry is "
        f"{expected[1]}x{expected[0]} (EXIF orientation?): its results would be in other "
        "coordinates than the dataset's"
    )


def checked_resize(resize: T.Augmentation, image: np.ndarray) -> T.Transform:
    """``resize``'s transform of an (H, W, C) image (a NoOpTransform for MIN_SIZE_TEST 0);
    ValueError for an image so thin that it would leave the image no pixel across."""
    transform = resize.get_transform(image)
    if isinstance(transform, T.ResizeTransform) and min(transform.new_h, transform.new_w) < 1:
        raise ValueError(
            f"{image.shape[1]}x{image.shape[0]} pixels resize to {transform.new_w}x"
            f"{transform.new_h} (INPUT.MIN_SIZE_TEST, MAX_SIZE_TEST): too thin to predict"
        )
    return transform


def inputs_loader(dataset: PredictionInputs, batch_size: int, num_workers: int) -> DataLoader:
    """Batches (lists) of ``dataset``'s items, decoded in ``num_workers`` processes."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
