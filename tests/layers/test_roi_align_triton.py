"""htc.layers.roi_align_triton: the CUDA RoIAlign of AutoROIAlign equals torchvision's (forward
within fp32 rounding, pooled outputs, gradients), keeps fp16/bf16 without round-trip casts and
gives bit-identical gradients. Without a GPU the kernels run in Triton's interpreter on CPU
(TRITON_INTERPRET=1, set by conftest), and Triton's compiler builds them for the GPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torchvision.ops import roi_align

import htc.layers.roi_align as kernels
import htc.layers.roi_align_cpu as cpu_kernels
import htc.layers.roi_align_triton as triton_roi_align
from conftest import child_env
from htc.layers import AutoROIAlign, TritonROIAlign

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(seed: int, num_rois: int = 10, channels: int = 3, wide: bool = False):
    """A feature of 2 images and RoIs of all kinds at stride 4: inside, crossing the border,
    outside, empty (x2 = x1), inverted; with ``wide``, one whose bins are wider than a fixed
    sampling ratio's samples (samples of a cell that do not share their bilinear taps)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, 11, 14, generator=g)
    boxes = torch.rand(num_rois, 4, generator=g) * 64 - 8
    boxes[:, 2:] = boxes[:, :2] + torch.rand(num_rois, 2, generator=g) * 20
    boxes[0, 2:] = boxes[0, :2]
    boxes[1, 2:] = boxes[1, :2] - 3
    if wide:
        boxes[2, 2:] = boxes[2, :2] + 56
    batch = torch.randint(0, 2, (num_rois, 1), generator=g).float()
    return x.to(DEVICE), torch.cat([batch, boxes], dim=1).to(DEVICE)


def _gradients(fn, x, rois, grad_seed=1):
    leaf = x.clone().requires_grad_()
    out = fn(leaf, rois)
    g = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=g).to(out)
    (got,) = torch.autograd.grad(out, leaf, grad)
    return out.detach(), got


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_forward_and_backward_equal_torchvision(aligned, sampling_ratio):
    x, rois = _case(seed=sampling_ratio + aligned, wide=sampling_ratio > 0)
    args = ((5, 4), 0.25, sampling_ratio, aligned)
    out, grad = _gradients(lambda f, r: triton_roi_align.roi_align(f, r, *args, 1), x, rois)
    want, want_grad = _gradients(lambda f, r: roi_align(f, r, *args), x, rois)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
    assert grad.abs().sum() > 0


def test_pooled_equals_average_pooling_of_the_full_output():
    """The 7x7 box feature from the 14x14 geometry, as avg_pool2d(roi_align(14x14), 2)."""
    x, rois = _case(seed=5, num_rois=6)
    args = ((6, 4), 0.25, 0, True)
    out, grad = _gradients(lambda f, r: triton_roi_align.roi_align(f, r, *args, 2), x, rois)
    want, want_grad = _gradients(lambda f, r: F.avg_pool2d(roi_align(f, r, *args), 2), x, rois)
    assert out.shape == (6, 3, 3, 2)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_gradients_are_bit_identical_from_run_to_run():
    x, rois = _case(seed=7, num_rois=12)
    rois[:, 1:] = rois[:6, 1:].repeat(2, 1)  # overlapping RoIs: many entries per pixel
    args = ((4, 4), 0.25, 0, True)
    runs = [_gradients(lambda f, r: triton_roi_align.roi_align(f, r, *args, 1), x, rois)[1]]
    runs.append(_gradients(lambda f, r: triton_roi_align.roi_align(f, r, *args, 1), x, rois)[1])
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("pool", [1, 2])
def test_entries_equal_the_vectorised_builders(aligned, sampling_ratio, pool):
    """The entry kernel writes the entries of the CPU backward's builder, in its order: the
    same pixels and cells, weights within fp32 rounding."""
    x, rois = _case(seed=11, num_rois=16, wide=sampling_ratio > 0)
    table = triton_roi_align.LevelTable([x], [0.25])
    geometry = ((6, 4), sampling_ratio, aligned, pool)
    count = triton_roi_align.EntryCount(rois, None, table, geometry)
    got = triton_roi_align.interpolation_entries(rois, None, table, geometry, count)
    want = cpu_kernels.interpolation_entries(rois, tuple(x.shape), (6, 4), 0.25, *geometry[1:])
    assert len(got[0]) == len(want[0]) > 0
    assert torch.equal(got[0].long(), want[0])
    assert torch.equal(got[1].long(), want[1])
    # CUDA contracts the weights' products and sums into FMAs: a few ulps on weights below 1
    torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pool", [1, 2])
