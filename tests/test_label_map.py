"""htc.data.label_map and htc.evaluation: one reader of label maps for training and evaluation,
by PIL mode; maps without unambiguous labels refused when the dataset is loaded."""

import numpy as np
import pytest
import torch
from detectron2.data.detection_utils import read_image
from PIL import Image

from conftest import load, map_all
from htc import register_htc_instances
from htc.data.label_map import check_label_map, read_label_map
from htc.evaluation import HTCSemSegEvaluator

LABELS = np.array([[0, 1, 2, 3], [4, 5, 255, 0], [1, 1, 2, 2]], dtype=np.uint8)


def _palette_map(path, labels=LABELS):
    image = Image.fromarray(labels, mode="P")
    palette = np.random.default_rng(0).integers(0, 256, (256, 3), dtype=np.uint8)
    image.putpalette(palette.reshape(-1).tolist())
    image.save(path)
    return path


@pytest.mark.parametrize(
    "mode, labels",
    [
        ("L", LABELS),
        ("P", LABELS),
        ("I;16", LABELS.astype(np.uint16) * 300),  # labels above 255
        ("I", LABELS.astype(np.int32) * 70000),
        ("1", LABELS % 2),
    ],
)
def test_single_channel_integer_maps_give_their_stored_values(tmp_path, mode, labels):
    path = tmp_path / ("map.tif" if mode == "I" else "map.png")  # PNG holds no 32-bit ints
    if mode == "P":
        _palette_map(path, labels)
    elif mode == "1":
        Image.fromarray(labels.astype(bool)).save(path)
    else:
        Image.fromarray(labels).save(path)
    assert Image.open(path).mode in {mode, "I"}  # Pillow before 10 reopens 16-bit PNGs as I
    assert np.array_equal(read_label_map(str(path)), labels.astype(np.int64))
    check_label_map(str(path), *labels.shape, "image.png")


def test_palette_indices_are_not_luminance(tmp_path):
    """What Detectron2's read_image(path, "L") gives for a palette map: grey levels."""
    path = _palette_map(tmp_path / "voc.png")
    luminance = read_image(str(path), "L")[..., 0]
    assert not np.array_equal(luminance, LABELS)
    assert np.array_equal(read_label_map(str(path)), LABELS)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "F", "CMYK"])
def test_maps_without_unambiguous_labels_are_refused(tmp_path, mode):
    path = tmp_path / ("map.tif" if mode in ("F", "CMYK") else "map.png")
    Image.new(mode, (4, 3)).save(path)
    with pytest.raises(ValueError, match=f"map.*PIL mode '{mode}' has no unambiguous labels"):
        check_label_map(str(path), 3, 4, "image.png")


def test_a_map_of_another_size_is_refused_at_load(tmp_path):
    path = tmp_path / "map.png"
    Image.fromarray(LABELS).save(path)
    with pytest.raises(ValueError, match=r"map.png: semantic map of size \(3, 4\).*\(4, 3\)"):
        check_label_map(str(path), 4, 3, "image.png")


def test_rgb_maps_are_refused_when_the_dataset_is_loaded(dataset):
    root, _ = dataset
    labels = np.array(Image.open(root / "train_sem" / "00002.png"))
    Image.fromarray(np.stack([labels] * 3, axis=-1)).save(root / "train_sem" / "00002.png")
    with pytest.raises(ValueError, match="00002.png: a label map of PIL mode 'RGB'"):
        load(root)


def test_training_and_evaluation_read_a_palette_map_alike(dataset):
    """The mapper's sem_seg and the evaluator's ground truth are the same labels: predicting the
    mapper's labels scores 100 mIoU."""
    root, _ = dataset
    for path in sorted((root / "train_sem").glob("*.png")):
        _palette_map(path, np.array(Image.open(path)))
    records = load(root)
    mapped = map_all(records)
    name = "test_label_map_palette"
    register_htc_instances(
        name, str(root / "train.json"), str(root / "train"), str(root / "train_sem"),
        metadata={"stuff_classes": [str(i) for i in range(6)]},
    )  # fmt: skip
    evaluator = HTCSemSegEvaluator(name, distributed=False)
    evaluator.reset()
    for record, out in zip(records, mapped):
        labels = out["sem_seg"].clamp(max=5)
        scores = torch.nn.functional.one_hot(labels, 6).permute(2, 0, 1).float()
        evaluator.process([{"file_name": record["file_name"]}], [{"sem_seg": scores}])
    assert evaluator.evaluate()["sem_seg"]["mIoU"] == pytest.approx(100.0)
