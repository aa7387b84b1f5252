"""HTC's configuration: ``add_htc_config`` (every ``MODEL.HTC`` key and the other keys HTC
adds, each with its reason), the process-wide settings a config asks for (float32 precision,
deterministic algorithms), and the Detectron2 classes the modern backbones' configs need."""

import difflib
import functools
import inspect
import logging
import os
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

import detectron2
import torch
from detectron2.config import CfgNode as CN
from detectron2.config import LazyConfig
from detectron2.utils.registry import locate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from . import layers

FLOAT32_PRECISIONS = ("", "highest", "high", "medium")
# The process settings' keys in a LazyConfig, with their defaults there (Detectron2's
# default_setup reads SEED or train.seed, CUDNN_BENCHMARK or train.cudnn_benchmark, and so on).
LAZY_SETTINGS = {
    "DETERMINISTIC": ("train.deterministic", False),
    "FLOAT32_PRECISION": ("train.float32_precision", ""),
    "SEED": ("train.seed", -1),
    "CUDNN_BENCHMARK": ("train.cudnn_benchmark", False),
    "MODEL.DEVICE": ("train.device", "cuda"),
    "SOLVER.AMP.ENABLED": ("train.amp.enabled", False),
    "MODEL.HTC.ROI_ALIGN": ("model.roi_heads.roi_align", "auto"),
}


