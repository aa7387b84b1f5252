"""Export HTC to TorchScript or ONNX, traced through Detectron2's ``TracingAdapter``; run the
exported model (TorchScript, or ONNX in onnxruntime) and turn its outputs into Detectron2's.

    python -m htc.export --config-file CFG --format {torchscript,onnx} --output DIR
        [--sample-image IMAGE] [--opset 17] [--opts KEY VALUE ...]

writes ``DIR/model.ts`` or ``DIR/model.onnx``, then runs it on the sample image and prints its
detections next to eager PyTorch's.

The exported model (batch size 1) takes ``image``: (3, H, W) float32 pixels in
``cfg.INPUT.FORMAT`` (RGB for the shipped configs), already resized as ``DefaultPredictor``
resizes them (ResizeShortestEdge to INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST); H and W are free.
Its outputs, in this order (:data:`OUTPUT_NAMES`):

* ``boxes`` (N, 4) in the pixels of the given image, ``scores`` (N,), ``classes`` (N,) int64;
* ``mask_probs`` (N, 1, M, M): the stage-merged mask probabilities on the boxes (M = 28);
* ``sem_logits`` (1, K, Hp/s, Wp/s): the semantic logits of the padded image at stride s
  (MODEL.SEM_SEG_HEAD.COMMON_STRIDE, 8 in the shipped configs), only for models with the
  semantic branch.

:func:`postprocess` turns them (from PyTorch or onnxruntime alike) into ``{"instances",
"sem_seg"}`` at the output size, as the model's own inference does: masks pasted at 0.5, boxes
rescaled, semantic logits upsampled, cropped and resized.

Refused, with the reason: Soft-NMS (a data-dependent loop the tracer would freeze: export with
``MODEL.HTC.TEST_NMS nms``), deformable convs (no ONNX DeformConv before opset 19, and none in
torchvision's exporter), a ViT or MViTv2 backbone without a square pad (their attention's sizes
follow the input's: the traced graph would hold the sample's), ONNX opsets below 16
(torchvision's RoiAlign export drops ``aligned=True`` there, misaligning every RoI).
"""

import argparse
import functools
import sys
import types
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import detectron2
import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.layers import DeformConv, ModulatedDeformConv
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess, sem_seg_postprocess
from detectron2.structures import Boxes, Instances
from torch import nn
from torch.nn import functional as F

from .backbones import square_size
from .checkpoint import load_weights
from .data.inputs import checked_resize, read_image_or_reason
from .demo import check_serving_cfg, load_predictor_cfg


@functools.cache
def _tracing_tools() -> tuple:
    """Detectron2's ``TracingAdapter`` and ``patch_builtin_len``, imported at the first export,
    not with this module. The ``detectron2.export`` package of Detectron2 v0.6 imports caffe2
    (gone from PyTorch 2) in its ``__init__``; there the package is entered without that
    ``__init__``: these two modules need nothing of it."""
    try:
        from detectron2.export.flatten import TracingAdapter
        from detectron2.export.torchscript_patch import patch_builtin_len
    except ModuleNotFoundError as error:
        if error.name != "caffe2":
            raise
        package = types.ModuleType("detectron2.export")
        package.__path__ = [str(Path(detectron2.__file__).parent / "export")]
        sys.modules["detectron2.export"] = package
        from detectron2.export.flatten import TracingAdapter
        from detectron2.export.torchscript_patch import patch_builtin_len
    return TracingAdapter, patch_builtin_len


FORMATS = ("torchscript", "onnx")
OUTPUT_NAMES = ("boxes", "scores", "classes", "mask_probs", "sem_logits")
MIN_ONNX_OPSET = 16
DEFORMABLE_CONVS = (DeformConv, ModulatedDeformConv)  # htc.layers' subclass them
try:  # backbones whose attention sizes follow the input's: tracing freezes them
    from detectron2.modeling.backbone import MViT, ViT

    SIZE_BOUND_BACKBONES = {ViT: "MODEL.VIT.SQUARE_PAD", MViT: "MODEL.MVIT.SQUARE_PAD"}
