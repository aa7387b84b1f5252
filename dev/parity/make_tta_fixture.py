"""Dev only (run in .venv-mmdet2, dev/parity/setup_mmdet2_env.sh): record MMDetection 2.x's HTC
``aug_test`` (multi-scale + horizontal flip) for tests/test_tta.py.

    .venv-mmdet2/bin/python dev/parity/make_tta_fixture.py \\
        --weights tests/fixtures/htc_parity_small.pth --out tests/fixtures/htc_tta_mmdet2.pth

The model is the small R-50 of make_fixture.py (2.x's configs/htc/htc_r50_fpn_1x_coco.py
narrowed the same way) with that fixture's weights. Each view is made as 2.x's test pipeline
makes it (mmcv's keep-ratio rescale, flip, normalize, pad to 32); the resized images are saved, so
that the test feeds the same pixels to our TTA and compares the merging alone. Saved: the views
(resized RGB images and their sizes), the merged RPN proposals, the detections, the merged mask
probabilities of each detection (its class's channel) and the binary masks, bit-packed.
"""

import argparse

import mmcv
import mmdet
import numpy as np
import torch
from mmcv import Config
from mmdet.models import build_detector
from mmdet.models.roi_heads import htc_roi_head
from narrow import SMALL, narrow

MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def reference_model(state_dict):
    """2.x's HTC R-50 narrowed as make_fixture.py's "small", with ``state_dict``."""
    cfg = Config.fromfile(f"{mmdet.__path__[0]}/.mim/configs/htc/htc_r50_fpn_1x_coco.py")
    cfg.model.backbone.init_cfg = None
    narrow(cfg, SMALL)
    model = build_detector(cfg.model)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def views(rgb: np.ndarray, short_sides, max_size: int):
    """(resized RGB images, imgs, img_metas) as 2.x's MultiScaleFlipAug makes them: for each
    scale, the image and its horizontal flip."""
    height, width = rgb.shape[:2]
    resized, imgs, metas = [], [], []
    for short in short_sides:
        image = mmcv.imrescale(rgb, (max_size, short), interpolation="bilinear")
        new_h, new_w = image.shape[:2]
        scale = np.array([new_w / width, new_h / height] * 2, dtype=np.float32)
        resized.append(torch.from_numpy(image).permute(2, 0, 1).contiguous())
        for flip in (False, True):
            view = mmcv.imflip(image, "horizontal") if flip else image
            view = mmcv.imnormalize(view, MEAN, STD, to_rgb=False)
            padded = mmcv.impad_to_multiple(view, 32, pad_val=0)
            imgs.append(torch.from_numpy(padded).permute(2, 0, 1)[None].contiguous())
            metas.append([dict(
                img_shape=(new_h, new_w, 3), ori_shape=(height, width, 3),
                pad_shape=padded.shape, scale_factor=scale, flip=flip,
                flip_direction="horizontal" if flip else None,
            )])  # fmt: skip
    return resized, imgs, metas


def record_merges(model):
    """The merged proposals, the detections (in NMS order, which the merged masks follow) and
    the merged mask probabilities that ``aug_test`` computes, kept."""
    kept = {}

    def keep(name, function):
        def kept_function(*args, **kwargs):
            kept[name] = function(*args, **kwargs)
            return kept[name]

        return kept_function

    model.rpn_head.aug_test_rpn = keep("proposals", model.rpn_head.aug_test_rpn)
    htc_roi_head.multiclass_nms = keep("detections", htc_roi_head.multiclass_nms)
    htc_roi_head.merge_aug_masks = keep("masks", htc_roi_head.merge_aug_masks)
    return kept


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", required=True, help="make_fixture.py's small fixture")
    parser.add_argument("--out", required=True)
    parser.add_argument("--short-sides", type=int, nargs="+", default=[160, 200, 240])
    parser.add_argument("--max-size", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(2)
    base = torch.load(args.weights, map_location="cpu")
    model = reference_model(base["state_dict"])
    rgb = base["image_rgb"].permute(1, 2, 0).numpy()
    resized, imgs, metas = views(rgb, args.short_sides, args.max_size)
    kept = record_merges(model)
    with torch.no_grad():
        [(bbox_result, segm_result)] = model.aug_test(imgs, metas, rescale=True)
    detections, labels = kept["detections"]
    by_class = np.argsort(labels.numpy(), kind="stable")  # bbox2result's order
    assert np.allclose(np.concatenate(bbox_result), detections[by_class].numpy())
    masks = np.empty((len(labels), *segm_result[0][0].shape), dtype=bool)
    masks[by_class] = np.stack([m for per_class in segm_result for m in per_class])
    merged = kept["masks"][np.arange(len(labels)), labels]  # (N, 28, 28): each one's class
    out = {
        "views": resized, "short_sides": args.short_sides, "max_size": args.max_size,
        "proposals": kept["proposals"][0][:, :4], "proposal_scores": kept["proposals"][0][:, 4],
        "det_boxes": detections[:, :4], "det_scores": detections[:, 4], "det_labels": labels,
        "mask_probabilities": torch.from_numpy(np.ascontiguousarray(merged)),
        "masks_packed": torch.from_numpy(np.packbits(masks, axis=-1)),
        "mask_width": masks.shape[-1], "mmdet": mmdet.__version__, "mmcv": mmcv.__version__,
    }  # fmt: skip
    torch.save(out, args.out)
    print(f"saved {args.out}: {len(labels)} detections, mmdet {mmdet.__version__}")


if __name__ == "__main__":
    main()
