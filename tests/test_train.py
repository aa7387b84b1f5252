"""train_net.py end to end on a small copy of the demo dataset: the main job, --eval-only and
--resume."""

import json
import subprocess
import sys

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from omegaconf import OmegaConf
from PIL import Image

import lazyconfig_train_net
from conftest import DEMO_CONFIG as CONFIG
from conftest import (
    ROOT,
    SMALL,
    child_env,
    load_cfg,
    make_batch,
    metrics_entries,
    run_train_net,
    tiny_cfg,
    training_iterations,
)
from htc import register_htc_instances
from htc.demo import TITLE_HEIGHT
from train_net import Trainer, check_dataset

# train_net's options for a run that trains and does not evaluate at its end
NO_EVALUATION = ["DATASETS.TEST", "()", "MODEL.HTC.PANOPTIC_ON", "False"]


def _main_job(workspace, output, *opts) -> str:
    """The README's first command, scripts/main_job.py, on the small demo copy."""
    command = [sys.executable, str(ROOT / "scripts/main_job.py"), "--output", str(output), *opts]
    env = child_env(DETECTRON2_DATASETS=str(workspace))
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.heavy
def test_main_job_then_eval_only_and_resume(workspace, tmp_path):
    """The main job trains through train_net.py, then draws its curves and pictures; the run's
    checkpoint is evaluated with --eval-only and drawn by htc.demo (``--resume``:
    tests/test_resume.py)."""
    output = tmp_path / "out"
    log = _main_job(workspace, output, *SMALL, "SOLVER.MAX_ITER", "4")
    for name in ["model_final.pth", "model_0000001.pth", "last_checkpoint", "metrics.json"]:
        assert (output / name).is_file(), name
    assert (output / "training_curves.png").is_file()
    assert sorted(p.name for p in (output / "pictures").iterdir()) == [
        "00001.png", "00002.png", "00003.png",
    ]  # fmt: skip
    assert "[main job] done in" in log and "  segm/AP " in log
    assert list(output.glob("events.out.tfevents.*"))
    for task in ["bbox", "segm", "sem_seg", "panoptic_seg"]:
        assert f"copypaste: Task: {task}" in log
    assert max(training_iterations(output)) == 3
    evaluation = [m for m in metrics_entries(output) if "segm/AP" in m][-1]
    for key in ["panoptic_seg/PQ", "panoptic_seg/PQ_th", "panoptic_seg/PQ_st", "sem_seg/mIoU"]:
        assert 0 <= evaluation[key] <= 100, key  # the demo's PQ next to AP and mIoU

    log = run_train_net(
        workspace, "--eval-only", *SMALL, "MODEL.WEIGHTS", str(output / "model_final.pth"),
        "OUTPUT_DIR", str(tmp_path / "eval"), "TEST.AUG.ENABLED", "True",
        "TEST.AUG.MIN_SIZES", "(128, 160)", "TEST.AUG.MAX_SIZE", "400",
    )  # fmt: skip
    for task in ["bbox", "segm", "sem_seg", "panoptic_seg"]:
        assert f"copypaste: Task: {task}" in log
    assert log.count("copypaste: Task: segm") == 2  # plain and with test-time augmentation
    assert (tmp_path / "eval/inference_TTA/htc_demo_val/coco_instances_results.json").is_file()

    # the README's htc.demo command on the trained checkpoint
    vis = tmp_path / "vis"
    demo = subprocess.run(
        [
            sys.executable, "-m", "htc.demo", "--config-file", str(CONFIG),
            "--input", str(workspace / "htc_demo" / "val"), "--output", str(vis),
            "--opts", "MODEL.WEIGHTS", str(output / "model_final.pth"),
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "20",
        ],
        capture_output=True, text=True, timeout=600,
        env=child_env(DETECTRON2_DATASETS=str(workspace)),
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr[-2000:]
    pictures = sorted(vis.glob("*.png"))
    assert [p.name for p in pictures] == ["00001.png", "00002.png", "00003.png"]
    width, height = Image.open(pictures[0]).size
    assert (width, height) == (3 * 256, 256 + TITLE_HEIGHT)  # instances | semantic | panoptic


def test_custom_dataset_entry_script_of_the_readme(workspace, tmp_path):
    """The README's my_train.py pattern: register a COCO-format dataset, then train_net."""
    demo = workspace / "htc_demo"
    script = tmp_path / "my_train.py"
    script.write_text(
        "import train_net\n"
        "from htc import register_htc_instances\n\n"
        f"register_htc_instances('mine_train', '{demo}/train.json', '{demo}/train', "
        f"sem_seg_root='{demo}/train_sem')\n"
        f"register_htc_instances('mine_val', '{demo}/val.json', '{demo}/val', "
        f"sem_seg_root='{demo}/val_sem')\n\n"
        "if __name__ == '__main__':\n"
        "    train_net.invoke_main()\n"
    )
    cmd = [
        sys.executable, str(script), "--config-file", str(CONFIG), *SMALL,
        "DATASETS.TRAIN", "('mine_train',)", "DATASETS.TEST", "('mine_val',)",
        "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(tmp_path / "out"),
        "MODEL.HTC.PANOPTIC_ON", "False",  # mine_val has no panoptic ground truth
    ]  # fmt: skip
    env = child_env()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "Loaded 6 images in COCO format" in log and "copypaste: Task: segm" in log


def _trainer_cfg(tiny_dataset, name: str, output, *opts: str):
    """The demo config as train_net.py would run it (SMALL), training on ``tiny_dataset``
    registered as ``name``, with no evaluation."""
    register_htc_instances(
        name, str(tiny_dataset / "train.json"), str(tiny_dataset / "train"),
        sem_seg_root=str(tiny_dataset / "train_sem"),
    )  # fmt: skip
    cfg = load_cfg(CONFIG)
    cfg.merge_from_list([*SMALL, *NO_EVALUATION, "DATASETS.TRAIN", f"('{name}',)", *opts])
    cfg.OUTPUT_DIR = str(output)
    return cfg


def test_num_classes_that_do_not_fit_the_dataset_are_refused(tiny_dataset, tmp_path):
    """train_net's Trainer refuses them as it builds its data loader, before any training."""
    cfg = _trainer_cfg(
        tiny_dataset, "test_num_classes", tmp_path, "MODEL.ROI_HEADS.NUM_CLASSES", "5"
    )
    with pytest.raises(ValueError, match="'test_num_classes' has 3 thing classes but "
                       "MODEL.ROI_HEADS.NUM_CLASSES is 5"):  # fmt: skip
        Trainer(cfg)


def test_test_datasets_are_checked_before_training(tiny_dataset, tmp_path):
    """Detectron2 loads them at the first evaluation, the end of the run by default."""
    coco = json.loads((tiny_dataset / "train.json").read_text())
    coco["categories"] = coco["categories"][:2]
    coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] in
                           {c["id"] for c in coco["categories"]}]  # fmt: skip
    (tmp_path / "two.json").write_text(json.dumps(coco))
    images = str(tiny_dataset / "train")
    register_htc_instances("test_early_missing", str(tmp_path / "typo.json"), images)
    register_htc_instances("test_early_two", str(tmp_path / "two.json"), images)
    trained = _trainer_cfg(tiny_dataset, "test_early_train", tmp_path)
    for name, refused in (("test_early_missing", "typo.json"),
                          ("test_early_two", "'test_early_two' has 2 thing classes")):  # fmt: skip
        cfg = trained.clone()
        cfg.DATASETS.TEST = (name,)
        with pytest.raises((ValueError, FileNotFoundError), match=refused):
            Trainer(cfg)