except ImportError:  # Detectron2 v0.6 has neither
    SIZE_BOUND_BACKBONES = {}
# modules whose len() of tensors must stay symbolic under tracing (Detectron2 patches its own)
TRACED_LEN_MODULES = ("htc.roi_heads",)


def check_exportable(model: nn.Module, fmt: str, opset: int = 17) -> None:
    """Raise ValueError naming what ``model`` (or the format and opset) cannot be exported as:
    :func:`export` calls it, so that a model built in Python is refused as the command's is
    (a Soft-NMS model traced without a word, and its file gave other images' detections)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: use one of {FORMATS}")
    roi_heads = model.roi_heads
    if not roi_heads.mask_on:
        raise ValueError("MODEL.MASK_ON False: the exported model's outputs include the masks")
    if roi_heads.test_nms != "nms":
        raise ValueError(
            f"MODEL.HTC.TEST_NMS={roi_heads.test_nms!r} (roi_heads.test_nms): Soft-NMS is a "
            "data-dependent loop that tracing would freeze; export with --opts "
            "MODEL.HTC.TEST_NMS nms"
        )
    deformable = [n for n, m in model.named_modules() if isinstance(m, DEFORMABLE_CONVS)]
    if deformable:
        raise ValueError(
            f"MODEL.RESNETS.DEFORM_ON_PER_STAGE: deformable convs ({deformable[0]}) cannot be "
            "exported (ONNX has DeformConv only from opset 19, and torchvision's deform_conv2d "
            "has no exporter)"
        )
    _check_input_size_free(model.backbone)
    if fmt == "onnx" and opset < MIN_ONNX_OPSET:
        raise ValueError(
            f"--opset {opset}: use {MIN_ONNX_OPSET} or newer; below it torchvision exports "
            "RoiAlign without aligned=True, which silently misaligns every RoI"
        )


def _check_input_size_free(backbone: nn.Module) -> None:
    """Refuse a ViT or MViT backbone that pads its inputs to no fixed square: their attention's
    relative positions and pooled sizes follow the input's, and a traced graph keeps the sample
    image's (another size gave other detections, or failed in onnxruntime)."""
    if square_size(backbone) > 0:
        return
    for module in backbone.modules():
        key = next((k for c, k in SIZE_BOUND_BACKBONES.items() if isinstance(module, c)), None)
        if key is not None:
            raise ValueError(
                f"{type(module).__name__} backbone without a square pad: its traced graph would "
                "hold the sample image's size and give wrong results at others; set "
                f"{key} to the largest input side (1024 in ViTDet's recipes), so that every "
                "input is padded to that square"
            )


def raw_inference(model, inputs: List[Dict[str, torch.Tensor]]) -> Tuple[torch.Tensor, ...]:
    """The outputs of :data:`OUTPUT_NAMES` for ``inputs`` = [{"image": (3, H, W)}]: the model's
    inference before post-processing (the ``inference_func`` of the ``TracingAdapter``)."""
    images = model.preprocess_image(inputs)
    (instances,), semantic_logits = model.detect(images)
    outputs = (
        instances.pred_boxes.tensor,
        instances.scores,
        instances.pred_classes,
        instances.pred_masks,
    )
    return outputs if semantic_logits is None else (*outputs, semantic_logits)


def tracing_adapter(model, image: torch.Tensor) -> nn.Module:
    """``model`` as a module of one image tensor returning a tuple of tensors (Detectron2's
    ``TracingAdapter``)."""
    adapter, _ = _tracing_tools()
    return adapter(model, ([{"image": image}],), raw_inference)


