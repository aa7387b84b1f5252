"""Dev only (run in .venv-mmdet): record MMDetection 3.3's HTC on one image for the parity tests.

    .venv-mmdet/bin/python dev/parity/make_fixture.py --size small \\
        --out tests/fixtures/htc_parity_small.pth
    .venv-mmdet/bin/python dev/parity/make_fixture.py --size r50 --out /tmp/htc_parity_r50.pth
    .venv-mmdet/bin/python dev/parity/make_fixture.py --size r101 \\
        --weights tests/fixtures/htc_parity_small.pth \\
        --out tests/fixtures/htc_parity_r101.pth   # and each other family of FAMILIES

Builds the reference HTC (configs/htc/htc_r50_fpn_1x_coco.py, or the config of a family of
FAMILIES; every size but "r50" narrows every width and uses 3 thing / 5 semantic classes, same
architecture), draws random weights that make every tensor matter (the default init zeroes
residual branches and gives near-constant logits), and saves: the state dict, the RGB input,
FPN features, semantic logits/feature, RPN proposals, per stage class logits and deltas for a
fixed proposal list (refined stage to stage as the reference does), the final detections, each
stage's mask logits on them, the semantic loss for a given label map, and the ROI heads' losses
of one training step.
"""

import argparse
import math
import os

import mmdet
import torch
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.structures import PixelData
from narrow import SMALL, narrow

MASK_DETECTIONS = 30


def resnext(groups, base_width):
    """Narrow ResNeXt: the 3x3 conv of stage i is ``groups * base_width * 2**i`` wide, as the
    official 32x4d / 64x4d are ``32 * 4 * 2**i`` / ``64 * 4 * 2**i``."""

    def change(cfg):
        cfg.model.backbone.update(groups=groups, base_width=base_width)

    return change


def soft_nms(cfg):
    """mmcv's linear Soft-NMS; all 1000 detections kept, so that the decayed ones count too."""
    cfg.model.test_cfg.rcnn.nms = dict(type="soft_nms", iou_threshold=0.5)
    cfg.model.test_cfg.rcnn.max_per_img = 1000


def htcpp_heads(cfg):
    """HTC++'s box heads: 4 shared convs and 1 fc, regression trained by GIoU (weight 10) on
    decoded boxes; Soft-NMS at test time (the top 100)."""
    for head in cfg.model.roi_head.bbox_head:
        head.update(type="Shared4Conv1FCBBoxHead", conv_out_channels=SMALL["fpn"])
        head.reg_decoded_bbox = True
        head.loss_bbox = dict(type="GIoULoss", loss_weight=10.0)  # replaced, not merged
    cfg.model.test_cfg.rcnn.nms = dict(type="soft_nms", iou_threshold=0.5)


# family -> (the reference's config in configs/htc, what changes on top of it and the narrowing)
FAMILIES = {
    "small": ("htc_r50_fpn_1x_coco.py", None),
    "r50": ("htc_r50_fpn_1x_coco.py", None),
    "r101": ("htc_r101_fpn_20e_coco.py", None),
    "x101_32x4d": ("htc_x101-32x4d_fpn_16xb1-20e_coco.py", resnext(4, 4)),
    "x101_64x4d_dcn": (
        "htc_x101-64x4d-dconv-c3-c5_fpn_ms-400-1400-16xb1-20e_coco.py",
        resnext(8, 2),
    ),
    "without_semantic": ("htc-without-semantic_r50_fpn_1x_coco.py", None),
    "soft_nms": ("htc_r50_fpn_1x_coco.py", soft_nms),
    "htcpp_heads": ("htc_r50_fpn_1x_coco.py", htcpp_heads),
}


# predictor layers scaled down so class logits are O(5) and box deltas O(1) (not saturated)
PREDICTOR_SCALE = {
    "fc_cls": 1 / 8,
    "rpn_cls": 1 / 8,
    "conv_logits": 1 / 8,
    "fc_reg": 1 / 40,
    "rpn_reg": 1 / 40,
    "conv_offset": 1 / 8,  # offsets of a tenth of a pixel: O(1) ones make the deep random
    # ResNeXt chaotic (a rounding of another thread count grew to 13 at p2)
}


