"""Nothing lost: atomic checkpoint writes (a run killed with SIGKILL and resumed:
tests/test_resume.py)."""

import logging

import pytest
import torch
from detectron2.modeling import build_model

from conftest import tiny_cfg
from htc.checkpoint import HTCCheckpointer, atomic_open


def test_interrupted_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"previous complete checkpoint")
    with pytest.raises(RuntimeError):
        with atomic_open(str(path), "wb") as f:
            f.write(b"half a new chec")
            raise RuntimeError("killed while saving")
    assert path.read_bytes() == b"previous complete checkpoint"
    assert list(tmp_path.iterdir()) == [path]
    with atomic_open(str(path), "wb") as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"


def _model(**opts):
    cfg = tiny_cfg()
    for key, value in opts.items():
        cfg.merge_from_list([key, value])
    return build_model(cfg)


def test_weights_of_other_shapes_are_refused_or_skipped_on_request(tmp_path):
    path = tmp_path / "five_classes.pth"
    torch.save({"model": _model(**{"MODEL.ROI_HEADS.NUM_CLASSES": 5}).state_dict()}, path)
    model = _model()
    with pytest.raises(ValueError, match=r"12 parameters .* do not fit.*\n.*cls_score.weight: "
                       r"checkpoint \(6, 64\), model \(4, 64\)"):  # fmt: skip
        HTCCheckpointer(model).load(str(path))
    model = _model()
    before = model.roi_heads.box_predictor[0].cls_score.weight.clone()
    HTCCheckpointer(model, skip_mismatched=True).load(str(path))
    assert torch.equal(model.roi_heads.box_predictor[0].cls_score.weight, before)


def test_weights_of_another_model_are_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"encoder.layer1.weight": torch.zeros(3)}}, path)
    with pytest.raises(ValueError, match="none of this model's parameters"):
        HTCCheckpointer(_model()).load(str(path))


def test_missing_and_unexpected_keys_are_reported(tmp_path, caplog):
    state = _model().state_dict()
    state.pop("semantic_head.conv_logits.weight")
    state["semantic_head.extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save({"model": state}, path)
    with caplog.at_level(logging.WARNING):
        HTCCheckpointer(_model()).load(str(path))
    assert "semantic_head.conv_logits.weight" in caplog.text
    assert "semantic_head.extra.weight" in caplog.text
