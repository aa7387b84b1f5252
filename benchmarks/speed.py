"""Speed, memory and FLOPs of HTC R-50-FPN next to Detectron2's Cascade Mask R-CNN R-50-FPN.

    .venv/bin/python benchmarks/speed.py [--device cpu|cuda] [--threads 2] [--repeats 5]
        [--precisions fp32,tf32,fp16,bf16] [--batches 2,8] [--only gpu|latency]

Per input size, one process times the models in turns (a drift of the machine's speed hits all
alike); peak memory is measured in a fresh process per model. Both models have random weights
with BN and their box regression layers (RPN and every stage) zeroed: proposals are anchors of
every level and the stages keep them, so both do RoI work on the same kind of boxes; the score
threshold is 0.001 and TEST.DETECTIONS_PER_IMAGE fixes the number of detections (100 unless
stated), so the mask heads do full work. Latency is the median of ``--repeats`` runs after a
warm-up.

FLOPs are fvcore's ``FlopCountAnalysis`` of the inference (one multiply-add counts as one flop;
RoIAlign, NMS and element-wise ops are not counted). A component's time comes from forward
hooks (perf_counter, CUDA-synchronised on GPU) in separate runs. The dense-conv figure is this
machine's throughput on a 3x3 conv of 256 channels at stride 8 of the same input.

The precision rows time inference (1 image) and train steps (``--batches`` images) at the first
size in fp32, TF32 (FLOAT32_PRECISION "high"), and fp16/bf16 autocast (fp16 with a GradScaler),
and say how far TF32 moves the outputs. The counts rows profile one train step: host syncs
(``aten::item``, ``aten::nonzero``, ``aten::_local_scalar_dense``; on CUDA also
``cudaStreamSynchronize``) and kernel launches. The determinism rows run the same train step
twice from the same seed and compare every gradient bit for bit, for HTC with each RoIAlign
kernel (deterministic algorithms requested, warn-only, so the ops that have none are named).
``--only gpu`` runs just these rows, ``--only latency`` all but these.
"""

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List
from unittest import mock

import torch
from common import PARTS, batch, cascade_cfg, htc_cfg, train_step
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

VARIANTS = {
    "cascade": "Cascade Mask R-CNN R50-FPN (Detectron2)",
    "htc": "HTC R50-FPN (htc_R_50_FPN_1x)",
    "htc_instances": "HTC R50-FPN, instances only (MODEL.HTC.SEMANTIC_OUTPUT False)",
}
# component -> module names (prefix match) of the model; "other" is the rest of the latency
COMPONENTS = {
    "backbone + FPN": ["backbone"],
    "RPN": ["proposal_generator"],
    "semantic head": ["semantic_head"],
    "box RoIAlign (3 stages)": ["roi_heads.box_pooler"],
    "semantic RoIAlign for boxes": ["roi_heads._semantic_box_rois"],
    "box heads (3 stages)": ["roi_heads.box_head.", "roi_heads.box_predictor."],
    "mask RoIAlign (+ semantic)": ["roi_heads.mask_pooler", "roi_heads.semantic_pooler"],
    "mask heads": ["roi_heads.mask_head."],
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# models of the precision and region rows: HTC also with torchvision's RoIAlign in every pooler
TRAIN_MODELS = {"cascade": "auto", "htc": "auto", "htc_tv": "torchvision"}


def build(name: str, device: str, detections: int, roi_align: str = "auto"):
    """``name`` "cascade" or "htc" ("htc_tv": HTC with MODEL.HTC.ROI_ALIGN "torchvision")."""
    if name == "htc_tv":
        name, roi_align = "htc", "torchvision"
    cfg = cascade_cfg() if name == "cascade" else htc_cfg("htc_R_50_FPN_1x.yaml")
    cfg.MODEL.DEVICE = device
    cfg.MODEL.HTC.ROI_ALIGN = roi_align
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.001
    cfg.TEST.DETECTIONS_PER_IMAGE = detections
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for layer in [model.proposal_generator.rpn_head.anchor_deltas] + [
            p.bbox_pred for p in model.roi_heads.box_predictor
        ]:
            layer.weight.zero_()
            layer.bias.zero_()
    return model


def test_input(height: int, width: int, device: str) -> List[dict]:
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 255, (3, height, width), generator=g, dtype=torch.uint8)
    return [{"image": image.to(device), "height": height, "width": width}]


def timed(fn: Callable, repeats: int, device: str) -> List[float]:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) / 1024


def peak_memory_mb(fn: Callable, device: str) -> float:
    """Memory that one call of ``fn`` adds at its peak over what the process held before
    (CPU: the resident set's high-water mark, reset before the call; CUDA: allocated
    tensors)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark back to the current resident set
    before = _status_mb("VmRSS")
    fn()
    return _status_mb("VmHWM") - before


def fresh_process_peak_mb(script: str, *argv: str) -> float:
    """The ``peak_mb`` that ``script`` prints (a JSON line, its last) when run with ``argv`` in a
    fresh process whose allocator returns every block of 64 KiB or more to the system at once
    (MALLOC_MMAP_THRESHOLD_), so that the CPU high-water mark is the measured call's alone."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, script, *argv]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])["peak_mb"]