def add_htc_config(cfg: CN) -> None:
    """Add the Hybrid Task Cascade keys to a Detectron2 config (in place).

    ``MODEL.HTC`` holds the paper's switches; the semantic branch reuses ``MODEL.SEM_SEG_HEAD``
    (``COMMON_STRIDE`` picks the fusion level, 8 = P3) and adds ``NUM_CONVS``/``EMBED_DIM``.
    """
    cfg.MODEL.HTC = CN()
    # Stage t's mask head learns on the boxes stage t just refined (re-assigned, re-sampled).
    cfg.MODEL.HTC.INTERLEAVED = True
    # Stage t's mask head adds a 1x1 conv of the previous head's 14x14 feature (chained from the
    # earlier heads, re-run on stage t's RoIs).
    cfg.MODEL.HTC.MASK_INFO_FLOW = True
    # Whether the model has the semantic segmentation branch at all.
    cfg.MODEL.HTC.SEMANTIC_ON = True
    # Which RoI features the semantic feature is summed into: any subset of ("bbox", "mask").
    cfg.MODEL.HTC.SEMANTIC_FUSION = ["bbox", "mask"]
    # Weight of stage t's box and mask losses (one entry per cascade stage).
    cfg.MODEL.HTC.STAGE_LOSS_WEIGHTS = [1.0, 0.5, 0.25]
    # Test-time masks: "mean" of all stages' sigmoid masks (reference 2.x), or "last" stage only.
    cfg.MODEL.HTC.MASK_MERGE = "mean"
    # Final detections: class-wise "nms", or Soft-NMS "soft_linear" / "soft_gaussian" (IoU
    # threshold ROI_HEADS.NMS_THRESH_TEST, minimum score ROI_HEADS.SCORE_THRESH_TEST).
    cfg.MODEL.HTC.TEST_NMS = "nms"
    cfg.MODEL.HTC.SOFT_NMS_SIGMA = 0.5
    # Soft-NMS drops boxes whose decayed score falls under this (the reference's min_score); the
    # candidates already passed ROI_HEADS.SCORE_THRESH_TEST.
    cfg.MODEL.HTC.SOFT_NMS_MIN_SCORE = 0.001
    # Inference outputs "sem_seg", the (K, H, W) semantic scores at the output resolution (what
    # SemSegEvaluator reads); False skips that upsampling when only instances are wanted.
    cfg.MODEL.HTC.SEMANTIC_OUTPUT = True
    # Instance masks at inference: "bitmask", Detectron2's (N, H, W) pred_masks (H x W bytes each:
    # 1.2 GB for 100 masks of a 12-megapixel photo), or "rle", pred_masks_rle, a COCO RLE per
    # instance made a few masks at a time (bounded memory; htc.evaluation's COCO and LVIS
    # evaluators score them, Detectron2's COCOEvaluator and Cityscapes' need "bitmask").
    cfg.MODEL.HTC.MASK_OUTPUT = "bitmask"
    # Inference also outputs "panoptic_seg" as PanopticFPN does: the instances, then the semantic
    # branch's stuff. The branch's classes are read as the panoptic categories of DATASETS.TEST[0]
    # by its metadata's "semantic_to_panoptic" (see htc/panoptic.py). Needs the semantic branch
    # and MASK_OUTPUT "bitmask".
    cfg.MODEL.HTC.PANOPTIC_ON = False
    cfg.MODEL.HTC.PANOPTIC = CN()
    # PanopticFPN's thresholds (MODEL.PANOPTIC_FPN.COMBINE): an instance more than this covered by
    # higher-scoring ones is dropped; stuff regions under this many pixels and instances scored
    # under this are left out.
    cfg.MODEL.HTC.PANOPTIC.OVERLAP_THRESH = 0.5
    cfg.MODEL.HTC.PANOPTIC.STUFF_AREA_LIMIT = 4096
    cfg.MODEL.HTC.PANOPTIC.INSTANCES_CONFIDENCE_THRESH = 0.5
    # Loading MODEL.WEIGHTS refuses parameters whose shape differs from the model's; True skips
    # them (left at their initialization), e.g. to fine-tune on another number of classes.
    cfg.MODEL.HTC.SKIP_MISMATCHED_WEIGHTS = False
    # Kernels (htc/layers). RoIAlign, the same results by each: "auto" picks per call the one
    # measured faster (CPU: "cpu_parallel", the parallel forward and sparse-matrix backward;
    # CUDA: "triton" or "torchvision", by the call's shape; "triton" always under DETERMINISTIC).
    # Deformable convs: "torchvision" (train on CPU and CUDA) or "detectron2"'s (CUDA only).
    cfg.MODEL.HTC.ROI_ALIGN = "auto"
    cfg.MODEL.HTC.DEFORM_CONV = "torchvision"

    cfg.MODEL.SEM_SEG_HEAD.NUM_CONVS = 4
    cfg.MODEL.SEM_SEG_HEAD.EMBED_DIM = 256
    _add_backbone_config(cfg)
    # "SGD" (Detectron2's) or "AdamW" (betas BETAS; the same parameter groups and clipping); with
    # either, no weight decay on the parameters whose own names are in ZERO_WEIGHT_DECAY
    # (htc/solver.py).
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.BETAS = (0.9, 0.999)
    cfg.SOLVER.ZERO_WEIGHT_DECAY = []
    if "FLOAT32_PRECISION" not in cfg:  # Detectron2 main's key, given to v0.6 as well
        # fp32 matmuls and convs on CUDA: "highest" (no TF32), "high" (TF32) or "medium"; ""
        # leaves PyTorch's settings as they are. Applied by set_float32_precision.
        cfg.FLOAT32_PRECISION = ""
    if "USE_FED_LOSS" not in cfg.MODEL.ROI_BOX_HEAD:  # Detectron2 main's keys, given to v0.6
        # so that the LVIS configs load there, to be refused with the reason (roi_heads.py)
        cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS = False
        cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE = False
        cfg.MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER = 0.5
        cfg.MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES = 50
    # Bit-identical training runs (with a fixed SEED): applied by set_deterministic.
    cfg.DETERMINISTIC = False
    # A data order and augmentations that --resume continues exactly, with each process's RNG
    # states in every checkpoint (htc/data/resumable.py, htc/resume.py; needs a fixed SEED).
    cfg.DATALOADER.RESUMABLE = False


