"""Shared helpers: a tiny HTC (same architecture, small widths) and synthetic batches."""

import copy
import functools
import importlib.util
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (htc.layers.roi_align_triton) run in Triton's interpreter on CPU tensors.
    # Triton reads this when it is imported (Detectron2's imports import it), so it is set first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # The suite's processes share the cores: each gets its share as intra-op threads, and so do
    # the processes its tests start; wider pools contend for the same cores.
    _THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    torch.set_num_threads(_THREADS)

from detectron2.config import CfgNode, get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from htc import HTCDatasetMapper, add_htc_config  # noqa: E402
from htc.convert_mmdet import on_meta  # noqa: E402
from htc.data import load_htc_json  # noqa: E402
from htc.data.demo_data import VERSION, generate_split  # noqa: E402


def _check_triton_interpreter() -> None:
    """Stop, naming the fix, where Triton's interpreter cannot run HTC's kernels: Triton 3.6's
    (torch 2.11's) turns a loaded value into a loop bound with ``int()`` of a 1-element
    array, which NumPy 2.4 refuses. Every kernel test would fail with an InterpreterError."""
    import numpy as np

    try:
        import triton
        import triton.language as tl
    except ImportError:  # then the modules that test the kernels name what is missing
        return

    @triton.jit
    def count(bound, out):
        total = 0
        for _ in range(tl.load(bound)):
            total += 1
        tl.store(out, total)

    result = torch.zeros(1, dtype=torch.int32)
    try:
        count[(1,)](torch.tensor([3], dtype=torch.int32), result)
    except Exception as error:  # the interpreter wraps what it raises
        raise pytest.UsageError(
            f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1, the Triton tests on "
            f"CPU) cannot run a loop bounded by a loaded value with NumPy {np.__version__} "
            f"({error}): install triton>=3.7 or numpy<2.4"
        ) from error
    assert result.item() == 3, "Triton's interpreter miscounted a loop"


def _patch_the_language_once_per_launch() -> None:
    """Speed Triton's interpreter up on HTC's kernels, results unchanged.

    A launch maps triton.language onto the interpreter's functions (``_patch_lang`` of the
    kernel's globals) and restores it at the end. Triton 3.x maps it again at every call of a
    ``@triton.jit`` helper (thousands per launch), which repeats the same mapping for the same
    module's globals. Here each module's globals are mapped once per launch. Triton versions
    without these internals keep their own behaviour."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    needed = ("_patch_lang", "_LangPatchScope", "GridExecutor")
    if not all(hasattr(interpreter, name) for name in needed):
        return
    patch, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    if getattr(launch, "maps_once", False):
        return
    state: dict = {"mapped": None}  # the globals mapped in the running launch; None outside

    class _AlreadyMapped:
        def restore(self) -> None:
            pass

    def once_per_launch(fn):
        mapped = state["mapped"]
        if mapped is None:  # outside a launch: as Triton does
            return patch(fn)
        if any(fn.__globals__ is done for done in mapped):
            return _AlreadyMapped()
        mapped.append(fn.__globals__)
        return patch(fn)

    def launch_mapping_once(self, *args, **kwargs):
        state["mapped"] = []  # launches do not nest
        try:
            return launch(self, *args, **kwargs)
        finally:
            state["mapped"] = None

    launch_mapping_once.maps_once = True
    interpreter._patch_lang = once_per_launch
    interpreter.GridExecutor.__call__ = launch_mapping_once


if os.environ.get("TRITON_INTERPRET") == "1":
    _check_triton_interpreter()
    _patch_the_language_once_per_launch()

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# Detectron2's ViT, MViT and Swin (its main branch; v0.6 has none)
HAS_MODERN_BACKBONES = hasattr(__import__("detectron2.modeling").modeling, "ViT")


def load_cfg(path: Path) -> CfgNode:
    cfg = get_cfg()
    add_htc_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


# htc_R_50_FPN_1x with small widths: a ResNet-18 with BN, 3 thing and 5 semantic classes
TINY_OPTS = [
    "MODEL.RESNETS.DEPTH", 18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.RESNETS.NORM", "BN",
    "MODEL.BACKBONE.FREEZE_AT", 0,
    "MODEL.FPN.OUT_CHANNELS", 32,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", 200,
    "MODEL.RPN.POST_NMS_TOPK_TEST", 100,
    "MODEL.ROI_HEADS.NUM_CLASSES", 3,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 5,
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32,
    "MODEL.SEM_SEG_HEAD.EMBED_DIM", 32,
]  # fmt: skip


def tiny_cfg(**htc) -> CfgNode:
    """htc_R_50_FPN_1x with :data:`TINY_OPTS`; ``htc`` sets MODEL.HTC keys."""
    cfg = load_cfg(CONFIGS / "htc_R_50_FPN_1x.yaml")
    cfg.merge_from_list(TINY_OPTS)
    for key, value in htc.items():
        cfg.MODEL.HTC[key.upper()] = value
    return cfg


def heuristics_file(path: Path, weights: dict) -> str:
    """``weights`` as a file that Detectron2 loads by its name-matching heuristics (as pycls'
    and MAE's ImageNet files)."""
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "test", "matching_heuristics": True}, f)
    return str(path)


