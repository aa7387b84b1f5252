"""Bad input gets an error naming the file or key and what is wrong; what the reference ignores
is ignored and reported; non-finite losses stop training."""

import copy
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from PIL import Image

from conftest import make_batch, tiny_cfg
from htc import HTCDatasetMapper
from htc.checkpoint import HTCCheckpointer
from htc.data import load_htc_json
from htc.demo_data import generate_split


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


@pytest.mark.parametrize(
    "damage, error, message",
    [
        (lambda p: p.unlink(), FileNotFoundError, r"train.json: 1 images not found, e.g. .*00001"),
        (lambda p: p.write_bytes(b"no image"), OSError, r"cannot read .*00001.png.*identify"),
        (lambda p: p.write_bytes(b""), OSError, r"cannot read .*00001.png"),
        (truncate, OSError, r"cannot read .*00001.png.*truncated"),
    ],
    ids=["missing", "not-an-image", "empty-file", "truncated"],
)
def test_bad_image_files_are_named(dataset, damage, error, message):
    root, _ = dataset
    damage(first_image(root))
    with pytest.raises(error, match=message):
        map_all(load(root))


def _edit_first_annotation(**fields):
    def edit(coco):
        coco["annotations"][0].update(fields)

    return edit


def _del_first_bbox(coco):
    del coco["annotations"][0]["bbox"]


def _image_height(coco):
    coco["images"][0]["height"] = 300


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (_edit_first_annotation(category_id=99), ValueError, r"train.json.*category_id=99"),
        (_edit_first_annotation(bbox=[1, 2, float("nan"), 4]), ValueError, r"annotation 1 of .*"
         r"00001.png has bbox \[1, 2, nan, 4\]: expected 4 finite numbers"),
        (_edit_first_annotation(bbox=[1, 2, 3]), ValueError, r"annotation 1 .*bbox \[1, 2, 3\]"),
        (_del_first_bbox, ValueError, r"annotation 1 of .*00001.png has bbox None"),
        (_image_height, ValueError, r"image shape for image .*00001.png.*300"),
    ],
    ids=["unknown-category", "nan-box", "short-box", "no-box", "wrong-image-size"],
)  # fmt: skip
def test_malformed_annotations_are_refused(dataset, edit, error, message):
    root, coco = dataset
    edit(coco)
    with pytest.raises(error, match=message):
        map_all(load(root, coco))


def test_malformed_json_is_named(dataset):
    root, _ = dataset
    (root / "train.json").write_text('{"images": [')
    with pytest.raises(ValueError, match="train.json: malformed COCO instances file"):
        load(root)


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"bbox": [10, 10, 0.5, 20]}, "box narrower or lower than 1 pixel"),
        ({"bbox": [10, 10, -5, 20]}, "box narrower or lower than 1 pixel"),
        ({"bbox": [300, 10, 20, 20]}, "box outside the image"),
        ({"segmentation": []}, "no valid segmentation"),
        ({"segmentation": [[1, 2, 3, 4]]}, "no valid segmentation"),  # a 2-point polygon
    ],
    ids=["thin-box", "negative-width", "outside", "no-mask", "degenerate-polygon"],
)
def test_degenerate_annotations_are_ignored_as_the_reference_does(dataset, caplog, fields, reason):
    root, coco = dataset
    total = len(coco["annotations"])
    coco["annotations"][0].update(fields)
    with caplog.at_level(logging.WARNING):
        records = load(root, coco)
    kept = [obj["id"] for r in records for obj in r["annotations"]]
    assert 1 not in kept and len(kept) == total - 1
    if fields.get("segmentation") != [[1, 2, 3, 4]]:  # Detectron2's loader drops those itself
        assert f"ignored 1 of {total} annotations" in caplog.text
        assert f"annotation 1 of {first_image(root)}: {reason}" in caplog.text
    assert all(len(out["instances"]) > 0 for out in map_all(records))


def test_no_masks_at_all_is_refused(dataset):
    root, coco = dataset
    for ann in coco["annotations"]:
        ann["segmentation"] = []
    with pytest.raises(ValueError, match="no annotation has a segmentation"):
        load(root, coco)


def test_crowd_annotations_stay_out_of_the_targets(dataset):
    root, coco = dataset
    ours = [a for a in coco["annotations"] if a["image_id"] == 1]
    ours[0]["iscrowd"] = 1
    ours[0]["bbox"] = [0, 0, 0.5, 0.5]  # crowd boxes are not checked for size
    records = load(root, coco)
    assert len(records[0]["annotations"]) == len(ours)
    assert len(map_all(records)[0]["instances"]) == len(ours) - 1


def test_images_without_annotations_map_to_empty_targets(dataset):
    root, coco = dataset
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 1]
    out = map_all(load(root, coco))[0]
    assert len(out["instances"]) == 0 and out["sem_seg"].shape == (256, 256)


def test_missing_semantic_map_is_named(dataset):
    root, _ = dataset
    (root / "train_sem" / "00002.png").unlink()
    with pytest.raises(FileNotFoundError, match="semantic map of .*00002.png"):
        load(root)


def test_bad_semantic_maps_are_named(dataset):
    root, _ = dataset
    Image.fromarray(np.zeros((100, 120), np.uint8)).save(root / "train_sem" / "00001.png")
    with pytest.raises(ValueError, match=r"00001.png: semantic map of size \(100, 120\)"):
        map_all(load(root))
    Image.fromarray(np.full((256, 256), 7, np.uint8)).save(root / "train_sem" / "00001.png")
    with pytest.raises(ValueError, match=r"00001.png: semantic labels \[7\] outside \[0, 6\)"):
        map_all(load(root))


# --- checkpoints for MODEL.WEIGHTS --------------------------------------------------------------


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


# --- non-finite losses ------------------------------------------------------------------------


def test_non_finite_loss_stops_the_trainer_before_the_optimizer_step():
    """Detectron2's own trainer check (v0.6 and later alike) names the loss and the iteration."""
    model = _model()
    model.train()
    head = model.roi_heads.mask_head[1].predictor
    head.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SimpleTrainer(model, [make_batch()] * 20, optimizer)
    trainer.iter = trainer.start_iter = 17
    with EventStorage(start_iter=17) as trainer.storage:
        with pytest.raises(
            FloatingPointError, match=r"(?s)iteration=17.*'loss_mask_stage1': (np.float64\()?nan"
        ):
            trainer.run_step()
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
