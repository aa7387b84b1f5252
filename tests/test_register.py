"""htc.data.register and htc.data.builtin: what registration puts in Detectron2's catalogs
(that importing htc puts nothing there: test_environment's fresh interpreter)."""

from detectron2.data import DatasetCatalog, MetadataCatalog

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
    demo = MetadataCatalog.get("htc_demo_val")
    assert demo.thing_classes == ["disc", "square", "triangle"] and demo.ignore_label == 255
