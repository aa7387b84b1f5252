"""Dev only (run in .venv-mmdet): MMDetection 3.3's pieces that our model takes from Detectron2
instead (box decoding and its clamps, anchors, the RPN's selection and NMS, mask pasting), on
the rare inputs where two implementations part: extreme deltas, boxes under a pixel or of zero
size, tied scores. Saved for tests/test_reference_pieces.py.

    .venv-mmdet/bin/python dev/parity/make_pieces.py --out tests/fixtures/mmdet_pieces.pth
"""

import argparse

import numpy as np
import torch
from make_fixture import reference_model
from mmdet.models.roi_heads.mask_heads.fcn_mask_head import _do_paste_mask
from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder
from mmdet.models.task_modules.prior_generators import AnchorGenerator
from mmdet.utils import register_all_modules

IMAGE = (200, 264)  # (height, width)
FEATURE_SIZES = [(56, 72), (28, 36), (14, 18), (7, 9), (4, 5)]  # of the padded 224 x 288
STAGE_STDS = [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]]


def rare_boxes(g: torch.Generator) -> torch.Tensor:
    """(N, 4): ordinary boxes, then boxes under a pixel, of zero width or height, at a border."""
    corner = torch.rand(40, 2, generator=g) * torch.tensor([IMAGE[1] * 0.8, IMAGE[0] * 0.8])
    size = torch.rand(40, 2, generator=g) * 60 + 1
    ordinary = torch.cat([corner, corner + size], dim=1)
    rare = torch.tensor(
        [[10.0, 10.0, 10.3, 10.2], [50.5, 20.0, 50.5, 40.0], [30.0, 60.0, 70.0, 60.0],
         [0.0, 0.0, 0.4, 0.4], [263.7, 199.6, 264.0, 200.0], [100.0, 100.0, 100.0, 100.0]]
    )  # fmt: skip
    return torch.cat([ordinary, rare])


def extreme_deltas(n: int, g: torch.Generator) -> torch.Tensor:
    """(n, 4) deltas, every fourth row pushed past the log-scale clamp (+-10 in dw or dh) or
    far off centre (+-8 in dx or dy)."""
    deltas = torch.randn(n, 4, generator=g)
    for i in range(0, n, 4):
        deltas[i, (i // 4) % 4] = (-1) ** (i // 8) * (8.0 if (i // 4) % 4 < 2 else 10.0)
    return deltas


def decoding(g: torch.Generator) -> dict:
    """Each cascade stage's coder and the RPN's, decoding extreme deltas on rare boxes and
    clipping to the image, as the reference refines RoIs and makes proposals."""
    boxes = rare_boxes(g)
    deltas = extreme_deltas(len(boxes), g)
    decoded = []
    for stds in STAGE_STDS + [[1.0, 1.0, 1.0, 1.0]]:
        coder = DeltaXYWHBBoxCoder(target_means=[0.0] * 4, target_stds=stds)
        decoded.append(coder.decode(boxes, deltas * 3, max_shape=IMAGE))
    return {"decode_boxes": boxes, "decode_deltas": deltas * 3, "decoded": decoded}


def anchors() -> dict:
    generator = AnchorGenerator(strides=[4, 8, 16, 32, 64], ratios=[0.5, 1.0, 2.0], scales=[8])
    return {"anchors": generator.grid_priors(FEATURE_SIZES, device="cpu")}


def rpn_on_ties(g: torch.Generator) -> dict:
    """The RPN's proposals from objectness logits rounded to 1/4 (many exact ties) and deltas
    with extremes, through the reference's per-level top 1000, NMS at 0.7 and top 1000."""
    model = reference_model("small")
    logits = [(torch.randn(1, 3, h, w, generator=g) * 2).round() / 4 for h, w in FEATURE_SIZES]
    deltas = [
        extreme_deltas(3 * h * w, g).reshape(1, h, w, 3 * 4).permute(0, 3, 1, 2).contiguous()
        for h, w in FEATURE_SIZES
    ]
    meta = {"img_shape": IMAGE, "ori_shape": IMAGE, "scale_factor": (1.0, 1.0)}
    with torch.no_grad():
        result = model.rpn_head.predict_by_feat(
            logits, deltas, batch_img_metas=[meta], cfg=model.test_cfg.rpn, rescale=False
        )[0]
    return {"rpn_logits": logits, "rpn_deltas": deltas, "rpn_boxes": result.bboxes,
            "rpn_scores": result.scores}  # fmt: skip


def pasting(g: torch.Generator) -> dict:
    """28 x 28 mask probabilities pasted into the image and thresholded at 0.5 (10 ordinary
    boxes and the rare ones; saved bit-packed along the rows)."""
    boxes = rare_boxes(g)[-16:]
    probabilities = torch.rand(len(boxes), 1, 28, 28, generator=g)
    pasted, _ = _do_paste_mask(probabilities, boxes, *IMAGE, skip_empty=False)
    packed = torch.from_numpy(np.packbits((pasted >= 0.5).numpy(), axis=-1))
    return {"paste_boxes": boxes, "paste_probabilities": probabilities[:, 0],
            "pasted_packed": packed}  # fmt: skip


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    register_all_modules()
    g = torch.Generator().manual_seed(0)
    out = {"image_size": IMAGE, "feature_sizes": FEATURE_SIZES}
    for piece in (decoding, anchors, rpn_on_ties, pasting):
        out.update(piece(g) if piece is not anchors else piece())
    torch.save(out, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
