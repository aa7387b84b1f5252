"""htc.remap_classes: a COCO checkpoint's class layers cut to another dataset's classes."""

import pickle
import re

import pytest
import torch
from detectron2.modeling import build_model

from conftest import PrintsWhenUnpickled, save_cut_off, tiny_cfg
from htc.checkpoint import HTCCheckpointer, write_checkpoint
from htc.remap_classes import coco_sources, main


def _coco_state() -> dict:
    """The state dict of the tiny HTC on COCO's 80 classes."""
    coco = tiny_cfg()
    coco.merge_from_list(["MODEL.ROI_HEADS.NUM_CLASSES", 80])
    return build_model(coco).state_dict()


def test_cityscapes_classes_take_their_coco_rows_and_the_rest_is_kept(tmp_path, capsys):
    assert coco_sources("cityscapes") == [0, 0, 2, 7, 5, 6, 3, 1]  # rider from person
    state = _coco_state()
    torch.save({"model": state}, tmp_path / "coco.pth")
    out = tmp_path / "pretrained" / "out.pth"  # in a folder that the command makes
    assert main(["--to", "cityscapes", str(tmp_path / "coco.pth"), str(out)]) == 0
    got = torch.load(out)["model"]

    cityscapes = tiny_cfg()
    cityscapes.merge_from_list(["MODEL.ROI_HEADS.NUM_CLASSES", 8])
    model = build_model(cityscapes)
    assert {k: v.shape for k, v in got.items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    rows = torch.tensor([0, 0, 2, 7, 5, 6, 3, 1])
    for stage in range(3):
        box = f"roi_heads.box_predictor.{stage}"
        cls = state[f"{box}.cls_score.weight"]
        assert torch.equal(
            got[f"{box}.cls_score.weight"], cls[torch.cat([rows, torch.tensor([80])])]
        )
        assert torch.equal(got[f"{box}.bbox_pred.weight"], state[f"{box}.bbox_pred.weight"])
        mask = f"roi_heads.mask_head.{stage}.predictor.bias"
        assert torch.equal(got[mask], state[mask][rows])
    backbone = "backbone.bottom_up.stem.conv1.weight"
    assert torch.equal(got[backbone], state[backbone])
    model.load_state_dict(got)  # every key and shape fits
    with pytest.raises(SystemExit):  # remapped already: its rows are no longer COCO's
        main(["--to", "cityscapes", str(out), str(tmp_path / "again.pth")])
    assert not (tmp_path / "again.pth").exists()
    assert "out.pth has 8 classes, not COCO's 80" in capsys.readouterr().err


def test_the_input_is_loaded_safely_and_the_output_written_whole(tmp_path, capsys, monkeypatch):
    """weights_only (any object's code ran while loading), and atomic writes (an interrupted
    write left a truncated checkpoint)."""
    path = tmp_path / "evil.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "x": PrintsWhenUnpickled()}, path)
    with pytest.raises(SystemExit):
        main(["--to", "cityscapes", str(path), str(tmp_path / "out.pth")])
    captured = capsys.readouterr()
    assert "weights_only" in captured.err and "unpickled!" not in captured.out
    torch.save({"model": _coco_state()}, tmp_path / "coco.pth")
    monkeypatch.setattr(torch, "save", save_cut_off)
    with pytest.raises(OSError, match="no space left"):
        main(["--to", "cityscapes", str(tmp_path / "coco.pth"), str(tmp_path / "out.pth")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco.pth", "evil.pth"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot be read as a checkpoint: .*No such file"),
        (torch.zeros(3), "holds a Tensor, not a checkpoint's dict"),
        ({"state_dict": {"roi_head.bbox_head.0.fc_cls.weight": torch.zeros(81, 4)}},
         "is an MMDetection checkpoint: convert it first"),
        ({"model": {"backbone.weight": torch.zeros(1)}}, "no box classifier"),
    ],
)  # fmt: skip
def test_what_is_no_detectron2_coco_checkpoint_is_a_usage_error(tmp_path, capsys, content, message):
    """Tracebacks before (FileNotFoundError, AttributeError, ValueError)."""
    path = tmp_path / "in.pth"
    if content is not None:
        torch.save(content, path)
    with pytest.raises(SystemExit) as stopped:
        main(["--to", "cityscapes", str(path), str(tmp_path / "out.pth")])
    assert stopped.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("writer", ["converter", "zoo", "torch.save"])
def test_a_detectron2_pkl_is_read(tmp_path, writer):
    """A .pkl in Detectron2's format, the converter's (tensors) or the model zoo's (NumPy
    arrays), as Detectron2 reads it: refused before with torch's weights_only advice; also
    torch's zip named .pkl, which this tool wrote before."""
    state = _coco_state()
    path, out = tmp_path / "coco.pkl", tmp_path / "out.pth"
    if writer == "torch.save":
        torch.save({"model": state}, path)
    elif writer == "zoo":
        with open(path, "wb") as f:
            model = {k: v.numpy() for k, v in state.items()}
            pickle.dump({"model": model, "__author__": "Detectron2 Model Zoo"}, f, protocol=2)
    else:
        write_checkpoint(state, str(path), "htc-detectron2 convert_mmdet")
    assert main(["--to", "cityscapes", str(path), str(out)]) == 0
    key = "roi_heads.box_predictor.2.cls_score.weight"
    rows = torch.tensor([0, 0, 2, 7, 5, 6, 3, 1, 80])
    assert torch.equal(torch.load(out)["model"][key], state[key][rows])


def test_a_pkl_is_loaded_safely(tmp_path, capsys):
    """A .pkl runs what it names when unpickled: only tensors, arrays and containers are."""
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"a": torch.zeros(1)}, "x": PrintsWhenUnpickled()}, f)
    with pytest.raises(SystemExit):
        main(["--to", "cityscapes", str(path), str(tmp_path / "out.pth")])
    captured = capsys.readouterr()
    assert "weights_only" in captured.err and "builtins.print is no tensor's" in captured.err
    assert "unpickled!" not in captured.out


def test_a_pkl_output_is_in_detectron2s_format(tmp_path):
    """An output named .pkl was torch's zip, which Detectron2's checkpointer, reading .pkl as a
    pickle, refused as "a checkpoint cut short"."""
    state = _coco_state()
    torch.save({"model": state}, tmp_path / "coco.pth")
    out = tmp_path / "cityscapes.pkl"
    assert main(["--to", "cityscapes", str(tmp_path / "coco.pth"), str(out)]) == 0
    cityscapes = tiny_cfg()
    cityscapes.merge_from_list(["MODEL.ROI_HEADS.NUM_CLASSES", 8])
    model = build_model(cityscapes)
    HTCCheckpointer(model, complete=True).load(str(out), checkpointables=[])
    mask = "roi_heads.mask_head.0.predictor.bias"
    assert torch.equal(model.state_dict()[mask], state[mask][[0, 0, 2, 7, 5, 6, 3, 1]])