def test_all_levels_in_one_pass_equal_each_level_alone(pool):
    """Each RoI on its own level (one level without RoIs, one at another resolution), in the
    RoIs' order; gradients for every level."""
    g = torch.Generator().manual_seed(13)
    features = [torch.randn(2, 3, 22 // s, 28 // s, generator=g).to(DEVICE) for s in (1, 2, 4)]
    _, rois = _case(seed=13, num_rois=8)
    levels = torch.tensor([0, 2] * 4, device=DEVICE)
    levels[:3] = 0
    scales = [0.25, 0.125, 0.0625]
    leaves = [f.clone().requires_grad_() for f in features]
    args = (levels, scales, (4, 6), 0, True, pool)
    out = triton_roi_align.multi_level_roi_align(leaves, rois, *args)
    grad = torch.randn(out.shape, generator=g).to(out)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.zeros_like(out)
    for level, (feature, scale) in enumerate(zip(leaves, scales)):
        chosen = levels == level
        pooled = roi_align(feature, rois[chosen], (4, 6), scale, 0, True)
        want[chosen] = F.avg_pool2d(pooled, pool) if pool > 1 else pooled
    want_grads = torch.autograd.grad(want, leaves, grad, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got[1].abs().sum() == 0 and got[2].abs().sum() > 0


def test_calls_on_shared_levels_copy_them_once(monkeypatch):
    """Within ``shared_levels``, the calls of AutoROIAlign on the same levels copy them to the
    channels-last buffer once and sum their gradients there: the same outputs, bit for bit, and
    gradients, to float rounding, as calls that copy the levels each (a level's gradient sums the
    same terms, grouped by buffer); a level changed in place is copied again."""
    monkeypatch.setattr(kernels, "TRITON_DEVICES", (DEVICE,))
    monkeypatch.setattr(kernels, "triton_kernels", lambda: triton_roi_align)
    g = torch.Generator().manual_seed(17)
    features = [torch.randn(2, 3, 12 // s, 16 // s, generator=g).to(DEVICE) for s in (1, 2)]
    _, rois = _case(seed=17, num_rois=4)
    rois[:, 1:] /= 2  # on the small levels
    levels = torch.tensor([0, 1] * 2, device=DEVICE)
    box, semantic = TritonROIAlign((4, 4), 0.25, 0, True), TritonROIAlign((4, 4), 0.25, 0, True)
    copies = []
    joint = triton_roi_align.LevelTable.joint
    monkeypatch.setattr(
        triton_roi_align.LevelTable, "joint", lambda t, f: copies.append(len(f)) or joint(t, f)
    )

    def pool(leaves):
        outs = [box.all_levels(leaves, rois, levels, [0.25, 0.125]) for _ in range(2)]
        outs += [semantic(leaves[1], rois), semantic.pooled(leaves[1], rois, (2, 2))]
        grads = torch.autograd.grad([o.sum() * (i + 1) for i, o in enumerate(outs)], leaves)
        return outs, grads

    want = pool([f.clone().requires_grad_() for f in features])
    assert copies == [2, 2, 1, 1]
    copies.clear()
    with kernels.shared_levels():
        got = pool([f.clone().requires_grad_() for f in features])
    assert copies == [2, 1]
    for a, b in zip(got[0], want[0]):
        assert torch.equal(a, b)
    for a, b in zip(got[1], want[1]):  # the same terms, summed in another order
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    copies.clear()
    with kernels.shared_levels(), torch.no_grad():
        x = features[1].clone()
        before = semantic(x, rois)
        x.add_(1)
        assert torch.equal(semantic(x, rois), semantic(x.clone(), rois))
        assert not torch.equal(semantic(x, rois), before)
    assert copies == [1, 1, 1]


def test_triton_launches_on_the_device_of_their_input(monkeypatch):
    """Every Triton call runs with its input's device made current (a model on cuda:1 in a
    process whose current device is cuda:0)."""
    calls = _count_triton_calls(monkeypatch)
    guarded = []
    device_of = kernels.device_of
    monkeypatch.setattr(kernels, "device_of", lambda t: guarded.append(t.device) or device_of(t))
    module = TritonROIAlign((4, 4), 0.25, 0, True)
    x, rois = _case(seed=4, num_rois=3)
    module(x, rois)
    module.pooled(x, rois, (2, 2))
    levels = torch.zeros(len(rois), dtype=torch.long, device=DEVICE)
    module.all_levels([x, x[:, :, ::2, ::2]], rois, levels, [0.25, 0.125])
    assert calls == [1, 2] and guarded == [x.device] * 3
    if x.is_cuda:
        with device_of(x):
            assert torch.cuda.current_device() == x.device.index


def test_shared_levels_under_inference_mode(monkeypatch):
    """Inference tensors have no version counter: within ``shared_levels`` under
    ``torch.inference_mode`` each call copies its levels, with the outputs of ``no_grad``."""
    monkeypatch.setattr(kernels, "TRITON_DEVICES", (DEVICE,))
    monkeypatch.setattr(kernels, "triton_kernels", lambda: triton_roi_align)
    x, rois = _case(seed=19, num_rois=3)
    module = TritonROIAlign((4, 4), 0.25, 0, True)
    with torch.no_grad(), kernels.shared_levels():
        want = [module(x, rois), module.pooled(x, rois, (2, 2))]
    with torch.inference_mode():
        features = x.clone()
        with kernels.shared_levels():
            got = [module(features, rois), module.pooled(features, rois, (2, 2))]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


class _Ops(TorchDispatchMode):
    """Records the names of the ops dispatched (views and allocations aside) and of the Triton
    kernels launched, each as one name (the interpreter's own ops inside a launch are not)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if not func.is_view and name not in {"empty", "new_empty", "empty_like"}:
            self.names.append(name)
        return func(*args, **(kwargs or {}))

    def kernel(self, kernel):
        """``kernel`` that records its launches."""
        ops = self

        class Recorded:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    ops.names.append("triton")
                    with _disable_current_modes():
                        return kernel[grid](*args, **kwargs)

                return launch

        return Recorded()


def test_backward_is_a_few_ops(monkeypatch):
    """The backward is two Triton kernels (entries, gradients), one sort, its row pointers and
    a layout copy of the output gradient: at most six kernel launches on CUDA (the earlier
    builder of entries dispatched about 140 ops)."""
    x, rois = _case(seed=9, num_rois=12)
    leaf = x.clone().requires_grad_()
    out = triton_roi_align.roi_align(leaf, rois, (4, 4), 0.25, 0, True, 1)
    grad = torch.ones_like(out)
    with _Ops() as ops:
        for name in ("_entries_kernel", "_backward_kernel"):
            monkeypatch.setattr(triton_roi_align, name, ops.kernel(getattr(triton_roi_align, name)))
        torch.autograd.grad(out, leaf, grad)
    assert ops.names.count("triton") == 2
    assert ops.names.count("sort") == 1
    assert len(ops.names) <= 6, ops.names


class _FloatCopies(TorchDispatchMode):
    """Records the shapes of the fp32 tensors that ops produce."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_natively(dtype):
    """fp16/bf16 features give outputs and gradients of their dtype, as accurate as that dtype,
    and no fp32 copy of the feature or of the output is made (the RoIs stay fp32)."""
    x, rois = _case(seed=3, channels=4)
    args = ((4, 4), 0.25, 0, True)
    leaf = x.to(dtype).requires_grad_()
    with _FloatCopies() as record:
        out = triton_roi_align.roi_align(leaf, rois, *args, 1)
        (grad,) = torch.autograd.grad(out, leaf, torch.ones_like(out))
    assert out.dtype == grad.dtype == dtype
    for shape in (tuple(x.shape), tuple(out.shape), (2, 11, 14, 4), (10, 4, 4, 4)):
        assert shape not in record.shapes
    exact = x.to(dtype).float().requires_grad_()  # the same values, computed in fp32
    want = roi_align(exact, rois, *args)
    (want_grad,) = torch.autograd.grad(want, exact, torch.ones_like(want))
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), want.detach(), rtol=2 * eps, atol=4 * eps)
    torch.testing.assert_close(grad.float(), want_grad, rtol=2 * eps, atol=4 * eps)


def test_no_rois():
    x, rois = _case(seed=0)
    out, grad = _gradients(lambda f, r: triton_roi_align.roi_align(f, r, (7, 7), 0.25, 0, True, 1),
                           x, rois[:0])  # fmt: skip
    assert out.shape == (0, 3, 7, 7)
    assert torch.equal(grad, torch.zeros_like(x))


def _count_triton_calls(monkeypatch) -> list:
    """Routes TRITON_DEVICES' kernels to this module on this test's device; the returned list
    gets the pool of each single-level call."""
    monkeypatch.setattr(kernels, "TRITON_DEVICES", (DEVICE,))
    monkeypatch.setattr(AutoROIAlign, "_on_cpu", lambda *a: pytest.fail("CPU path taken"))
    monkeypatch.setattr(kernels, "triton_kernels", lambda: triton_roi_align)
    calls = []
    run = triton_roi_align.roi_align
    monkeypatch.setattr(
        triton_roi_align, "roi_align", lambda *a, **k: calls.append(a[-1]) or run(*a, **k)
    )
    return calls


def test_triton_roi_align_routes_its_device_to_triton(monkeypatch):
    """TritonROIAlign ("triton") takes these kernels on TRITON_DEVICES (CUDA), for forward and
    pooled, whatever the size, and leaves them under tracing (export)."""
    calls = _count_triton_calls(monkeypatch)
    module = TritonROIAlign((4, 4), 0.25, 0, True)
    x, rois = _case(seed=2, num_rois=3)
    torch.testing.assert_close(module(x, rois), roi_align(x, rois, (4, 4), 0.25, 0, True))
    module.pooled(x, rois, (2, 2))
    assert calls == [1, 2]
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    assert module._route(x, rois) == "torchvision"


@pytest.mark.parametrize(
    "capability, hip, runs", [((6, 0), None, False), ((7, 0), None, True), ((6, 0), "6.2", True)]
)
def test_triton_runs_on_volta_and_newer(monkeypatch, capability, hip, runs):
    """PyTorch's bound for Triton (Inductor's): CUDA compute capability 7.0; ROCm; and any
    device of Triton's interpreter."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "hip", hip)
    kernels._cuda_capability.cache_clear()
    try:
        assert kernels.triton_runs_on(torch.device("cuda", 1)) is runs
        assert kernels.triton_runs_on(torch.device("cuda")) is runs
        assert kernels.triton_runs_on(torch.device("cpu"))
    finally:
        kernels._cuda_capability.cache_clear()


@pytest.mark.parametrize(
    "case, message", [("older GPU", "compute capability 7.0 and newer"), ("float64", "float64")]
)
def test_what_triton_cannot_compute_takes_the_other_kernels(monkeypatch, case, message):
    """A GPU that Triton does not compile for, a float64 input (the kernels compute in
    float32): "auto" takes the other kernels, every call; "triton" too, and says why."""
    cpu_route = AutoROIAlign._on_cpu
    calls = _count_triton_calls(monkeypatch)
    monkeypatch.setattr(AutoROIAlign, "_on_cpu", cpu_route)
    x, rois = _case(seed=4, num_rois=3)
    if case == "float64":
        x, rois = x.double(), rois.double()
    else:
        monkeypatch.setattr(kernels, "triton_runs_on", lambda device: False)
    levels = torch.zeros(len(rois), dtype=torch.long, device=DEVICE)
    auto = AutoROIAlign((4, 4), 0.25, 0, True)
    assert auto._route(x, rois, pool=2) != "triton"
    assert auto.all_levels([x, x[:, :, ::2, ::2]], rois, levels, [0.25, 0.125]) is None
    with pytest.warns(RuntimeWarning, match=message):
        out = TritonROIAlign((4, 4), 0.25, 0, True)(x, rois)
    torch.testing.assert_close(out, roi_align(x, rois, (4, 4), 0.25, 0, True))
    assert calls == []


def test_auto_takes_the_kernel_measured_faster_per_call(monkeypatch):
    """AutoROIAlign ("auto") on TRITON_DEVICES: torchvision's kernel for a small one-level
    call, Triton for a pooled one, for several levels and for every call under deterministic
    algorithms; the same outputs whichever it takes."""
    calls = _count_triton_calls(monkeypatch)
    module = AutoROIAlign((4, 4), 0.25, 0, True)
    x, rois = _case(seed=3, num_rois=3)
    want = roi_align(x, rois, (4, 4), 0.25, 0, True)
    torch.testing.assert_close(module(x, rois), want)
    assert calls == []
    module.pooled(x, rois, (2, 2))
    assert calls == [2]
    levels = torch.zeros(len(rois), dtype=torch.long, device=DEVICE)
    assert module.all_levels([x, x[:, :, ::2, ::2]], rois, levels, [0.25, 0.125]) is not None
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    torch.testing.assert_close(module(x, rois), want, rtol=1e-6, atol=1e-6)
    assert calls == [2, 1]


@pytest.mark.heavy
@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the other tests compile the kernels")
def test_kernels_compile_for_the_gpu(tmp_path):
    """Triton's compiler, which the interpreter of the other tests does not run, turns every
    variant of the kernels into an sm_90 binary (no GPU needed)."""
    env = child_env(TRITON_CACHE_DIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    script = Path(__file__).with_name("compile_triton_kernels.py")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    # levels or one level x (3 dtypes x 2 pools of the forward, 2 pools of the counts and of
    # the entries), and the backward in 3 dtypes
    assert out.stdout.count("compiled ") == 2 * (6 + 2 + 2) + 3
