"""htc.data.coco: COCO json loading and checks. Missing files, malformed json and malformed
annotations are named where they are read; what the reference ignores is ignored and reported."""

import json
import logging
import re

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

from conftest import first_image, load, map_all
from htc.data import load_htc_json
from htc.data.coco_checks import CocoFormatError, rle_string_counts


def _first_annotation(**fields):
    def edit(coco):
        coco["annotations"][0].update(fields)

    return edit


def _first_image(**fields):
    def edit(coco):
        coco["images"][0].update(fields)

    return edit


def _category(index: int, **fields):
    def edit(coco):
        coco["categories"][index].update(fields)

    return edit


def _polygon(*coords):
    return _first_annotation(segmentation=[list(coords)])


def _rle(**fields):
    def edit(coco):
        coco["annotations"][0]["segmentation"].update(fields)

    return edit


def _del_first_bbox(coco):
    del coco["annotations"][0]["bbox"]


def _duplicate(key):
    def edit(coco):
        coco[key][1]["id"] = coco[key][0]["id"]

    return edit


def _second_image_of_the_first_file(coco):
    coco["images"][1]["file_name"] = "./" + coco["images"][0]["file_name"]


def _truncated_rle(coco):
    counts = coco["annotations"][0]["segmentation"]["counts"]
    coco["annotations"][0]["segmentation"]["counts"] = counts[: len(counts) // 2]


ANN = r"train.json: annotation 1 of image 1 \(00001.png\)"
MALFORMED = {
    # 1. segmentations: polygons and RLEs checked before pycocotools' C code sees them
    "polygon-nan": (
        _polygon(1, 2, float("nan"), 4, 5, 6),
        ANN + ": polygon 0 has a coordinate that is not finite",
    ),
    "polygon-inf": (_polygon(1, 2, float("inf"), 4, 5, 6), "not finite"),
    "polygon-huge": (_polygon(1, 2, 1e12, 4, 5, 6), ANN + r": polygon 0 reaches \(1\.\.1e\+12"),
    "polygon-odd": (_polygon(1, 2, 30, 4, 5, 60, 7), ANN + ": polygon 0 has 7 numbers"),
    "polygon-text": (
        _polygon(1, 2, "30", 4, 5, 60),
        "polygon 0 holds something other than numbers",
    ),
    "polygon-flat": (_first_annotation(segmentation=[1, 2, 30, 4, 5, 60]), "polygon 0 is int"),
    "rle-size": (
        _rle(size=[128, 256]),
        ANN + r": RLE size \[128, 256\] \(height, width\) is not "
        r"the image's \[256, 256\]",
    ),
    "rle-size-text": (_rle(size="256x256"), "RLE size '256x256' is not"),
    "rle-truncated": (_truncated_rle, "RLE (run lengths add up to|counts are malformed)"),
    "rle-garbage": (_rle(counts="\x01\x02"), "compressed RLE counts are malformed: character"),
    "rle-counts-sum": (_rle(counts=[10, 20, 30]), "add up to 60 .*needs 65536"),
    "rle-counts-negative": (_rle(counts=[65546, -10]), "negative runs True"),
    "segmentation-number": (_first_annotation(segmentation=7), "segmentation is int"),
    "image-size-wrong": (_first_image(height=300), r"RLE size \[256, 256\].*\[300, 256\]"),
    # 2. identities and references
    "image-id-twice": (_duplicate("images"), r"train.json: image id 1 is used twice"),
    "annotation-id-twice": (
        _duplicate("annotations"),
        r"train.json: annotation id 1 is used twice",
    ),
    "category-id-twice": (_duplicate("categories"), r"train.json: category id 1 is used twice"),
    "image-file-twice": (
        _second_image_of_the_first_file,
        r"train.json: images 1 and 2 are the same file 00001.png",
    ),
    "image-id-text": (_first_image(id="1"), r"image #0 has id '1' \(str\): ids are integers"),
    "image-id-float": (_first_image(id=1.0), r"image #0 has id 1.0 \(float\)"),
    "annotation-id-missing": (_first_annotation(id=None), r"annotation #0 has id None"),
    "image-id-of-annotation-text": (
        _first_annotation(image_id="1"),
        r"annotation 1 refers to "
        r"image_id '1' \(str\), which is not the id of an image",
    ),
    "image-id-of-annotation-unknown": (_first_annotation(image_id=999), "image_id 999 \\(int\\)"),
    "category-unknown": (
        _first_annotation(category_id=99),
        ANN + " has category_id 99, which is not the id of a category",
    ),
    "category-text": (_first_annotation(category_id="0"), "has category_id '0'"),
    "category-name-missing": (_category(0, name=None), r"category \d+ has name None"),
    "iscrowd-2": (_first_annotation(iscrowd=2), "iscrowd 2: expected 0 or 1"),
    "ignore-1": (_first_annotation(ignore=1), "ignore 1: not supported by Detectron2"),
    "height-text": (_first_image(height="256"), r"image 1 \(00001.png\) has height '256'"),
    "width-zero": (_first_image(width=0), "has width 0: expected a positive integer"),
    "file-name-missing": (_first_image(file_name=None), "image 1 has file_name None"),
    # boxes
    "bbox-nan": (
        _first_annotation(bbox=[1, 2, float("nan"), 4]),
        ANN + r" has bbox "
        r"\[1, 2, nan, 4\]: expected 4 finite numbers",
    ),
    "bbox-short": (_first_annotation(bbox=[1, 2, 3]), r"bbox \[1, 2, 3\]"),
    "bbox-missing": (_del_first_bbox, ANN + " has bbox None"),
    "bbox-text": (_first_annotation(bbox=[1, 2, "3", 4]), r"bbox \[1, 2, '3', 4\]"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_json_fields_are_refused_when_loaded(dataset, case):
    root, coco = dataset
    edit, message = MALFORMED[case]
    edit(coco)
    with pytest.raises(CocoFormatError, match=message):
        load(root, coco)


def test_rle_strings_decode_as_pycocotools_encodes():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 5), (64, 48)]:
        mask = rng.random(shape) > rng.random()
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        runs = rle_string_counts(rle["counts"].decode())
        flat = np.repeat(np.arange(len(runs)) % 2, runs).astype(bool)
        assert sum(runs) == mask.size
        assert np.array_equal(flat.reshape(shape[::-1]).T, mask)


def test_image_size_mismatch_found_when_read_names_the_file(dataset):
    root, coco = dataset
    for ann in coco["annotations"]:  # polygons: the json's sizes cannot be checked at load
        if ann["image_id"] == 1:
            ann["segmentation"] = [[10, 10, 60, 10, 60, 60]]
    coco["images"][0]["height"] = 300
    (root / "train_sem" / "00001.png").unlink()
    Image.new("L", (256, 300)).save(root / "train_sem" / "00001.png")
    with pytest.raises(ValueError, match=r"Mismatched image shape for image .*00001.png.*300"):
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
    with pytest.raises(ValueError, match="no annotation is left with a segmentation"):
        load(root, coco)


def test_two_categories_of_one_name_are_named_in_a_warning(dataset, caplog):
    """Detectron2 accepts them; the evaluation and the class-order check cannot tell them apart."""
    root, coco = dataset
    _category(1, name="disc")(coco)
    (root / "train.json").write_text(json.dumps(coco))
    with caplog.at_level(logging.WARNING):  # a name of its own: thing_classes differ from "bad"'s
        load_htc_json(str(root / "train.json"), str(root / "train"), "twice_named")
    assert re.search(r"train.json: categories \d+ and \d+ are both named 'disc'", caplog.text)


def test_masks_whose_boxes_are_all_ignored_are_named_by_the_boxes(dataset):
    """Some mask-only converters write every bbox [0, 0, 0, 0]: the loader said "no annotation
    has a segmentation", though every one had its polygons."""
    root, coco = dataset
    for ann in coco["annotations"]:
        ann["bbox"] = [0, 0, 0, 0]
    total = len(coco["annotations"])
    with pytest.raises(ValueError, match=f"{total} of {total} ignored: .*box narrower or lower"):
        load(root, coco)


def test_missing_semantic_map_is_named(dataset):
    root, _ = dataset
    (root / "train_sem" / "00002.png").unlink()
    with pytest.raises(FileNotFoundError, match="semantic map of .*00002.png"):
        load(root)


def test_semantic_maps_mirror_the_image_folders(dataset):
    """Two images of one name in two folders take the maps of their folders, not one map (and
    where one of them is missing, not a map of its name outside its folder); maps in one folder
    are found by the images' names, where those differ."""
    root, coco = dataset
    for folder, image in zip("ab", coco["images"][:2]):
        for kind in ("train", "train_sem"):
            (root / kind / folder).mkdir()
            (root / kind / image["file_name"]).rename(root / kind / folder / "00001.png")
        image["file_name"] = f"{folder}/00001.png"
    records = load(root, coco)
    assert [r["sem_seg_file_name"] for r in records[:2]] == [
        str(root / "train_sem" / folder / "00001.png") for folder in "ab"
    ]
    (root / "train_sem" / "a" / "00001.png").rename(root / "train_sem" / "00001.png")
    with pytest.raises(FileNotFoundError, match=r"semantic map of .*a/00001.png not found: "
                       r".*train_sem/a/00001.png"):  # fmt: skip
        load(root, coco)
    (root / "train_sem" / "b" / "00001.png").rename(root / "train_sem" / "00002.png")
    with pytest.raises(ValueError, match=r"a/00001.png and .*b/00001.png would share"):
        load(root, coco)  # maps in one folder, by the images' names alone: two images, one map
    coco["images"][1]["file_name"] = "b/00002.png"
    (root / "train" / "b" / "00001.png").rename(root / "train" / "b" / "00002.png")
    records = load(root, coco)
    assert [r["sem_seg_file_name"] for r in records[:2]] == [
        str(root / "train_sem" / name) for name in ("00001.png", "00002.png")
    ]


def test_images_that_would_share_a_semantic_map_are_refused(dataset):
    root, coco = dataset
    second = coco["images"][1]
    (root / "train" / second["file_name"]).rename(root / "train" / "00001.jpg")
    second["file_name"] = "00001.jpg"
    with pytest.raises(ValueError, match=r"00001.png and .*00001.jpg would share .*00001.png"):
        load(root, coco)


def test_integral_float_sizes_load_as_integers(dataset):
    """As some tools write them; mask pasting at evaluation needs integers."""
    root, coco = dataset
    coco["images"][0].update(height=256.0, width=256.0)
    record = load(root, coco)[0]
    assert (record["height"], record["width"]) == (256, 256)
    assert type(record["height"]) is type(record["width"]) is int


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


@pytest.mark.parametrize("mask", ["rle", "polygon"])
@pytest.mark.parametrize(
    "box, how",
    [(lambda x, y, w, h: [x, y, x + w, y + h], "box written as (x1, y1, x2, y2)"),
     (lambda x, y, w, h: [x + 2 * w, y, w, h], "box not around its mask")],
    ids=["xyxy", "elsewhere"],
)  # fmt: skip
def test_boxes_that_do_not_frame_their_masks_are_named(dataset, caplog, box, how, mask):
    """The box heads and the mask heads would learn different objects: one warning counts
    them, by kind, naming one; they are kept (amodal boxes are meant so)."""
    root, coco = dataset
    first = coco["annotations"][0]
    x, y, w, h = first["bbox"]
    if mask == "polygon":
        first["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    with caplog.at_level(logging.WARNING):
        load(root, coco)
    assert "frame their masks" not in caplog.text  # the generated boxes fit
    first["bbox"] = box(x, y, w, h)
    with caplog.at_level(logging.WARNING):
        records = load(root, coco)
    assert f"1 of {len(coco['annotations'])} boxes do not frame their masks" in caplog.text
    assert f"{{'{how}': 1}}), e.g. annotation 1 of {first_image(root)}" in caplog.text
    assert 1 in [obj["id"] for r in records for obj in r["annotations"]]