def build_on_meta(cfg: CfgNode):
    """``build_model(cfg)`` on the meta device."""
    cfg = cfg.clone()
    cfg.MODEL.DEVICE = "meta"
    with on_meta():
        return build_model(cfg)


def reference_parameter_count(model) -> int:
    """Learnable parameters as the reference counts them: its BN affine parameters are
    parameters, our FrozenBN keeps them as buffers."""
    frozen_affine = sum(
        b.numel() for n, b in model.named_buffers() if n.endswith((".weight", ".bias"))
    )
    return sum(p.numel() for p in model.parameters()) + frozen_affine


def make_batch(num_images: int = 2, size: int = 96, with_gt: bool = True, seed: int = 0) -> list:
    """Images with rectangles of 3 classes on a 2-region background; masks and semantic labels
    agree with the picture (background classes 3 and 4, things 0..2)."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(num_images):
        image = torch.zeros(3, size, size)
        sem = torch.full((size, size), 3, dtype=torch.long)
        sem[size // 2 :] = 4
        image[:, size // 2 :] = 0.3
        boxes, classes, masks = [], [], []
        for _ in range(3 if with_gt else 0):
            x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
            w, h = torch.randint(size // 6, size // 2, (2,), generator=g).tolist()
            c = int(torch.randint(0, 3, (1,), generator=g))
            mask = torch.zeros(size, size, dtype=torch.bool)
            mask[y0 : y0 + h, x0 : x0 + w] = True
            image[c, mask] = 1.0
            sem[mask] = c
            boxes.append([x0, y0, x0 + w, y0 + h])
            classes.append(c)
            masks.append(mask)
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.gt_classes = torch.tensor(classes, dtype=torch.long)
        inst.gt_masks = BitMasks(torch.stack(masks) if masks else torch.zeros(0, size, size))
        batch.append(
            {
                "image": (image * 255).to(torch.uint8),
                "instances": inst,
                "sem_seg": sem,
                "height": size,
                "width": size,
            }
        )
    return batch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _logs_reach_caplog() -> None:
    """Detectron2's setup_logger (in default_setup, train_net.py, htc.predict), run in-process by
    an earlier test of the worker, stops its loggers' propagation to the root, where caplog
    reads: which tests' logs were seen depended on the order xdist gave them."""
    for name in ("detectron2", "fvcore", "htc"):
        logging.getLogger(name).propagate = True


# --- train_net.py runs on a small copy of the demo dataset ---------------------------------------

