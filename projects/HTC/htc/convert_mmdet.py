"""Convert an MMDetection 2.x/3.x HTC checkpoint, or the ImageNet ResNet or ResNeXt that the
reference's configs start from, into a Detectron2 checkpoint of this project.

    python -m htc.convert_mmdet INPUT.pth OUTPUT.pth [--config configs/htc_R_50_FPN_1x.yaml]
    python -m htc.convert_mmdet resnet50-0676ba61.pth pretrained/R-50.pkl \
        --config configs/htc_R_50_FPN_1x.yaml

Only names change (no tensor is permuted): the anchor, delta and class layouts already agree.
An ImageNet classifier (torchvision's ResNets, open-mmlab's ResNeXts: ``conv1``, ``layer1-4``,
``fc``) gives the backbone's ``bottom_up`` and loses its ``fc``. With ``--config`` the result is
checked against the model that config builds: every tensor must find its place with the same
shape and every model tensor must be given (of a backbone: every ``bottom_up`` tensor but the
deformable convolutions' offsets, which start at zero), else nothing is written. An OUTPUT
ending in ``.pkl`` is written in Detectron2's model-zoo format (the configs' ``pretrained/*.pkl``).
"""

import argparse
import contextlib
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

from .checkpoint import write_checkpoint


def _res(m: re.Match) -> str:
    """mmdet ``layer{L}.{b}`` -> Detectron2 ``res{L+1}.{b}``."""
    return f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}"


