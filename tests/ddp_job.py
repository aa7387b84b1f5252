"""2 processes of train_net's Trainer through htc.distributed.launch (gloo without CUDA).

Each rank writes ``rank<r>.pth`` (its weights after training) and ``rank<r>.json`` (per step:
its images' GT instance count and the parameters that got no gradient) to OUTPUT_DIR.
"""

import json
from pathlib import Path

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from htc import register_htc_instances
from htc.distributed import argument_parser, launch_from_args
from train_net import Trainer, setup  # the repository root is on PYTHONPATH


class GradientReport(HookBase):
    """After every step: the GT count of this rank's batch and its parameters without grad."""

    def __init__(self):
        self.steps = []
        self.gt_counts = []

    def before_train(self):
        module = self.trainer.model.module if comm.get_world_size() > 1 else self.trainer.model
        module.register_forward_pre_hook(
            lambda _, inputs: self.gt_counts.append(sum(len(x["instances"]) for x in inputs[0]))
        )

    def after_step(self):
        unused = [n for n, p in self.trainer.model.named_parameters() if p.grad is None]
        self.steps.append({"gt_instances": self.gt_counts[-1], "no_grad": unused})


def main(args):
    data = args.data
    register_htc_instances(
        "ddp_train", f"{data}/train.json", f"{data}/train", sem_seg_root=f"{data}/train_sem"
    )
    cfg = setup(args)
    trainer = Trainer(cfg)
    report = GradientReport()
    trainer.register_hooks([report])
    trainer.train()
    rank, out = comm.get_rank(), Path(cfg.OUTPUT_DIR)
    torch.save(trainer.model.state_dict(), out / f"rank{rank}.pth")
    summary = {"world": comm.get_world_size(), "steps": report.steps}
    (out / f"rank{rank}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    parser = argument_parser()  # train_net.py's, and its launch
    parser.add_argument("--data", required=True)
    launch_from_args(main, parser.parse_args())
