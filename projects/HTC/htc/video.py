"""Annotated videos drawn from ``htc.predict``'s COCO results, so that a resumed run draws a
video whole without keeping its frames' predictions in memory."""

import itertools
import os
from pathlib import Path
from typing import Dict, List, Optional

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode

from .data.inputs import video_fps, video_frames


def results_to_instances(
    results: List[dict], image_size: tuple, contiguous_ids: Optional[Dict[int, int]]
) -> Instances:
    """The ``pred_boxes`` (XYXY), ``scores``, ``pred_classes`` and (N, H, W) ``pred_masks`` of
    one image's COCO results, whose category ids ``contiguous_ids`` maps to the model's (None:
    they are the model's)."""
    instances = Instances(image_size)
    boxes = [BoxMode.convert(r["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for r in results]
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.scores = torch.tensor([r["score"] for r in results], dtype=torch.float32)
    classes = [r["category_id"] for r in results]
    if contiguous_ids is not None:
        classes = [contiguous_ids[c] for c in classes]
    instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
    if results and "segmentation" in results[0]:
        masks = mask_util.decode([r["segmentation"] for r in results])  # (H, W, N)
        instances.pred_masks = torch.from_numpy(masks.transpose(2, 0, 1).astype(bool))
    return instances


def write_drawn_video(
    video: Path,
    frame_results: Dict[int, List[dict]],
    target: Path,
    metadata,
    threshold: float,
    contiguous_ids: Optional[Dict[int, int]],
) -> None:
    """``target`` (.mp4): each frame of ``video`` with its results scored above ``threshold``,
    drawn by Detectron2's ``VideoVisualizer``, which keeps an object's colour from frame to frame
    (a ``Visualizer`` per frame draws each in a colour of its own) and draws masked objects
    without their boxes. Written under a temporary name and renamed, so that ``target`` exists
    only whole."""
    partial = target.with_suffix(".partial.mp4")
    frames = video_frames(video)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"{video}: no frames could be read to draw")
    size = (first.shape[1], first.shape[0])
    writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*"mp4v"), video_fps(video), size)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {partial} (codec mp4v)")
    drawer = VideoVisualizer(metadata, instance_mode=ColorMode.IMAGE)
    try:
        for index, frame in enumerate(itertools.chain([first], frames)):
            confident = [r for r in frame_results.get(index, []) if r["score"] > threshold]
            instances = results_to_instances(confident, frame.shape[:2], contiguous_ids)
            picture = drawer.draw_instance_predictions(frame[:, :, ::-1], instances).get_image()
            writer.write(np.ascontiguousarray(picture[:, :, ::-1]))
    finally:
        writer.release()
    os.replace(partial, target)