def test_weights_that_do_not_fit_are_refused_unless_skipping_is_asked(
    tiny_dataset, tmp_path, monkeypatch
):
    """train_net's Trainer loads MODEL.WEIGHTS with HTCCheckpointer (tests/test_checkpoint.py),
    skipping the weights of other shapes only under MODEL.HTC.SKIP_MISMATCHED_WEIGHTS."""
    cfg = load_cfg(CONFIG)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5
    weights = tmp_path / "five_classes.pth"
    checkpoint = build_model(cfg).state_dict()
    torch.save({"model": checkpoint}, weights)
    opts = ["MODEL.WEIGHTS", str(weights)]
    # no writers: their TensorBoard thread and files would stay open for the session
    monkeypatch.setattr(Trainer, "build_writers", lambda self: [])
    trainer = Trainer(_trainer_cfg(tiny_dataset, "test_weights", tmp_path, *opts))
    with pytest.raises(ValueError) as refused:
        trainer.resume_or_load(resume=False)
    assert "12 parameters of the checkpoint do not fit the model's shapes" in str(refused.value)
    assert "roi_heads.box_predictor.0.cls_score.weight: checkpoint (6, 128), model (4, 128)" in (
        str(refused.value)
    )
    opts += ["MODEL.HTC.SKIP_MISMATCHED_WEIGHTS", "True"]
    trainer = Trainer(_trainer_cfg(tiny_dataset, "test_weights_skipped", tmp_path, *opts))
    model = trainer.model.state_dict()
    kept = model["roi_heads.box_predictor.0.cls_score.weight"].clone()
    trainer.resume_or_load(resume=False)
    assert torch.equal(model["roi_heads.box_predictor.0.cls_score.weight"], kept)
    for key in ("roi_heads.box_predictor.0.bbox_pred.weight", "backbone.fpn_output2.weight"):
        assert torch.equal(model[key], checkpoint[key]), key


