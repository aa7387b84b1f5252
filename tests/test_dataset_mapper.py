"""htc.data.dataset_mapper: images, masks and semantic maps stay aligned through the transforms;
bad image and label files are named when they are read."""

import inspect

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from conftest import CONFIGS, first_image, load, map_all, tiny_cfg, truncate
from htc import HTCDatasetMapper, register_htc_instances
from htc.data import load_htc_json


@pytest.mark.parametrize(
    "damage, error, message",
    [
        (lambda p: p.unlink(), FileNotFoundError, r"train.json: 1 images not found, e.g. .*00001"),
        (lambda p: p.write_bytes(b"no image"), OSError, r"cannot read .*00001.png.*identify"),
        (lambda p: p.write_bytes(b""), OSError, r"cannot read .*00001.png"),
        (truncate, OSError, r"cannot read .*00001.png.*truncated"),
        (
            lambda p: Image.fromarray(np.full((256, 256), 999, np.uint16)).save(p),
            ValueError,
            r"00001.png: I(;16)? pixels, which Detectron2's reader clips to 8 bits",
        ),
    ],
    ids=["missing", "not-an-image", "empty-file", "truncated", "16-bit"],
)
def test_bad_image_files_are_named(dataset, damage, error, message):
    root, _ = dataset
    damage(first_image(root))
    with pytest.raises(error, match=message):
        map_all(load(root))


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


def test_bad_semantic_maps_are_named(dataset):
    root, _ = dataset
    Image.fromarray(np.zeros((100, 120), np.uint8)).save(root / "train_sem" / "00001.png")
    with pytest.raises(ValueError, match=r"00001.png: semantic map of size \(100, 120\)"):
        map_all(load(root))
    Image.fromarray(np.full((256, 256), 7, np.uint8)).save(root / "train_sem" / "00001.png")
    with pytest.raises(ValueError, match=r"00001.png: semantic labels \[7\] outside \[0, 6\)"):
        map_all(load(root))


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


def _derived(tiny_dataset, name: str, augmentations: list):
    """The config, the mapper and the first record of the tiny dataset registered as ``name``
    with derived semantic labels (3 things + background)."""
    register_htc_instances(
        name, str(tiny_dataset / "train.json"), str(tiny_dataset / "train"), derive_semantic=True
    )
    cfg = tiny_cfg()
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.DATASETS.TRAIN = (name,)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    mapper = HTCDatasetMapper(cfg, is_train=True, augmentations=augmentations)
    record = load_htc_json(str(tiny_dataset / "train.json"), str(tiny_dataset / "train"), "t")[0]
    return cfg, mapper, record


def test_derived_semantic_labels(tiny_dataset):
    cfg, mapper, record = _derived(tiny_dataset, "test_derived", augmentations=[])
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


def test_derived_semantic_labels_ignore_crowd_regions(tiny_dataset):
    """A crowd's pixels are its class or the background between its members: neither is
    taught. Its RLE is flipped with the image; the instances paint over it. A crowd without a
    mask paints nothing; keypoints (which a flip cannot map without their flip indices) are
    not read."""
    _, mapper, record = _derived(tiny_dataset, "test_derived_crowd", [T.RandomFlip(prob=1.0)])
    crowd = np.zeros((256, 256), np.uint8, order="F")
    crowd[:40, :30] = 1
    rle = mask_util.encode(crowd)
    rle["counts"] = rle["counts"].decode()
    box = {"iscrowd": 1, "bbox": [0, 0, 30, 40], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}
    record["annotations"] += [dict(box, segmentation=rle, keypoints=[5.0, 5.0, 2]), box]
    out = mapper(record)
    sem, inst = out["sem_seg"], out["instances"]
    assert len(inst) == len(record["annotations"]) - 2  # the crowds are no targets
    masks = inst.gt_masks.tensor
    painted = masks.any(dim=0)
    flipped = torch.from_numpy(crowd[:, ::-1].astype(bool))
    assert (sem[flipped & ~painted] == 255).all() and (flipped & ~painted).sum() > 0
    assert (sem[~flipped & ~painted] == 3).all()
    for mask, cls in zip(masks, inst.gt_classes):
        assert (sem[mask] == cls).all()