# (mmdet key pattern, Detectron2 key); the first match wins
RULES: List[Tuple[str, Callable[[re.Match], str]]] = [
    (r"^backbone\.conv1\.weight$", lambda m: "backbone.bottom_up.stem.conv1.weight"),
    (r"^backbone\.bn1\.(.+)$", lambda m: f"backbone.bottom_up.stem.conv1.norm.{m[1]}"),
    (r"^backbone\.layer(\d)\.(\d+)\.downsample\.0\.(.+)$", lambda m: f"{_res(m)}.shortcut.{m[3]}"),
    (
        r"^backbone\.layer(\d)\.(\d+)\.downsample\.1\.(.+)$",
        lambda m: f"{_res(m)}.shortcut.norm.{m[3]}",
    ),
    (
        r"^backbone\.layer(\d)\.(\d+)\.conv2\.conv_offset\.(.+)$",
        lambda m: f"{_res(m)}.conv2_offset.{m[3]}",
    ),
    (r"^backbone\.layer(\d)\.(\d+)\.conv(\d)\.(.+)$", lambda m: f"{_res(m)}.conv{m[3]}.{m[4]}"),
    (r"^backbone\.layer(\d)\.(\d+)\.bn(\d)\.(.+)$", lambda m: f"{_res(m)}.conv{m[3]}.norm.{m[4]}"),
    (
        r"^neck\.lateral_convs\.(\d)\.conv\.(.+)$",
        lambda m: f"backbone.fpn_lateral{int(m[1]) + 2}.{m[2]}",
    ),
    (
        r"^neck\.fpn_convs\.(\d)\.conv\.(.+)$",
        lambda m: f"backbone.fpn_output{int(m[1]) + 2}.{m[2]}",
    ),
    (r"^rpn_head\.rpn_conv\.(.+)$", lambda m: f"proposal_generator.rpn_head.conv.{m[1]}"),
    (
        r"^rpn_head\.rpn_cls\.(.+)$",
        lambda m: f"proposal_generator.rpn_head.objectness_logits.{m[1]}",
    ),
    (r"^rpn_head\.rpn_reg\.(.+)$", lambda m: f"proposal_generator.rpn_head.anchor_deltas.{m[1]}"),
    (
        r"^roi_head\.bbox_head\.(\d)\.shared_fcs\.(\d)\.(.+)$",
        lambda m: f"roi_heads.box_head.{m[1]}.fc{int(m[2]) + 1}.{m[3]}",
    ),
    (
        r"^roi_head\.bbox_head\.(\d)\.shared_convs\.(\d)\.conv\.(.+)$",
        lambda m: f"roi_heads.box_head.{m[1]}.conv{int(m[2]) + 1}.{m[3]}",
    ),
    (
        r"^roi_head\.bbox_head\.(\d)\.fc_cls\.(.+)$",
        lambda m: f"roi_heads.box_predictor.{m[1]}.cls_score.{m[2]}",
    ),
    (
        r"^roi_head\.bbox_head\.(\d)\.fc_reg\.(.+)$",
        lambda m: f"roi_heads.box_predictor.{m[1]}.bbox_pred.{m[2]}",
    ),
    (
        r"^roi_head\.mask_head\.(\d)\.convs\.(\d)\.conv\.(.+)$",
        lambda m: f"roi_heads.mask_head.{m[1]}.mask_fcn{int(m[2]) + 1}.{m[3]}",
    ),
    (
        r"^roi_head\.mask_head\.(\d)\.upsample\.(.+)$",
        lambda m: f"roi_heads.mask_head.{m[1]}.deconv.{m[2]}",
    ),
    (
        r"^roi_head\.mask_head\.(\d)\.conv_logits\.(.+)$",
        lambda m: f"roi_heads.mask_head.{m[1]}.predictor.{m[2]}",
    ),
    (
        r"^roi_head\.mask_head\.(\d)\.conv_res\.conv\.(.+)$",
        lambda m: f"roi_heads.mask_head.{m[1]}.res_conv.{m[2]}",
    ),
    (
        r"^roi_head\.semantic_head\.(lateral_convs|convs)\.(\d)\.conv\.(.+)$",
        lambda m: f"semantic_head.{m[1]}.{m[2]}.{m[3]}",
    ),
    (
        r"^roi_head\.semantic_head\.(conv_embedding)\.conv\.(.+)$",
        lambda m: f"semantic_head.{m[1]}.{m[2]}",
    ),
    (r"^roi_head\.semantic_head\.(conv_logits)\.(.+)$", lambda m: f"semantic_head.{m[1]}.{m[2]}"),
]
# a backbone's style as a config's text gives it: style='caffe' (Python), "style": "caffe" (JSON)
CAFFE_STYLE = re.compile(r"""\bstyle['"]?\s*[=:]\s*['"]caffe['"]""")
LEGACY_1X = re.compile(r"^(bbox_head|mask_head|semantic_head)\.")
# the families that tests/test_parity.py proves number by number against MMDetection 3.3
PROVEN_FAMILIES = {
    "ResNet-50, semantic branch, 2fc box heads",
    "ResNet-50, 2fc box heads",
    "ResNet-50, semantic branch, 4conv1fc box heads",
    "ResNet-101, semantic branch, 2fc box heads",
    "ResNeXt-101, semantic branch, 2fc box heads",
    "ResNeXt-101 with DCN in res3-res5, semantic branch, 2fc box heads",
}
DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}  # of bottleneck blocks
BASIC_DEPTHS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34}  # of basic blocks (no conv3)


class ConversionError(ValueError):
    pass


def rename(key: str) -> Optional[str]:
    """The Detectron2 name of an mmdet key, or None if no rule applies."""
    for pattern, target in RULES:
        match = re.match(pattern, key)
        if match is not None:
            return target(match)
    return None


