"""Panoptic output (htc.panoptic): the fusion of instances and semantic stuff, COCO-Stuff's classes
read as COCO panoptic's categories, the model's output, and PQ on the demo's ground truth."""

import json
import logging

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from PIL import Image

import htc.predict
from conftest import DEMO_CONFIG, make_batch, tiny_cfg
from htc import register_htc_instances
from htc.data import coco_stuff_to_panoptic, register_builtin
from htc.data.coco_panoptic import COCO_STUFF_STUFF_NAMES, FIRST_STUFF_ID, MERGED, REMOVED
from htc.data.demo_data import PANOPTIC_IDS, generate_split
from htc.demo import load_predictor_cfg
from htc.evaluation import panoptic_evaluator
from htc.panoptic import PanopticFusion, class_to_stuff

H, W = 10, 20


def _box_mask(rows: slice, cols: slice) -> torch.Tensor:
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[rows, cols] = True
    return mask


def _hand_built_case():
    """Semantic classes: 0 thing, 1 and 2 both stuff category 7, 3 stuff category 9, 4 none.
    Left half: classes 1, 2 at 0.3 each, thing at 0.4 (the merged category wins); right top:
    class 3; right bottom: class 4. Instances, by score: A (0.9); B inside A (0.8, dropped:
    covered 100%); C a quarter under A (0.7, kept on its free pixels); D under the score
    threshold (0.4)."""
    probs = torch.full((5, H, W), 1e-4)
    probs[:, :, :10] = torch.tensor([0.4, 0.3, 0.3, 1e-4, 1e-4])[:, None, None]
    probs[3, :5, 10:] = 1.0
    probs[4, 5:, 10:] = 1.0
    instances = Instances((H, W))
    masks = [
        _box_mask(slice(0, 4), slice(0, 4)),
        _box_mask(slice(0, 4), slice(1, 4)),
        _box_mask(slice(2, 6), slice(2, 6)),
        _box_mask(slice(8, 10), slice(0, 2)),
    ]
    instances.pred_masks = torch.stack(masks)
    instances.scores = torch.tensor([0.9, 0.8, 0.7, 0.4])
    instances.pred_classes = torch.tensor([2, 1, 0, 0])
    instances.pred_boxes = Boxes(torch.zeros(4, 4))
    return instances, probs.log(), masks


def test_fusion_of_a_hand_built_case():
    instances, scores, masks = _hand_built_case()
    fusion = PanopticFusion(
        class_to_stuff=[-1, 7, 7, 9, -1],
        overlap_threshold=0.5,
        stuff_area_limit=60,  # category 9 covers 50 pixels: left out
        instances_score_threshold=0.5,
    )
    seg, info = fusion(instances, scores)
    expected = torch.zeros(H, W, dtype=torch.int32)
    expected[:, :10] = 3
    expected[masks[2]] = 2
    expected[masks[0]] = 1
    assert torch.equal(seg, expected)
    score_a, score_c = instances.scores[[0, 2]].tolist()
    assert info == [
        {"id": 1, "isthing": True, "score": score_a, "category_id": 2, "instance_id": 0},
        {"id": 2, "isthing": True, "score": score_c, "category_id": 0, "instance_id": 2},
        {"id": 3, "isthing": False, "category_id": 7, "area": 100 - 16 - 12},
    ]


def test_fusion_thresholds_are_the_configs():
    instances, scores, _ = _hand_built_case()
    permissive = PanopticFusion(
        class_to_stuff=[-1, 7, 7, 9, -1],
        overlap_threshold=1.0,
        stuff_area_limit=50,
        instances_score_threshold=0.3,
    )
    _, info = permissive(instances, scores)
    assert [s["instance_id"] for s in info if s["isthing"]] == [0, 1, 2, 3]
    assert [s["category_id"] for s in info if not s["isthing"]] == [7, 9]


def test_fusion_without_stuff_is_refused():
    with pytest.raises(ValueError, match="no semantic class"):
        PanopticFusion(class_to_stuff=[-1, -1])