@torch.no_grad()
def randomize(model, seed):
    """Weights of variance ~ 2 / fan_in (activations O(1)), random BN parameters."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.state_dict().items()):
        if name.endswith("num_batches_tracked"):
            continue
        if "bn" in name or "downsample.1" in name:
            if name.endswith("running_var") or name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        elif p.dim() > 1:
            fan_in = p[0].numel() if "upsample" not in name else p.shape[0] * p[0, 0].numel()
            scale = next((v for k, v in PREDICTOR_SCALE.items() if f".{k}." in name), 1.0)
            p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(2.0 / fan_in) * scale)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@torch.no_grad()
def calibrate_bn(model, inputs):
    """BN running statistics from one pass over ``inputs`` (so activations stay O(1))."""
    bns = [
        m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: the stats of this one batch
        bn.train()
    model.backbone(inputs)
    for bn in bns:
        bn.momentum = 0.1
        bn.eval()


def make_image(height, width, seed):
    """An RGB uint8 (3, H, W) image: smooth background with a few bright shapes."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image = torch.stack([yy * 200 / height, xx * 200 / width, (yy + xx) * 100 / (height + width)])
    for _ in range(5):
        cy, cx = (
            torch.randint(0, height, (1,), generator=g),
            torch.randint(0, width, (1,), generator=g),
        )
        r = torch.randint(10, max(12, height // 4), (1,), generator=g)
        color = torch.randint(0, 255, (3, 1), generator=g).float()
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        image[:, inside] = color
    image += torch.randn(image.shape, generator=g) * 8
    return image.clamp(0, 255).to(torch.uint8)


def random_instances(height, width, num, seed):
    """``num`` GT boxes with rectangular-ish masks (ellipses) and labels 0..2."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
    wh = torch.rand(num, 2, generator=g) * torch.tensor([width * 0.3, height * 0.3]) + 12
    boxes = torch.cat([xy, xy + wh], dim=1).round()
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    masks = []
    for x0, y0, x1, y1 in boxes.tolist():
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        masks.append(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1)
    labels = torch.randint(0, 3, (num,), generator=g)
    return boxes, labels, torch.stack(masks)


def training_step(model, x, samples, args, proposals):
    """The ROI heads' losses on fixed proposals (250 RPN boxes + 10 jittered copies of each GT
    box, so that every stage has positives), every RoI sampled (PseudoSampler)."""
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    boxes, labels, masks = random_instances(args.height, args.width, 5, seed=3)
    gt = InstanceData(bboxes=boxes, labels=labels)
    gt.masks = BitmapMasks(masks.numpy().astype("uint8"), args.height, args.width)
    samples[0].gt_instances = gt
    g = torch.Generator().manual_seed(4)
    near = boxes.repeat_interleave(10, dim=0)
    size = (near[:, 2:] - near[:, :2]).repeat(1, 2)
    near = near + torch.randn(near.shape, generator=g) * 0.03 * size
    fixed = torch.cat([proposals[:250], near]).clone()
    rpn = InstanceData(bboxes=fixed.clone(), scores=torch.ones(len(fixed)))
    losses = model.roi_head.loss(x, [rpn], samples)
    losses = {k: v for k, v in losses.items() if "loss" in k}
    return {"train_gt_boxes": boxes, "train_gt_labels": labels, "train_gt_masks": masks,
            "train_proposals": fixed, "train_losses": losses}  # fmt: skip


def reference_model(size):
    """The reference's HTC of family ``size``, in eval mode, with FAMILIES' changes applied."""
    config, change = FAMILIES[size]
    cfg = Config.fromfile(f"{mmdet.__path__[0]}/.mim/configs/htc/{config}")
    cfg.model.backbone.init_cfg = None
    for rcnn in cfg.model.train_cfg.rcnn:  # deterministic training step: every RoI is used
        rcnn.sampler = dict(type="PseudoSampler")
        rcnn.assigner.match_low_quality = False
    if size != "r50":
        narrow(cfg, SMALL)
    if change is not None:
        change(cfg)
    model = MODELS.build(cfg.model)
    model.init_weights()
    randomize(model, seed=0)
    return model.eval()


@torch.no_grad()
def take_weights(model, base_state, inputs):
    """Every tensor of ``base_state`` with a name and shape of the model is taken; the others keep
    their random draw, rounded to float16's precision so that they are saved as float16 exactly;
    the backbone's BN statistics are calibrated when it has any drawn tensor. Returns the names
    of the tensors not taken."""
    state = model.state_dict()
    drawn = [k for k, v in state.items() if k not in base_state or base_state[k].shape != v.shape]
    for name, value in state.items():
        if name not in drawn:
            value.copy_(base_state[name])
        elif value.is_floating_point():
            value.copy_(value.half().float())
    if any(name.startswith("backbone.") for name in drawn):
        calibrate_bn(model, inputs)  # every BN of the backbone, the taken ones too
        for name, value in model.state_dict().items():
            if name.startswith("backbone.") and "running_" in name:
                value.copy_(value.half().float())
                drawn += [] if name in drawn else [name]
    return drawn


def only_what_differs(out, base, drawn):
    """The fixture of a family made ``--weights`` a base fixture: the outputs and tensors that
    differ from the base's (beyond the float rounding of another machine), and the names of the
    base's that this family does not have."""
    state = out.pop("state_dict")
    same = [k for k, v in out.items() if k in base and _same(v, base[k])]
    out = {k: v for k, v in out.items() if k not in same}
    out["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in state.items()
                         if k in drawn}  # fmt: skip
    out["absent"] = [k for k in base if k not in out and k not in same]
    out["absent_weights"] = [k for k in base["state_dict"] if k not in state]
    return out


def _same(a, b):
    """Equal, floats up to 1e-5 of their largest magnitude (another machine rounds otherwise)."""
    if torch.is_tensor(a):
        if not torch.is_tensor(b) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        if not a.is_floating_point() or not a.numel():
            return torch.equal(a, b)
        return bool((a - b).abs().max() <= 1e-5 * b.abs().max())
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def stage_outputs(model, x, sem_feat, proposals, samples):
    """Per stage class logits and deltas for 60 fixed proposals, refined from stage to stage as
    the reference does."""
    roi_head, out = model.roi_head, {"stage_rois": [], "stage_cls": [], "stage_deltas": []}
    fixed = proposals[:60].clone()
    rois = torch.cat([fixed.new_zeros(len(fixed), 1), fixed], dim=1)
    for stage in range(roi_head.num_stages):
        res = roi_head._bbox_forward(stage, x, rois, semantic_feat=sem_feat)
        out["stage_rois"].append(rois[:, 1:].clone())
        out["stage_cls"].append(res["cls_score"])
        out["stage_deltas"].append(res["bbox_pred"])
        if stage < roi_head.num_stages - 1:
            labels = res["cls_score"][:, :-1].argmax(dim=1)
            boxes = roi_head.bbox_head[stage].regress_by_class(
                rois[:, 1:], labels, res["bbox_pred"], samples[0].metainfo
            )
            rois = torch.cat([rois[:, :1], boxes], dim=1)
    return out


def stage_mask_logits(model, x, sem_feat, boxes):
    """Each stage's mask logits on ``boxes``, the mask information flow passed along."""
    roi_head = model.roi_head
    rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], dim=1)
    mask_feats = roi_head.mask_roi_extractor[-1](x[:4], rois)
    if sem_feat is not None:
        mask_feats = mask_feats + roi_head.semantic_roi_extractor([sem_feat], rois)
    last, logits = None, []
    for head in roi_head.mask_head:
        stage_logits, last = head(mask_feats, last)
        logits.append(stage_logits)
    return logits


