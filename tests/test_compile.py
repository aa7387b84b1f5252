"""``torch.compile`` of the whole model: a training step and an inference step give eager's
outputs. The backend is "aot_eager" (Dynamo's graphs, with AOTAutograd's joint forward and
backward), which compiles in seconds; Inductor's code generation takes minutes on two cores and
is measured in benchmarks/compile_speed.py. Shapes are static (``dynamic=False``): the training
and inference graphs are the same, and the recompilation for dynamic shapes would double the
test's time."""

import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.guards
from detectron2.modeling import build_model

from conftest import make_batch, tiny_cfg, train_losses


@pytest.fixture
def fresh_dynamo(monkeypatch):
    # Dynamo times each compiled frame's guards for its logs, after flushing the CPU caches:
    # a tenth of the compile time here, and nothing that the compiled code depends on.
    monkeypatch.setattr(
        torch._dynamo.guards, "profile_guard_manager", lambda *args: 0.0, raising=False
    )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def _gradients(model) -> list:
    return [p.grad for p in model.parameters() if p.grad is not None]


@pytest.mark.heavy
def test_the_compiled_model_trains_and_infers_as_eager(fresh_dynamo):
    torch.manual_seed(0)
    eager = build_model(tiny_cfg())
    compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager", dynamic=False)
    batch = make_batch(1)  # a second image recompiles the same code for its shapes
    steps = [train_losses(model, batch) for model in (eager, compiled)]
    assert fresh_dynamo["stats"]["unique_graphs"] > 10, "Dynamo compiled the model's graphs"
    assert steps[0].keys() == steps[1].keys()
    for key, want in steps[0].items():
        assert (want - steps[1][key]).abs().item() <= 1e-5, key
    for losses in steps:
        sum(losses.values()).backward()
    want, got = _gradients(eager), _gradients(compiled)
    assert len(want) == len(got) > 0
    scale = max(g.abs().max().item() for g in want)
    assert max((a - b).abs().max().item() for a, b in zip(want, got)) <= 1e-5 * scale

    image = make_batch(1, with_gt=False)
    with torch.no_grad():
        want, got = (model.eval()(image)[0]["instances"] for model in (eager, compiled))
    assert len(want) == len(got) > 0
    for field in ("pred_classes", "scores", "pred_masks"):
        torch.testing.assert_close(got.get(field), want.get(field), atol=1e-5, rtol=0)
    ulp = 2**-17  # of a float32 coordinate from 64 to 128 px
    torch.testing.assert_close(got.pred_boxes.tensor, want.pred_boxes.tensor, atol=4 * ulp, rtol=0)
