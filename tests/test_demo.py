"""htc.demo: the pictures name what each panel shows, whatever the masks' format, each under a
name of its own."""

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.structures import BitMasks, Instances
from PIL import Image

from conftest import DEMO_CONFIG, load_cfg
from htc.data import register_builtin
from htc.demo import (
    TITLE_HEIGHT,
    draw_prediction,
    drawing_metadata,
    main,
    picture_names,
    semantic_metadata,
    titled,
)


def _demo(*args: str, opts=()) -> None:
    main(["--config-file", str(DEMO_CONFIG), *args, "--opts", "MODEL.DEVICE", "cpu", *opts])


@pytest.fixture
def photo(tmp_path):
    """A 64x48 photo alone in a folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    path = folder / "photo.png"
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(path)
    return path


def test_a_titled_panel_keeps_the_panel_under_a_band_with_its_title():
    panel = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    pictures = {title: titled(panel, title) for title in ("image", "prediction: semantic")}
    for picture in pictures.values():
        assert picture.shape == (256 + TITLE_HEIGHT, 256, 3) and picture.dtype == np.uint8
        assert np.array_equal(picture[TITLE_HEIGHT:], panel)
        band = picture[:TITLE_HEIGHT]
        assert (band < 100).any() and (band == 255).mean() > 0.7  # dark text on white
    first, second = (p[:TITLE_HEIGHT] for p in pictures.values())
    assert (first < 100).sum() < (second < 100).sum()  # a longer title, more ink


def _instances(masks: np.ndarray, scores, rle: bool) -> Instances:
    instances = Instances(masks.shape[1:], scores=torch.tensor(scores))
    instances.pred_classes = torch.zeros(len(scores), dtype=torch.long)
    instances.pred_boxes = BitMasks(torch.from_numpy(masks)).get_bounding_boxes()
    if rle:
        instances.pred_masks_rle = [
            mask_util.encode(np.asfortranarray(mask.astype(np.uint8))) for mask in masks
        ]
    else:
        instances.pred_masks = torch.from_numpy(masks)
    return instances


def test_pictures_of_rle_masks_are_those_of_bitmasks():
    """MODEL.HTC.MASK_OUTPUT rle gives a list of RLEs, which the instances above the threshold
    are selected from as the masks are."""
    masks = np.zeros((3, 64, 80), bool)
    masks[0, 5:30, 5:40], masks[1, 20:60, 30:70], masks[2, 40:50, 10:20] = True, True, True
    image = np.full((64, 80, 3), 128, np.uint8)
    metadata = MetadataCatalog.get("__unused")
    pictures = []
    for rle in (False, True):
        np.random.seed(0)  # the Visualizer's colours
        instances = _instances(masks, [0.9, 0.2, 0.7], rle)
        pictures.append(draw_prediction(image, {"instances": instances}, metadata))
    assert np.array_equal(*pictures) and not np.array_equal(pictures[0][TITLE_HEIGHT:], image)
    none = draw_prediction(image, {"instances": _instances(masks, [0.1] * 3, True)}, metadata)
    assert np.array_equal(none[TITLE_HEIGHT:], image)


def test_the_semantic_panel_names_the_semantic_classes():
    """COCO panoptic's stuff_classes name its 133 categories, the semantic branch predicts
    COCO-Stuff's 183 labels: the panel named label 11 "stop sign" and drew no label from 133 on.
    It names labels by names of their count: COCO-Stuff's for 183, else the dataset's or
    "class K"."""
    meta = MetadataCatalog.get("coco_2017_val_panoptic")  # registered by Detectron2
    names = semantic_metadata(meta, 183).stuff_classes
    assert len(names) == 183 and names[0] == "person" and names[182] == "other"
    assert (names[11], names[12], names[91], names[148]) == (
        "unused 12",
        "stop sign",
        "banner",
        "road",
    )
    image = np.full((32, 40, 3), 128, np.uint8)
    scores = torch.zeros(183, 32, 40)
    scores[150] = 1  # roof, everywhere
    outputs = {"instances": Instances((32, 40), scores=torch.zeros(0)), "sem_seg": scores}
    semantic = draw_prediction(image, outputs, meta)[TITLE_HEIGHT:, 40:]
    assert not np.array_equal(semantic, image)
    register_builtin()
    coco = MetadataCatalog.get("coco_2017_val_htc")  # its maps' labels, named (not cocostuff_K)
    assert semantic_metadata(coco, 183).stuff_classes == names
    assert len(set(names)) == 183  # SemSegEvaluator's keys, IoU-<name>
    own = Metadata(name="own", stuff_classes=["sky", "disc", "grass"])
    assert semantic_metadata(own, 3) is own
    assert semantic_metadata(own, 2).stuff_classes == ["class 0", "class 1"]


def test_pictures_of_images_of_one_name_have_names_of_their_own(tmp_path):
    files = [
        tmp_path / "a" / "x.png",
        tmp_path / "b" / "x.png",
        tmp_path / "x.jpg",
        tmp_path / "y.png",
    ]
    names = picture_names(files)
    assert names[files[3]] == "y"
    assert len(set(names.values())) == 4 and all(
        n.startswith("x_") for n in list(names.values())[:3]
    )


def test_no_picture_overwrites_an_input(photo, monkeypatch):
    """An output folder that is an input folder, or a picture named as an input file, is
    refused before the model is built: the photo is left as it was."""
    before = photo.read_bytes()
    with pytest.raises(ValueError, match="--output .*photos is an --input folder"):
        _demo("--input", str(photo.parent), "--output", str(photo.parent))
    monkeypatch.chdir(photo.parent)
    with pytest.raises(ValueError, match="the picture photo.png would overwrite that input"):
        _demo("--input", "photo.png", "--output", ".")
    assert photo.read_bytes() == before


@pytest.mark.parametrize(
    "opts, message",
    [
        (["INPUT.FORMAT", "L"], "INPUT.FORMAT 'L': give 'RGB' or 'BGR'"),
        (["INPUT.FORMAT", "rgb"], "INPUT.FORMAT 'rgb'"),
        (["TEST.AUG.ENABLED", "True"], "TEST.AUG.ENABLED True: .* train_net.py --eval-only"),
    ],
)
def test_settings_the_demo_would_ignore_are_refused_by_key(photo, tmp_path, opts, message):
    with pytest.raises(ValueError, match=message):
        _demo("--input", str(photo), "--output", str(tmp_path / "out"), opts=opts)
    assert not (tmp_path / "out").exists()


def test_the_picture_draws_the_instances_at_the_configured_threshold(photo, tmp_path, capsys):
    """Random weights score every instance under 0.5: at --confidence-threshold 0 the picture
    draws the instances the demo counts (a fixed 0.5 drew none of them)."""
    torch.manual_seed(0)
    out = tmp_path / "out"
    _demo("--input", str(photo), "--output", str(out), "--confidence-threshold", "0",
          opts=["TEST.DETECTIONS_PER_IMAGE", "3"])  # fmt: skip
    assert "3 instances" in capsys.readouterr().out
    picture = np.asarray(Image.open(out / "photo.png"))
    image = np.asarray(Image.open(photo))
    assert not np.array_equal(picture[TITLE_HEIGHT:, : image.shape[1]], image)


def test_the_demo_counts_and_draws_above_0_5_by_default(photo, tmp_path, capsys):
    """As Detectron2's demo: the configs' SCORE_THRESH_TEST (0.001) drew a hundred instances."""
    torch.manual_seed(0)
    out = tmp_path / "out"
    _demo("--input", str(photo), "--output", str(out), opts=["TEST.DETECTIONS_PER_IMAGE", "3"])
    assert "0 instances" in capsys.readouterr().out
    picture = np.asarray(Image.open(out / "photo.png"))
    image = np.asarray(Image.open(photo))
    assert np.array_equal(picture[TITLE_HEIGHT:, : image.shape[1]], image)
    torch.manual_seed(0)  # the key in --opts is taken, not overridden by the default
    opts = ["TEST.DETECTIONS_PER_IMAGE", "3", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    _demo("--input", str(photo), "--output", str(out), opts=opts)
    assert "3 instances" in capsys.readouterr().out


def test_without_a_test_dataset_the_panels_name_generic_classes(photo, tmp_path):
    """DATASETS.TEST () leaves no class names: the panels are drawn with "class K" (Detectron2's
    Visualizer raised on the missing stuff_classes of the semantic panel)."""
    out = tmp_path / "out"
    opts = ["DATASETS.TEST", "()", "MODEL.HTC.PANOPTIC_ON", "False"]
    _demo("--input", str(photo), "--output", str(out), "--confidence-threshold", "0",
          opts=[*opts, "TEST.DETECTIONS_PER_IMAGE", "3"])  # fmt: skip
    picture = np.asarray(Image.open(out / "photo.png"))
    assert picture.shape == (48 + TITLE_HEIGHT, 2 * 64, 3)  # instances, semantic
    cfg = load_cfg(DEMO_CONFIG)
    cfg.DATASETS.TEST = ()
    metadata = drawing_metadata(cfg)
    assert metadata.thing_classes == ["class 0", "class 1", "class 2"]
    assert len(metadata.stuff_classes) == cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
