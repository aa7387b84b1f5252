"""Cityscapes and LVIS v1 end to end on small datasets in their real layouts
(tests/real_layouts.py): loaded by Detectron2's own loaders, trained for a few iterations by
train_net.py with the shipped configs at small widths, and scored by the official evaluators;
the ground truth fed as the prediction scores 100 in each."""

import json
import shutil
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.evaluation import DatasetEvaluators
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances, PolygonMasks
from PIL import Image
from real_layouts import THINGS, write_cityscapes, write_lvis
from torch.nn import functional as F

from conftest import CONFIGS, SMALL, TINY_OPTS, load_cfg, run_train_net, tiny_cfg
from htc.data.cityscapes import load_cityscapes_htc, panoptic_metadata
from htc.data.lvis import load_lvis_htc, register_lvis_htc, stuff_map
from htc.data.register import register_with_loader
from htc.evaluation import build_evaluators
from htc.panoptic import PanopticFusion, class_to_stuff
from htc.predict import _dataset_category_ids, coco_results
from htc.roi_heads import HAS_FED_LOSS

# The shipped configs at the widths of the other tests, on 128 x 256 images.
SMALL_MODEL = [str(v) for v in TINY_OPTS] + [
    "MODEL.WEIGHTS", "", "SOLVER.MAX_ITER", "2", "SOLVER.BASE_LR", "0.001",
    "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()", "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MAX_SIZE_TRAIN", "256", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "256",
]  # fmt: skip
NO_FED_LOSS = [
    "MODEL.ROI_BOX_HEAD.USE_FED_LOSS",
    "False",
    "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE",
    "False",
]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_layouts")
    write_cityscapes(root)
    write_lvis(root)
    return root


def _train_net(config: str, datasets, output, *opts) -> str:
    opts = (*SMALL, *SMALL_MODEL, "OUTPUT_DIR", str(output), *opts)
    return run_train_net(datasets, *opts, config=CONFIGS / config)


def _cityscapes_dirs(datasets, split: str):
    root = datasets / "cityscapes"
    return str(root / "leftImg8bit" / split), str(root / "gtFine" / split)


def test_cityscapes_instances_come_with_their_train_id_maps(datasets):
    """Detectron2's loader reads the polygons (its own 8 classes); each image gets the
    ``_labelTrainIds.png`` of the same frame, labels 0-18 or 255."""
    from cityscapesscripts.helpers.labels import name2label

    dicts = load_cityscapes_htc(*_cityscapes_dirs(datasets, "train"))
    things = _get_builtin_metadata("cityscapes")["thing_classes"]
    assert len(dicts) == 2
    for record in dicts:
        frame = record["file_name"].rsplit("/", 1)[1].replace("leftImg8bit.png", "")
        assert record["sem_seg_file_name"].endswith(f"/{frame}gtFine_labelTrainIds.png")
        labels = np.unique(np.asarray(Image.open(record["sem_seg_file_name"])))
        assert set(labels) <= set(range(19)) | {255} and {0, 2, 10} <= set(labels)
        drawn = np.asarray(Image.open(record["sem_seg_file_name"].replace("TrainIds", "Ids")))
        assert {name2label[n].id for n in ("road", "building", "sky")} <= set(np.unique(drawn))
        classes = sorted(things[a["category_id"]] for a in record["annotations"])
        assert len(classes) == 3 and set(classes) <= set(THINGS)


