"""htc.predict and its output folder (htc.prediction_output): images from files, folders and
globs; COCO results; bad files skipped by name; a stopped run resumed without redoing or losing
an image; runs that would mix results refused."""

import argparse
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import DEMO_CONFIG, child_env, truncate
from htc import register_htc_instances
from htc.data.inputs import PredictionInputs, find_inputs, read_image_or_reason, video_frames
from htc.demo import load_predictor_cfg
from htc.predict import MARKER, predict
from htc.prediction_output import RECORDS, dataset_image_ids, image_ids, run_settings, video_names
from htc.video import write_drawn_video


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
        confidence_threshold=0.0, image_ids=None, draw=False, draw_threshold=0.5, semantic=False,
        panoptic=False,
        batch_size=1, workers=0, num_gpus=1, num_machines=1, machine_rank=0, dist_url="auto",
        dist_timeout=1800.0,
        opts=["MODEL.DEVICE", "cpu", "TEST.DETECTIONS_PER_IMAGE", "5"],
    )  # fmt: skip
    args.update(overrides)
    torch.manual_seed(0)  # the same random weights in every run
    return predict(argparse.Namespace(**args))


def test_inputs_are_files_folders_and_globs(photos, tmp_path):
    names = lambda paths: sorted(p.name for p in paths)  # noqa: E731
    everything = ["a.png", "b.png", "c.png", "cut.png", "empty.jpg", "notes.png"]
    assert names(find_inputs([str(photos)])) == everything  # recursive, by extension
    assert names(find_inputs([str(photos / "*.png"), str(photos / "a.png")])) == [
        "a.png", "b.png", "cut.png", "notes.png",
    ]  # fmt: skip
    assert names(find_inputs([str(photos / "**" / "c.png")])) == ["c.png"]
    assert names(find_inputs([str(photos / "readme.txt")])) == ["readme.txt"]  # named itself
    assert "c.png" not in names(find_inputs([str(photos)], exclude=[photos / "sub"]))
    assert names(find_inputs([str(photos / "sub" / "c.png")], exclude=[photos / "sub"])) == [
        "c.png"
    ]
    with pytest.raises(FileNotFoundError, match="input not found: .*missing"):
        find_inputs([str(tmp_path / "missing")])


