"""The narrowing of the parity fixtures' small models, shared by the MMDetection 3.3 and 2.x
scripts (it reads only config keys the two versions have in common)."""

SMALL = dict(stem=16, base=8, fpn=32, fc=64, mask=32, sem=32, classes=3, sem_classes=5)


def narrow(cfg, s: dict) -> None:
    """Every width of ``cfg.model`` (an HTC config of either version) to ``s``'s, in place."""
    m = cfg.model
    m.backbone.update(stem_channels=s["stem"], base_channels=s["base"])
    m.neck.update(in_channels=[s["base"] * 4 * 2**i for i in range(4)], out_channels=s["fpn"])
    m.rpn_head.update(in_channels=s["fpn"], feat_channels=s["fpn"])
    r = m.roi_head
    for key in ("bbox_roi_extractor", "mask_roi_extractor", "semantic_roi_extractor"):
        if key in r:
            r[key].out_channels = s["fpn"]
    for head in r.bbox_head:
        head.update(in_channels=s["fpn"], fc_out_channels=s["fc"], num_classes=s["classes"])
    for head in r.mask_head:
        head.update(in_channels=s["fpn"], conv_out_channels=s["mask"], num_classes=s["classes"])
    if "semantic_head" in r:
        r.semantic_head.update(
            in_channels=s["fpn"], conv_out_channels=s["sem"], num_classes=s["sem_classes"]
        )
