"""Run under torchrun by test_distributed.py: train.main as a user would run it, with every rank
recording the image indices it trained on and, at the end, its own copy of the weights.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_probe.py OUT_DIR TRAIN_FLAGS...
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

out, flags = Path(sys.argv[1]), sys.argv[2:]
rank = int(os.environ["RANK"])
seen, nets = [], []
real_epoch, real_build = train.train_one_epoch, train.build_training


def recording_epoch(model, split, order, *args, **kwargs):
    seen.append(order.clone())
    return real_epoch(model, split, order, *args, **kwargs)


def capturing_build(*args, **kwargs):
    built = real_build(*args, **kwargs)
    nets.append(built[0])
    return built


train.train_one_epoch, train.build_training = recording_epoch, capturing_build
train.main(flags)
torch.save({"orders": seen, "params": {k: v.detach().clone() for k, v in nets[0].named_parameters()}},
           out / f"rank{rank}.pt")
