"""htc_mvitv2_h_in21k_lsj_3x.py without the semantic branch, for data without stuff maps (COCO's
instances alone): the reference's htc-without-semantic on this backbone."""

from ..common.htc_heads import without_semantic
from .htc_mvitv2_h_in21k_lsj_3x import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

without_semantic(model, dataloader)
train.output_dir = "./output/htc_without_semantic_mvitv2_h_in21k_lsj_3x"
