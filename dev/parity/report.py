"""Dev only (run in the project's .venv): max abs differences between our HTC and a fixture of
MMDetection's HTC made by make_fixture.py (a narrow family of tests/fixtures, or the full R-50).

    .venv/bin/python dev/parity/report.py tests/fixtures/htc_parity_*.pth
    .venv/bin/python dev/parity/report.py /tmp/htc_parity_r50.pth
"""

import argparse
from pathlib import Path

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage
from fixtures import load_reference, twins

from htc import SEMANTIC_FEATURE, add_htc_config
from htc.convert_mmdet import convert

ROOT = Path(__file__).resolve().parents[2]


def config_of(family: str) -> Path:
    if family == "r50":
        return ROOT / "configs/htc_R_50_FPN_1x.yaml"
    return ROOT / f"tests/fixtures/htc_parity_{family}.yaml"


def build(ref):
    cfg = get_cfg()
    add_htc_config(cfg)
    cfg.merge_from_file(str(config_of(ref["config"])))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    model = build_model(cfg).eval()
    model.load_state_dict(convert(ref["state_dict"])[0], strict=True)
    return model


def diff(a, b) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def training_losses(model, ref, images, feats):
    """ROI-head losses of one step on the fixture's proposals, every RoI sampled (as its
    PseudoSampler)."""
    heads, size = model.roi_heads, images.image_sizes[0]
    target = Instances(size, gt_boxes=Boxes(ref["train_gt_boxes"]))
    target.gt_classes, target.gt_masks = ref["train_gt_labels"], BitMasks(ref["train_gt_masks"])
    heads.batch_size_per_image, heads.positive_fraction, heads.proposal_append_gt = (
        10**6,
        1.0,
        False,
    )
    heads.train()
    with EventStorage():
        _, losses = heads(
            images, feats, [Instances(size, proposal_boxes=Boxes(ref["train_proposals"]))], [target]
        )
    heads.eval()
    names = {"loss_cls": "loss_cls", "loss_bbox": "loss_box_reg", "loss_mask": "loss_mask"}
    return [
        (f"training: stage {t} {ours} ({ref['train_losses'][f's{t}.{theirs}'].item():.4f})",
         diff(losses[f"{ours}_stage{t}"], ref["train_losses"][f"s{t}.{theirs}"].reshape(())))
        for t in range(3) for theirs, ours in names.items()
    ]  # fmt: skip


@torch.no_grad()
def report(path: str) -> None:
    ref = load_reference(path)
    model = build(ref)
    image = ref["image_rgb"]
    batch = [{"image": image, "height": image.shape[1], "width": image.shape[2]}]
    images = model.preprocess_image(batch)
    feats, logits = model._features(images)
    heads, size = model.roi_heads, images.image_sizes[0]
    rows = [(f"FPN {k} (max |value| {v.abs().max():.1f})", diff(feats[k], v))
            for k, v in zip(["p2", "p3", "p4", "p5", "p6"], ref["fpn"])]  # fmt: skip
    if logits is not None:
        rows.append(("semantic logits", diff(logits, ref["semantic_logits"])))
        rows.append(("semantic feature", diff(feats[SEMANTIC_FEATURE], ref["semantic_feat"])))

    proposals, _ = model.proposal_generator(images, feats, None)
    best = pairwise_iou(Boxes(ref["rpn_boxes"]), proposals[0].proposal_boxes).max(dim=1).values
    rows.append(
        ("RPN proposals: fraction with an IoU>0.9999 twin", (best > 0.9999).float().mean().item())
    )

    props = [Instances(size, proposal_boxes=Boxes(ref["stage_rois"][0]))]
    for stage in range(3):
        rows.append(
            (
                f"stage {stage} input RoIs",
                diff(props[0].proposal_boxes.tensor, ref["stage_rois"][stage]),
            )
        )
        cls, deltas = heads.box_stage(feats, props, stage)
        rows.append((f"stage {stage} class logits", diff(cls, ref["stage_cls"][stage])))
        rows.append((f"stage {stage} box deltas", diff(deltas, ref["stage_deltas"][stage])))
        props = heads._create_proposals_from_boxes(
            heads.box_predictor[stage].predict_boxes((cls, deltas), props), [size]
        )

    det = heads._forward_box(feats, [Instances(size, proposal_boxes=Boxes(ref["rpn_boxes"]))])[0]
    twin = twins(det, ref)
    paired = len(det) == len(twin) and twin.unique().numel() == len(det)
    rows.append(
        (
            f"detections ({len(det)} vs {len(twin)}, paired one to one: {paired}): scores",
            diff(det.scores[twin], ref["det_scores"]),
        )
    )
    rows.append(("detections: boxes", diff(det.pred_boxes.tensor[twin], ref["det_boxes"])))
    n = len(ref["stage_mask_logits"][0])
    boxes, classes = Boxes(ref["det_boxes"][:n]), ref["det_labels"][:n]
    every = heads._run_mask_heads(feats, [boxes], 2, keep_all=True)
    alone = heads._run_mask_heads(feats, [boxes], 2, True, classes)
    for stage, (got, one, want) in enumerate(zip(every, alone, ref["stage_mask_logits"])):
        rows.append(
            (
                f"stage {stage} mask probabilities ({n} detections), every class",
                diff(got.sigmoid(), want.sigmoid()),
            )
        )
        want_one = want[torch.arange(n), classes][:, None]
        rows.append(
            (
                f"stage {stage} mask probabilities, each detection's class (inference)",
                diff(one.sigmoid(), want_one.sigmoid()),
            )
        )
    if logits is not None:
        targets = model._semantic_targets([{"sem_seg": ref["semantic_labels"].long()}], images)
        loss = model.semantic_head.losses(logits, targets)["loss_sem_seg"]
        rows.append(("semantic loss", diff(loss, ref["loss_semantic_seg"])))

    rows += training_losses(model, ref, images, feats)

    print(f"| {Path(path).name} ({ref['config']}, image {tuple(image.shape[1:])}) | max abs diff |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.3g} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fixtures", nargs="+")
    for fixture in parser.parse_args().fixtures:
        report(fixture)
