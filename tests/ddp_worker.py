"""Run by tests/test_distributed.py, alone or under torchrun: `engine.fit` on a small conv net
without batch norm (so that 1 and N processes compute the same gradients) on prepared data;
rank 0 saves the initial and trained state dicts, every rank the number of images it trained on
(OUT.pt.rank<r>). Usage: ddp_worker.py PREPARED OUT.pt"""

import sys

import torch
from torch import nn

from edgekd.data.prepared import load_info, load_split
from edgekd.train.distributed import join_process_group, leave_process_group
from edgekd.train.engine import FitSetup, train_model
from edgekd.train.losses import ce_loss_fn


def main(prepared: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ranks, device = join_process_group(torch.device("cpu"))
    info, train, val = load_info(prepared), load_split(prepared, "train"), load_split(prepared, "val")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, len(info.classes)))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    setup = FitSetup(epochs=3, batch_size=16, eval_batch_size=64, seed=3, mean=info.mean, std=info.std,
                     bn_recalibration=False, ranks=ranks)
    ce, seen = ce_loss_fn(0.1), []

    def counted(net, batch):
        seen.append(len(batch.y))
        return ce(net, batch)

    train_model(model, counted, 0.01, 0.05, train, val, setup)
    if ranks.main:
        torch.save({"initial": initial, "trained": model.state_dict()}, out)
    with open(f"{out}.rank{ranks.rank}", "w") as f:
        f.write(str(sum(seen)))
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
