"""htc.data.demo_data: the deterministic generator, and its data made once per machine."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from detectron2.utils import comm

from conftest import child_env
from htc.data import demo_data
from htc.data.demo_data import SEMANTIC_CLASSES, THING_CLASSES, generate_split, make_scene


def test_demo_generator_is_deterministic(tmp_path):
    a = make_scene(np.random.default_rng(7))
    b = make_scene(np.random.default_rng(7))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert [o["category_id"] for o in a[2]] == [o["category_id"] for o in b[2]]
    assert all(np.array_equal(x["mask"], y["mask"]) for x, y in zip(a[2], b[2]))
    generate_split(tmp_path / "one", "val", 3, seed=1)
    generate_split(tmp_path / "two", "val", 3, seed=1)
    for name in [
        "val.json", "val/00001.png", "val_sem/00003.png", "val_panoptic.json",
        "val_panoptic/00002.png",
    ]:  # fmt: skip
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_demo_scene_labels_agree_with_instances():
    image, semantic, objects = make_scene(np.random.default_rng(11))
    assert image.shape == (256, 256, 3) and semantic.shape == (256, 256)
    assert set(np.unique(semantic)) <= set(range(len(SEMANTIC_CLASSES)))
    assert set(np.unique(semantic)) & {3, 4, 5}  # some stuff
    for obj in objects:  # every visible object pixel carries its class in the semantic map
        assert (semantic[obj["mask"]] == obj["category_id"]).all()
        assert obj["category_id"] < len(THING_CLASSES)


def test_demo_json_is_coco(tiny_dataset):
    data = json.loads((tiny_dataset / "train.json").read_text())
    assert {c["name"] for c in data["categories"]} == set(THING_CLASSES)
    assert all(a["area"] > 0 and a["iscrowd"] == 0 for a in data["annotations"])


def _load_everywhere(root: str, log: str) -> None:
    """One process of 2: load the demo dataset, counting who generates it."""
    generate = demo_data.ensure_demo_data

    def counted(base):
        with open(log, "a") as f:
            f.write(f"rank {comm.get_rank()}\n")
        return generate(base)

    demo_data.SPLITS = {"train": (4, 0), "val": (2, 1)}
    demo_data.ensure_demo_data = counted
    demo_data.register_demo(Path(root))
    assert len(DatasetCatalog.get("htc_demo_train")) == 4
    comm.synchronize()


@pytest.mark.heavy
def test_two_processes_generate_the_data_once(tmp_path):
    """Every rank's loader asks for the data; the first process of the machine makes it while
    the others wait (they used to delete and create the same folder at once)."""
    root, log = tmp_path / "htc_demo", tmp_path / "log"
    code = (
        "import sys; from htc.distributed import launch; import test_demo_data as t\n"
        f"launch(t._load_everywhere, 2, args=({str(root)!r}, {str(log)!r}))"
    )
    env = child_env(Path(__file__).parent, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert log.read_text().splitlines() == ["rank 0"]
    assert (root / "VERSION").read_text() == demo_data.VERSION
    assert len(json.loads((root / "train.json").read_text())["images"]) == 4
