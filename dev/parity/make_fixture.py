"""Dev only (run in .venv-mmdet): record MMDetection 3.3's HTC on one image for the parity test.

    .venv-mmdet/bin/python dev/parity/make_fixture.py --size small \\
        --out tests/fixtures/htc_parity_small.pth
    .venv-mmdet/bin/python dev/parity/make_fixture.py --size r50 --out /tmp/htc_parity_r50.pth

Builds the reference HTC (configs/htc/htc_r50_fpn_1x_coco.py; "small" narrows every width and
uses 3 thing / 5 semantic classes, same architecture), draws random weights that make every
tensor matter (the default init zeroes residual branches and gives near-constant logits), and
saves: the state dict, the RGB input, FPN features, semantic logits/feature, RPN proposals, per
stage class logits and deltas for a fixed proposal list (refined stage to stage as the
reference does), the final detections, each stage's mask logits on them, and the semantic loss
for a given label map.
"""

import argparse
import math

import mmdet
import torch
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.structures import PixelData

MASK_DETECTIONS = 30
SMALL = dict(stem=16, base=8, fpn=32, fc=64, mask=32, sem=32, classes=3, sem_classes=5)


def narrow(cfg, s):
    m = cfg.model
    m.backbone.update(stem_channels=s["stem"], base_channels=s["base"])
    m.neck.update(in_channels=[s["base"] * 4 * 2**i for i in range(4)], out_channels=s["fpn"])
    m.rpn_head.update(in_channels=s["fpn"], feat_channels=s["fpn"])
    r = m.roi_head
    for key in ("bbox_roi_extractor", "mask_roi_extractor", "semantic_roi_extractor"):
        r[key].out_channels = s["fpn"]
    for head in r.bbox_head:
        head.update(in_channels=s["fpn"], fc_out_channels=s["fc"], num_classes=s["classes"])
    for head in r.mask_head:
        head.update(in_channels=s["fpn"], conv_out_channels=s["mask"], num_classes=s["classes"])
    r.semantic_head.update(
        in_channels=s["fpn"], conv_out_channels=s["sem"], num_classes=s["sem_classes"]
    )


# predictor layers scaled down so class logits are O(5) and box deltas O(1) (not saturated)
PREDICTOR_SCALE = {
    "fc_cls": 1 / 8,
    "rpn_cls": 1 / 8,
    "conv_logits": 1 / 8,
    "fc_reg": 1 / 40,
    "rpn_reg": 1 / 40,
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=["small", "r50"], default="small")
    parser.add_argument("--out", required=True)
    parser.add_argument("--height", type=int, default=200)
    parser.add_argument("--width", type=int, default=264)
    args = parser.parse_args()
    torch.set_num_threads(2)
    register_all_modules()
    cfg = Config.fromfile(f"{mmdet.__path__[0]}/.mim/configs/htc/htc_r50_fpn_1x_coco.py")
    cfg.model.backbone.init_cfg = None
    for rcnn in cfg.model.train_cfg.rcnn:  # deterministic training step: every RoI is used
        rcnn.sampler = dict(type="PseudoSampler")
        rcnn.assigner.match_low_quality = False
    if args.size == "small":
        narrow(cfg, SMALL)
    model = MODELS.build(cfg.model)
    model.init_weights()
    randomize(model, seed=0)
    model.eval()

    rgb = make_image(args.height, args.width, seed=1)
    sample = DetDataSample(
        metainfo=dict(
            img_shape=(args.height, args.width), ori_shape=(args.height, args.width),
            scale_factor=(1.0, 1.0),
        )
    )  # fmt: skip
    data = model.data_preprocessor({"inputs": [rgb.flip(0)], "data_samples": [sample]}, False)
    inputs, samples = data["inputs"], data["data_samples"]
    calibrate_bn(model, inputs)
    roi_head = model.roi_head
    out = {"state_dict": model.state_dict(), "image_rgb": rgb, "config": args.size}
    with torch.no_grad():
        x = model.extract_feat(inputs)
        out["fpn"] = list(x)
        sem_logits, sem_feat = roi_head.semantic_head(x)
        out["semantic_logits"], out["semantic_feat"] = sem_logits, sem_feat
        proposals = model.rpn_head.predict(x, samples, rescale=False)
        out["rpn_boxes"], out["rpn_scores"] = proposals[0].bboxes, proposals[0].scores

        fixed = out["rpn_boxes"][:60].clone()
        rois = torch.cat([fixed.new_zeros(len(fixed), 1), fixed], dim=1)
        out["stage_rois"], out["stage_cls"], out["stage_deltas"] = [], [], []
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

        det = model.predict(inputs, samples, rescale=False)[0].pred_instances
        out["det_boxes"], out["det_scores"], out["det_labels"] = det.bboxes, det.scores, det.labels
        out["det_masks_mmdet3"] = det.masks[:5].clone()  # 3.x: last stage only (issue #10210)
        top = det.bboxes[:MASK_DETECTIONS]  # the masks of the top detections (fixture size)
        det_rois = torch.cat([top.new_zeros(len(top), 1), top], dim=1)
        mask_feats = roi_head.mask_roi_extractor[-1](x[:4], det_rois)
        mask_feats = mask_feats + roi_head.semantic_roi_extractor([sem_feat], det_rois)
        last, out["stage_mask_logits"] = None, []
        for head in roi_head.mask_head:
            logits, last = head(mask_feats, last)
            out["stage_mask_logits"].append(logits)

        g = torch.Generator().manual_seed(2)
        labels = torch.randint(0, SMALL["sem_classes"] if args.size == "small" else 183,
                               (args.height, args.width), generator=g)  # fmt: skip
        labels[: args.height // 5] = 255
        sample.gt_sem_seg = PixelData(sem_seg=labels[None])
        train_data = model.data_preprocessor(
            {"inputs": [rgb.flip(0)], "data_samples": [sample]}, True
        )
        padded = torch.stack([s.gt_sem_seg.sem_seg for s in train_data["data_samples"]])
        assert padded.shape[-2:] == inputs.shape[-2:]  # padded with 255 to the batch shape
        out["semantic_labels"] = labels.to(torch.uint8)
        out["loss_semantic_seg"] = roi_head.semantic_head.loss(sem_logits, padded)
        out.update(training_step(model, x, train_data["data_samples"], args, out["rpn_boxes"]))
    torch.save(out, args.out)
    print(f"saved {args.out}: {len(out['det_boxes'])} detections, mmdet {mmdet.__version__}")


if __name__ == "__main__":
    main()
