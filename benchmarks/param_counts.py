"""Learnable parameters of every shipped config, counted as the reference counts them (BN affine
parameters included; Detectron2's FrozenBN keeps them as buffers).

    .venv/bin/python benchmarks/param_counts.py
"""

from pathlib import Path

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from htc import add_htc_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def count(path: Path) -> int:
    cfg = get_cfg()
    add_htc_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    model = build_model(cfg)
    frozen = sum(b.numel() for n, b in model.named_buffers() if n.endswith((".weight", ".bias")))
    return sum(p.numel() for p in model.parameters()) + frozen


if __name__ == "__main__":
    print("| config | parameters |")
    print("|---|---|")
    for path in sorted(CONFIGS.rglob("*.yaml")):
        print(f"| {path.relative_to(CONFIGS)} | {count(path):,} |")