def export(model, image: torch.Tensor, fmt: str, output: Path, opset: int = 17) -> Path:
    """Trace ``model`` (eval mode) on ``image`` and write ``output/model.ts`` or
    ``output/model.onnx``; returns the file."""
    check_exportable(model, fmt, opset)
    adapter = tracing_adapter(model, image).eval()  # the exporters restore the adapter's mode
    output.mkdir(parents=True, exist_ok=True)
    _, patch_builtin_len = _tracing_tools()
    with torch.no_grad(), patch_builtin_len(TRACED_LEN_MODULES):
        if fmt == "torchscript":
            path = output / "model.ts"
            torch.jit.save(torch.jit.trace(adapter, (image,), check_trace=False), str(path))
            return path
        path = output / "model.onnx"
        names = list(OUTPUT_NAMES[: len(adapter(image))])
        dynamic = {"image": {1: "height", 2: "width"}}
        dynamic.update({name: {0: "detections"} for name in names[:4]})
        if len(names) > 4:
            dynamic["sem_logits"] = {2: "semantic_height", 3: "semantic_width"}
        torch.onnx.export(
            adapter, (image,), str(path), dynamo=False, opset_version=opset,
            input_names=["image"], output_names=names, dynamic_axes=dynamic,
        )  # fmt: skip
    return path


def load_exported(path: Path):
    """A callable: image (3, H, W) float32 tensor -> the tuple of output tensors, running
    ``model.ts`` in TorchScript or ``model.onnx`` in onnxruntime (CPU)."""
    if path.suffix == ".ts":
        module = torch.jit.load(str(path))
        return lambda image: tuple(module(image))
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many threads as PyTorch's
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outputs = session.run(None, {"image": image.cpu().numpy().astype(np.float32)})
        return tuple(torch.from_numpy(o) for o in outputs)

    return run


def postprocess(
    outputs: Sequence[Union[torch.Tensor, np.ndarray]],
    image_size: Tuple[int, int],
    height: int,
    width: int,
    semantic_stride: int = 8,
) -> dict:
    """Detectron2's outputs from the exported model's ``outputs`` on one image of
    ``image_size`` (H, W: the image given to the model): ``instances`` at (height, width) with
    pred_boxes, scores, pred_classes and pred_masks (N, height, width) bool, and with the
    semantic logits ``sem_seg`` (K, height, width), as the model's own inference gives them.
    ``semantic_stride`` is the model's MODEL.SEM_SEG_HEAD.COMMON_STRIDE (8 in every shipped
    config); a stride under it is refused, the logits then covering less than the image."""
    tensors = [torch.as_tensor(o) for o in outputs]
    boxes, scores, classes, masks = tensors[:4]
    instances = Instances(image_size)
    instances.pred_boxes = Boxes(boxes.clone())  # detector_postprocess scales them in place
    instances.scores = scores
    instances.pred_classes = classes
    instances.pred_masks = masks
    result = {"instances": detector_postprocess(instances, height, width)}
    if len(tensors) > 4:
        logits = F.interpolate(
            tensors[4], scale_factor=semantic_stride, mode="bilinear", align_corners=False
        )[0]
        if logits.shape[-2] < image_size[0] or logits.shape[-1] < image_size[1]:
            raise ValueError(
                f"sem_logits {tuple(tensors[4].shape)} at semantic_stride {semantic_stride} "
                f"cover {tuple(logits.shape[-2:])} pixels, less than the {tuple(image_size)} "
                "image: pass the model's MODEL.SEM_SEG_HEAD.COMMON_STRIDE as semantic_stride"
            )
        result["sem_seg"] = sem_seg_postprocess(logits, image_size, height, width)
    return result