def _add_backbone_config(cfg: CN) -> None:
    """Keys of Detectron2's transformer backbones for yacs configs (htc/backbones.py); defaults
    are the B sizes of Detectron2's ViTDet, MViTv2 and Swin configs."""
    # MODEL.BACKBONE.NAME "build_vit_sfp_backbone": a plain ViT + ViTDet's simple feature pyramid.
    cfg.MODEL.VIT = CN()
    cfg.MODEL.VIT.IMG_SIZE = 1024  # the input size its global blocks' relative positions span
    cfg.MODEL.VIT.PATCH_SIZE = 16
    cfg.MODEL.VIT.EMBED_DIM = 768
    cfg.MODEL.VIT.DEPTH = 12
    cfg.MODEL.VIT.NUM_HEADS = 12
    cfg.MODEL.VIT.DROP_PATH_RATE = 0.1
    cfg.MODEL.VIT.WINDOW_SIZE = 14
    cfg.MODEL.VIT.WINDOW_BLOCK_INDEXES = [0, 1, 3, 4, 6, 7, 9, 10]  # the others: global attention
    cfg.MODEL.VIT.USE_ACT_CHECKPOINT = False
    # Inputs padded to this square, at least their longest side (ViTDet's LSJ recipe: 1024); 0:
    # to the size divisibility.
    cfg.MODEL.VIT.SQUARE_PAD = 0
    # "build_mvit_fpn_backbone": MViTv2 + FPN.
    cfg.MODEL.MVIT = CN()
    cfg.MODEL.MVIT.EMBED_DIM = 96
    cfg.MODEL.MVIT.DEPTH = 24
    cfg.MODEL.MVIT.NUM_HEADS = 1
    cfg.MODEL.MVIT.LAST_BLOCK_INDEXES = [1, 4, 20, 23]  # the last block of each stage
    cfg.MODEL.MVIT.DROP_PATH_RATE = 0.4
    cfg.MODEL.MVIT.USE_ACT_CHECKPOINT = False
    cfg.MODEL.MVIT.SQUARE_PAD = 0
    # "build_swin_fpn_backbone": Swin Transformer + FPN.
    cfg.MODEL.SWIN = CN()
    cfg.MODEL.SWIN.EMBED_DIM = 128
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 18, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [4, 8, 16, 32]
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3
    cfg.MODEL.SWIN.USE_ACT_CHECKPOINT = False
    cfg.MODEL.SWIN.SQUARE_PAD = 0


def _setting(cfg: Union[CN, DictConfig], key: str) -> Tuple[str, Any]:
    """The name and value of the process setting ``key`` (a yacs key) in ``cfg``: a yacs config,
    or a LazyConfig, where it is :data:`LAZY_SETTINGS`'s key (its default where unset)."""
    if isinstance(cfg, CN):
        return key, functools.reduce(getattr, key.split("."), cfg)
    name, default = LAZY_SETTINGS[key]
    return name, OmegaConf.select(cfg, name, default=default)


def check_device(cfg: Union[CN, DictConfig], training: bool = True) -> None:
    """Refuse a CUDA ``MODEL.DEVICE`` (a LazyConfig's ``train.device``) on a machine without
    CUDA, naming the key, before anything is built (Detectron2's default device is "cuda"); for
    ``training``, ``SOLVER.AMP.ENABLED`` (``train.amp.enabled``) too, which Detectron2's
    AMPTrainer refused only at the first step, after the datasets had loaded."""
    if torch.cuda.is_available():
        return
    key, device = _setting(cfg, "MODEL.DEVICE")
    if torch.device(device).type == "cuda":
        _refuse_without_cuda(cfg, f"{key}={device!r}", key, "cpu")
    key, amp = _setting(cfg, "SOLVER.AMP.ENABLED")
    if training and amp:
        _refuse_without_cuda(cfg, f"{key}=True (Detectron2's AMP trains on CUDA)", key, False)


def _refuse_without_cuda(cfg: Union[CN, DictConfig], problem: str, key: str, value: Any) -> None:
    """The error of a setting, ``problem``, that needs CUDA, with the override ``key`` = ``value``
    that runs on the CPU, as ``cfg``'s kind of config writes it."""
    override = f"{key} {value}" if isinstance(cfg, CN) else f"{key}={value}"
    raise ValueError(
        f"{problem}, but PyTorch finds no CUDA GPU on this machine: run on the CPU with "
        f"{override!r}"
    )


def set_float32_precision(cfg: Union[CN, DictConfig]) -> None:
    """Apply ``cfg.FLOAT32_PRECISION`` (a LazyConfig's ``train.float32_precision``) to this
    process, as Detectron2 main's ``default_setup`` does (v0.6's does not):
    ``torch.set_float32_matmul_precision`` and cuDNN's TF32 switch, on machines with CUDA; a no-op
    for "". It is a process-wide setting, not the model's."""
    key, precision = _setting(cfg, "FLOAT32_PRECISION")
    if precision not in FLOAT32_PRECISIONS:
        raise ValueError(f"{key}={precision!r}: use one of {FLOAT32_PRECISIONS}")
    if precision == "" or not torch.cuda.is_available():
        return
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = precision != "highest"
    logging.getLogger(__name__).info(
        f"{key}={precision}: matmul precision "
        f"{torch.get_float32_matmul_precision()}, cuDNN TF32 {torch.backends.cudnn.allow_tf32}"
    )