def test_non_finite_loss_stops_the_trainer_before_the_optimizer_step():
    """Detectron2's own trainer check (v0.6 and later alike) names the loss and the iteration."""
    model = build_model(tiny_cfg())
    model.train()
    head = model.roi_heads.mask_head[1].deconv
    head.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SimpleTrainer(model, [make_batch()] * 20, optimizer)
    trainer.iter = trainer.start_iter = 17
    with EventStorage(start_iter=17) as trainer.storage:
        with pytest.raises(
            FloatingPointError, match=r"(?s)iteration=17.*'loss_mask_stage1': (np.float64\()?nan"
        ):
            trainer.run_step()
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())


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


def test_rle_masks_with_the_polygon_format_are_refused_before_training(tiny_dataset):
    """Detectron2's mapper fails on them at the first image sampled with one, hours in maybe."""
    name = "test_rle_masks"
    register_htc_instances(name, str(tiny_dataset / "train.json"), str(tiny_dataset / "train"))
    DatasetCatalog.get(name)  # loading names the first RLE mask
    cfg = tiny_cfg()
    cfg.MODEL.HTC.SEMANTIC_ON = False
    cfg.INPUT.MASK_FORMAT = "bitmask"
    check_dataset(cfg, name, is_train=True)
    cfg.INPUT.MASK_FORMAT = "polygon"
    check_dataset(cfg, name, is_train=False)  # inference reads no masks
    with pytest.raises(ValueError, match=r"\(annotation 1 of .*00001.png\).*MASK_FORMAT bitmask"):
        check_dataset(cfg, name, is_train=True)


def test_a_test_dataset_ordering_the_classes_otherwise_is_refused(
    tiny_dataset, tmp_path, monkeypatch
):
    """The same images exported with other category ids: as many classes, the same names, in
    another order; the model's class 0 would be scored as the test data's class 0."""
    coco = json.loads((tiny_dataset / "train.json").read_text())
    ids = sorted(c["id"] for c in coco["categories"])
    swap = dict(zip(ids, [ids[1], ids[0], *ids[2:]]))
    for item in coco["categories"] + coco["annotations"]:
        key = "id" if "name" in item else "category_id"
        item[key] = swap[item[key]]
    (tmp_path / "swapped.json").write_text(json.dumps(coco))
    for name, path in (("test_order_train", tiny_dataset / "train.json"),
                       ("test_order_val", tmp_path / "swapped.json")):  # fmt: skip
        register_htc_instances(name, str(path), str(tiny_dataset / "train"))
        DatasetCatalog.get(name)  # loading sets thing_classes
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = ("test_order_train",)
    check_dataset(cfg, "test_order_train", is_train=False)
    refused = "'test_order_val' orders its thing classes unlike.* 0 there, 1 here.*the same ids"
    with pytest.raises(ValueError, match=refused):
        check_dataset(cfg, "test_order_val", is_train=False)
    lazy = OmegaConf.create({"dataloader": {
        "train": {"dataset": {"names": ["test_order_train"]}},
        "test": {"dataset": {"names": "test_order_val"}}, "evaluator": {},
    }})  # fmt: skip
    monkeypatch.setattr(lazyconfig_train_net, "instantiate", lambda cfg: None)  # nothing built
    with pytest.raises(ValueError, match=refused):
        lazyconfig_train_net.build_evaluation(lazy, model=None)


def test_ignore_value_that_is_not_the_datasets_is_refused(tiny_dataset):
    register_htc_instances(
        "test_ignore", str(tiny_dataset / "train.json"), str(tiny_dataset / "train"),
        sem_seg_root=str(tiny_dataset / "train_sem"),
    )  # fmt: skip
    cfg = tiny_cfg()
    check_dataset(cfg, "test_ignore", is_train=True)
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 0
    with pytest.raises(ValueError, match="'test_ignore' marks unlabeled pixels 255.*IGNORE_VALUE"):
        check_dataset(cfg, "test_ignore", is_train=True)