def load_mmdet_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The ``state_dict`` of an mmcv checkpoint, loaded with ``weights_only=True``."""
    try:
        with open(path, "rb") as f:
            pickled = f.read(1) == b"\x80"  # torch's format before 1.6: a pickle
    except OSError as e:  # missing, a folder, unreadable
        raise ConversionError(f"{path} cannot be read as a checkpoint file: {e.strerror}") from e
    if path.endswith(".pkl"):
        raise ConversionError(
            f"{path} is in Detectron2's pickle format (.pkl: its model zoo's files, this "
            "converter's .pkl outputs): it needs no conversion; give it to MODEL.WEIGHTS as it is "
            "(this converts MMDetection's .pth)"
        )
    if not (pickled or zipfile.is_zipfile(path)):
        raise ConversionError(f"{path} is not a complete PyTorch checkpoint (no zip, no pickle)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{path}: refusing to unpickle objects other than tensors and plain containers "
            f"(weights_only=True): {str(e).splitlines()[0]}. A checkpoint with training state can "
            "be reduced to its weights with MMDetection's tools/model_converters/publish_model.py"
        ) from e
    except (RuntimeError, EOFError, KeyError, ValueError) as e:
        raise ConversionError(f"{path} is not a complete PyTorch checkpoint: {e!r}") from e
    if _caffe_style(checkpoint):
        raise ConversionError(
            f"{path} is of a caffe-style ResNet (style='caffe' in the config its meta keeps: "
            "the stride in the 1x1 conv, BGR input with std 1); this project's ResNet is the "
            "pytorch style (the stride in the 3x3, RGB input with std ~58), which computes "
            "something else with these weights. Use a pytorch-style checkpoint of the model"
        )
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        raise ConversionError(
            f"{path} holds a 'model' entry, as Detectron2's checkpoints do: give it to "
            "MODEL.WEIGHTS as it is (this converts MMDetection's)"
        )
    if not isinstance(state, dict) or not state:
        raise ConversionError(f"{path}: no state_dict of tensors found")
    if all(str(k).startswith("module.") for k in state):  # saved from (Distributed)DataParallel:
        state = {k[len("module.") :]: v for k, v in state.items()}  # as mmcv's loader strips it
    if any(LEGACY_1X.match(k) for k in state):
        raise ConversionError(
            f"{path} is an MMDetection 1.x (2019) HTC checkpoint: its weights follow the legacy "
            "conventions (81-way masks with background first, +1 box sizes, unaligned RoIAlign) "
            "and are not supported; use the v2.0 (2020) checkpoints of the model zoo"
        )
    return state


def _caffe_style(checkpoint: object) -> bool:
    """Whether the config that ``checkpoint``'s meta keeps builds a caffe-style ResNet. Its text
    is under ``meta['config']`` (MMDetection 2.x's tools/train.py for mmcv's runner) or
    ``meta['cfg']`` (mmengine's runner, MMDetection 3.x); without it nothing tells the styles
    apart (same names and shapes)."""
    meta = checkpoint.get("meta") if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict):
        return False
    text = meta.get("config") or meta.get("cfg")
    return isinstance(text, str) and CAFFE_STYLE.search(text) is not None


def is_imagenet_backbone(state: Dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` is an ImageNet classifier's ResNet or ResNeXt, named as torchvision and
    MMDetection's backbones name them (no ``backbone.`` prefix)."""
    return "conv1.weight" in state and "layer1.0.conv1.weight" in state


def backbone_as_mmdet(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An ImageNet classifier's tensors under the names of an MMDetection HTC's backbone; its
    classifier (``fc``) dropped."""
    return {f"backbone.{k}": v for k, v in state.items() if not k.startswith("fc.")}


def _cascade_mask_heads(state: Dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` has mask heads of later stages without HTC's ``conv_res``."""
    later = {k.split(".")[2] for k in state if re.match(r"roi_head\.mask_head\.[12]\.", k)}
    flow = {k.split(".")[2] for k in state if re.match(r"roi_head\.mask_head\.[12]\.conv_res\.", k)}
    return bool(later - flow)


def convert(state: Dict[str, torch.Tensor]) -> Tuple["OrderedDict[str, torch.Tensor]", List]:
    """Rename every tensor; ``num_batches_tracked`` is dropped. Returns the new state dict and
    the table rows (mmdet name, Detectron2 name, shape). Raises if a tensor has no rule."""
    converted, rows, unmapped = OrderedDict(), [], []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{key} is a {type(value).__name__}, not a tensor")
        new = rename(key)
        if new is None:
            unmapped.append(key)
            continue
        converted[new] = value
        rows.append((key, new, tuple(value.shape)))
    if any(key.startswith("roi_head.bbox_head.fc_cls.") for key in unmapped):
        raise ConversionError(
            "this is a (non-cascade) Mask R-CNN or Faster R-CNN checkpoint, which HTC cannot "
            "use: its one box head (roi_head.bbox_head.fc_cls, no stage index) has no place in "
            "HTC's cascade of three stages; convert an HTC checkpoint"
        )
    if unmapped:
        raise ConversionError(f"{len(unmapped)} tensors have no Detectron2 name: {unmapped[:20]}")
    return converted, rows


def family_of(state: Dict[str, torch.Tensor]) -> str:
    """What a checkpoint is, in the words of PROVEN_FAMILIES: backbone, depth, deformable
    stages and their kind, semantic branch, box head, a cascade without the mask information
    flow, stages other than 3: what a parity test proves differs in each."""
    blocks = tuple(
        len({k.split(".")[2] for k in state if k.startswith(f"backbone.layer{i}.")})
        for i in range(1, 5)
    )
    conv1, conv2 = (
        state.get("backbone.layer1.0.conv1.weight"),
        state.get("backbone.layer1.0.conv2.weight"),
    )
    depths = DEPTHS if "backbone.layer1.0.conv3.weight" in state else BASIC_DEPTHS
    if blocks not in depths or conv1 is None or conv2 is None:
        return "an unrecognised backbone"
    kind = "ResNeXt" if conv2.shape[1] < conv1.shape[0] else "ResNet"  # grouped 3x3
    family = f"{kind}-{depths[blocks]}"
    family += _deformable(state)
    if any(k.startswith("roi_head.semantic_head.") for k in state):
        family += ", semantic branch"
    heads = "4conv1fc" if any(".shared_convs.3." in k for k in state) else "2fc"
    family += f", {heads} box heads"
    if _cascade_mask_heads(state):  # Cascade Mask R-CNN's
        family += ", no mask information flow"
    stages = [_stages(state, f"roi_head.{head}.") for head in ("bbox_head", "mask_head")]
    if stages != [3, 3]:  # HTC's own
        family += f", {stages[0]} box and {stages[1]} mask stages"
    return family


def _deformable(state: Dict[str, torch.Tensor]) -> str:
    """The deformable stages of ``state`` and their kind, from the offsets a kernel tap:
    mmcv's DCN of one offset group (2: its x and y) as " with DCN in res3-res5", the modulated
    DCN (DCNv2: 3, with its mask) named as such, other offset groups by their channels."""
    offsets = {k: v.shape for k, v in state.items() if k.endswith(".conv_offset.weight")}
    if not offsets:
        return ""
    stages = sorted({int(k[len("backbone.layer")]) + 1 for k in offsets})
    per_tap = tuple({shape[0] / (shape[2] * shape[3]) for shape in offsets.values()})
    kind = {(2,): "DCN", (3,): "modulated DCN (DCNv2)"}.get(per_tap)
    channels = sorted({shape[0] for shape in offsets.values()})
    kind = kind or f"DCN of {channels} offset channels"
    return f" with {kind} in res{stages[0]}-res{stages[-1]}"


def _stages(state: Dict[str, torch.Tensor], prefix: str) -> int:
    """How many heads ``prefix``.<stage>. names."""
    return len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})