DEMO_CONFIG = CONFIGS / "demo/htc_R_18_FPN_demo.yaml"
SMALL = [
    "MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
    "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",  # an untrained model still predicts something
    "TEST.DETECTIONS_PER_IMAGE", "20",  # every route as with 100, at a fraction of the time
]  # fmt: skip


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A demo dataset of 6 train / 3 val images under its own DETECTRON2_DATASETS."""
    datasets = tmp_path_factory.mktemp("datasets")
    root = datasets / "htc_demo"
    generate_split(root, "train", 6, seed=0)
    generate_split(root, "val", 3, seed=1)
    (root / "VERSION").write_text(VERSION)
    return datasets


def child_env(*first_on_path: Path, **overrides: str) -> dict:
    """Our environment for a child process, with ``first_on_path`` and the repository root put
    before our own PYTHONPATH (the child must import what this process imports)."""
    path = [str(p) for p in (*first_on_path, ROOT)] + [os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p), **overrides)


def train_net_command(*args, config: Path = DEMO_CONFIG) -> list:
    return [sys.executable, str(ROOT / "train_net.py"), "--config-file", str(config), *args]


def run_train_net(workspace, *args, config: Path = DEMO_CONFIG) -> str:
    env = child_env(DETECTRON2_DATASETS=str(workspace))
    command = train_net_command(*args, config=config)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def metrics_entries(output) -> list:
    """The entries (dicts) of ``output``/metrics.json."""
    with open(output / "metrics.json") as f:
        return [json.loads(line) for line in f if line.strip()]


def training_iterations(output) -> list:
    """Iterations of the training entries of ``output``/metrics.json."""
    return [e["iteration"] for e in metrics_entries(output) if "total_loss" in e]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    generate_split(root, "train", num_images=3, seed=3)
    return root


@pytest.fixture
def dataset(clean, tmp_path):
    """A copy of the clean dataset and its json (a dict) to break before loading."""
    root = tmp_path / "data"
    shutil.copytree(clean, root)
    return root, json.loads((root / "train.json").read_text())


def load(root, coco=None):
    if coco is not None:
        (root / "train.json").write_text(json.dumps(coco))
    return load_htc_json(
        str(root / "train.json"), str(root / "train"), "bad", str(root / "train_sem")
    )


def map_all(records):
    cfg = tiny_cfg()
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 6
    mapper = HTCDatasetMapper(cfg, is_train=True, augmentations=[])
    return [mapper(copy.deepcopy(r)) for r in records]


def first_image(root):
    return root / "train" / "00001.png"


def truncate(path):
    path.write_bytes(path.read_bytes()[:400])


class PrintsWhenUnpickled:
    """An object whose unpickling runs code (prints "unpickled!"): what weights_only refuses."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def save_cut_off(obj, f, *args, **kwargs):
    """``torch.save`` stopped by a full disk after half a checkpoint."""
    f.write(b"half a checkpoint")
    raise OSError("no space left on device")


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    generate_split(root, "train", num_images=4, seed=3)
    return root


def train_losses(model, batch, seed=0):
    model.train()
    torch.manual_seed(seed)
    with EventStorage():
        return model(batch)


def dev_parity_module(name: str):
    """A module of dev/parity (the reference environment's tools), loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, ROOT / f"dev/parity/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache
def parity_reference(family: str) -> dict:
    """The reference's record of a parity family (tests/fixtures/htc_parity_<family>.pth), read
    once per process (not to be changed)."""
    fixtures = dev_parity_module("fixtures")
    return fixtures.load_reference(ROOT / f"tests/fixtures/htc_parity_{family}.pth")


def parity_model(family: str, cfg=None):
    """Our model of a parity family (``cfg``, else its yaml), in eval mode, with the reference's
    weights converted by htc.convert_mmdet."""
    from htc.convert_mmdet import convert

    model = build_model(cfg or load_cfg(ROOT / f"tests/fixtures/htc_parity_{family}.yaml")).eval()
    converted, _ = convert(parity_reference(family)["state_dict"])
    incompatible = model.load_state_dict(converted, strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    return model


def pytest_collection_modifyitems(items: list) -> None:
    """The tests marked ``heavy`` (several seconds each) first, in their order: xdist's
    worksteal hands each worker a contiguous half of the list and steals from the ends, so the
    long tests start early and short ones fill both workers' last seconds."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)