def set_deterministic(cfg: Union[CN, DictConfig]) -> None:
    """Apply ``cfg.DETERMINISTIC`` (a LazyConfig's ``train.deterministic``) to this process:
    ``torch.use_deterministic_algorithms`` (an op without a deterministic kernel raises), cuBLAS's
    fixed workspace and cuDNN without autotuning. HTC's own ops have deterministic kernels on CUDA
    (the Triton RoIAlign, the semantic branch's resizes and loss); Detectron2 seeds the data order
    from ``SEED`` (``train.seed``)."""
    key, deterministic = _setting(cfg, "DETERMINISTIC")
    if not deterministic:
        return
    seed_key, seed = _setting(cfg, "SEED")
    if seed < 0:
        raise ValueError(
            f"{key} needs a fixed {seed_key} (>= 0): without one, each run draws its own"
        )
    benchmark_key, benchmark = _setting(cfg, "CUDNN_BENCHMARK")
    if benchmark:
        raise ValueError(f"{key} and {benchmark_key}: cuDNN's autotuning picks its kernels per run")
    device = _setting(cfg, "MODEL.DEVICE")[1]
    roi_align_key, roi_align = _setting(cfg, "MODEL.HTC.ROI_ALIGN")
    roi_align = layers.roi_align_kernel(roi_align, roi_align_key)
    if torch.device(device).type == "cuda":
        why = _why_not_atomic_free(roi_align_key, roi_align, torch.device(device))
        if why:
            raise ValueError(
                f"{key} on CUDA: {why}, and torchvision's RoIAlign backward accumulates with "
                "atomics"
            )
    # read when cuBLAS starts, which is after this in train_net.py's processes
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    logging.getLogger(__name__).info(f"{key}: deterministic algorithms only")


def _why_not_atomic_free(key: str, roi_align: str, device: torch.device) -> Optional[str]:
    """Why the RoIAlign kernel ``roi_align`` (the value of ``key``) would take torchvision's
    kernels on the CUDA ``device``, or None where it runs the Triton kernels."""
    if roi_align not in ("auto", "triton"):
        return f"{key} {roi_align!r} runs torchvision's kernels (give 'auto' or 'triton')"
    return layers.roi_align.why_triton_cannot_run_on(device)


def require_detectron2(*names: str) -> List[type]:
    """The classes ``names`` of ``detectron2.modeling`` (e.g. "ViT", "SimpleFeaturePyramid"), for
    the configs of the modern backbones; an ImportError that names what is missing and the
    Detectron2 needed where the installed one lacks them (the v0.6 release does)."""
    import detectron2.modeling as modeling

    missing = [name for name in names if not hasattr(modeling, name)]
    if missing:
        raise ImportError(
            f"this config needs detectron2.modeling.{', '.join(missing)}, which the installed "
            f"Detectron2 ({detectron2.__version__} at {Path(detectron2.__file__).parent}) lacks: "
            "they came after the v0.6 release. Use Detectron2's main branch (scripts/setup.sh "
            "without DETECTRON2=0.6)."
        )
    return [getattr(modeling, name) for name in names]


# the keys read with a default where a LazyConfig lacks them (htc's settings, Detectron2's setup)
OPTIONAL_KEYS = {key for key, _ in LAZY_SETTINGS.values()} | {"train.skip_mismatched_weights"}
# train's dicts that lazyconfig_train_net.py reads, closed to their keys and the named arguments
# of the calls it hands them to as keyword arguments (Detectron2's create_ddp_model hands its
# own on to DDP); of train.amp it reads "enabled" alone
# arguments of those calls that Detectron2 sets itself, whatever the config says
SET_BY_DETECTRON2 = {"train.checkpointer": ("max_iter",)}  # PeriodicCheckpointer.before_train
TRAIN_DICTS = {
    "train.amp": (),
    "train.ddp": (
        "detectron2.engine.defaults.create_ddp_model",
        "torch.nn.parallel.DistributedDataParallel",
    ),
    "train.checkpointer": ("detectron2.engine.hooks.PeriodicCheckpointer",),
}


