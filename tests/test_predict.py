"""htc.predict: images from files, folders and globs; COCO results; bad files skipped by name;
a stopped run resumed without redoing or losing an image."""

import argparse
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import DEMO_CONFIG, truncate
from htc import register_htc_instances
from htc.demo import load_predictor_cfg
from htc.predict import RECORDS, find_images, predict


@pytest.fixture
def photos(tiny_dataset, tmp_path):
    """3 readable images (one in a subfolder), an empty, a truncated and a mislabelled one, and
    a text file."""
    images = sorted((tiny_dataset / "train").glob("*.png"))
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(images[0], folder / "a.png")
    shutil.copy(images[1], folder / "b.png")
    shutil.copy(images[2], folder / "sub" / "c.png")
    shutil.copy(images[3], folder / "cut.png")
    truncate(folder / "cut.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    (folder / "readme.txt").write_text("not an image either")
    return folder


def _run(photos, output, **overrides) -> dict:
    args = dict(
        config_file=str(DEMO_CONFIG), input=[str(photos)] if photos else [], output=str(output),
        confidence_threshold=0.0, image_ids=None, draw=False, semantic=False, panoptic=False,
        opts=["MODEL.DEVICE", "cpu", "TEST.DETECTIONS_PER_IMAGE", "5"],
    )  # fmt: skip
    args.update(overrides)
    torch.manual_seed(0)  # the same random weights in every run
    return predict(argparse.Namespace(**args))


def test_inputs_are_files_folders_and_globs(photos, tmp_path):
    names = lambda paths: sorted(p.name for p in paths)  # noqa: E731
    everything = ["a.png", "b.png", "c.png", "cut.png", "empty.jpg", "notes.png"]
    assert names(find_images([str(photos)])) == everything  # recursive, by extension
    assert names(find_images([str(photos / "*.png"), str(photos / "a.png")])) == [
        "a.png", "b.png", "cut.png", "notes.png",
    ]  # fmt: skip
    assert names(find_images([str(photos / "**" / "c.png")])) == ["c.png"]
    assert names(find_images([str(photos / "readme.txt")])) == ["readme.txt"]  # named itself
    with pytest.raises(FileNotFoundError, match="input not found: .*missing"):
        find_images([str(tmp_path / "missing")])


def test_results_are_coco_and_bad_files_are_named_and_skipped(photos, tmp_path, caplog):
    logging.getLogger("htc").propagate = True
    with caplog.at_level(logging.WARNING, logger="htc"):
        counts = _run(photos, tmp_path / "out", draw=True)
    assert counts == {"images": 3, "skipped": 3, "this run": 6, "results": 15}
    for bad in ("cut.png", "empty.jpg: empty file", "notes.png"):
        assert f"{photos}" in caplog.text and bad in caplog.text
    images = json.loads((tmp_path / "out" / "images.json").read_text())
    results = json.loads((tmp_path / "out" / "coco_results.json").read_text())
    assert sorted(i["file_name"].split("/")[-1] for i in images) == ["a.png", "b.png", "c.png"]
    assert {r["image_id"] for r in results} == {i["id"] for i in images}
    for result in results:
        assert result["category_id"] in (1, 2, 3)  # the demo dataset's ids
        assert len(result["bbox"]) == 4 and 0 <= result["score"] <= 1
        assert isinstance(result["segmentation"]["counts"], str)
    assert len(list((tmp_path / "out" / "pictures").glob("*.png"))) == 3


def test_a_stopped_run_resumes_where_it_stopped(photos, tmp_path):
    full = tmp_path / "full"
    _run(photos, full)
    want = json.loads((full / "coco_results.json").read_text())
    assert _run(photos, full)["this run"] == 0  # nothing redone
    assert json.loads((full / "coco_results.json").read_text()) == want

    stopped = tmp_path / "stopped"
    stopped.mkdir()
    lines = (full / RECORDS).read_text().splitlines()
    (stopped / RECORDS).write_text(lines[0] + "\n" + lines[1][:20])  # killed while writing
    counts = _run(photos, stopped)
    assert counts["this run"] == len(lines) - 1 and counts["images"] == 3
    assert json.loads((stopped / "coco_results.json").read_text()) == want


def test_the_results_are_what_coco_evaluator_scores(tiny_dataset, tmp_path):
    """On a registered dataset, with its image ids: the results equal COCOEvaluator's own
    results file for the same model, and COCOeval gives them the evaluator's AP."""
    name = "htc_predict_tiny"
    if name not in DatasetCatalog.list():
        register_htc_instances(name, str(tiny_dataset / "train.json"), str(tiny_dataset / "train"))
    opts = [
        "MODEL.DEVICE",
        "cpu",
        "DATASETS.TEST",
        f"('{name}',)",
        "MODEL.HTC.PANOPTIC_ON",
        "False",
    ]
    args = dict(input=[str(tiny_dataset / "train")], image_ids=str(tiny_dataset / "train.json"))
    _run(None, tmp_path / "out", opts=opts, **args)
    ours = json.loads((tmp_path / "out" / "coco_results.json").read_text())

    cfg = load_predictor_cfg(str(DEMO_CONFIG), opts + ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    torch.manual_seed(0)  # the weights of _run's model
    model = build_model(cfg).eval()
    evaluator = COCOEvaluator(name, output_dir=str(tmp_path / "eval"), use_fast_impl=False)
    scores = inference_on_dataset(model, build_detection_test_loader(cfg, name), evaluator)
    theirs = json.loads((tmp_path / "eval" / "coco_instances_results.json").read_text())
    key = lambda r: (r["image_id"], -r["score"], r["category_id"])  # noqa: E731
    assert len(ours) == len(theirs) > 0
    for a, b in zip(sorted(ours, key=key), sorted(theirs, key=key)):
        assert (a["image_id"], a["category_id"], a["segmentation"]) == (
            b["image_id"], b["category_id"], b["segmentation"],
        )  # fmt: skip
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)
    ground_truth = COCO(str(tiny_dataset / "train.json"))
    for kind in ("bbox", "segm"):
        coco_eval = COCOeval(ground_truth, ground_truth.loadRes(ours), kind)
        coco_eval.evaluate(), coco_eval.accumulate(), coco_eval.summarize()
        assert coco_eval.stats[0] * 100 == pytest.approx(scores[kind]["AP"], abs=1e-9)


def test_semantic_and_panoptic_pngs(photos, tmp_path):
    """Semantic labels as class indices; panoptic segments as COCO panoptic's RGB ids, each
    segment of panoptic.json in its PNG with its area, categories the dataset's."""
    out = tmp_path / "out"
    _run(photos, out, semantic=True, panoptic=True)
    images = json.loads((out / "images.json").read_text())
    annotations = json.loads((out / "panoptic.json").read_text())["annotations"]
    assert sorted(a["image_id"] for a in annotations) == sorted(i["id"] for i in images)
    for image, annotation in zip(sorted(images, key=lambda i: i["id"]),
                                 sorted(annotations, key=lambda a: a["image_id"])):  # fmt: skip
        labels = np.asarray(Image.open(out / "semantic" / f"{image['id']}.png"))
        assert labels.shape == (image["height"], image["width"]) and labels.max() < 6
        rgb = np.asarray(Image.open(out / "panoptic" / annotation["file_name"])).astype(int)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
        segments = annotation["segments_info"]
        assert segments and set(np.unique(ids)) - {0} == {s["id"] for s in segments}
        for segment in segments:
            assert segment["area"] == (ids == segment["id"]).sum()
            assert segment["category_id"] in range(1, 7)  # things 1-3, stuff 4-6


def test_outputs_the_model_does_not_give_are_refused(photos, tmp_path):
    opts = ["MODEL.DEVICE", "cpu", "MODEL.HTC.PANOPTIC_ON", "False"]
    with pytest.raises(ValueError, match="MODEL.HTC.PANOPTIC_ON"):
        _run(photos, tmp_path / "out", panoptic=True, opts=opts)
    with pytest.raises(ValueError, match="SEMANTIC_OUTPUT"):
        _run(
            photos,
            tmp_path / "out",
            semantic=True,
            opts=opts + ["MODEL.HTC.SEMANTIC_OUTPUT", "False"],
        )