def outermost_component(name: str) -> str:
    """The component of module ``name`` if its parent module belongs to none."""
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return "" if component_of(parent) else component_of(name)


def component_of(name: str) -> str:
    for component, prefixes in COMPONENTS.items():
        if any(name == p or (p.endswith(".") and name.startswith(p)) for p in prefixes):
            return component
    return ""


def hook_components(model, device: str, spent: Dict[str, float]) -> Callable[[], None]:
    """Add each component's forward time to ``spent`` (modules by hooks, HTC's mask heads
    too; the semantic box pooling, which runs as a method, ``_semantic_box_rois``, by wrapping
    it); returns the function that removes them."""
    starts, handles, wrapped = {}, [], []

    def before(name):
        def hook(*_):
            sync(device)
            starts[name] = time.perf_counter()

        return hook

    def after(name, component):
        def hook(*_):
            sync(device)
            spent[component] += time.perf_counter() - starts[name]

        return hook

    def wrap(owner, method_name: str, name: str, component: str) -> None:
        method = getattr(owner, method_name)

        def timed(*args, **kwargs):
            before(name)()
            out = method(*args, **kwargs)
            after(name, component)()
            return out

        setattr(owner, method_name, timed)
        wrapped.append((owner, method_name))

    for name, module in model.named_modules():
        component = outermost_component(name)
        if component:
            handles.append(module.register_forward_pre_hook(before(name)))
            handles.append(module.register_forward_hook(after(name, component)))
    if hasattr(model.roi_heads, "_semantic_box_rois"):
        name = "roi_heads._semantic_box_rois"
        wrap(model.roi_heads, "_semantic_box_rois", name, component_of(name))

    def remove():
        for handle in handles:
            handle.remove()
        for owner, method_name in wrapped:
            owner.__dict__.pop(method_name)

    return remove


class _Flat(torch.nn.Module):
    """The model on one image tensor, returning tensors (what fvcore's tracer needs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        out = self.model([{"image": image, "height": image.shape[1], "width": image.shape[2]}])
        inst = out[0]["instances"]
        extra = (out[0]["sem_seg"],) if "sem_seg" in out[0] else ()
        return (inst.pred_boxes.tensor, inst.scores, inst.pred_masks, *extra)


def flops_by_component(model, image: torch.Tensor) -> Dict[str, float]:
    from fvcore.nn import FlopCountAnalysis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(_Flat(model), (image,))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        total, by_module = analysis.total(), analysis.by_module()
    flops = defaultdict(float)
    for name, count in by_module.items():
        component = outermost_component(name.removeprefix("model."))
        if component:
            flops[component] += count
    flops["total"] = total
    return dict(flops)


def variant(name: str, device: str):
    """A model of :data:`VARIANTS` (100 detections)."""
    model = build("cascade" if name == "cascade" else "htc", device, 100)
    model.semantic_output = name == "htc"
    return model


def set_detections(model, count: int) -> None:
    for predictor in model.roi_heads.box_predictor:
        predictor.test_topk_per_image = count


def alternate(fns: Dict[str, Callable], repeats: int, device: str) -> Dict[str, List[float]]:
    """Times of ``repeats`` runs of each function, taken in turns (after one warm-up each), so
    that drifts of the machine's speed affect all alike."""
    for fn in fns.values():
        fn()
    times = defaultdict(list)
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name] += timed(fn, 1, device)
    return dict(times)


def inference_job(job: dict) -> dict:
    """Latency of every variant at one input size, taken in turns; per-component times and
    FLOPs; latency against the number of detections."""
    device, repeats = job["device"], job["repeats"]
    models = {name: variant(name, device).eval() for name in VARIANTS}
    inputs = test_input(job["height"], job["width"], device)
    detections = {}

    def infer(name):
        def run():
            with torch.no_grad():
                detections[name] = len(models[name](inputs)[0]["instances"])

        return run

    result = {"times": alternate({n: infer(n) for n in models}, repeats, device)}
    result["detections"] = dict(detections)
    spent = {name: defaultdict(float) for name in models}
    unhook = [hook_components(model, device, spent[name]) for name, model in models.items()]
    runs = defaultdict(list)
    for _ in range(repeats):
        for name in models:
            spent[name].clear()
            total = timed(infer(name), 1, device)[0]
            runs[name].append(dict(spent[name], total=total))
    for remove in unhook:
        remove()
    result["components"] = {
        name: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in set().union(*rs)}
        for name, rs in runs.items()
    }
    with torch.no_grad():
        result["flops"] = {
            name: flops_by_component(model, inputs[0]["image"]) for name, model in models.items()
        }
    scaling = {}
    for count in job["detections"]:
        for model in models.values():
            set_detections(model, count)
        times = alternate({n: infer(n) for n in ("cascade", "htc")}, repeats, device)
        scaling[str(count)] = {"times": times, "detections": dict(detections)}
    result["scaling"] = scaling
    return result