@pytest.mark.parametrize("threshold", ["overlap_threshold", "instances_score_threshold"])
def test_fusion_thresholds_outside_0_1_are_refused(threshold):
    """An overlap threshold of 5.0 kept every instance however covered, silently."""
    with pytest.raises(ValueError, match="=5.0: a fraction, in \\[0, 1\\]"):
        PanopticFusion(class_to_stuff=[-1, 0], **{threshold: 5.0})


def test_coco_stuff_classes_cover_every_panoptic_category_once():
    table = coco_stuff_to_panoptic()
    assert len(table) == 183
    assert COCO_STUFF_STUFF_NAMES == sorted(COCO_STUFF_STUFF_NAMES)
    assert len(COCO_STUFF_STUFF_NAMES) == 182 - FIRST_STUFF_ID + 1
    categories = {c["id"]: c for c in COCO_CATEGORIES}
    assert len(categories) == 133
    classes_of = {c: [k for k, v in enumerate(table) if v == c] for c in categories}
    assert all(classes_of.values()), [c for c, k in classes_of.items() if not k]
    assert set(table) - {0} == set(categories)  # nothing else is named
    for cid, category in categories.items():
        names = [COCO_STUFF_STUFF_NAMES[k + 1 - FIRST_STUFF_ID] for k in classes_of[cid]]
        if category["isthing"]:
            assert classes_of[cid] == [cid - 1]
        elif category["name"] in MERGED:
            assert sorted(names) == sorted(MERGED[category["name"]])
        else:
            assert names == [category["name"]]  # kept as it is, same id
    void = [k for k, v in enumerate(table) if v == 0]
    unused_thing_ids = set(range(1, 92)) - {c["id"] for c in COCO_CATEGORIES if c["isthing"]}
    removed = {FIRST_STUFF_ID - 1 + COCO_STUFF_STUFF_NAMES.index(n) for n in REMOVED}
    assert set(void) == {i - 1 for i in unused_thing_ids} | removed | {182}
    assert len(void) == 11 + 12 + 1


def test_coco_panoptic_is_registered_for_htc():
    register_builtin()
    stuff = class_to_stuff("coco_2017_val_panoptic", 183)
    meta = MetadataCatalog.get("coco_2017_val_panoptic")
    assert set(stuff) - {-1} == set(meta.stuff_dataset_id_to_contiguous_id.values())
    assert stuff[156] == meta.stuff_dataset_id_to_contiguous_id[187]  # sky-other: sky merged
    with pytest.raises(ValueError, match="NUM_CLASSES is 182"):
        class_to_stuff("coco_2017_val_panoptic", 182)
    with pytest.raises(ValueError, match="semantic_to_panoptic"):
        class_to_stuff("coco_2017_val_htc", 183)


def _demo_panoptic_model(mask_on: bool = True, **htc):
    cfg = tiny_cfg(PANOPTIC_ON=True, **htc)
    cfg.MODEL.MASK_ON = mask_on
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 6
    cfg.DATASETS.TEST = ("htc_demo_val",)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.HTC.PANOPTIC.INSTANCES_CONFIDENCE_THRESH = 0.0
    cfg.MODEL.HTC.PANOPTIC.STUFF_AREA_LIMIT = 1
    return build_model(cfg).eval()


@pytest.mark.parametrize("semantic_output", [True, False])
def test_model_outputs_panoptic_segmentation(semantic_output):
    torch.manual_seed(0)
    model = _demo_panoptic_model(SEMANTIC_OUTPUT=semantic_output)
    assert not [k for k in model.state_dict() if "panoptic" in k]  # checkpoints are unchanged
    batch = make_batch(2, with_gt=False)
    batch[1]["height"], batch[1]["width"] = 48, 40  # output resized as sem_seg is
    with torch.no_grad():
        outputs = model(batch)
    for out, size in zip(outputs, [(96, 96), (48, 40)]):
        assert ("sem_seg" in out) == semantic_output
        seg, info = out["panoptic_seg"]
        assert seg.shape == size and seg.dtype == torch.int32
        assert set(torch.unique(seg).tolist()) - {0} == {s["id"] for s in info}
        things = [s for s in info if s["isthing"]]
        stuff = [s for s in info if not s["isthing"]]
        assert things and stuff
        assert {s["category_id"] for s in things} <= {0, 1, 2}
        assert {s["category_id"] for s in stuff} <= {3, 4, 5}
        for s in stuff:
            assert s["area"] == (seg == s["id"]).sum()