@pytest.mark.parametrize(
    "break_it, error",
    [
        ("instanceIds", r"1 ground-truth files .* missing: .*_000000_gtFine_instanceIds.png$"),
        ("labelTrainIds", r"_000001_gtFine_labelTrainIds.png. Make the train-id maps"),
        ("image", r"1 frames of .* have no image in .*: frankfurt/frankfurt_000000_000000;"),
        ("stray", r"files not named \*_leftImg8bit.png in .*README.txt"),
        ("polygons", r"_000000_gtFine_polygons.json: not a Cityscapes polygons file"),
        ("label", r"_000000_gtFine_polygons.json: labels that Cityscapes does not have: \['van'\]"),
    ],
)
def test_cityscapes_frames_without_their_files_are_refused(datasets, tmp_path, break_it, error):
    """Each image's ground truth, and each ground-truth frame's image: the evaluators would
    leave the frame out of the scores (AP 100 for a frame predicted empty) or stop the process
    at the end of the evaluation."""
    root = tmp_path / "cityscapes"
    shutil.copytree(datasets / "cityscapes", root)
    image_dir, gt_dir = _cityscapes_dirs(tmp_path, "val")
    load_cityscapes_htc(image_dir, gt_dir)
    frames = sorted(Path(image_dir).glob("*/*_leftImg8bit.png"))
    frame = frames[0 if break_it != "labelTrainIds" else 1]
    gt = Path(gt_dir) / frame.parent.name / frame.name.replace("leftImg8bit.png", "gtFine_")
    if break_it == "image":
        frame.unlink()
    elif break_it == "stray":
        (frame.parent / "README.txt").write_text("notes")
    elif break_it == "polygons":
        Path(f"{gt}polygons.json").write_text("{")
    elif break_it == "label":
        polygons = json.loads(Path(f"{gt}polygons.json").read_text())
        polygons["objects"][-1]["label"] = "van"
        Path(f"{gt}polygons.json").write_text(json.dumps(polygons))
    else:
        Path(f"{gt}{break_it}.png").unlink()
    with pytest.raises((FileNotFoundError, ValueError), match=error):
        load_cityscapes_htc(image_dir, gt_dir)


def test_a_panoptic_json_without_its_folder_is_refused_before_inference(datasets, tmp_path):
    gt = tmp_path / "gtFine"
    shutil.copytree(datasets / "cityscapes" / "gtFine", gt)
    shutil.rmtree(gt / "cityscapes_panoptic_val")
    name = "cityscapes_val_without_panoptic_pngs"
    register_with_loader(
        name, list, evaluator_type="cityscapes_htc", **panoptic_metadata(gt, "val")
    )
    cfg = tiny_cfg(panoptic_on=True)
    with pytest.raises(FileNotFoundError, match=f"{name}.*no folder .*cityscapes_panoptic_val,"):
        build_evaluators(cfg, name, str(tmp_path))