def train_job(job: dict) -> dict:
    """Training-step time of both models at one size, 2 images, taken in turns."""
    device = job["device"]
    models = {name: build(name, device, 100) for name in ("cascade", "htc")}
    inputs = {
        name: [_to(x, device) for x in batch(2, job["height"], name == "htc")] for name in models
    }
    fns = {name: (lambda n=name: train_step(models[n], inputs[n])) for name in models}
    return {"times": alternate(fns, job["repeats"], device)}


def _to(x: dict, device: str) -> dict:
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in x.items()}


def memory_job(job: dict) -> dict:
    """Peak memory of one variant, inference (1 image) or training step (2 images)."""
    device, name = job["device"], job["variant"]
    if job["mode"] == "train":
        model = build(name, device, 100)
        inputs = [_to(x, device) for x in batch(2, job["height"], name == "htc")]
        return {"peak": peak_memory_mb(lambda: train_step(model, inputs), device)}
    model = variant(name, device).eval()
    inputs = test_input(job["height"], job["width"], device)

    def infer():
        with torch.no_grad():
            model(inputs)

    infer()  # lazily built state (anchors, thread pools) is not the model's working memory
    return {"peak": peak_memory_mb(infer, device)}


PRECISIONS = {"fp32": None, "tf32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
SYNC_EVENTS = ("aten::item", "aten::nonzero", "aten::_local_scalar_dense", "cudaStreamSynchronize")
COPY_EVENTS = ("cudaMemcpyAsync", "cudaMemcpy")
LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def set_precision(precision: str) -> None:
    """fp32 matmuls and convs strict, or TF32 ("tf32"); autocast is applied by the caller."""
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    torch.backends.cudnn.allow_tf32 = precision == "tf32"


def autocast(device: str, precision: str):
    dtype = PRECISIONS[precision]
    return torch.autocast(device, dtype=dtype, enabled=dtype is not None)


def amp_train_step(model, inputs, device: str, precision: str, scaler) -> None:
    """:func:`train_step` in ``precision``: under autocast, the loss scaled for fp16."""
    set_precision(precision)
    model.train()
    with EventStorage(), autocast(device, precision):
        losses = model(inputs)
    model.zero_grad()
    loss = sum(losses.values())
    (scaler.scale(loss) if precision == "fp16" else loss).backward()


def amp_trainer(model, inputs, device: str, precision: str, scaler) -> Callable[[], None]:
    return lambda: amp_train_step(model, inputs, device, precision, scaler)


def amp_inferrer(model, image, device: str, precision: str) -> Callable[[], None]:
    def run():
        set_precision(precision)
        model.eval()
        with torch.no_grad(), autocast(device, precision):
            model(image)

    return run


def train_inputs(name: str, device: str, height: int, images: int, boxes: int = 4) -> List[dict]:
    return [_to(x, device) for x in batch(images, height, name.startswith("htc"), boxes)]


def precision_job(job: dict) -> dict:
    """Per precision: inference latency (1 image) and train-step time (each batch size and
    boxes per image) of the :data:`TRAIN_MODELS`, per measure all precisions and models taken in
    turns; the outputs' change under TF32. Every run is made once before any is timed (cuDNN's
    and Triton's kernels, the allocator's pools), so that the first timed does not carry the
    warm-up."""
    device, repeats = job["device"], job["repeats"]
    models = {name: build(name, device, 100) for name in TRAIN_MODELS}
    image = test_input(job["height"], job["width"], device)
    inputs = {
        (name, images, boxes): train_inputs(name, device, job["height"], images, boxes)
        for name in models
        for images in job["batches"]
        for boxes in job["boxes"]
    }
    scaler = torch.amp.GradScaler(device)
    runs = {}
    for precision in job["precisions"]:
        runs[precision] = {"infer": {n: amp_inferrer(m, image, device, precision)
                                     for n, m in models.items()}}  # fmt: skip
        for images in job["batches"]:
            for boxes in job["boxes"]:
                runs[precision][f"train {images}x{boxes}"] = {
                    n: amp_trainer(m, inputs[n, images, boxes], device, precision, scaler)
                    for n, m in models.items()
                }
    for measures in runs.values():
        for fns in measures.values():
            for fn in fns.values():
                fn()
    result = {precision: {} for precision in runs}
    for measure in next(iter(runs.values())):  # precisions and models in turns, per measure
        fns = {(p, n): fn for p in runs for n, fn in runs[p][measure].items()}
        for (precision, name), times in alternate(fns, repeats, device).items():
            result[precision].setdefault(measure, {})[name] = times
    result["peak MB"] = {
        measure: {name: peak_memory_mb(fn, device) for name, fn in fns.items()}
        for measure, fns in runs[job["precisions"][0]].items()
        if measure.startswith("train")
    }
    result["tf32 change"] = tf32_change(models["htc"], image)
    set_precision("fp32")
    return result


def tf32_change(model, image: List[dict]) -> dict:
    """How far TF32 moves HTC's outputs from fp32: max |difference| of boxes (px), scores and
    semantic scores, when both give the same detections in the same order."""
    outputs = {}
    for precision in ("fp32", "tf32"):
        set_precision(precision)
        model.eval()
        with torch.no_grad():
            outputs[precision] = model(image)[0]
    a, b = outputs["fp32"], outputs["tf32"]
    ia, ib = a["instances"], b["instances"]
    same = len(ia) == len(ib) and torch.equal(ia.pred_classes, ib.pred_classes)
    diff = {"same detections": bool(same)}
    if same:
        diff["boxes"] = (ia.pred_boxes.tensor - ib.pred_boxes.tensor).abs().max().item()
        diff["scores"] = (ia.scores - ib.scores).abs().max().item()
    diff["sem_seg"] = (a["sem_seg"] - b["sem_seg"]).abs().max().item()
    return diff


def counts_job(job: dict) -> dict:
    """Host syncs and kernel launches of one train step (after a warm-up) of each model, and the
    ops with the most self time in it (device time on CUDA, CPU time else), in ms."""
    from torch.profiler import ProfilerActivity, profile

    device = job["device"]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    result = {"counts": {}, "ops": {}}
    for name in ("cascade", "htc"):
        model = build(name, device, 100)
        inputs = train_inputs(name, device, job["height"], 2)
        train_step(model, inputs)
        sync(device)
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            train_step(model, inputs)
            sync(device)
        wall = time.perf_counter() - start
        counts = defaultdict(int)
        for event in prof.events():
            if event.name in SYNC_EVENTS:
                counts[event.name] += 1
            elif event.name in LAUNCH_EVENTS:
                counts["kernel launches"] += 1
            elif event.name in COPY_EVENTS:  # a copy from pageable host memory also syncs
                counts[event.name] += 1
        # busy against wall: how far the step is bound by the host (launches, syncs, Python)
        counts["step under the profiler (ms)"] = round(wall * 1000, 1)
        busy = "device busy" if device == "cuda" else "CPU time in ops"
        counts[f"{busy} (ms)"] = round(busy_ms(prof, device), 1)
        result["counts"][name] = dict(counts)
        result["ops"][name] = self_times(prof, device)
    return result


def busy_ms(prof, device: str) -> float:
    """The time of all of ``prof``'s kernels on CUDA (its device events, annotations aside, as
    the profiler's own total counts them), else of all its ops on CPU, in ms."""
    if device != "cuda":
        return sum(e.self_cpu_time_total for e in prof.key_averages()) / 1000
    kernels = [
        e for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and not getattr(e, "is_user_annotation", False)
    ]  # fmt: skip
    return sum(e.self_device_time_total for e in kernels) / 1000


def self_times(prof, device: str, count: int = 20) -> Dict[str, float]:
    """The ``count`` ops of ``prof`` with the most self time (device time on CUDA), in ms."""
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    ops = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    return {op.key: getattr(op, key) / 1000 for op in ops[:count]}


def determinism_job(job: dict) -> dict:
    """Whether two identical train steps give bit-identical gradients, per RoIAlign kernel of
    HTC; the ops that warned of having no deterministic implementation."""
    device = job["device"]
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    result = {}
    for kernel in ("torchvision", "auto"):  # the last one is timed below
        grads = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                model = build("htc", device, 100, roi_align=kernel)
                inputs = train_inputs("htc", device, job["height"], 2)
                torch.manual_seed(1)
                train_step(model, inputs)
                grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                              if p.grad is not None})  # fmt: skip
        differ = [n for n in grads[0] if not torch.equal(grads[0][n], grads[1][n])]
        nondeterministic = sorted(
            {str(w.message).split(" does not have a deterministic")[0] for w in caught
             if "deterministic" in str(w.message)}
        )  # fmt: skip
        result[kernel] = {
            "parameters": len(grads[0]),
            "differing": len(differ),
            "first differing": differ[:3],
            "ops without a deterministic implementation": nondeterministic,
        }
    result["cost"] = determinism_cost(model, inputs, device, job["repeats"])
    return result