class _SchedulesOnHost(TorchFunctionMode):
    """``torch.linspace`` on the CPU: ViT, MViT and Swin read their drop-path schedules with
    ``.item()``, which a meta tensor cannot answer."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.linspace:
            kwargs = dict(kwargs or {}, device="cpu")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Modules built within hold meta tensors: names, shapes and parameter counts of full-size
    models of every backbone, without allocating or initialising their weights."""
    with torch.device("meta"), _SchedulesOnHost():
        yield


def _model_state(config_file: str) -> Dict[str, torch.Tensor]:
    """The state dict of the model of ``config_file``, a yacs (.yaml) or LazyConfig (.py) config,
    on the meta device (names and shapes: nothing allocated or initialised)."""
    from detectron2.config import LazyConfig, get_cfg, instantiate
    from detectron2.modeling import build_model

    from .config import add_htc_config

    if config_file.endswith(".py"):
        with on_meta():
            return instantiate(LazyConfig.load(config_file).model).state_dict()
    cfg = get_cfg()
    add_htc_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.MODEL.DEVICE = "meta"
    with on_meta():
        return build_model(cfg).state_dict()


def _from_imagenet(key: str) -> bool:
    """Whether the model's tensor ``key`` comes from an ImageNet backbone."""
    return key.startswith("backbone.bottom_up.") and ".conv2_offset." not in key


