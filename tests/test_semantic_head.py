"""htc.semantic_head.FusedSemanticHead in deterministic runs: the same outputs, through the
matrix-product resize, and a loss summed outside the cross-entropy (whose own sum accumulates
with atomics on CUDA)."""

import torch
from detectron2.layers import ShapeSpec
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from htc.semantic_head import FusedSemanticHead


def _head_and_features():
    torch.manual_seed(0)
    strides = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    shapes = {name: ShapeSpec(channels=6, stride=s) for name, s in strides.items()}
    head = FusedSemanticHead(shapes, fusion_feature="p3", num_classes=5, conv_dim=8, embed_dim=8)
    features = {name: torch.randn(2, 6, 128 // s, 96 // s) for name, s in strides.items()}
    return head, features


def test_deterministic_runs_resize_by_matrix_products(monkeypatch):
    head, features = _head_and_features()
    want = head(features)

    def interpolate(*args, **kwargs):
        raise AssertionError("F.interpolate in a deterministic run")

    monkeypatch.setattr(F, "interpolate", interpolate)
    torch.use_deterministic_algorithms(True)
    try:
        got = head(features)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _LossReductions(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reductions = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith("nll_loss2d_forward"):
            self.reductions.append(args[3])
        return func(*args, **(kwargs or {}))


def test_loss_is_summed_outside_the_cross_entropy():
    head, features = _head_and_features()
    logits, _ = head(features)
    targets = torch.randint(0, 5, (2, 128, 96))
    targets[:, :10] = 255
    with _LossReductions() as record:
        loss = head.losses(logits, targets)["loss_sem_seg"]
    assert record.reductions == [0]  # reduction "none"
    small = F.interpolate(targets[:, None].float(), size=logits.shape[-2:], mode="nearest")
    want = F.cross_entropy(logits, small[:, 0].long(), ignore_index=255) * 0.2
    want = want * (small != 255).sum() / small.numel()  # mean over all pixels, ignored ones too
    torch.testing.assert_close(loss, want)