def determinism_cost(model, inputs, device: str, repeats: int) -> dict:
    """Median seconds and peak memory (MB, CUDA) of the train step with deterministic algorithms
    and without, in turns."""

    def step(deterministic: bool) -> Callable[[], None]:
        def run():
            torch.use_deterministic_algorithms(deterministic, warn_only=True)
            torch.backends.cudnn.deterministic = deterministic
            train_step(model, inputs)

        return run

    fns = {"deterministic": step(True), "default": step(False)}
    out = {"seconds": medians(alternate(fns, repeats, device))}
    if device == "cuda":
        out["peak MB"] = {name: peak_memory_mb(fn, device) for name, fn in fns.items()}
    return out


# the region table's parts beyond dispatch_counts' (the layers that PARTS leaves to "the rest")
STEP_PARTS = {
    **PARTS,
    "backbone + FPN": [("fpn.py", "forward")],
    "semantic branch (head, targets, loss)": [
        ("semantic_head.py", "forward"),
        ("semantic_head.py", "losses"),
        ("meta_arch.py", "_semantic_targets"),
    ],
    "box heads' layers": [("box_head.py", "forward"), ("fast_rcnn.py", "forward")],
    "mask heads' layers": [
        ("mask_head.py", "layers"),
        ("mask_head.py", "conv_features"),
        ("mask_head.py", "predict"),
    ],
}


