"""Speed, memory and FLOPs of HTC R-50-FPN next to Detectron2's Cascade Mask R-CNN R-50-FPN.

    .venv/bin/python benchmarks/speed.py [--device cpu|cuda] [--threads 2] [--repeats 5]

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
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List

import torch
from common import batch, cascade_cfg, htc_cfg, train_step
from detectron2.modeling import build_model

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


def build(name: str, device: str, detections: int):
    cfg = cascade_cfg() if name == "cascade" else htc_cfg("htc_R_50_FPN_1x.yaml")
    cfg.MODEL.DEVICE = device
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


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_memory_mb(fn: Callable, device: str) -> float:
    """Memory that one call of ``fn`` adds at its peak over what the process held before
    (CPU: resident set high-water mark; CUDA: allocated tensors)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = current_rss_mb()
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before


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
    """Add each component's forward time to ``spent`` (modules by hooks, the semantic box
    pooling, which is a method, by wrapping it); returns the function that removes them."""
    starts, handles = {}, []

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

    for name, module in model.named_modules():
        component = outermost_component(name)
        if component:
            handles.append(module.register_forward_pre_hook(before(name)))
            handles.append(module.register_forward_hook(after(name, component)))
    heads = model.roi_heads

    def remove():
        for handle in handles:
            handle.remove()
        heads.__dict__.pop("_semantic_box_rois", None)

    if hasattr(heads, "_semantic_box_rois"):
        method, name = heads._semantic_box_rois, "roi_heads._semantic_box_rois"

        def wrapped(*args, **kwargs):
            before(name)()
            out = method(*args, **kwargs)
            after(name, component_of(name))()
            return out

        heads._semantic_box_rois = wrapped
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


JOBS = {"inference": inference_job, "train": train_job, "memory": memory_job}


def run_job(job: dict) -> dict:
    """``JOBS[job["kind"]](job)`` in a fresh Python process."""
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
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
        print(f"inference {text}: done", file=sys.stderr)
    for text in args.train_sizes.split(","):
        size = dict(common, height=int(text), width=int(text))
        results["train"][text] = run_job(dict(size, kind="train"))
        results["memory"][f"train {text}"] = {
            name: run_job(dict(size, kind="memory", mode="train", variant=name))["peak"]
            for name in ("cascade", "htc")
        }
        print(f"train {text}: done", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    report(results)


def medians(times: Dict[str, List[float]]) -> Dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def report(results: dict) -> None:
    args = results["args"]
    print(f"device {args['device']}, {args['threads']} threads, median of {args['repeats']}")
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
