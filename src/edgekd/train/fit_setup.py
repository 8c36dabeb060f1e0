"""What one training run is: epochs, batches, seed, normalisation, device, resume file, the processes
it runs on. Shared by the training loop (engine), the batch source (batching), validation
(evaluation) and resume, so none of them imports another for it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from edgekd.train.distributed import Ranks


@dataclass(frozen=True)
class FitSetup:
    """Everything `fit` needs besides the model, loss and optimizer."""

    epochs: int
    batch_size: int
    eval_batch_size: int
    seed: int  # with the epoch index, fixes shuffling and augmentation of that epoch
    mean: Sequence[float]
    std: Sequence[float]
    device: torch.device = torch.device("cpu")
    patience: int = 0  # epochs without val improvement before stopping; 0 = never stop early
    live_dir: str | Path | None = None  # dvclive folder for per-epoch curves
    resume_path: str | Path | None = None  # epoch checkpoint; None = no resume
    fingerprint: str = ""  # identity of params + data; a resume file with another one is stale
    bn_recalibration: bool = True  # re-estimate BN statistics before each validation (see below)
    input_size: int | None = None  # model input side; images are augmented at cache size, then resized
    augment: str = "dihedral"  # train.augment
    alternating_flip: bool = False  # train.alternating_flip (batching.epoch_augmentation)
    max_steps: int | None = None  # train.max_steps_per_epoch: an epoch is a random subset of this many batches
    # True: keep the best-val epoch. False: keep the last one, for QAT, whose BN/observer freeze
    # schedule must reach the weights that are exported (an earlier best-val epoch predates it).
    select_best: bool = True
    ranks: Ranks = Ranks()  # this process among the data-parallel ones (edgekd.train.distributed)
    optimizer: str = "adamw_onecycle"  # train.optimizer (engine.make_optimizer)
    momentum: float = 0.0  # train.momentum, Nesterov SGD only
    bn_bias_lr_scale: float = 1.0  # train.bn_bias_lr_scale: BN biases learn at this multiple of the lr
    lr_end: float = 0.07  # train.lr_end: nesterov_triangle's last lr as a fraction of its peak
    ema_decay: float = 0.0  # train.ema_decay: per-step decay of the weight average; 0 = no average
    lookahead: bool = False  # train.lookahead: the weights pulled toward their running average (engine.Lookahead)
    precision: str = "float32"  # train.precision: "bfloat16" runs the training steps under autocast