def test_cityscapes_evaluators_score_the_ground_truth_100(datasets, tmp_path, monkeypatch):
    """The instances of ``_instanceIds.png`` and the classes of ``_labelTrainIds.png`` as the
    prediction: 100 AP by cityscapesscripts' instance evaluation, 100 IoU by its pixel one, and
    their panoptic fusion 100 PQ against csCreatePanopticImgs' ground truth."""
    from cityscapesscripts.helpers.labels import id2label

    monkeypatch.chdir(datasets)  # folders relative to it, as DETECTRON2_DATASETS' default
    image_dir, gt_dir = _cityscapes_dirs(Path("."), "val")
    name = "cityscapes_val_as_predicted"
    meta = _get_builtin_metadata("cityscapes")
    panoptic = panoptic_metadata(datasets / "cityscapes" / "gtFine", "val")
    register_with_loader(
        name, lambda: load_cityscapes_htc(image_dir, gt_dir), image_dir=image_dir,
        gt_dir=gt_dir, sem_seg_root=gt_dir, evaluator_type="cityscapes_htc", **meta, **panoptic,
    )  # fmt: skip
    cfg = tiny_cfg(panoptic_on=True)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 19
    evaluator = DatasetEvaluators(build_evaluators(cfg, name, str(tmp_path)))
    fusion = PanopticFusion(class_to_stuff=class_to_stuff(name, 19), stuff_area_limit=64)
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        gt = record["sem_seg_file_name"].replace("labelTrainIds", "instanceIds")
        ids = np.asarray(Image.open(gt))
        instances = [i for i in np.unique(ids) if i >= 1000]
        masks = torch.stack([torch.from_numpy(ids == i) for i in instances])
        classes = [meta["thing_classes"].index(id2label[i // 1000].name) for i in instances]
        predicted = Instances(
            ids.shape,
            pred_masks=masks,
            pred_boxes=BitMasks(masks).get_bounding_boxes(),
            scores=torch.ones(len(instances)),
            pred_classes=torch.tensor(classes),
        )
        train_ids = np.asarray(Image.open(record["sem_seg_file_name"])).astype("int64")
        train_ids = torch.from_numpy(train_ids)
        # confident logits: the panoptic fusion weighs a stuff class against all things
        scores = 30.0 * F.one_hot(torch.where(train_ids == 255, 0, train_ids), 19).permute(2, 0, 1)
        output = {"instances": predicted, "sem_seg": scores}
        output["panoptic_seg"] = fusion(predicted, scores)
        evaluator.process([record], [output])
    results = evaluator.evaluate()
    assert results["segm"]["AP"] == pytest.approx(100)
    assert results["segm"]["AP50"] == pytest.approx(100)
    assert results["sem_seg"]["IoU"] == pytest.approx(100)
    assert results["panoptic_seg"]["PQ"] == pytest.approx(100)
    assert results["panoptic_seg"]["PQ_th"] == pytest.approx(100)


@pytest.mark.heavy
def test_cityscapes_config_trains_and_is_scored_by_the_cityscapes_evaluators(datasets, tmp_path):
    classes = ["MODEL.ROI_HEADS.NUM_CLASSES", "8", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "19"]
    log = _train_net("cityscapes/htc_R_50_FPN.yaml", datasets, tmp_path / "out", *classes)
    for task in ("segm", "sem_seg", "panoptic_seg"):  # Cityscapes' AP and IoU, and PQ
        assert f"copypaste: Task: {task}" in log
    assert (tmp_path / "out" / "model_final.pth").is_file()


@pytest.mark.parametrize("mask_output", ["bitmask", "rle"])
def test_lvis_evaluator_scores_the_ground_truth_100(datasets, tmp_path, mask_output):
    """LVIS's annotations as the prediction (its polygons drawn as masks, or their RLEs as
    MODEL.HTC.MASK_OUTPUT rle gives them): 100 box and mask AP, and 100 in each frequency group
    (rare, common, frequent)."""
    name = f"lvis_v1_val_as_predicted_{mask_output}"
    register_lvis_htc(name, str(datasets / "lvis/lvis_v1_val.json"), str(datasets / "coco"))
    cfg = tiny_cfg()
    cfg.TEST.DETECTIONS_PER_IMAGE = 300
    (evaluator,) = build_evaluators(cfg, name, str(tmp_path), instances_only=True)
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        annotations = record["annotations"]
        size = (record["height"], record["width"])
        polygons = PolygonMasks([a["segmentation"] for a in annotations])
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations]
        predicted = Instances(
            size,
            pred_boxes=Boxes(torch.tensor(boxes)),
            scores=torch.ones(len(annotations)),
            pred_classes=torch.tensor([a["category_id"] for a in annotations]),
        )
        masks = BitMasks.from_polygon_masks(polygons, *size).tensor
        if mask_output == "rle":
            columns = np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8))
            predicted.pred_masks_rle = mask_util.encode(columns)
            for rle in predicted.pred_masks_rle:
                rle["counts"] = rle["counts"].decode()
        else:
            predicted.pred_masks = masks
        evaluator.process([record], [{"instances": predicted}])
    results = evaluator.evaluate()
    for task in ("bbox", "segm"):
        for key in ("AP", "APr", "APc", "APf"):
            assert results[task][key] == pytest.approx(100), (task, key)