@pytest.mark.parametrize(
    "htc, message",
    [
        ({"SEMANTIC_ON": False, "SEMANTIC_FUSION": []}, "SEMANTIC_ON True"),
        ({"MASK_OUTPUT": "rle"}, "MASK_OUTPUT 'bitmask'"),
    ],
)
def test_panoptic_without_its_inputs_is_refused(htc, message):
    with pytest.raises(ValueError, match=message):
        _demo_panoptic_model(**htc)


def test_panoptic_without_masks_names_mask_on():
    """The message named MASK_OUTPUT's value, which was right, not MASK_ON's."""
    with pytest.raises(ValueError, match="set MODEL.MASK_ON True$"):
        _demo_panoptic_model(mask_on=False)


def _ground_truth_as_prediction(root, split: str):
    """(inputs, outputs) as the model would give them: the ground truth's segments with
    contiguous category ids and ``isthing``."""
    data = json.loads((root / f"{split}_panoptic.json").read_text())
    things = PANOPTIC_IDS["thing_dataset_id_to_contiguous_id"]
    stuff = PANOPTIC_IDS["stuff_dataset_id_to_contiguous_id"]
    inputs, outputs = [], []
    for ann in data["annotations"]:
        rgb = np.asarray(Image.open(root / f"{split}_panoptic" / ann["file_name"]), np.int32)
        seg = torch.from_numpy(rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2])
        info = [
            {
                "id": s["id"],
                "isthing": s["category_id"] in things,
                "category_id": {**things, **stuff}[s["category_id"]],
            }
            for s in ann["segments_info"]
        ]
        inputs.append({"image_id": ann["image_id"], "file_name": ann["file_name"]})
        outputs.append({"panoptic_seg": (seg.int(), info)})
    return inputs, outputs


def _pq(name, inputs, outputs, tmp_path):
    evaluator = panoptic_evaluator(name, str(tmp_path / "eval"))
    evaluator.reset()
    evaluator.process(inputs, outputs)
    return evaluator.evaluate()["panoptic_seg"]


def test_ground_truth_as_prediction_scores_pq_100(tmp_path):
    root = tmp_path / "htc_demo"
    generate_split(root, "val", 3, seed=1)
    name = "test_panoptic_demo_val"
    MetadataCatalog.get(name).set(
        panoptic_root=str(root / "val_panoptic"),
        panoptic_json=str(root / "val_panoptic.json"),
        **PANOPTIC_IDS,
    )
    inputs, outputs = _ground_truth_as_prediction(root, "val")
    result = _pq(name, inputs, outputs, tmp_path)
    for key in ["PQ", "SQ", "RQ", "PQ_th", "PQ_st"]:
        assert result[key] == pytest.approx(100.0), key

    # one thing segment missing: things lose recognition, stuff keeps 100
    inputs, outputs = _ground_truth_as_prediction(root, "val")  # the evaluator took "isthing"
    seg, info = outputs[0]["panoptic_seg"]
    first_thing = next(s for s in info if s["isthing"])
    seg[seg == first_thing["id"]] = 0
    info.remove(first_thing)
    result = _pq(name, inputs, outputs, tmp_path)
    assert result["RQ_th"] < 100 and result["PQ_st"] == pytest.approx(100.0)


def _own_dataset(tiny_dataset, name: str, **kwargs) -> None:
    """The tiny demo split as a user's own dataset: things disc, square, triangle (ids 1-3)."""
    root = tiny_dataset
    register_htc_instances(name, str(root / "train.json"), str(root / "train"), **kwargs)