def test_folders_are_searched_through_links_each_once(photos, tmp_path):
    """A linked subfolder is searched (rglob left it out, silently); a link to a folder above,
    or a second link to one searched, is not searched again."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(photos / "a.png", elsewhere / "far.png")
    (photos / "linked").symlink_to(elsewhere)
    (photos / "again").symlink_to(elsewhere)
    (photos / "sub" / "loop").symlink_to(photos)
    names = sorted(p.name for p in find_inputs([str(photos)]))
    assert names == ["a.png", "b.png", "c.png", "cut.png", "empty.jpg", "far.png", "notes.png"]


def test_results_are_coco_and_bad_files_are_named_and_skipped(photos, caplog):
    """Also with the output in the input folder: its pictures are no inputs of the next run.
    Random weights (MODEL.WEIGHTS empty) are said."""
    logging.getLogger("htc").propagate = True
    out = photos / "out"
    with caplog.at_level(logging.WARNING, logger="htc"):
        counts = _run(photos, out, draw=True)
    assert counts == {
        "images": 3, "skipped": 3, "this run": 6, "results": 15, "videos": 0, "frames": 0,
    }  # fmt: skip
    for bad in ("cut.png", "empty.jpg: empty file", "notes.png"):
        assert f"{photos}" in caplog.text and bad in caplog.text
    assert "MODEL.WEIGHTS is empty: the model runs on randomly initialized weights" in caplog.text
    images = json.loads((out / "images.json").read_text())
    results = json.loads((out / "coco_results.json").read_text())
    assert sorted(i["file_name"].split("/")[-1] for i in images) == ["a.png", "b.png", "c.png"]
    assert {r["image_id"] for r in results} == {i["id"] for i in images}
    for result in results:
        assert result["category_id"] in (1, 2, 3)  # the demo dataset's ids
        assert len(result["bbox"]) == 4 and 0 <= result["score"] <= 1
        assert isinstance(result["segmentation"]["counts"], str)
    assert len(list((out / "pictures").glob("*.png"))) == 3
    assert _run(photos, out, draw=True) == dict(counts, **{"this run": 3})  # the bad ones again


def test_a_users_folder_of_an_output_name_is_neither_dropped_nor_overwritten(photos):
    """With the output in the input folder, the user's own pictures/ is an input folder, not
    one a run made: writing pictures into it is refused, naming it, before any is written."""
    (photos / "pictures").mkdir()
    shutil.copy(photos / "a.png", photos / "pictures" / "1.png")
    before = (photos / "pictures" / "1.png").read_bytes()
    with pytest.raises(ValueError, match=r"pictures exists and no htc.predict made it"):
        _run(photos, photos, draw=True)
    assert (photos / "pictures" / "1.png").read_bytes() == before
    assert not (photos / RECORDS).exists()


def test_the_pictures_of_a_run_before_the_marker_are_no_inputs(photos):
    """An output whose records show that htc.predict wrote it, with a pictures/ from before the
    marker: its pictures stay out of the inputs, and more are drawn into it."""
    _run(photos, photos, draw=True)
    (photos / "pictures" / MARKER).unlink()
    counts = _run(photos, photos, draw=True)
    assert (counts["images"], counts["this run"]) == (3, 3)  # the bad photos again, no picture


@pytest.mark.parametrize(
    "opts, message",
    [
        (["INPUT.FORMAT", "rgb"], "INPUT.FORMAT 'rgb': give 'RGB' or 'BGR'"),
        (["TEST.AUG.ENABLED", "True"], "TEST.AUG.ENABLED True: .* train_net.py --eval-only"),
    ],
)
def test_settings_predict_would_ignore_are_refused_by_key(photos, tmp_path, opts, message):
    """A format other than RGB was fed as BGR, and TTA silently not run."""
    with pytest.raises(ValueError, match=message):
        _run(photos, tmp_path / "out", opts=["MODEL.DEVICE", "cpu", *opts])
    assert not (tmp_path / "out").exists()


def test_pictures_draw_the_results_above_the_draw_threshold(photos, tmp_path):
    """Random weights score the image's 3 results under 0.5: the default --draw-threshold 0.5
    draws none of them, 0 all (a fixed 0.5 could not be lowered; the results' own threshold,
    0.001 in the configs, drew a hundred)."""
    opts = ["MODEL.DEVICE", "cpu", "TEST.DETECTIONS_PER_IMAGE", "3"]
    pictures = {}
    for draw_threshold in (1.0, 0.5, 0.0):  # 1.0: none drawn
        out = tmp_path / f"out{draw_threshold}"
        _run(None, out, input=[str(photos / "a.png")], draw=True, draw_threshold=draw_threshold,
             opts=opts)  # fmt: skip
        assert len(_results(out)) == 3 and max(r["score"] for r in _results(out)) < 0.5
        picture = np.asarray(Image.open(out / "pictures" / "1.png"))
        pictures[draw_threshold] = picture[:, : picture.shape[1] // 3]  # the instances' panel
    assert np.array_equal(pictures[0.5], pictures[1.0])
    assert not np.array_equal(pictures[0.0], pictures[1.0])
    with pytest.raises(ValueError, match="--draw-threshold 50.0: a score"):
        _run(None, tmp_path / "percent", input=[str(photos / "a.png")], draw_threshold=50.0)


def test_without_a_test_dataset_pictures_name_generic_classes(photos, tmp_path):
    """DATASETS.TEST (): pictures drawn with "class K" (Detectron2's Visualizer raised on the
    missing stuff_classes after the first inference)."""
    out = tmp_path / "out"
    opts = ["MODEL.DEVICE", "cpu", "TEST.DETECTIONS_PER_IMAGE", "3", "DATASETS.TEST", "()"]
    opts += ["MODEL.HTC.PANOPTIC_ON", "False"]
    _run(None, out, input=[str(photos / "a.png")], draw=True, opts=opts)
    assert (out / "pictures" / "1.png").exists()
    assert {r["category_id"] for r in _results(out)} <= {0, 1, 2}  # contiguous


def test_an_image_decoded_at_another_size_than_its_dataset_entry_is_skipped(tmp_path, caplog):
    """A JPEG stored 64x48 with EXIF orientation 6 decodes 48x64 (turned): its entry's 64x48
    are another image's coordinates, so it is skipped naming both sizes."""
    folder = tmp_path / "photos"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.new("RGB", (64, 48), "gray").save(folder / "turned.jpg", exif=exif)
    dataset = tmp_path / "dataset.json"
    entry = {"id": 42, "file_name": "turned.jpg", "width": 64, "height": 48}
    dataset.write_text(json.dumps({"images": [entry]}))
    logging.getLogger("htc").propagate = True
    with caplog.at_level(logging.WARNING, logger="htc"):
        counts = _run(folder, tmp_path / "out", image_ids=str(dataset))
    assert (counts["images"], counts["skipped"]) == (0, 1)
    assert "turned.jpg: decoded at 48x64 pixels, but its --image-ids entry is 64x48" in caplog.text
    assert "EXIF orientation" in caplog.text


