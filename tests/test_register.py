"""htc.data.register and htc.data.builtin: what registration puts in Detectron2's catalogs
(that importing htc puts nothing there: test_environment's fresh interpreter)."""

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from htc import register_htc_instances
from htc.data import register_builtin

BUILTIN = ["coco_2017_train_htc", "coco_2017_val_htc", "htc_demo_train", "htc_demo_val"]


def test_builtin_datasets_are_registered_once_with_their_layout():
    register_builtin()
    register_builtin()  # a second call in the same process changes nothing
    assert set(BUILTIN) <= set(DatasetCatalog.list())
    meta = MetadataCatalog.get("coco_2017_val_htc")
    assert meta.json_file.endswith("coco/annotations/instances_val2017.json")
    assert meta.sem_seg_root.endswith("coco/stuffthingmaps/val2017")
    assert len(meta.stuff_classes) == 183 and meta.evaluator_type == "coco"
    assert meta.ignore_label == 255
    # named before the json is read (htc.demo's pictures: "person", not "class 0")
    assert len(meta.thing_classes) == 80 and meta.thing_classes[0] == "person"
    demo = MetadataCatalog.get("htc_demo_val")
    assert demo.thing_classes == ["disc", "square", "triangle"] and demo.ignore_label == 255


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sem_seg_root": "", "derive_semantic": True}, "sem_seg_root is empty"),
        ({"sem_seg_root": ""}, "sem_seg_root is empty"),
        ({"sem_seg_root": "maps", "derive_semantic": True}, "either sem_seg_root or derive"),
    ],
)
def test_semantic_labels_asked_two_ways_or_from_no_folder_are_refused(kwargs, message):
    """An empty sem_seg_root passed the check of both ways given (it is falsy) and looked for
    the maps in the working folder."""
    with pytest.raises(ValueError, match=message):
        register_htc_instances("test_semantic_asked_wrong", "train.json", "train", **kwargs)
    assert "test_semantic_asked_wrong" not in DatasetCatalog.list()