@pytest.mark.parametrize(
    "how, classes, want_table, want_stuff",
    [
        ("derive_semantic", 4, [1, 2, 3, 4], [-1, -1, -1, 3]),
        ("label maps", 6, [1, 2, 3, 4, 5, 6], [-1, -1, -1, 3, 4, 5]),
        ("label maps named", 6, [4, 1, 5, 2, 6, 3], [0, -1, 2, -1, 4, -1]),
    ],
)
def test_own_datasets_get_default_panoptic_categories(
    tiny_dataset, how, classes, want_table, want_stuff, caplog
):
    """Things keep their json ids, other semantic classes become stuff numbered after them:
    classes 0..T-1 are the things where the labels are derived or nothing says otherwise (with a
    warning), else stuff_classes says which classes are things by their names."""
    name = f"own_{how.replace(' ', '_')}"
    kwargs = {"derive_semantic": True} if how == "derive_semantic" else {}
    if how.startswith("label maps"):
        kwargs["sem_seg_root"] = str(tiny_dataset / "train_sem")
    if how == "label maps named":
        kwargs["metadata"] = {
            "stuff_classes": ["sky", "disc", "grass", "square", "water", "triangle"]
        }
    if name not in DatasetCatalog.list():
        _own_dataset(tiny_dataset, name, **kwargs)
    logging.getLogger("htc").propagate = True
    with caplog.at_level(logging.WARNING, logger="htc"):
        assert class_to_stuff(name, classes) == want_stuff
    assert ("are taken as its thing classes" in caplog.text) == (how == "label maps")
    meta = MetadataCatalog.get(name)
    assert meta.semantic_to_panoptic == want_table
    assert len(meta.stuff_classes) == classes
    if how == "derive_semantic":
        assert meta.stuff_classes == ["disc", "square", "triangle", "background"]


def test_own_dataset_whose_class_names_leave_things_unnamed_is_refused(tiny_dataset):
    name = "own_unnamed_things"
    if name not in DatasetCatalog.list():
        _own_dataset(
            tiny_dataset, name, sem_seg_root=str(tiny_dataset / "train_sem"),
            metadata={"stuff_classes": [f"class {k}" for k in range(6)]},
        )  # fmt: skip
    with pytest.raises(ValueError, match="each thing class once by its name"):
        class_to_stuff(name, 6)


def test_the_demo_config_on_own_data_outputs_and_draws_panoptic(tiny_dataset, tmp_path):
    """The user's first try: the demo config with only DATASETS.TEST changed, run by htc.predict
    --panoptic --draw. The dataset's default panoptic categories are set when the model is
    built: htc.predict read its metadata before, and stopped at the first panoptic PNG."""
    name = "own_first_try"
    if name not in DatasetCatalog.list():
        _own_dataset(tiny_dataset, name, sem_seg_root=str(tiny_dataset / "train_sem"))
    model = build_model(load_predictor_cfg(str(DEMO_CONFIG), ["MODEL.DEVICE", "cpu"]))
    with torch.no_grad():  # random weights: make stuff class 3 ("sky") win where no thing is
        model.semantic_head.conv_logits.bias[3] += 20
    weights, out = tmp_path / "model.pth", tmp_path / "out"
    torch.save({"model": model.state_dict()}, weights)  # built for the demo's dataset
    image = next((tiny_dataset / "train").glob("*.png"))
    opts = ["MODEL.DEVICE", "cpu", "DATASETS.TEST", f"('{name}',)", "MODEL.WEIGHTS", str(weights)]
    htc.predict.main(
        ["--config-file", str(DEMO_CONFIG), "--input", str(image), "--output", str(out),
         "--panoptic", "--draw", "--workers", "0", "--opts", *opts]
    )  # fmt: skip
    picture = np.asarray(Image.open(out / "pictures" / "1.png"))
    assert picture.shape[1] == 3 * np.asarray(Image.open(image)).shape[1]
    (annotation,) = json.loads((out / "panoptic.json").read_text())["annotations"]
    categories = {s["category_id"] for s in annotation["segments_info"]}
    assert categories <= {1, 2, 3, 4, 5, 6} and 4 in categories  # class 3's stuff category