def test_htc_predict_writes_the_category_ids_of_the_lvis_json(datasets):
    """LVIS's metadata maps no category ids (Detectron2's loader numbers them from 0 and
    LVISEvaluator adds 1): htc.predict wrote the contiguous ids, each one too low, silently; the
    ground truth as the prediction now gets the json's ids."""
    name = "lvis_v1_val_predicted_ids"
    json_file = datasets / "lvis/lvis_v1_val.json"
    register_lvis_htc(name, str(json_file), str(datasets / "coco"))
    cfg = tiny_cfg()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(MetadataCatalog.get(name).thing_classes)
    cfg.DATASETS.TEST = (name,)
    ids = _dataset_category_ids(cfg)
    for record in DatasetCatalog.get(name):
        classes = [a["category_id"] for a in record["annotations"]]
        predicted = Instances(
            (record["height"], record["width"]),
            pred_boxes=Boxes(torch.zeros(len(classes), 4)),
            scores=torch.ones(len(classes)),
            pred_classes=torch.tensor(classes),
        )
        results = coco_results({"instances": predicted}, record["image_id"], ids)
        annotations = json.loads(json_file.read_text())["annotations"]
        want = [a["category_id"] for a in annotations if a["image_id"] == record["image_id"]]
        assert [r["category_id"] for r in results] == want


def _zero_based(data: dict) -> None:
    for item in data["categories"]:
        item["id"] -= 1
    for ann in data["annotations"]:
        ann["category_id"] -= 1


LVIS_BREAKS = {  # what breaks an LVIS json -> the start of its refusal
    "two images of one id": (
        lambda d: d["images"][1].update(id=d["images"][0]["id"]),
        "image id 1 is used twice",
    ),
    "0-based category ids": (_zero_based, "its categories are not the 1203 of the table"),
    "an annotation of no image": (
        lambda d: d["annotations"][0].update(image_id=999),
        "annotation 1 refers to image_id 999",
    ),
    "a category id beyond the table": (
        lambda d: d["annotations"][0].update(category_id=5000),
        "annotation 1 of image 1 .* 5000",
    ),
    "a category without frequency": (
        lambda d: d["categories"][0].pop("frequency"),
        "category 1 .* frequency None",
    ),
    "an RLE mask": (
        lambda d: d["annotations"][0].update(segmentation={"size": [1, 1], "counts": "1"}),
        "annotation 1 has segmentation dict .* polygons only",
    ),
    "a polygon coordinate of NaN": (
        lambda d: d["annotations"][0]["segmentation"][0].__setitem__(0, float("nan")),
        "polygon 0 has a coordinate that is not finite",
    ),
}


@pytest.mark.parametrize("case", LVIS_BREAKS)
def test_an_lvis_json_that_the_loader_would_misread_is_refused(datasets, tmp_path, case):
    """Detectron2's LVIS loader and the LVIS API trust the file: two images of one id merge
    (one trains on the other's objects), 0-based ids shift every class by one, an annotation
    of an unknown image is dropped; the others fail hours in."""
    data = json.loads((datasets / "lvis/lvis_v1_train.json").read_text())
    break_it, error = LVIS_BREAKS[case]
    break_it(data)
    path = tmp_path / "lvis_v1_train.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=error):
        load_lvis_htc(str(path), str(datasets / "coco"), "lvis_v1_train_broken")


