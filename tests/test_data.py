"""Datasets, the mapper and the demo generator."""

import json

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from PIL import Image

from conftest import CONFIGS, tiny_cfg
from htc import HTCDatasetMapper, register_htc_instances
from htc.data import check_dataset, load_htc_json
from htc.demo_data import SEMANTIC_CLASSES, THING_CLASSES, generate_split, make_scene


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    generate_split(root, "train", num_images=4, seed=3)
    return root


def test_demo_generator_is_deterministic(tmp_path):
    a = make_scene(np.random.default_rng(7))
    b = make_scene(np.random.default_rng(7))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert [o["category_id"] for o in a[2]] == [o["category_id"] for o in b[2]]
    assert all(np.array_equal(x["mask"], y["mask"]) for x, y in zip(a[2], b[2]))
    generate_split(tmp_path / "one", "val", 3, seed=1)
    generate_split(tmp_path / "two", "val", 3, seed=1)
    for name in ["val.json", "val/00001.png", "val_sem/00003.png"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_demo_scene_labels_agree_with_instances():
    image, semantic, objects = make_scene(np.random.default_rng(11))
    assert image.shape == (256, 256, 3) and semantic.shape == (256, 256)
    assert set(np.unique(semantic)) <= set(range(len(SEMANTIC_CLASSES)))
    assert set(np.unique(semantic)) & {3, 4, 5}  # some stuff
    for obj in objects:  # every visible object pixel carries its class in the semantic map
        assert (semantic[obj["mask"]] == obj["category_id"]).all()
        assert obj["category_id"] < len(THING_CLASSES)


def _mapper(flip: bool, size: int):
    """The mapper of the demo's 6 semantic classes with a fixed resize and flip."""
    cfg = tiny_cfg()
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 6
    augs = [T.ResizeShortestEdge(size, size), T.RandomFlip(prob=1.0 if flip else 0.0)]
    return HTCDatasetMapper(cfg, is_train=True, augmentations=augs)


def _records(root):
    return load_htc_json(
        str(root / "train.json"), str(root / "train"), "t", str(root / "train_sem")
    )


@pytest.mark.parametrize("flip, size", [(False, 256), (True, 256), (True, 160), (False, 400)])
def test_mapper_keeps_image_masks_and_semantic_aligned(tiny_dataset, flip, size):
    records = _records(tiny_dataset)
    out = _mapper(flip, size)(records[0])
    image, sem, inst = out["image"], out["sem_seg"], out["instances"]
    assert image.shape[-2:] == sem.shape == (size, size)
    original = np.asarray(Image.open(records[0]["sem_seg_file_name"]))
    if flip:
        original = original[:, ::-1]
    resized = np.asarray(
        Image.fromarray(np.ascontiguousarray(original)).resize((size, size), Image.NEAREST)
    )
    assert (sem.numpy() == resized).mean() > 0.99
    for mask, cls in zip(inst.gt_masks.tensor, inst.gt_classes):
        # each instance mask lies on pixels the semantic map labels with its class
        assert (sem[mask] == cls).float().mean() > 0.95
    # the image's thing colours sit where the semantic map says "thing"
    things = sem < 3
    saturation = image.float().max(0).values - image.float().min(0).values
    assert saturation[things].mean() > saturation[~things].mean()


def test_mapper_rejects_bad_semantic_maps(tiny_dataset, tmp_path):
    records = _records(tiny_dataset)
    mapper = _mapper(False, 256)
    bad_size = tmp_path / "small.png"
    Image.fromarray(np.zeros((100, 120), np.uint8)).save(bad_size)
    with pytest.raises(ValueError, match="small.png"):
        mapper(dict(records[0], sem_seg_file_name=str(bad_size)))
    bad_label = tmp_path / "label.png"
    Image.fromarray(np.full((256, 256), 9, np.uint8)).save(bad_label)
    with pytest.raises(ValueError, match=r"label.png.*\[9\].*NUM_CLASSES"):
        mapper(dict(records[0], sem_seg_file_name=str(bad_label)))


def test_derived_semantic_labels(tiny_dataset):
    register_htc_instances(
        "test_derived", str(tiny_dataset / "train.json"), str(tiny_dataset / "train"),
        derive_semantic=True,
    )  # fmt: skip
    cfg = tiny_cfg()
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.DATASETS.TRAIN = ("test_derived",)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4  # 3 things + background
    mapper = HTCDatasetMapper(cfg, is_train=True, augmentations=[])
    record = load_htc_json(str(tiny_dataset / "train.json"), str(tiny_dataset / "train"), "t")[0]
    out = mapper(record)
    sem, inst = out["sem_seg"], out["instances"]
    assert sem.shape == out["image"].shape[-2:]
    painted = torch.zeros_like(sem, dtype=torch.bool)
    for mask, cls in zip(inst.gt_masks.tensor, inst.gt_classes):
        assert (sem[mask] == cls).all()
        painted |= mask
    assert (sem[~painted] == 3).all()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 6
    with pytest.raises(ValueError, match="NUM_CLASSES to 4"):
        HTCDatasetMapper(cfg, is_train=True, augmentations=[])


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


def test_coco_htc_is_registered_with_its_layout():
    meta = MetadataCatalog.get("coco_2017_val_htc")
    assert meta.json_file.endswith("coco/annotations/instances_val2017.json")
    assert meta.sem_seg_root.endswith("coco/stuffthingmaps/val2017")
    assert len(meta.stuff_classes) == 183 and meta.evaluator_type == "coco"


def test_demo_json_is_coco(tiny_dataset):
    data = json.loads((tiny_dataset / "train.json").read_text())
    assert {c["name"] for c in data["categories"]} == set(THING_CLASSES)
    assert all(a["area"] > 0 and a["iscrowd"] == 0 for a in data["annotations"])


def test_multiscale_config_draws_short_side_in_400_1400_long_side_1600():
    cfg = tiny_cfg()
    cfg.merge_from_file(str(CONFIGS / "htc_X_101_64x4d_dconv_c3-c5_FPN_ms_400-1400_20e.yaml"))
    mapper = HTCDatasetMapper(cfg, is_train=True)
    (resize,) = [a for a in mapper.augmentations.augs if isinstance(a, T.ResizeShortestEdge)]
    assert resize.is_range and tuple(resize.short_edge_length) == (400, 1400)
    assert resize.max_size == 1600


def test_semantic_branch_without_semantic_labels_is_refused(tiny_dataset):
    register_htc_instances(
        "test_no_sem", str(tiny_dataset / "train.json"), str(tiny_dataset / "train")
    )
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="'test_no_sem' has none.*SEMANTIC_ON False"):
        check_dataset(cfg, "test_no_sem", is_train=True)
    check_dataset(cfg, "test_no_sem", is_train=False)  # inference needs no labels
    cfg.MODEL.HTC.SEMANTIC_ON = False
    check_dataset(cfg, "test_no_sem", is_train=True)