def sample_image(cfg: CfgNode, path: Optional[str]) -> torch.Tensor:
    """(3, H, W) float32: ``path`` read in INPUT.FORMAT and resized as DefaultPredictor does,
    or without a path a fixed random image of that test size. An image that htc.predict would
    skip (unreadable, 16-bit, too thin once resized) raises ValueError naming --sample-image."""
    if path is None:
        size = cfg.INPUT.MIN_SIZE_TEST or 800  # 0: inputs are not resized
        pixels = np.random.default_rng(0).integers(0, 256, (size, size * 4 // 3, 3), np.uint8)
    else:
        pixels, reason = read_image_or_reason(Path(path))
        if pixels is None:
            raise ValueError(f"--sample-image {path}: {reason}")
        pixels = pixels[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else pixels
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    try:
        pixels = checked_resize(resize, pixels).apply_image(pixels)
    except ValueError as error:
        raise ValueError(f"--sample-image {path}: {error}") from None
    return torch.as_tensor(pixels.astype("float32").transpose(2, 0, 1))


def describe(outputs: Sequence[torch.Tensor], top: int = 5) -> str:
    """The detections of ``outputs`` in a few lines."""
    boxes, scores, classes = outputs[:3]
    lines = [f"{len(scores)} detections"]
    for box, score, cls in list(zip(boxes.tolist(), scores.tolist(), classes.tolist()))[:top]:
        lines.append(f"  class {cls} score {score:.4f} box {[round(v, 1) for v in box]}")
    return "\n".join(lines)


def match_detections(
    ours: Sequence[torch.Tensor], eager: Sequence[torch.Tensor], box_tolerance: float = 1.0
) -> Optional[torch.Tensor]:
    """``order`` with ``ours[i]`` the detection ``eager[order[i]]`` (same class, every box
    coordinate within ``box_tolerance`` px), or None if the detections are not the same.
    Detections whose scores tie to float rounding may come in another order."""
    boxes, classes = ours[0].float(), ours[2].long()
    if len(boxes) != len(eager[0]):
        return None
    distance = (boxes[:, None, :] - eager[0][None, :, :]).abs().amax(dim=-1)
    distance[classes[:, None] != eager[2][None, :]] = float("inf")
    order, taken = [], set()
    for row in distance:
        candidates = [j for j in row.argsort().tolist() if j not in taken]
        if not candidates or row[candidates[0]] > box_tolerance:
            return None
        order.append(candidates[0])
        taken.add(candidates[0])
    return torch.tensor(order, dtype=torch.long)


def compare(ours: Sequence[torch.Tensor], eager: Sequence[torch.Tensor]) -> str:
    """Agreement of an exported model's outputs with eager PyTorch's, in one line."""
    order = match_detections(ours, eager)
    if order is None:
        return f"DIFFERENT detections: {len(ours[1])} exported, {len(eager[1])} eager"
    moved = int((order != torch.arange(len(order))).sum())
    diffs = [
        f"{name} {(a.float() - b[order] if i < 4 else a.float() - b).abs().max().item():.1e}"
        for i, (name, a, b) in enumerate(zip(OUTPUT_NAMES, ours, eager))
        if name != "classes" and a.numel()
    ]
    return (
        f"the same {len(order)} detections ({moved} in another order); "
        "max abs difference: " + ", ".join(diffs)
    )


def build_for_export(cfg: CfgNode, fmt: str, opset: int = 17):
    """The model of ``cfg`` in eval mode on CPU, checked (:func:`check_exportable`) before
    MODEL.WEIGHTS is loaded (random weights, announced, when empty)."""
    model = build_model(cfg).eval()
    check_exportable(model, fmt, opset)
    load_weights(model, cfg)
    return model


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Export HTC to TorchScript or ONNX")
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True, help="folder for model.ts / model.onnx")
    parser.add_argument("--sample-image", help="image to trace and check on (else a random one)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (16 or newer)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE pairs")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.is_file() or output.suffix in (".ts", ".onnx", ".pt"):
        parser.error(f"--output {output}: a folder, which model.ts or model.onnx is written into")

    cfg = load_predictor_cfg(args.config_file, [*args.opts, "MODEL.DEVICE", "cpu"])
    check_serving_cfg(cfg)
    model = build_for_export(cfg, args.format, args.opset)
    image = sample_image(cfg, args.sample_image)
    path = export(model, image, args.format, output, args.opset)
    print(f"wrote {path}")
    with torch.no_grad():
        eager = raw_inference(model, [{"image": image}])
    runtime = "TorchScript" if args.format == "torchscript" else "onnxruntime (CPU)"
    exported = load_exported(path)(image)
    print(f"{runtime} on the {tuple(image.shape[1:])} sample image: {describe(exported)}")
    print(f"against eager PyTorch: {compare(exported, eager)}")


if __name__ == "__main__":
    main()