def apply_overrides(cfg: DictConfig, overrides: List[str]) -> DictConfig:
    """Detectron2's ``LazyConfig.apply_overrides``, one override at a time, each refused where
    its key names nothing that is read (Detectron2 adds it: ``train.max_iterr=10`` trained the
    config's schedule). ``+key=value`` adds a key on purpose."""
    for override in overrides:
        key = override.split("=", 1)[0]
        if "=" in override and not key.startswith("+") and key not in OPTIONAL_KEYS:
            _check_key(cfg, key, override)
        cfg = LazyConfig.apply_overrides(cfg, [override])
    return cfg


def check_links_resolve(cfg: DictConfig) -> None:
    """Refuse a top-level key whose ``${...}`` links do not resolve (Detectron2's
    ``LazyConfig.save``, in ``default_setup``, raised a bare OmegaConf error): a variable of the
    config file, such as the loop variable of ``for p in model.roi_heads.box_predictors``, is
    kept as a top-level key, where the links of the node it holds point nowhere."""
    for key in cfg:
        try:
            OmegaConf.to_container(cfg[key], resolve=True)
        except InterpolationResolutionError as error:
            raise ValueError(
                f"the config's top-level {key!r} holds a link that does not resolve there "
                f"({str(error).splitlines()[0]}): if it is a variable of the config file (a loop "
                "over the model's parts), name it with a leading '_' (LazyConfig.load leaves "
                "those out) or set the parts in a function"
            ) from None


def _check_key(cfg: DictConfig, key: str, override: str) -> None:
    """Refuse ``key`` where its first part missing from ``cfg`` is missing from a node whose
    keys are known: the root, ``train`` and its :data:`TRAIN_DICTS` (what the training script
    reads), or a LazyCall's node (the config's keys and its object's arguments). Other dicts are
    open (kwargs)."""
    parts = key.split(".")
    node, depth = cfg, 0
    while depth < len(parts) - 1 and isinstance(node, DictConfig) and parts[depth] in node:
        node, depth = node[parts[depth]], depth + 1
    name = parts[depth]
    if not isinstance(node, DictConfig) or name in node:
        return
    where, known = ".".join(parts[:depth]), [str(k) for k in node.keys()]
    if where in TRAIN_DICTS:
        known += [a for target in TRAIN_DICTS[where] for a in _named_arguments(target)]
        known = [k for k in known if k not in SET_BY_DETECTRON2.get(where, ())]
        if name in known:
            return
    elif where not in ("", "train") and ("_target_" not in node or _takes(node._target_, name)):
        return
    close = difflib.get_close_matches(name, list(dict.fromkeys(known)), n=3)
    raise KeyError(
        f"override {override!r}: {where or 'the config'} has no {name!r}"
        + (f" (did you mean {', '.join(close)}?)" if close else "")
        + "; +key=value adds a key on purpose"
    )


def _named_arguments(target: str) -> List[str]:
    """The arguments that the class or function ``target`` names (a class: up its chain) after
    its first, which the training script gives (the model, the checkpointer)."""
    target = locate(target)
    functions = [c.__init__ for c in target.__mro__] if inspect.isclass(target) else [target]
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    names = []
    for function in functions:
        parameters = [
            p for p in inspect.signature(function).parameters.values() if p.kind not in kinds
        ]
        names += [p.name for p in parameters if p.name != "self"][1:]
    return names


def _takes(target: Any, name: str) -> bool:
    """Whether ``target`` (a LazyCall's class or function, or its name) takes the argument
    ``name``; True where that cannot be told (``**kwargs`` up its classes' chain)."""
    if isinstance(target, str):
        try:
            target = locate(target)
        except Exception:  # Detectron2's locate raises what the import raised
            return True
    if target is None:
        return False
    functions = [c.__init__ for c in target.__mro__] if inspect.isclass(target) else [target]
    for function in functions:
        try:
            parameters = inspect.signature(function).parameters
        except (TypeError, ValueError):
            return True
        if name in parameters:
            return True
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            return False
    return True