def check_against_model(
    converted: Dict[str, torch.Tensor], config_file: str, backbone: bool = False
) -> None:
    """Refuse unless ``converted`` fills the model of ``config_file`` exactly (``backbone``:
    its ImageNet-initialised tensors)."""
    expected = _model_state(config_file)
    given = [k for k in expected if _from_imagenet(k)] if backbone else expected
    missing = [k for k in given if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    shapes = [
        f"{k}: {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in converted.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing for the model: {missing[:20]}")
    if unexpected:
        problems.append(f"not in the model: {unexpected[:20]}")
    if shapes:
        problems.append(f"shape mismatches: {shapes[:20]}")
    if problems:
        raise ConversionError(f"does not fit {config_file}: " + "; ".join(problems))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="MMDetection HTC checkpoint, or ImageNet ResNet(Xt) (.pth)")
    parser.add_argument("output", help="Detectron2 checkpoint to write (.pth; .pkl: model zoo's)")
    parser.add_argument("--config", help="our config the checkpoint must fit")
    args = parser.parse_args(argv)
    try:
        state = load_mmdet_state_dict(args.input)
        backbone = is_imagenet_backbone(state)
        if backbone:
            state = backbone_as_mmdet(state)
        converted, rows = convert(state)
        if args.config:
            check_against_model(converted, args.config, backbone)
        elif not backbone and not _stages(state, "roi_head.mask_head."):
            raise ConversionError(
                f"{args.input} has no mask heads: a box-only model (Cascade R-CNN?), not HTC. "
                "Give the model it is for with --config"
            )
        elif _cascade_mask_heads(state):
            raise ConversionError(
                f"{args.input} is a Cascade Mask R-CNN checkpoint, not HTC's: its later mask "
                "heads have no conv_res (the mask information flow), which would stay at random "
                "in HTC. Give the model it is for with --config (e.g. "
                "configs/ablations/cascade_mask_rcnn_R_50_FPN_1x.yaml)"
            )
    except (ConversionError, OSError, ImportError) as e:  # OSError: --config's file
        print(f"error: {e}", file=sys.stderr)
        return 1
    family = family_of(state)
    if backbone:
        print(f"an ImageNet {family.split(',')[0]}: the backbone's weights alone")
    elif family not in PROVEN_FAMILIES:
        print(
            f"warning: {family}: no parity test against MMDetection covers this family; its "
            "names and shapes fit, its numbers are not proven (tests/test_parity.py)",
            file=sys.stderr,
        )
    width = max(len(r[0]) for r in rows)
    for old, new, shape in rows:
        print(f"{old:<{width}}  ->  {new}  {list(shape)}")
    print(f"{len(rows)} tensors mapped")
    write_checkpoint(converted, args.output, "htc-detectron2 convert_mmdet")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