def test_multiscale_config_draws_short_side_in_400_1400_long_side_1600():
    cfg = tiny_cfg()
    cfg.merge_from_file(str(CONFIGS / "htc_X_101_64x4d_dconv_c3-c5_FPN_ms_400-1400_20e.yaml"))
    mapper = HTCDatasetMapper(cfg, is_train=True)
    (resize,) = [a for a in mapper.augmentations.augs if isinstance(a, T.ResizeShortestEdge)]
    assert resize.is_range and tuple(resize.short_edge_length) == (400, 1400)
    assert resize.max_size == 1600


def test_semantic_labels_are_padded_with_the_ignored_label():
    """FixedSizeCrop(pad=True) padded them with 255 (0 in Detectron2 v0.6) whatever the ignored
    label: learned as a class, or refused as a value that the map itself did not hold."""
    cfg = tiny_cfg()
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 254
    padding = T.FixedSizeCrop((64, 64), pad=True)
    for augmentations in ([padding], [T.RandomApply(padding, prob=0.5)]):
        with pytest.raises(ValueError, match=r"pads the semantic labels with (255|0), not .* 254"):
            HTCDatasetMapper(cfg, is_train=True, augmentations=augmentations)
    HTCDatasetMapper(cfg, is_train=False, augmentations=[padding])  # reads no labels
    HTCDatasetMapper(cfg, is_train=True, augmentations=[T.FixedSizeCrop((64, 64), pad=False)])
    if "seg_pad_value" in inspect.signature(T.FixedSizeCrop).parameters:  # after v0.6
        crop = T.FixedSizeCrop((64, 64), seg_pad_value=254)
        HTCDatasetMapper(cfg, is_train=True, augmentations=[crop])


def test_labels_are_checked_against_the_configured_ignore_value(tiny_dataset, tmp_path):
    """One source of truth: SEM_SEG_HEAD.IGNORE_VALUE, which the loss and the padding use."""
    cfg = tiny_cfg()
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 6
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 254
    mapper = HTCDatasetMapper(cfg, is_train=True, augmentations=[])
    record = _records(tiny_dataset)[0]
    labels = np.array(Image.open(record["sem_seg_file_name"]))
    for value, accepted in [(254, True), (255, False)]:
        path = tmp_path / f"ignore{value}.png"
        Image.fromarray(np.where(labels == 0, value, labels).astype(np.uint8)).save(path)
        if accepted:
            assert (mapper(dict(record, sem_seg_file_name=str(path)))["sem_seg"] == 254).any()
        else:
            with pytest.raises(ValueError, match=r"\[255\].*not 254 .*IGNORE_VALUE"):
                mapper(dict(record, sem_seg_file_name=str(path)))


@pytest.mark.parametrize("orientation", [6, None])
def test_swapped_size_names_the_likely_cause(dataset, orientation):
    """The json gives the stored size (300 wide, 256 high); Detectron2 reads the image rotated
    by its EXIF orientation (256 wide, 300 high), or the json swapped the two."""
    root, coco = dataset
    for ann in coco["annotations"]:  # polygons: their size is the image's, whatever it is
        if ann["image_id"] == 1:
            ann["segmentation"] = [[10, 10, 60, 10, 60, 60]]
    coco["images"][0].update(height=256, width=300)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
        Image.new("RGB", (300, 256)).save(first_image(root), exif=exif)
    else:
        Image.new("RGB", (256, 300)).save(first_image(root))
    Image.new("L", (300, 256)).save(root / "train_sem" / "00001.png")
    cause = "EXIF orientation \\(6\\) rotates it" if orientation else "swapped in the json"
    with pytest.raises(ValueError, match=f"(?s)00001.png.*Width and height are.*{cause}"):
        map_all(load(root, coco))


def test_records_made_elsewhere_fail_with_the_file_named(dataset):
    """Records that did not come through load_htc_json (a user's own loader) still fail with the
    file named: annotations Detectron2 cannot transform, a label map that holds no labels."""
    root, _ = dataset
    records = load(root)
    records[0]["annotations"][0]["segmentation"] = [[1, 2, 30]]
    with pytest.raises(ValueError, match=r"00001.png: its annotations cannot be transformed"):
        map_all(records[:1])
    labels = np.array(Image.open(records[1]["sem_seg_file_name"]))
    Image.fromarray(np.stack([labels] * 3, -1)).save(records[1]["sem_seg_file_name"])
    rgb = r"00002.png: a label map of PIL mode 'RGB' has no unambiguous labels"
    with pytest.raises(ValueError, match=rgb):
        map_all(records[1:2])
