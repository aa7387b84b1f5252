"""htc_vitdet_h_75ep.py without the semantic branch, for data without stuff maps (COCO's
instances alone): the reference's htc-without-semantic on this backbone."""

from ..common.htc_heads import without_semantic
from .htc_vitdet_h_75ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

without_semantic(model, dataloader)
train.output_dir = "./output/htc_without_semantic_vitdet_h_75ep"
