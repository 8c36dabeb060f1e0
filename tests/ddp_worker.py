"""Run by tests/test_distributed*.py, alone or under torchrun (gloo); each process writes what it
saw to files that the test reads. Usage: ddp_worker.py COMMAND ARGS..., COMMAND one of

- `fit PREPARED OUT.pt`: `engine.fit` on a small conv net without batch norm (so that 1 and N
  processes compute the same gradients) on prepared data; rank 0 saves the initial and trained
  state dicts, every rank the number of images it trained on (OUT.pt.rank<r>).
- `early-stop OUT`: two 3-epoch fits with patience 1 on random images, whose val accuracies are
  scripted so that the processes' early-stop decisions disagree (rank 0 stops after epoch 2 and
  rank 1 does not, then the other way round); every rank writes the epochs each fit ran
  (OUT.rank<r>, JSON).
- `stale-resume FOLDER`: `resume.restore` of FOLDER/resume.pt, written for another run, by rank 1
  a second after rank 0, as a slower process comes to it; every rank marks reading the file
  (FOLDER/read.rank<r>) and deleting it (FOLDER/unlink.rank<r>, holding the read marks there were
  at that moment).
"""

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from edgekd.data.batches import load_split
from edgekd.data.prepared import load_info
from edgekd.train import engine
from edgekd.train import resume as resume_module
from edgekd.train.distributed import Ranks, join_process_group, leave_process_group
from edgekd.train.engine import train_model
from edgekd.train.fit_setup import FitSetup
from edgekd.train.losses import ce_loss_fn


def fit(ranks: Ranks, prepared: str, out: str) -> None:
    torch.manual_seed(0)
    info, train, val = load_info(prepared), load_split(prepared, "train"), load_split(prepared, "val")
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, len(info.classes)),
    )
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    setup = FitSetup(
        epochs=3,
        batch_size=16,
        eval_batch_size=64,
        seed=3,
        mean=info.mean,
        std=info.std,
        bn_recalibration=False,
        ranks=ranks,
    )
    ce, seen = ce_loss_fn(0.1), []

    def counted(net, batch):
        seen.append(len(batch.y))
        return ce(net, batch)

    train_model(model, counted, 0.01, 0.05, train, val, setup)
    if ranks.main:
        torch.save({"initial": initial, "trained": model.state_dict()}, out)
    with open(f"{out}.rank{ranks.rank}", "w") as f:
        f.write(str(sum(seen)))


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def early_stop(ranks: Ranks, out: str) -> None:
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = (images, torch.arange(8) % 2)
    setup = FitSetup(
        epochs=3,
        batch_size=4,
        eval_batch_size=8,
        seed=0,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        patience=1,
        bn_recalibration=False,
        ranks=ranks,
    )
    falling, rising = [0.5, 0.4, 0.3], [0.5, 0.6, 0.7]  # patience 1: stop after epoch 2 / never
    epochs_run = []
    for accuracies in ([falling, rising], [rising, falling]):  # rank 0's, rank 1's
        scripted = iter(accuracies[ranks.rank])
        engine.evaluate = lambda *args, scripted=scripted, **kwargs: {"acc": next(scripted), "loss": 1.0}
        epochs_run.append(train_model(_tiny_net(), ce_loss_fn(0.0), 0.01, 0.0, data, data, setup).epochs_run)
    Path(f"{out}.rank{ranks.rank}").write_text(json.dumps(epochs_run))


def stale_resume(ranks: Ranks, folder: str) -> None:
    folder = Path(folder)
    resume = folder / "resume.pt"
    read, unlink = resume_module.load_checkpoint, Path.unlink

    def marked_read(path):
        state = read(path)
        (folder / f"read.rank{ranks.rank}").touch()
        return state

    def marked_unlink(path, *args, **kwargs):
        if path == resume:
            (folder / f"unlink.rank{ranks.rank}").write_text(" ".join(sorted(p.name for p in folder.glob("read.*"))))
        unlink(path, *args, **kwargs)

    resume_module.load_checkpoint, Path.unlink = marked_read, marked_unlink
    model = _tiny_net()
    setup = FitSetup(
        epochs=1,
        batch_size=4,
        eval_batch_size=8,
        seed=0,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        resume_path=resume,
        fingerprint="this run",
        ranks=ranks,
    )
    time.sleep(ranks.rank)  # rank 1 a second late
    resume_module.restore(model, torch.optim.SGD(model.parameters(), lr=0.1), None, setup)


COMMANDS = {"fit": fit, "early-stop": early_stop, "stale-resume": stale_resume}

if __name__ == "__main__":
    torch.set_num_threads(1)
    ranks, _ = join_process_group(torch.device("cpu"))
    COMMANDS[sys.argv[1]](ranks, *sys.argv[2:])
    leave_process_group()
