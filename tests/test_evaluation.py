"""COCO AP by the fastest COCOeval at hand (htc.evaluation.HTCCOCOEvaluator): faster-coco-eval's
gives pycocotools' numbers, per category and on a subset of images included; keypoints and a
machine without it get pycocotools'. Which evaluators a model's outputs get."""

import json
import logging
import sys
from types import SimpleNamespace

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator, coco_evaluation
from detectron2.structures import Boxes, BoxMode, Instances
from pycocotools.cocoeval import COCOeval

import htc.evaluation
import train_net  # the repository root is on sys.path (conftest)
from conftest import tiny_cfg
from htc.evaluation import (
    HTCCOCOEvaluator,
    HTCSemSegEvaluator,
    build_evaluators,
    coco_eval_class,
)

WIDTH, HEIGHT = 200, 160


def _ellipse(box: list) -> dict:
    x, y, w, h = box
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    inside = ((xx - x - w / 2) / (w / 2)) ** 2 + ((yy - y - h / 2) / (h / 2)) ** 2 <= 1
    rle = mask_util.encode(np.asfortranarray(inside.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


@pytest.fixture
def dataset(tmp_path):
    """30 images of 3 to 8 instances of 4 categories, and predictions: most instances found with
    jittered boxes and masks (some with the wrong category), plus false positives."""
    rng = np.random.default_rng(0)
    images, annotations, predictions = [], [], []
    for image_id in range(1, 31):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": WIDTH,
                       "height": HEIGHT})  # fmt: skip
        found = []
        for _ in range(rng.integers(3, 9)):
            w, h = rng.uniform(6, 130, 2)  # small, medium and large
            box = [float(rng.uniform(0, WIDTH - w)), float(rng.uniform(0, HEIGHT - h)), w, h]
            category = int(rng.integers(1, 5))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": box,
                                "category_id": category, "segmentation": _ellipse(box),
                                "area": w * h * np.pi / 4,
                                "iscrowd": int(rng.random() < 0.1)})  # fmt: skip
            if rng.random() < 0.8:
                shift = rng.normal(0, 0.05, 2) * [w, h]
                jittered = [box[0] + shift[0], box[1] + shift[1], w, h]
                category = category if rng.random() < 0.9 else int(rng.integers(1, 5))
                found.append((jittered, category))
        found += [([float(x) for x in rng.uniform(0, 150, 2)] + [30.0, 20.0], 1) for _ in range(2)]
        predictions.append({"image_id": image_id, "instances": [
            {"image_id": image_id, "category_id": category, "bbox": box,
             "score": float(rng.random()), "segmentation": _ellipse(box)}
            for box, category in found
        ]})  # fmt: skip
    categories = [{"id": k, "name": f"class{k}"} for k in range(1, 5)]
    path = tmp_path / "instances.json"
    coco = {"images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(coco))
    name = f"coco_eval_test_{tmp_path.name}"
    thing_classes = [c["name"] for c in categories]  # per-category AP in the results
    register_coco_instances(name, {"thing_classes": thing_classes}, str(path), str(tmp_path))
    yield name, predictions
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


@pytest.fixture
def without_detectron2_cocoeval(monkeypatch):
    """As the setup installs Detectron2: no compiled C++ COCOeval."""
    monkeypatch.setattr(htc.evaluation, "fast_coco_eval_available", lambda: False)


def _evaluate(evaluator, predictions, img_ids=None) -> dict:
    evaluator.reset()
    evaluator._predictions = [dict(p) for p in predictions]
    return evaluator.evaluate(img_ids)


@pytest.mark.parametrize("img_ids", [None, list(range(5, 25))])
def test_faster_coco_eval_gives_pycocotools_numbers(dataset, img_ids, without_detectron2_cocoeval):
    pytest.importorskip("faster_coco_eval")
    name, predictions = dataset
    official = _evaluate(COCOEvaluator(name, use_fast_impl=False), predictions, img_ids)
    fast = HTCCOCOEvaluator(name)
    assert fast._cocoeval is not COCOeval and fast._use_fast_impl
    got = _evaluate(fast, predictions, img_ids)
    assert coco_evaluation.COCOeval_opt is not fast._cocoeval  # restored
    for task in ("bbox", "segm"):
        assert got[task].keys() == official[task].keys() > {"AP", "APl", "AP-class1", "AP-class4"}
        assert 20 < official[task]["AP"] < 90
        for metric, value in official[task].items():
            assert got[task][metric] == pytest.approx(value, abs=1e-9), metric


def test_keypoints_go_to_pycocotools(dataset, without_detectron2_cocoeval):
    pytest.importorskip("faster_coco_eval")
    name, predictions = dataset
    gt = COCOEvaluator(name, use_fast_impl=False)._coco_api
    dt = gt.loadRes([dict(i, keypoints=[]) for p in predictions for i in p["instances"]])
    assert type(coco_eval_class()(gt, dt, "keypoints")) is COCOeval
    assert type(coco_eval_class()(gt, dt, "bbox")) is not COCOeval


def test_without_faster_coco_eval_pycocotools_computes(
    dataset, monkeypatch, without_detectron2_cocoeval
):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # as if not installed
    assert coco_eval_class() is COCOeval
    name, predictions = dataset
    evaluator = HTCCOCOEvaluator(name)
    assert not evaluator._use_fast_impl
    official = _evaluate(COCOEvaluator(name, use_fast_impl=False), predictions)
    got = _evaluate(evaluator, predictions)
    assert got == official and all(np.isfinite(list(got["segm"].values())))


def test_per_class_ap_is_named_by_the_things_of_panoptic_metadata(dataset):
    """Detectron2's COCO panoptic metadata names all its categories, stuff too, thing_classes:
    box and mask AP on coco_2017_val_panoptic asserted after the inference that they are the
    json's; the AP per class now takes the things' names (the contiguous ids' in order)."""
    name, predictions = dataset
    official = _evaluate(COCOEvaluator(name, use_fast_impl=False), predictions)
    panoptic = f"{name}_panoptic"
    MetadataCatalog.get(panoptic).set(
        json_file=MetadataCatalog.get(name).json_file,
        thing_classes=[f"class{k}" for k in range(1, 5)] + ["sky", "grass"],
        thing_dataset_id_to_contiguous_id={k: k - 1 for k in range(1, 5)},
    )
    contiguous = [
        dict(p, instances=[dict(i, category_id=i["category_id"] - 1) for i in p["instances"]])
        for p in predictions
    ]  # as the model outputs them where the metadata maps the ids
    try:
        got = _evaluate(HTCCOCOEvaluator(panoptic, use_fast_impl=False), contiguous)
    finally:
        MetadataCatalog.remove(panoptic)
    assert got == official and "AP-class4" in got["segm"] and "AP-sky" not in got["segm"]


def _instances(results: list, rle: bool) -> Instances:
    """The model's output of the json ``results`` of one image: masks pasted, or as RLEs."""
    boxes = torch.tensor([r["bbox"] for r in results])
    instances = Instances((HEIGHT, WIDTH), scores=torch.tensor([r["score"] for r in results]))
    instances.pred_boxes = Boxes(BoxMode.convert(boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS))
    instances.pred_classes = torch.tensor([r["category_id"] - 1 for r in results])
    rles = [r["segmentation"] for r in results]
    if rle:
        instances.pred_masks_rle = rles
    else:
        instances.pred_masks = torch.from_numpy(mask_util.decode(rles)).permute(2, 0, 1).bool()
    return instances


def test_rle_masks_are_scored_as_pasted_masks(dataset, without_detectron2_cocoeval):
    """MODEL.HTC.MASK_OUTPUT rle: Detectron2's evaluator reads only pred_masks, and scored the
    boxes alone; the RLEs now give the mask AP that the pasted masks give."""
    name, predictions = dataset
    inputs = [{"image_id": p["image_id"]} for p in predictions]
    results = []
    for rle in (False, True):
        evaluator = HTCCOCOEvaluator(name)
        evaluator.reset()
        evaluator.process(
            inputs, [{"instances": _instances(p["instances"], rle)} for p in predictions]
        )
        results.append(evaluator.evaluate())
    assert results[1].keys() == {"bbox", "segm"} and results[1] == results[0]


def test_outputs_the_model_does_not_give_are_not_evaluated(dataset, caplog, monkeypatch):
    """MODEL.HTC.SEMANTIC_OUTPUT False: no mIoU (its evaluator failed on the missing sem_seg at
    the first image); Cityscapes' instance evaluation, which reads pasted masks, refuses RLEs,
    and train_net.py does so before it trains."""
    name, _ = dataset
    MetadataCatalog.get(name).set(sem_seg_root="maps")
    cfg = tiny_cfg()
    cfg.MODEL.HTC.SEMANTIC_OUTPUT = False
    with caplog.at_level(logging.INFO, logger="htc"):
        assert [type(e) for e in build_evaluators(cfg, name)] == [HTCCOCOEvaluator]
    assert f"{name}: no mIoU, the model outputs no sem_seg (SEMANTIC_OUTPUT False)" in caplog.text
    cfg.MODEL.HTC.SEMANTIC_OUTPUT, cfg.MODEL.META_ARCHITECTURE = True, "GeneralizedRCNN"
    with caplog.at_level(logging.INFO, logger="htc"):  # it failed after the whole training run
        assert [type(e) for e in build_evaluators(cfg, name)] == [HTCCOCOEvaluator]
    assert f"{name}: no mIoU, GeneralizedRCNN has no semantic branch" in caplog.text
    cfg.MODEL.HTC.PANOPTIC_ON = True
    MetadataCatalog.get(name).set(panoptic_json="panoptic.json")
    with caplog.at_level(
        logging.INFO, logger="htc"
    ):  # no panoptic_seg output: failed after training
        assert [type(e) for e in build_evaluators(cfg, name)] == [HTCCOCOEvaluator]
    assert f"{name}: no PQ, GeneralizedRCNN has no semantic branch" in caplog.text
    cfg.MODEL.HTC.PANOPTIC_ON = False
    cfg.MODEL.META_ARCHITECTURE = "HybridTaskCascade"
    cityscapes = MetadataCatalog.get(f"{name}_cityscapes").set(evaluator_type="cityscapes_htc")
    try:
        cfg.MODEL.HTC.MASK_OUTPUT = "rle"
        refused = "reads pasted masks: evaluate with MODEL.HTC.MASK_OUTPUT bitmask"
        with pytest.raises(ValueError, match=refused):
            build_evaluators(cfg, cityscapes.name)
        cfg.DATASETS.TEST = (cityscapes.name,)
        monkeypatch.setattr(train_net, "setup", lambda args: cfg)
        monkeypatch.setattr(train_net, "Trainer", None)  # nothing built, nothing trained
        with pytest.raises(ValueError, match=refused):
            train_net.main(SimpleNamespace(eval_only=False))
    finally:
        MetadataCatalog.remove(cityscapes.name)


def test_the_miou_evaluator_names_a_model_without_semantic_output(tmp_path):
    """A LazyConfig lists its evaluators itself: with model.semantic_output=False, the mIoU
    evaluator's KeyError now says what to change."""
    name = f"semantic_eval_test_{tmp_path.name}"
    DatasetCatalog.register(name, lambda: [{"file_name": "a.png", "sem_seg_file_name": "a.png"}])
    MetadataCatalog.get(name).set(ignore_label=255)
    try:
        evaluator = HTCSemSegEvaluator(name, num_classes=3)
        evaluator.reset()
        with pytest.raises(ValueError, match="outputs no sem_seg .* model.semantic_output=False"):
            evaluator.process([{"file_name": "a.png"}], [{"instances": Instances((8, 8))}])
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _registered(name: str, records: list, **metadata) -> str:
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(ignore_label=255, **metadata)
    return name


def test_the_miou_evaluator_refuses_what_it_cannot_score(tmp_path):
    """stuff_classes of another count than the semantic head's classes (SemSegEvaluator failed
    in NumPy after the inference) and, for a LazyConfig's evaluator list, a dataset without
    label maps (a bare KeyError); refused at construction, which lazyconfig_train_net.py does
    before training."""
    maps = [{"file_name": "a.png", "sem_seg_file_name": "a.png"}]
    named = _registered(f"stuff_{tmp_path.name}", maps, stuff_classes=["sky", "road"])
    unmapped = _registered(f"unmapped_{tmp_path.name}", [{"file_name": "a.png"}])
    try:
        HTCSemSegEvaluator(named, num_classes=2)
        refused = f"{named}' names 2 semantic classes \\(its metadata's stuff_classes\\) but .* 3"
        with pytest.raises(ValueError, match=refused):
            HTCSemSegEvaluator(named, num_classes=3)
        no_maps = f"{unmapped}' has no semantic maps .*: drop the mIoU evaluator"
        with pytest.raises(ValueError, match=no_maps):
            HTCSemSegEvaluator(unmapped, num_classes=3)
    finally:
        for name in (named, unmapped):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_ground_truth_without_area_is_refused_before_inference(dataset, tmp_path):
    """COCO AP splits objects by their 'area': faster-coco-eval counted those without one as
    small (APs, APm, APl silently wrong), pycocotools raised a KeyError after the inference."""
    name, _ = dataset
    coco = json.loads(open(MetadataCatalog.get(name).json_file).read())
    del coco["annotations"][3]["area"]
    path = tmp_path / "no_area.json"
    path.write_text(json.dumps(coco))
    lacking = f"{name}_no_area"
    register_coco_instances(lacking, {}, str(path), str(tmp_path))
    try:
        count, example = len(coco["annotations"]), coco["annotations"][3]["id"]
        refused = (
            f"no_area.json: 1 of its {count} annotations have no 'area' \\(e.g. id {example}\\)"
        )
        with pytest.raises(ValueError, match=refused):
            build_evaluators(tiny_cfg(), lacking)
    finally:
        DatasetCatalog.remove(lacking)
        MetadataCatalog.remove(lacking)