def test_an_input_skipped_once_is_read_again_once_mended(photos, tmp_path):
    """An empty file is skipped; copied over with an image, the next run predicts it, and the
    merged files count it as an image, no more as skipped, under the id it had."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "late.png").write_bytes(b"")
    out = tmp_path / "out"
    assert _run(folder, out)["skipped"] == 1
    shutil.copy(photos / "a.png", folder / "late.png")
    counts = _run(folder, out)
    assert (counts["this run"], counts["images"], counts["skipped"]) == (1, 1, 0)
    assert [i["id"] for i in json.loads((out / "images.json").read_text())] == [1]


def test_merged_files_of_other_inputs_say_what_they_leave_out(photos, tmp_path, caplog):
    """A second run with other inputs writes the merged files of its own: the earlier run's
    image is counted in a warning, and the earlier panoptic.json, of that image, removed."""
    out = tmp_path / "out"
    _run(None, out, input=[str(photos / "a.png")], panoptic=True)
    assert (out / "panoptic.json").exists()
    logging.getLogger("htc").propagate = True
    with caplog.at_level(logging.WARNING, logger="htc"):
        _run(None, out, input=[str(photos / "b.png")])
    assert "1 inputs that earlier runs predicted into" in caplog.text and "a.png" in caplog.text
    images = json.loads((out / "images.json").read_text())
    assert [i["file_name"] for i in images] == [str(photos / "b.png")]
    assert not (out / "panoptic.json").exists()


def test_unreadable_inputs_are_reasons_not_errors(tmp_path, monkeypatch):
    """Each is skipped by name, in this run and the next, instead of ending the run."""
    wide = tmp_path / "16bit.png"
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(wide)
    (tmp_path / "gone.png").symlink_to(tmp_path / "nothing.png")
    big = tmp_path / "big.png"
    Image.new("RGB", (40, 40)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1,600 pixels: over twice the limit
    reasons = {path.name: read_image_or_reason(path) for path in (wide, tmp_path / "gone.png", big)}
    assert all(image is None for image, _ in reasons.values())
    assert re.fullmatch(
        r"I(;16)? pixels: the model reads 8 bits per channel", reasons["16bit.png"][1]
    )
    assert reasons["gone.png"][1].startswith("FileNotFoundError")
    assert reasons["big.png"][1].startswith("DecompressionBombError")


def test_a_stopped_run_resumes_where_it_stopped(photos, tmp_path, caplog):
    full = tmp_path / "full"
    _run(photos, full)
    want = json.loads((full / "coco_results.json").read_text())
    logging.getLogger("htc").propagate = True
    with caplog.at_level(logging.WARNING, logger="htc"):
        assert _run(photos, full, semantic=True)["this run"] == 3  # only the bad files again
    assert "lack these outputs, which are not made for them now: {'semantic': 3}" in caplog.text
    assert json.loads((full / "coco_results.json").read_text()) == want

    stopped = tmp_path / "stopped"
    stopped.mkdir()
    lines = (full / RECORDS).read_text().splitlines()
    (stopped / RECORDS).write_text(lines[0] + "\n" + lines[1][:20])  # killed while writing
    counts = _run(photos, stopped)
    inputs = len(find_inputs([str(photos)]))
    assert counts["this run"] == inputs - 1 and counts["images"] == 3
    assert json.loads((stopped / "coco_results.json").read_text()) == want


def test_image_ids_are_the_dataset_entries_that_end_each_path(tmp_path):
    dataset = tmp_path / "dataset.json"
    entries = [("cam1/001.jpg", 10), ("cam2/001.jpg", 20), ("002.jpg", 30), ("x/002.jpg", 40)]
    entries += [("/elsewhere/x/003.jpg", 70), ("dup.jpg", 50), ("dup.jpg", 60)]
    dataset.write_text(json.dumps({"images": [{"file_name": f, "id": i} for f, i in entries]}))
    data = tmp_path / "data"
    files = [data / "cam1/001.jpg", data / "cam2/001.jpg", data / "002.jpg", data / "x/002.jpg"]
    files.append(data / "x/003.jpg")  # an absolute file_name, of another machine
    ids = dataset_image_ids(files, str(dataset))
    assert ids == {str(f): i for f, (_, i) in zip(files, entries)}
    for inputs, message in [
        ([data / "cam3/001.jpg"], "cam3/001.jpg matches two images of .* alike"),
        ([data / "dup.jpg"], r"dup.jpg matches two images of .* alike: \['dup.jpg', 'dup.jpg'\]"),
        ([data / "004.jpg"], "004.jpg is not an image of"),
        ([data / "002.jpg", data / "y/002.jpg"], r"002.jpg and .*y/002.jpg both match image 30"),
    ]:
        with pytest.raises(ValueError, match=message):
            dataset_image_ids(inputs, str(dataset))
    done = [{"file_name": str(files[2]), "image_id": 1, "results": []}]  # an automatic id
    with pytest.raises(ValueError, match="002.jpg: its results in the output have image id 1"):
        image_ids(files, done, str(dataset))
    assert image_ids(files, [dict(done[0], image_id=30)], str(dataset)) == ids


def test_image_ids_of_an_lvis_json_come_from_its_coco_urls(tmp_path):
    """LVIS v1's images have no file_name (a bare KeyError 'file_name'), v0.5's name the 2014
    file: the folder and name that end their coco_url, as Detectron2's LVIS loader reads them; an
    entry with neither is named."""
    url = "http://images.cocodataset.org/{}/000000000139.jpg"
    images = [{"id": 139, "coco_url": url.format("val2017")}]
    v05 = {"file_name": "COCO_train2014_000000000139.jpg", "not_exhaustive_category_ids": []}
    images.append({"id": 9, "coco_url": url.format("train2017"), **v05})  # the name elsewhere
    dataset = tmp_path / "lvis_v1_val.json"
    dataset.write_text(json.dumps({"images": images}))
    files = [tmp_path / "coco" / folder / "000000000139.jpg" for folder in ("val2017", "train2017")]
    assert dataset_image_ids(files, str(dataset)) == {str(files[0]): 139, str(files[1]): 9}
    dataset.write_text(json.dumps({"images": [{"id": 5, "flickr_url": "http://x/a.jpg"}]}))
    with pytest.raises(ValueError, match="lvis_v1_val.json: image 5 has no 'file_name'"):
        dataset_image_ids(files[:1], str(dataset))


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
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"images": [{"file_name": "x.png", "id": 1}]}))
    with pytest.raises(ValueError, match="00001.png is not an image of .*other.json"):
        _run(None, tmp_path / "out", opts=opts, **dict(args, image_ids=str(other)))
    _run(None, tmp_path / "out", opts=opts, **args)  # not bound by a run that made no results
    ours = json.loads((tmp_path / "out" / "coco_results.json").read_text())
    with pytest.raises(
        ValueError, match="image ids of .*train.json, and this run's would have numbered"
    ):
        _run(None, tmp_path / "out", opts=opts, **dict(args, image_ids=None))  # new ids over them

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


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The demo model's random weights (seed 0) as a checkpoint, as a user gives MODEL.WEIGHTS:
    other processes load the weights that the in-process runs build."""
    cfg = load_predictor_cfg(str(DEMO_CONFIG), ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.save({"model": build_model(cfg).state_dict()}, path)
    return ["MODEL.DEVICE", "cpu", "TEST.DETECTIONS_PER_IMAGE", "5", "MODEL.WEIGHTS", str(path)]


def _results(output) -> list:
    return json.loads((output / "coco_results.json").read_text())


def _assert_same_results(ours: list, theirs: list) -> None:
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        assert _mask_iou(a["segmentation"], b["segmentation"]) > 0.99


def _mask_iou(a: dict, b: dict) -> float:
    return float(mask_util.iou([a], [b], [False])[0, 0]) if a != b else 1.0


def test_batches_decoded_by_workers_give_the_results_of_one_at_a_time(photos, tmp_path):
    one = _run(photos, tmp_path / "one")
    batched = _run(photos, tmp_path / "batched", batch_size=2, workers=2)
    assert batched == one  # the same counts: every bad file skipped by name
    _assert_same_results(_results(tmp_path / "batched"), _results(tmp_path / "one"))


@pytest.fixture
def videos(tiny_dataset, tmp_path):
    """clip.mp4 of 4 frames (the demo images, lossy), an empty .mp4 and a text file .avi."""
    folder = tmp_path / "videos"
    folder.mkdir()
    files = sorted((tiny_dataset / "train").glob("*.png"))
    images = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    height, width = images[0].shape[:2]
    writer = cv2.VideoWriter(
        str(folder / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 4.0, (width, height)
    )
    for image in images:
        writer.write(np.ascontiguousarray(image[:, :, ::-1]))
    writer.release()
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.avi").write_text("not a video")
    return folder


def test_videos_give_results_per_frame_a_drawn_video_and_resume(videos, tmp_path):
    """Results per frame, whose image ids are frame indices, equal to those of the frame as an
    image; the drawn video has every frame; a run stopped within a video redoes only the rest."""
    out = tmp_path / "out"
    counts = _run(videos, out, draw=True)
    assert (counts["videos"], counts["frames"], counts["skipped"]) == (3, 4, 2)
    name = video_names([videos / "clip.mp4"])[str(videos / "clip.mp4")]
    assert name.startswith("clip_")  # the same name whatever the other inputs are:
    assert (
        video_names([videos / "a" / "clip.mp4", videos / "clip.mp4"])[str(videos / "clip.mp4")]
        == name
    )
    results = json.loads((out / "videos" / f"{name}.json").read_text())
    assert sorted({r["image_id"] for r in results}) == [0, 1, 2, 3] and len(results) == 20
    frames = list(video_frames(videos / "clip.mp4"))
    drawn = list(video_frames(out / "videos" / f"{name}.mp4"))
    assert len(drawn) == 4 and drawn[0].shape == frames[0].shape
    assert np.abs(drawn[0].astype(int) - frames[0]).mean() > 1  # the instances drawn on it

    Image.fromarray(frames[2][:, :, ::-1]).save(tmp_path / "frame.png")
    _run(None, tmp_path / "image", input=[str(tmp_path / "frame.png")])
    as_image = [dict(r, image_id=2) for r in _results(tmp_path / "image")]
    _assert_same_results([r for r in results if r["image_id"] == 2], as_image)

    records = [json.loads(line) for line in (out / RECORDS).read_text().splitlines()]
    stopped = [r for r in records if r.get("frame", 0) < 2 and "frames" not in r]
    (out / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in stopped))
    assert _run(videos, out)["this run"] == 4  # frames 2 and 3, the two bad videos again
    assert json.loads((out / "videos" / f"{name}.json").read_text()) == results


def test_videos_have_no_semantic_or_panoptic_pngs(videos, tmp_path):
    with pytest.raises(ValueError, match="not of videos: .*clip.mp4"):
        _run(videos, tmp_path / "out", semantic=True)


@pytest.fixture
def many_photos(tiny_dataset, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for k in range(16):
        shutil.copy(sorted((tiny_dataset / "train").glob("*.png"))[k % 4], folder / f"{k:02}.png")
    return folder


@pytest.mark.heavy
def test_a_killed_run_resumes_losing_at_most_the_batch_in_flight(many_photos, weights, tmp_path):
    out = tmp_path / "killed"
    command = [
        sys.executable, "-m", "htc.predict", "--config-file", str(DEMO_CONFIG),
        "--input", str(many_photos), "--output", str(out), "--confidence-threshold", "0",
        "--batch-size", "2", "--workers", "1", "--opts", *weights,
    ]  # fmt: skip
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, env=child_env(), stderr=stderr)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if (out / RECORDS).exists() and (out / RECORDS).read_text().count("\n") >= 4:
            process.kill()
        time.sleep(0.02)
    assert process.wait() == -signal.SIGKILL, log.read_text()[-3000:]  # it ran until killed
    before = (out / RECORDS).read_text().count("\n")
    assert 4 <= before < 16

    counts = _run(many_photos, out, opts=weights)
    assert counts["this run"] == 16 - before and counts["images"] == 16
    _run(many_photos, tmp_path / "whole", opts=weights)
    _assert_same_results(_results(out), _results(tmp_path / "whole"))


@pytest.mark.heavy
def test_two_processes_give_the_merged_json_of_one(photos, weights, tmp_path):
    one = _run(photos, tmp_path / "one", opts=weights)
    assert _run(photos, tmp_path / "two", opts=weights, num_gpus=2) is None  # rank 0 logs counts
    assert all(
        (tmp_path / "two" / name).stat().st_size for name in (RECORDS, "predictions.1.jsonl")
    )
    _assert_same_results(_results(tmp_path / "two"), _results(tmp_path / "one"))
    images = json.loads((tmp_path / "two" / "images.json").read_text())
    assert images == json.loads((tmp_path / "one" / "images.json").read_text())
    assert len(images) == one["images"] == 3


def test_a_run_with_other_settings_is_refused_not_mixed_in(photos, weights, tmp_path):
    """Another threshold or other weights into an output with results would mix two models'
    results in one file; the weights count by content, not by path."""
    out = tmp_path / "out"
    _run(photos, out, opts=weights)
    want = _results(out)
    with pytest.raises(ValueError, match=r"other settings \(MODEL.ROI_HEADS.SCORE_THRESH_TEST "
                                         r"0.0 then, 0.99 now\)"):  # fmt: skip
        _run(photos, out, opts=weights, confidence_threshold=0.99)
    moved = tmp_path / "moved.pth"
    shutil.copy(weights[-1], moved)
    # only the bad files are read again
    assert _run(photos, out, opts=[*weights, "MODEL.WEIGHTS", str(moved)])["this run"] == 3
    other = tmp_path / "other.pth"
    state = torch.load(moved, weights_only=True)
    state["model"]["roi_heads.box_predictor.0.cls_score.bias"] += 1
    torch.save(state, other)
    with pytest.raises(ValueError, match="MODEL.WEIGHTS sha256 '[0-9a-f]{64}' then"):
        _run(photos, out, opts=[*weights, "MODEL.WEIGHTS", str(other)])
    assert _results(out) == want


def test_a_second_run_into_an_output_in_use_is_refused(photos, tmp_path):
    """Two runs appending to one output at once would record each image twice."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.lockf(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)",
         str(out / ".predict.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RuntimeError, match="another htc.predict is writing into .*out"):
            _run(photos, out)
        assert not (out / RECORDS).exists()
    finally:
        holder.kill()
        holder.wait()
    assert _run(photos, out)["images"] == 3


def test_category_ids_of_a_dataset_that_is_not_registered_or_does_not_fit(photos, tmp_path):
    """Results take DATASETS.TEST[0]'s category ids: a name this process has not registered (a
    wrapper script forgotten) and a class count other than the model's are refused before the
    model runs, instead of contiguous ids or a KeyError at the first result."""
    opts = ["MODEL.DEVICE", "cpu", "DATASETS.TEST", "('mine_val',)"]
    with pytest.raises(ValueError, match="'mine_val'.*is not registered in this process"):
        _run(photos, tmp_path / "a", opts=opts)
    opts = ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", "5"]
    with pytest.raises(
        ValueError, match="has 3 thing classes but MODEL.ROI_HEADS.NUM_CLASSES is 5"
    ):
        _run(photos, tmp_path / "b", opts=opts)
    assert not (tmp_path / "b" / RECORDS).exists()


def test_inputs_are_the_same_files_from_any_working_folder(photos, tmp_path, monkeypatch):
    """A relative input names another file from another folder, and the same file by another
    spelling: records are kept by absolute path."""
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, image in ((first, photos / "a.png"), (second, photos / "b.png")):
        (folder / "in").mkdir(parents=True)
        shutil.copy(image, folder / "in" / "x.png")
    out = tmp_path / "out"
    monkeypatch.chdir(first)
    assert _run(None, out, input=["in/x.png"])["this run"] == 1
    assert _run(None, out, input=[str(first / "in" / "x.png")])["this run"] == 0
    monkeypatch.chdir(second)
    counts = _run(None, out, input=["in/x.png"])
    assert counts["this run"] == 1 and counts["images"] == 1
    images = json.loads((out / "images.json").read_text())
    assert [i["file_name"] for i in images] == [str(second / "in" / "x.png")]


def test_a_record_that_is_not_json_is_named_and_a_thin_image_skipped(photos, tmp_path, caplog):
    out = tmp_path / "out"
    thin = tmp_path / "thin"
    thin.mkdir()
    Image.new("RGB", (3000, 1)).save(thin / "line.png")  # 1 px high: 0 px once resized
    logging.getLogger("htc").propagate = True
    with caplog.at_level(logging.WARNING, logger="htc"):
        assert _run(thin, out)["skipped"] == 1
    assert "skipped" in caplog.text and "too thin to predict" in caplog.text
    lines = (out / RECORDS).read_text().splitlines()
    (out / RECORDS).write_text("{not json\n" + "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"predictions.jsonl, line 1, is not a record"):
        _run(thin, out)


def test_an_object_keeps_its_colour_from_frame_to_frame(tmp_path):
    """One result in every frame of a still video is drawn alike in each (a Visualizer per
    frame gave it a random colour in each)."""
    path, target = tmp_path / "still.mp4", tmp_path / "drawn.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 4.0, (96, 64))
    for _ in range(6):
        writer.write(np.full((64, 96, 3), 90, np.uint8))
    writer.release()
    mask = np.zeros((64, 96), np.uint8, order="F")
    mask[16:48, 24:72] = 1
    rle = mask_util.encode(mask)
    rle["counts"] = rle["counts"].decode()
    result = {"bbox": [24, 16, 48, 32], "score": 0.9, "category_id": 0, "segmentation": rle}
    metadata = MetadataCatalog.get("test_colours")  # no thing_colors: colours drawn at random
    write_drawn_video(path, {i: [result] for i in range(6)}, target, metadata, 0.5, None)
    inside = [frame[22:44, 30:66].reshape(-1, 3).mean(0) for frame in video_frames(target)]
    assert len(inside) == 6 and np.abs(inside[0] - 90).max() > 10  # drawn over
    assert max(np.abs(colour - inside[0]).max() for colour in inside) < 6


def test_settings_name_url_weights_and_compare_only_the_keys_of_both(photos, tmp_path):
    """Weights from a URL count by name; a key that one side lacks (of another version) or
    that does not change results (the kernels) lets the run resume."""
    cfg = load_predictor_cfg(str(DEMO_CONFIG), ["MODEL.WEIGHTS", "https://example.org/a.pth"])
    settings = run_settings(cfg)
    assert settings["MODEL.WEIGHTS"] == "https://example.org/a.pth"
    assert "MODEL.WEIGHTS sha256" not in settings and "MODEL.DEVICE" not in settings
    out = tmp_path / "out"
    _run(photos, out)
    marker = out / "settings.json"
    earlier = json.loads(marker.read_text())
    marker.write_text(json.dumps({**earlier, "MODEL.KEY_OF_ANOTHER_VERSION": 1}))
    opts = [
        "MODEL.DEVICE",
        "cpu",
        "TEST.DETECTIONS_PER_IMAGE",
        "5",
        "MODEL.HTC.ROI_ALIGN",
        "torchvision",
    ]
    assert _run(photos, out, opts=opts)["this run"] == 3  # the bad files only
    with pytest.raises(ValueError, match="MODEL.WEIGHTS '' then, 'https://example.org/a.pth' now"):
        _run(photos, out, opts=[*opts, "MODEL.WEIGHTS", "https://example.org/a.pth"])


def test_no_resize_and_too_thin_videos(videos, monkeypatch):
    """INPUT.MIN_SIZE_TEST 0 keeps the image's size (Detectron2's no-op resize); a video whose
    frames are too thin to resize is skipped with the reason, not raised from the loader."""
    image = np.zeros((5, 300, 3), np.uint8)
    assert PredictionInputs([], {}, 0, 1333, "BGR").model_input(image)["image"].shape == (3, 5, 300)
    inputs = PredictionInputs([(videos / "clip.mp4", -1)], {}, 128, 128, "BGR")
    monkeypatch.setattr(
        inputs, "model_input", lambda frame: (_ for _ in ()).throw(ValueError("thin"))
    )
    assert list(inputs) == [{"file_name": str(videos / "clip.mp4"), "skipped": "thin"}]