class PartClock:
    """Wall time of each part of a step, the device synchronised at every boundary; a part's
    time excludes the parts called within it, and time outside every part goes to "rest"."""

    def __init__(self, device: str):
        self.device, self.spent, self.stack = device, defaultdict(float), []
        self.mark = time.perf_counter()

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        self.switch()
        self.stack.append(name)
        try:
            yield
        finally:
            self.switch()
            self.stack.pop()

    def switch(self) -> None:
        """Adds the time since the last switch to the current part."""
        sync(self.device)
        now = time.perf_counter()
        self.spent[self.stack[-1] if self.stack else "rest"] += now - self.mark
        self.mark = now


def clocked_parts(clock: PartClock, patches: ExitStack) -> None:
    """Wraps every function of :data:`STEP_PARTS` (module functions, also where another module
    imported them by name, and methods of the loaded Detectron2 and HTC modules, by file and
    name) in ``clock.part``, undone by ``patches``."""
    parts = {pair: part for part, pairs in STEP_PARTS.items() for pair in pairs}
    modules = [
        m
        for name, m in list(sys.modules.items())
        if name.startswith(("detectron2.modeling", "htc")) and getattr(m, "__file__", "")
    ]
    functions = {}  # id of a module function -> its wrapped version

    def wrapped(fn, part):
        def run(*args, **kwargs):
            with clock.part(part):
                return fn(*args, **kwargs)

        return run

    for module in modules:
        file = module.__file__.rsplit("/", 1)[-1]
        classes = [
            c
            for c in vars(module).values()
            if isinstance(c, type) and c.__module__ == module.__name__
        ]
        for owner in [module, *classes]:
            for attr, value in list(vars(owner).items()):
                part = parts.get((file, attr))
                if part is None or (
                    owner is module and getattr(value, "__module__", "") != module.__name__
                ):
                    continue
                if isinstance(value, (staticmethod, classmethod)):
                    new = type(value)(wrapped(value.__func__, part))
                else:
                    new = wrapped(value, part)
                    if owner is module:
                        functions[id(value)] = new
                patches.enter_context(mock.patch.object(owner, attr, new))
    for module in modules:
        for attr, value in list(vars(module).items()):
            if id(value) in functions:
                patches.enter_context(mock.patch.object(module, attr, functions[id(value)]))


def clocked_train_step(model, inputs, clock: PartClock) -> None:
    """:func:`train_step` with its backward as the part "backward" of ``clock``."""
    train_step(model, inputs, lambda: clock.part("backward"))
    clock.switch()


def regions_job(job: dict) -> dict:
    """With PyTorch's default precision settings, per model of :data:`TRAIN_MODELS`: the time
    of a train step of 2 images per boxes per image, and of inference (1 image, 100
    detections), all in turns; then the median time of each part of the train steps
    (:class:`PartClock`; the backward is one part)."""
    device, repeats = job["device"], job["repeats"]
    models = {name: build(name, device, 100) for name in TRAIN_MODELS}
    inputs = {
        (name, boxes): train_inputs(name, device, job["height"], 2, boxes)
        for name in models
        for boxes in job["boxes"]
    }
    image = test_input(job["height"], job["width"], device)

    def infer(model):
        def run():
            model.eval()
            with torch.no_grad():
                model(image)

        return run

    steps = {
        f"{n} {b}": functools.partial(train_step, models[n], x) for (n, b), x in inputs.items()
    }
    result = {"step": medians(alternate(steps, repeats, device))}
    result["infer"] = medians(alternate({n: infer(m) for n, m in models.items()}, repeats, device))
    result["parts"] = {}
    for (name, boxes), x in inputs.items():
        clock, runs = PartClock(device), []
        with ExitStack() as patches:
            clocked_parts(clock, patches)
            clocked_train_step(models[name], x, clock)
            for _ in range(repeats):
                clock.spent.clear()
                sync(device)
                clock.mark = time.perf_counter()
                clocked_train_step(models[name], x, clock)
                runs.append(dict(clock.spent))
        parts = set().union(*runs)
        result["parts"][f"{name} {boxes}"] = {
            p: statistics.median(r.get(p, 0.0) for r in runs) for p in parts
        }
    return result


