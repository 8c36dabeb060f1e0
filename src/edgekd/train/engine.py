"""The one training loop shared by every training stage: teachers, baseline, distill and QAT.

A stage supplies the model, a `loss_fn(model, x, y) -> {"loss", "logits", ...}` closure (CE, KD,
or KD on a fake-quant model) and an optimizer; `fit` runs the epochs, selects the best epoch on
VAL accuracy, optionally stops early, logs curves to dvclive and keeps a resume checkpoint so a
killed stage continues from its last finished epoch with identical results. Batches come from
`batching`, validation from `evaluation`, the resume file from `resume`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from edgekd.train.batching import Batch, BatchSource, LossFn, fresh_augmentation, iterate_batches, steps_per_epoch
from edgekd.train.distributed import Ranks, agree_on, data_parallel, sum_over_ranks
from edgekd.train.evaluation import evaluate, recalibrate_bn
from edgekd.train.fit_setup import FitSetup
from edgekd.train.resume import Progress, restore, resume_file, save_resume

log = logging.getLogger("edgekd")


@dataclass
class FitResult:
    best_val_acc: float
    best_epoch: int  # 0-based
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    train_images_per_s: float = 0.0  # training throughput incl. augmentation (and teachers for KD)
    train_seconds: float = 0.0


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, epochs: int, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW + OneCycle (linear warm-up over 20 % of the steps, cosine decay to ~0).

    OneCycle suits these short from-scratch runs: warm-up keeps BN/Adam stable in the first steps
    of a randomly initialised net, and the schedule ends at a tiny lr regardless of epoch count.
    No weight decay on BN parameters and biases (1-D tensors), as in torchvision's recipes.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    total = epochs * steps_per_epoch
    # OneCycleLR divides by its warm-up length in steps, pct_start * total - 1: zero at 5 steps.
    warmup = 0.2 if total != 5 else 0.3
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=warmup)
    return optimizer, scheduler


def train_one_epoch(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batches: Iterator[Batch],
    device: torch.device,
    total: int | None = None,
    ranks: Ranks = Ranks(),
) -> dict[str, float]:
    """One pass over `batches`; returns mean loss (and its parts), train accuracy, images/s, over
    the global batches of all processes."""
    model.train()
    sums: dict[str, float] = {}
    correct = seen = 0
    start = time.perf_counter()
    for batch in tqdm(batches, total=total, leave=False, disable=not sys.stderr.isatty()):
        out = loss_fn(model, batch)
        y = batch.y
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        for name, value in out.items():
            if name != "logits":
                sums[name] = sums.get(name, 0.0) + value.item() * len(y)
        correct += (out["logits"].argmax(1) == y).sum().item()
        seen += len(y)
    seconds = time.perf_counter() - start
    names = list(sums)
    *totals, correct, seen = sum_over_ranks([*(sums[n] for n in names), correct, seen], ranks)
    stats = {name: total_ / seen for name, total_ in zip(names, totals)}
    stats.update(train_acc=correct / seen, seconds=seconds, images_per_s=seen / seconds)
    return stats


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    setup: FitSetup,
    on_epoch_start: Callable[[int], None] | None = None,
    batches: BatchSource | None = None,
) -> FitResult:
    """Train for `setup.epochs`, keep the best-val-accuracy (or the last) weights, load them into `model`.

    `batches(epoch, generator)` replaces the default source (augmented `train` batches), e.g. with
    the stored views and teacher logits of distillation; `train` then serves BN re-estimation only.
    All images come at the cached size; `setup.input_size` downscales every batch after augmentation
    (and every val batch), so a smaller student trains on exactly the views its teachers labelled.

    `on_epoch_start(epoch)` runs before every epoch this process trains, e.g. QAT freezing BN or
    observers. After a resume it is first called with the resumed epoch, never with earlier ones,
    so it must test `epoch >= k` rather than `epoch == k` (the frozen flags are buffers and are
    restored with the weights anyway).
    """
    model.to(setup.device)
    step_model = data_parallel(model, setup.ranks, setup.device)  # model itself for one process
    progress = restore(model, optimizer, scheduler, setup)
    live = _open_live(setup.live_dir if setup.ranks.main else None)
    for row in progress.history:  # a resumed run: DVC deleted the stage's outputs before rerunning it
        _log_live(live, row)
    steps = steps_per_epoch(len(train[0]), setup.batch_size, setup.max_steps)
    for epoch in range(progress.next_epoch, setup.epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        lr = optimizer.param_groups[0]["lr"]
        generator = torch.Generator().manual_seed(setup.seed * 10_007 + epoch)  # shuffle + augment
        epoch_batches = (
            batches(epoch, generator)
            if batches is not None
            else iterate_batches(
                *train, setup, generator, fresh_augmentation(generator, train[0].shape[-1], setup.augment)
            )
        )
        stats = train_one_epoch(
            step_model, loss_fn, optimizer, scheduler, epoch_batches, setup.device, steps, setup.ranks
        )
        if setup.bn_recalibration:
            recalibrate_bn(model, train[0], setup)
        val_stats = evaluate(model, *val, setup.mean, setup.std, setup.eval_batch_size, setup.device, setup.input_size)
        row = {"epoch": epoch, **stats, "val_acc": val_stats["acc"], "val_loss": val_stats["loss"], "lr": lr}
        progress.history.append(row)
        # Ties keep the earlier, less trained epoch; without selection every epoch replaces the last.
        if val_stats["acc"] > progress.best_val_acc or not setup.select_best:
            progress.best_val_acc, progress.best_epoch = val_stats["acc"], epoch
            progress.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        progress.next_epoch = epoch + 1
        log.info(
            "epoch %d/%d loss %.4f train_acc %.4f val_acc %.4f lr %.2e %.1fs %.0f img/s",
            epoch + 1,
            setup.epochs,
            row["loss"],
            row["train_acc"],
            row["val_acc"],
            lr,
            row["seconds"],
            row["images_per_s"],
        )
        _log_live(live, row)
        # Rank 0's decision on every process: their val accuracies can differ (agree_on).
        stop = agree_on(setup.patience > 0 and epoch - progress.best_epoch >= setup.patience, setup.ranks)
        if setup.resume_path is not None and setup.ranks.main and progress.next_epoch < setup.epochs and not stop:
            save_resume(setup, model, optimizer, scheduler, progress)
        if stop:
            log.info("early stop: no val improvement for %d epochs", setup.patience)
            break
    _close_live(live)
    # Done: a rerun must start from scratch. No barrier: the other processes read the file only in
    # `restore`, whose barrier they passed before rank 0 first wrote it.
    if setup.resume_path is not None and setup.ranks.main:
        Path(setup.resume_path).unlink(missing_ok=True)
    model.load_state_dict(progress.best_state)
    return _result(progress)


def _result(progress: Progress) -> FitResult:
    seconds = sum(row["seconds"] for row in progress.history)
    images = sum(row["seconds"] * row["images_per_s"] for row in progress.history)
    return FitResult(
        best_val_acc=progress.best_val_acc,
        best_epoch=progress.best_epoch,
        epochs_run=len(progress.history),
        history=progress.history,
        train_images_per_s=images / seconds if seconds else math.nan,
        train_seconds=seconds,
    )


def _open_live(live_dir: str | Path | None):
    """A fresh dvclive logger that never touches dvc.yaml: the stage declares its folder as an output.

    Always fresh: a resumed run replays its finished epochs from the resume file, so the curves are
    complete although DVC deleted the folder (a declared output) before rerunning the stage.
    """
    if live_dir is None:
        return None
    from dvclive import Live  # imported lazily: slow to import, unused by library callers

    return Live(str(live_dir), resume=False, dvcyaml=False, save_dvc_exp=False)


def _log_live(live, row: dict[str, float]) -> None:
    """One epoch's point of every curve: the training stage's per-epoch figures live here, not in its
    metrics file (which holds the selected epoch's val accuracy alone)."""
    if live is None:
        return
    live.step = int(row["epoch"])  # the epoch checkpoint, not dvclive's own counter, is the truth
    for name in ("loss", "train_acc", "val_acc", "val_loss", "lr", "images_per_s", "seconds"):
        live.log_metric(name, row[name])
    live.next_step()


def _close_live(live) -> None:
    """End the curves and drop dvclive's summary file (`metrics.json`, the last epoch's figures): the
    stage's own metrics file holds the selected epoch's, and one metrics file per stage keeps
    `dvc exp show` readable."""
    if live is None:
        return
    live.end()
    Path(live.dir, "metrics.json").unlink(missing_ok=True)


def setup_from_params(
    params: Any,
    info: Any,
    device: torch.device,
    epochs: int,
    seed: int,
    live_dir: str | Path | None,
    fingerprint_: str,
    bn_recalibration: bool = True,
    input_size: int | None = None,
    select_best: bool = True,
    ranks: Ranks = Ranks(),
) -> FitSetup:
    """FitSetup from params.yaml's `train` section and the stage's own seed stream.

    Without best-epoch selection there is nothing to stop early for, so `train.patience` is not read.
    """
    return FitSetup(
        epochs=epochs,
        batch_size=params.train.batch_size,
        eval_batch_size=params.train.eval_batch_size,
        seed=seed,
        mean=info.mean,
        std=info.std,
        device=device,
        patience=params.train.patience if select_best else 0,
        live_dir=live_dir,
        resume_path=None if live_dir is None else resume_file(live_dir),
        fingerprint=fingerprint_,
        bn_recalibration=bn_recalibration,
        input_size=input_size,
        select_best=select_best,
        augment=params.train.augment,
        max_steps=params.train.max_steps_per_epoch,
        ranks=ranks,
    )


def train_model(
    model: nn.Module,
    loss_fn: LossFn,
    lr: float,
    weight_decay: float,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    setup: FitSetup,
    on_epoch_start: Callable[[int], None] | None = None,
    batches: BatchSource | None = None,
) -> FitResult:
    """`fit` with this project's optimizer and schedule (AdamW + OneCycle)."""
    steps = steps_per_epoch(len(train[0]), setup.batch_size, setup.max_steps)
    optimizer, scheduler = make_optimizer(model, lr, weight_decay, setup.epochs, steps)
    return fit(model, loss_fn, optimizer, scheduler, train, val, setup, on_epoch_start, batches)