def test_a_cocofied_lvis_json_keeps_lvis_names_under_some_of_cocos_ids(datasets, tmp_path):
    """As Detectron2's prepare_cocofied_lvis.py writes it: LVIS's categories (names,
    frequencies) renumbered to COCO's ids, those without instances dropped."""
    data = json.loads((datasets / "lvis/lvis_v1_train.json").read_text())
    used = sorted({ann["category_id"] for ann in data["annotations"]})
    coco_id = dict(zip(used, (1, 2, 3, 4)))  # person, bicycle, car, motorcycle
    data["categories"] = [
        dict(c, id=coco_id[c["id"]]) for c in data["categories"] if c["id"] in coco_id
    ]
    for ann in data["annotations"]:
        ann["category_id"] = coco_id[ann["category_id"]]
    path = tmp_path / "lvis_v1_train_cocofied.json"
    path.write_text(json.dumps(data))
    records = load_lvis_htc(str(path), str(datasets / "coco"), "lvis_v1_train_cocofied")
    assert {a["category_id"] for r in records for a in r["annotations"]} == {0, 1, 2, 3}
    data["categories"][0]["id"] = 12  # no COCO category has it
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"category ids \[12\] are not in COCO's table"):
        load_lvis_htc(str(path), str(datasets / "coco"), "lvis_v1_train_cocofied")


def test_an_lvis_image_or_map_that_is_missing_or_misfit_is_refused_at_loading(datasets, tmp_path):
    coco = tmp_path / "coco"
    shutil.copytree(datasets / "coco", coco)
    json_file, maps = str(datasets / "lvis/lvis_v1_train.json"), str(coco / "stuffthingmaps")
    load_lvis_htc(json_file, str(coco), "lvis_v1_train_checked", maps)
    image = sorted((coco / "train2017").glob("*.jpg"))[0]
    label_map = Path(stuff_map(str(image), maps))
    Image.open(label_map).resize((20, 10)).save(label_map)
    with pytest.raises(ValueError, match=f"{label_map}: semantic map of size \\(10, 20\\)"):
        load_lvis_htc(json_file, str(coco), "lvis_v1_train_checked", maps)
    image.unlink()
    with pytest.raises(FileNotFoundError, match=f"1 images not found, e.g. {image}"):
        load_lvis_htc(json_file, str(coco), "lvis_v1_train_checked", maps)


def test_lvis_config_learns_with_the_federated_loss_at_every_stage():
    cfg = load_cfg(CONFIGS / "lvis/htc_R_50_FPN_1x.yaml")
    cfg.merge_from_list(TINY_OPTS + ["MODEL.ROI_HEADS.NUM_CLASSES", 1203])
    if not HAS_FED_LOSS:
        with pytest.raises(ValueError, match="after v0.6"):
            build_model(cfg)
        pytest.skip("Detectron2 v0.6 has no federated loss: the LVIS configs are refused")
    register_lvis_htc("lvis_v1_fed_loss_weights", "unused.json", "unused")
    cfg.DATASETS.TRAIN = ("lvis_v1_fed_loss_weights",)  # the class weights: LVIS v1's counts
    predictors = build_model(cfg).roi_heads.box_predictor
    assert len(predictors) == 3
    assert all(p.use_fed_loss and p.use_sigmoid_ce for p in predictors)
    assert all(p.fed_loss_cls_weights.shape == (1203,) for p in predictors)


@pytest.mark.heavy
def test_lvis_config_trains_and_is_scored_by_the_lvis_evaluator(datasets, tmp_path):
    """Repeat-factor sampling on LVIS's categories, 300 detections per image, LVISEvaluator
    (AP by frequency group) and the semantic branch's mIoU on COCO-Stuff's maps; on v0.6 without
    the federated loss, which it does not have."""
    opts = [
        "MODEL.ROI_HEADS.NUM_CLASSES", "1203", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "183",
        "TEST.DETECTIONS_PER_IMAGE", "20",  # each detection's masks of 1203 classes
    ]  # fmt: skip
    opts += [] if HAS_FED_LOSS else NO_FED_LOSS
    log = _train_net("lvis/htc_R_50_FPN_1x.yaml", datasets, tmp_path / "out", *opts)
    assert "RepeatFactorTrainingSampler" in log
    for task in ("bbox", "segm", "sem_seg"):
        assert f"copypaste: Task: {task}" in log
    assert "APr" in log and "APf" in log