JOBS = {
    "inference": inference_job,
    "train": train_job,
    "memory": memory_job,
    "precision": precision_job,
    "counts": counts_job,
    "regions": regions_job,
    "determinism": determinism_job,
}


def run_job(job: dict) -> dict:
    """``JOBS[job["kind"]](job)`` in a fresh Python process."""
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8")  # deterministic cuBLAS, if asked
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{job}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def dense_conv_gflops(height: int, width: int, device: str, repeats: int) -> float:
    """GFLOP/s (multiply-adds) of a 3x3 conv 256->256 on the stride-8 map of the input."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(device)
    x = torch.randn(1, 256, height // 8, width // 8, device=device)
    with torch.no_grad():
        conv(x)
        seconds = statistics.median(timed(lambda: conv(x), repeats, device))
    return 256 * 256 * 9 * x.shape[2] * x.shape[3] / seconds / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="800x1333,320x320", help="inference sizes HxW")
    parser.add_argument("--train-sizes", default="320,800", help="square, 2 images")
    parser.add_argument("--detections", default="10,50,100", help="scaling at the first size")
    parser.add_argument("--precisions", default="fp32,tf32,fp16,bf16", help="of the precision rows")
    parser.add_argument("--batches", default="2,8", help="images per train step, precision rows")
    parser.add_argument(
        "--boxes",
        default="4,20",
        help="ground-truth boxes per image of the train batches (GPU rows)",
    )
    parser.add_argument(
        "--determinism-size", type=int, default=800,
        help="square images of the determinism rows",
    )  # fmt: skip
    parser.add_argument("--only", choices=["gpu", "latency"], help="one of the two parts")
    parser.add_argument(
        "--parts", default="precision,counts,regions,determinism", help="of the GPU rows"
    )
    parser.add_argument("--json", help="also write all results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(JOBS[job["kind"]](job)))
        return
    common = dict(device=args.device, threads=args.threads, repeats=args.repeats)
    results = {"args": vars(args), "inference": {}, "train": {}, "conv": {}, "memory": {}}
    results["machine"] = machine(args.device)
    print(f"machine: {json.dumps(results['machine'])}", file=sys.stderr)
    if args.only != "latency":
        results.update(gpu_rows(args, common))
    if args.only != "gpu":
        latency_rows(args, common, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    report(results)


def gpu_rows(args, common: dict) -> dict:
    """The ``--parts`` of the GPU rows: precision, counts and regions at the first inference
    size; determinism at --determinism-size."""
    height, width = (int(v) for v in args.sizes.split(",")[0].split("x"))
    size = dict(common, height=height, width=width)
    precisions = args.precisions.split(",")
    batches = [int(v) for v in args.batches.split(",")]
    boxes = [int(v) for v in args.boxes.split(",")]
    small = args.determinism_size
    jobs = {
        "precision": dict(
            size, kind="precision", precisions=precisions, batches=batches, boxes=boxes
        ),
        "counts": dict(size, kind="counts"),
        "regions": dict(size, kind="regions", boxes=boxes),
        "determinism": dict(common, kind="determinism", height=small, width=small),
    }
    out = {}
    for name, job in jobs.items():
        if name not in args.parts.split(","):
            continue
        try:
            out[name] = run_job(job)
        except RuntimeError as error:  # reported in its place; the other parts still run
            out[name] = {"error": str(error)[-2000:]}
        print(f"{name}: {json.dumps(out[name])}", file=sys.stderr)
    return out


def machine(device: str) -> dict:
    """What the figures were measured on: versions, and on CUDA the GPU's name, driver, clocks
    (current and maximum, MHz), power limit and temperature from nvidia-smi."""
    out = {"torch": torch.__version__, "cpu threads": torch.get_num_threads()}
    if device != "cuda":
        return out
    out["gpu"] = torch.cuda.get_device_name()
    out["cuda"] = torch.version.cuda
    fields = (
        "driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,"
        "temperature.gpu"
    )
    try:
        query = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        out.update(zip(fields.split(","), query.stdout.strip().split(", ")))
    except (OSError, subprocess.SubprocessError) as error:
        out["nvidia-smi"] = str(error)
    return out


def latency_rows(args, common: dict, results: dict) -> None:
    counts = [int(v) for v in args.detections.split(",")]
    for i, text in enumerate(args.sizes.split(",")):
        height, width = (int(v) for v in text.split("x"))
        size = dict(common, height=height, width=width)
        results["conv"][text] = dense_conv_gflops(height, width, args.device, args.repeats)
        job = dict(size, kind="inference", detections=counts if i == 0 else [])
        results["inference"][text] = run_job(job)
        results["memory"][text] = {
            name: run_job(dict(size, kind="memory", mode="infer", variant=name))["peak"]
            for name in VARIANTS
        }
        done = {k: results[k][text] for k in ("conv", "inference", "memory")}
        print(f"inference {text}: {json.dumps(done)}", file=sys.stderr)  # kept if cut short
    for text in args.train_sizes.split(","):
        size = dict(common, height=int(text), width=int(text))
        results["train"][text] = run_job(dict(size, kind="train"))
        results["memory"][f"train {text}"] = {
            name: run_job(dict(size, kind="memory", mode="train", variant=name))["peak"]
            for name in ("cascade", "htc")
        }
        done = {"train": results["train"][text], "memory": results["memory"][f"train {text}"]}
        print(f"train {text}: {json.dumps(done)}", file=sys.stderr)


def medians(times: Dict[str, List[float]]) -> Dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def report(results: dict) -> None:
    args = results["args"]
    print(f"device {args['device']}, {args['threads']} threads, median of {args['repeats']}")
    print(f"machine: {results.get('machine')}")
    if args["only"] != "latency":
        report_gpu_rows(results)
    if results["inference"]:
        report_latency(results)


def report_gpu_rows(results: dict) -> None:
    for part, reporter in (("precision", report_precision), ("counts", report_counts),
                           ("regions", report_regions),
                           ("determinism", report_determinism)):  # fmt: skip
        if part not in results:
            continue
        if "error" in results[part]:
            print(f"\n{part} rows failed:\n{results[part]['error']}")
        else:
            reporter(results)


def report_precision(results: dict) -> None:
    size = results["args"]["sizes"].split(",")[0]
    print(
        f"\nPrecision at {size} (train steps: square {size.split('x')[0]} images; "
        "'train NxB': N images of B ground-truth boxes)\n"
    )
    runs = {k: v for k, v in results["precision"].items() if k in PRECISIONS}
    names = list(next(iter(next(iter(runs.values())).values())))
    peaks = results["precision"]["peak MB"]
    heads = " | ".join(f"{n} (ms)" for n in names)
    ratios = " | ".join(f"{n} / cascade" for n in names if n != "cascade")
    print(f"| precision | measure | {heads} | {ratios} | HTC vs its fp32 |")
    print("|---|---|" + "---|" * (2 * len(names)))
    for precision, measures in runs.items():
        for measure, times in measures.items():
            t = medians(times)
            base = medians(runs["fp32"][measure])["htc"] if "fp32" in runs else float("nan")
            cells = [f"{t[n] * 1e3:.1f}" for n in names]
            cells += [f"{t[n] / t['cascade']:.2f}" for n in names if n != "cascade"]
            print(
                f"| {precision} | {measure} | " + " | ".join(cells) + f" | {base / t['htc']:.2f}x |"
            )
    first = next(iter(runs))
    print(f"\nPeak memory of a train step in {first} (MB over the model and its inputs)\n")
    print("| measure | " + " | ".join(names) + " | htc / cascade |")
    print("|---|" + "---|" * (len(names) + 1))
    for measure, peak in peaks.items():
        cells = " | ".join(f"{peak[n]:.0f}" for n in names)
        print(f"| {measure} | {cells} | {peak['htc'] / peak['cascade']:.2f} |")
    print(f"\nTF32 against fp32, HTC outputs: {results['precision']['tf32 change']}")


def report_counts(results: dict) -> None:
    print("\nOne train step (2 images): host syncs, kernel launches, busy time against wall time\n")
    counts = results["counts"]["counts"]
    names = sorted(set().union(*(c.keys() for c in counts.values())))
    print("| event | " + " | ".join(counts) + " |")
    print("|---|" + "---|" * len(counts))
    for name in names:
        row = [str(c.get(name, 0)) for c in counts.values()]
        print(f"| {name} | " + " | ".join(row) + " |")
    print("\nThe same step: ops with the most self time (device time on CUDA), ms\n")
    ops = results["counts"]["ops"]
    names = sorted(set().union(*ops.values()), key=lambda n: -ops["htc"].get(n, 0.0))
    print("| op | " + " | ".join(ops) + " |")
    print("|---|" + "---|" * len(ops))
    for name in names:
        row = [f"{t.get(name, float('nan')):.2f}" for t in ops.values()]
        print(f"| `{name[:80]}` | " + " | ".join(row) + " |")


def report_regions(results: dict) -> None:
    size = results["args"]["sizes"].split(",")[0]
    regions = results["regions"]
    print(f"\nPyTorch's default precision settings, {size} (train steps: square images), ms\n")
    print("| measure | " + " | ".join(regions["infer"]) + " |")
    print("|---|" + "---|" * len(regions["infer"]))
    cells = " | ".join(f"{t * 1e3:.1f}" for t in regions["infer"].values())
    print(f"| inference, 1 image | {cells} |")
    for boxes in sorted({int(k.split()[1]) for k in regions["step"]}):
        cells = " | ".join(f"{regions['step'][f'{n} {boxes}'] * 1e3:.1f}" for n in regions["infer"])
        print(f"| train step, 2 images x {boxes} boxes | {cells} |")
    runs = regions["parts"]
    print(
        "\nWhere a train step goes (2 images; 'model B': B ground-truth boxes per image): "
        "median ms per part, synchronised at each part's bounds\n"
    )
    first = next(iter(runs.values()))
    parts = sorted(set().union(*runs.values()), key=lambda p: -first.get(p, 0.0))
    print("| part | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for part in parts:
        cells = " | ".join(f"{r.get(part, 0.0) * 1e3:.1f}" for r in runs.values())
        print(f"| {part} | {cells} |")
    sums = " | ".join(f"{sum(r.values()) * 1e3:.1f}" for r in runs.values())
    print(f"| sum of the parts | {sums} |")


def report_determinism(results: dict) -> None:
    print("\nTwo identical HTC train steps: gradients that differ\n")
    print("| RoIAlign kernel | parameters | differing | ops without a deterministic version |")
    print("|---|---|---|---|")
    runs = {k: v for k, v in results["determinism"].items() if k != "cost"}
    for kernel, r in runs.items():
        ops = "; ".join(r["ops without a deterministic implementation"]) or "none"
        print(f"| {kernel} | {r['parameters']} | {r['differing']} | {ops} |")
    cost = results["determinism"]["cost"]
    seconds = cost["seconds"]
    ratio = seconds["deterministic"] / seconds["default"]
    print(
        f"\nThe step (HTC, last kernel above) deterministic {seconds['deterministic']:.3f} s, "
        f"default {seconds['default']:.3f} s ({ratio:.2f}x); "
        f"peak MB {cost.get('peak MB', 'not measured')}"
    )


def report_latency(results: dict) -> None:
    print(
        "\n| input | model | GFLOPs | latency (s) | latency ratio | FLOP ratio | latency ratio "
        "/ FLOP ratio | peak memory (MB) | memory ratio | detections |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, r in results["inference"].items():
        latency, flops, memory = medians(r["times"]), r["flops"], results["memory"][key]
        for name, title in VARIANTS.items():
            lat = latency[name] / latency["cascade"]
            flop = flops[name]["total"] / flops["cascade"]["total"]
            print(
                f"| {key} | {title} | {flops[name]['total'] / 1e9:.1f} | {latency[name]:.3f} "
                f"| {lat:.2f} | {flop:.2f} | {lat / flop:.2f} | {memory[name]:.0f} "
                f"| {memory[name] / memory['cascade']:.2f} | {r['detections'][name]} |"
            )
    for key, r in results["inference"].items():
        report_components(key, r, results["conv"][key])
    key, r = next(iter(results["inference"].items()))
    print(f"\nLatency (s) against the number of detections at {key}\n")
    print("| detections | Cascade | HTC | ratio |")
    print("|---|---|---|---|")
    for count, run in r["scaling"].items():
        t = medians(run["times"])
        print(
            f"| {count} ({run['detections']['htc']}) | {t['cascade']:.3f} | {t['htc']:.3f} "
            f"| {t['htc'] / t['cascade']:.2f} |"
        )
    print("\nTraining step (2 images, forward + backward)\n")
    print("| input | model | step (s) | ratio | peak memory (MB) | memory ratio |")
    print("|---|---|---|---|---|---|")
    for key, r in results["train"].items():
        t, memory = medians(r["times"]), results["memory"][f"train {key}"]
        for name in t:
            print(
                f"| {key}x{key} | {VARIANTS[name]} | {t[name]:.2f} | "
                f"{t[name] / t['cascade']:.2f} | {memory[name]:.0f} | "
                f"{memory[name] / memory['cascade']:.2f} |"
            )


def report_components(key: str, r: dict, conv: float) -> None:
    print(
        f"\nComponents at {key}: GFLOPs, ms, achieved GFLOP/s (dense 3x3 conv of 256 channels "
        f"at stride 8 on this machine: {conv:.1f} GFLOP/s)\n"
    )
    print("| component | Cascade GFLOPs | ms | GFLOP/s | HTC GFLOPs | ms | GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for component in [*COMPONENTS, "other", "total"]:
        cells = []
        for name in ("cascade", "htc"):
            spent, flops = r["components"][name], r["flops"][name]
            if component == "other":
                seconds = spent["total"] - sum(spent.get(c, 0.0) for c in COMPONENTS)
                count = flops["total"] - sum(flops.get(c, 0.0) for c in COMPONENTS)
            else:
                seconds, count = spent.get(component, 0.0), flops.get(component, 0.0)
            rate = f"{count / seconds / 1e9:.1f}" if count > 1e6 and seconds > 0 else "-"
            cells += [f"{count / 1e9:.2f}", f"{seconds * 1e3:.0f}", rate]
        print(f"| {component} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
