"""htc.data.coco: COCO json loading and checks. Missing files, malformed json and malformed
annotations are named where they are read; what the reference ignores is ignored and reported."""

import logging

import pytest

from conftest import first_image, load, map_all
from htc.data import load_htc_json


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


def test_missing_semantic_map_is_named(dataset):
    root, _ = dataset
    (root / "train_sem" / "00002.png").unlink()
    with pytest.raises(FileNotFoundError, match="semantic map of .*00002.png"):
        load(root)


def test_missing_files_are_named(tmp_path, tiny_dataset):
    with pytest.raises(FileNotFoundError, match="annotation file.*nope.json"):
        load_htc_json(str(tmp_path / "nope.json"), str(tmp_path), "x")
    with pytest.raises(FileNotFoundError, match="semantic map folder"):
        load_htc_json(
            str(tiny_dataset / "train.json"), str(tiny_dataset / "train"), "x", str(tmp_path / "no")
        )
    partial = tmp_path / "sem"
    partial.mkdir()
    with pytest.raises(FileNotFoundError, match="semantic map of .*00001.png"):
        load_htc_json(
            str(tiny_dataset / "train.json"), str(tiny_dataset / "train"), "x", str(partial)
        )
