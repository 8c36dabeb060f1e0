"""One student run, as the `baseline` and `distill` stages train it: the model of `student.*`, its
whitening conv fitted to the train split, and `fit` on CE (no targets) or CE + KD on the teachers'
stored targets. The stages add their files (checkpoint, metrics, curves, resume); the studies that
rerun the student per seed or per recipe part (tools/studies) call the same function, so what they
measure is what the pipeline trains."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from edgekd.config import Params
from edgekd.data.prepared import DatasetInfo
from edgekd.train.distributed import Ranks
from edgekd.train.engine import FitResult, setup_from_params, train_model
from edgekd.train.fit_setup import FitSetup
from edgekd.train.models import build_model, fit_whitening
from edgekd.train.soft_targets import student_objective


def train_student(
    params: Params,
    info: DatasetInfo,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    device: torch.device,
    targets: dict | None = None,
    live_dir: str | Path | None = None,
    run_id: str = "",
    ranks: Ranks = Ranks(),
) -> tuple[nn.Module, FitResult, FitSetup]:
    """Train the student at `student.seed` on CE, or on CE + KD with `targets` (`load_soft_targets`);
    returns the model holding the selected epoch's weights, the fit's result and its setup. The
    caller seeds the process first (`seed_everything(student.seed)`): the initial weights come from
    the global generator. `live_dir` and `run_id` give the stage its curves and resume file."""
    cfg = params.student
    model = build_model(
        cfg.arch, len(info.classes), cfg.width, stem=cfg.stem, norm_after_pool=params.train.norm_after_pool
    )
    size = cfg.image_size or info.image_size
    fit_whitening(model, train[0], info.mean, info.std, size)  # a convnet's first conv, from this train split
    setup = setup_from_params(
        params, info, device, cfg.epochs, cfg.seed, live_dir, run_id, input_size=size, ranks=ranks
    )
    loss_fn, batches = student_objective(params, train, setup, targets)
    result = train_model(model, loss_fn, cfg.lr, params.train.weight_decay, train, val, setup, batches=batches)
    return model, result, setup