def semantic_loss(model, rgb, sample, sem_logits, inputs, args):
    """The semantic branch's loss for a random label map with an ignored band on top."""
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, SMALL["sem_classes"] if args.size != "r50" else 183,
                           (args.height, args.width), generator=g)  # fmt: skip
    labels[: args.height // 5] = 255
    sample.gt_sem_seg = PixelData(sem_seg=labels[None])
    train_data = model.data_preprocessor({"inputs": [rgb.flip(0)], "data_samples": [sample]}, True)
    padded = torch.stack([s.gt_sem_seg.sem_seg for s in train_data["data_samples"]])
    assert padded.shape[-2:] == inputs.shape[-2:]  # padded with 255 to the batch shape
    loss = model.roi_head.semantic_head.loss(sem_logits, padded)
    return {"semantic_labels": labels.to(torch.uint8), "loss_semantic_seg": loss}, train_data


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(FAMILIES), default="small")
    parser.add_argument("--out", required=True)
    parser.add_argument("--height", type=int, default=200)
    parser.add_argument("--width", type=int, default=264)
    parser.add_argument("--mask-detections", type=int, default=MASK_DETECTIONS)
    parser.add_argument(
        "--weights",
        help="a fixture whose tensors of the same name and shape are used (the others drawn); "
        "only what differs from it is saved",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    register_all_modules()
    model = reference_model(args.size)

    rgb = make_image(args.height, args.width, seed=1)
    sample = DetDataSample(
        metainfo=dict(
            img_shape=(args.height, args.width), ori_shape=(args.height, args.width),
            scale_factor=(1.0, 1.0),
        )
    )  # fmt: skip
    data = model.data_preprocessor({"inputs": [rgb.flip(0)], "data_samples": [sample]}, False)
    inputs, samples = data["inputs"], data["data_samples"]
    if args.weights:
        base = torch.load(args.weights, map_location="cpu", weights_only=True)
        drawn = take_weights(model, base["state_dict"], inputs)
    else:
        calibrate_bn(model, inputs)
    out = {"state_dict": model.state_dict(), "image_rgb": rgb, "config": args.size}
    with torch.no_grad():
        x = model.extract_feat(inputs)
        out["fpn"] = list(x)
        sem_feat = None
        if model.roi_head.with_semantic:
            sem_logits, sem_feat = model.roi_head.semantic_head(x)
            out["semantic_logits"], out["semantic_feat"] = sem_logits, sem_feat
        proposals = model.rpn_head.predict(x, samples, rescale=False)
        out["rpn_boxes"], out["rpn_scores"] = proposals[0].bboxes, proposals[0].scores
        out.update(stage_outputs(model, x, sem_feat, out["rpn_boxes"], samples))

        det = model.predict(inputs, samples, rescale=False)[0].pred_instances
        out["det_boxes"], out["det_scores"], out["det_labels"] = det.bboxes, det.scores, det.labels
        if not args.weights:  # 3.x: last stage only (issue #10210)
            out["det_masks_mmdet3"] = det.masks[:5].clone()
        top = det.bboxes[: args.mask_detections]  # the masks of the top detections
        out["stage_mask_logits"] = stage_mask_logits(model, x, sem_feat, top)

        if model.roi_head.with_semantic:
            semantic, train_data = semantic_loss(model, rgb, sample, sem_logits, inputs, args)
            out.update(semantic)
        else:
            batch = {"inputs": [rgb.flip(0)], "data_samples": [sample]}
            train_data = model.data_preprocessor(batch, True)
        out.update(training_step(model, x, train_data["data_samples"], args, out["rpn_boxes"]))
    if args.weights:
        out = only_what_differs(out, base, drawn)
        out["weights_of"] = os.path.basename(args.weights)
    torch.save(out, args.out)
    print(f"saved {args.out}: {len(out['det_boxes'])} detections, mmdet {mmdet.__version__}")


if __name__ == "__main__":
    main()
