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
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from edgekd.train.batching import Batch, BatchSource, LossFn, epoch_augmentation, iterate_batches, steps_per_epoch
from edgekd.train.device import precision_autocast
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
    model: nn.Module, lr: float, weight_decay: float, epochs: int, steps_per_epoch: int, setup: FitSetup | None = None
) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer and per-step schedule of `setup.optimizer` (train.optimizer):

    - "adamw_onecycle": AdamW + OneCycle (linear warm-up over 20 % of the steps, cosine decay to ~0).
      Warm-up keeps BN/Adam stable in the first steps of a randomly initialised net, and the
      schedule ends at a tiny lr regardless of epoch count.
    - "nesterov_triangle": SGD with Nesterov momentum (train.momentum), the lr rising linearly from
      0.2x to its peak at 23 % of the steps and falling to train.lr_end x at the end (airbench's
      schedule, docs/recipe.md): with BN after every conv and batches of 1024 it reaches a given accuracy in
      fewer epochs than AdamW.

    No weight decay on BN parameters and biases (1-D tensors), as in torchvision's recipes. BN biases
    learn at train.bn_bias_lr_scale times the lr (airbench: 64x): BN weights and biases set each
    channel's ReLU threshold, and the higher rate moves them as fast as the convs' weights move.
    """
    kind = setup.optimizer if setup is not None else "adamw_onecycle"
    scale = setup.bn_bias_lr_scale if setup is not None else 1.0
    norm_biases = {
        id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.bias is not None
    }
    # A reparametrised head (models.ConvNet: logits scaled through its weights by `logit_scale`) gets
    # the lr under which it steps as a plain head's scaled logits would, its decay per step unchanged:
    # lr x scale^2 for SGD, whose step follows the gradient's size, x scale for AdamW, whose does not.
    logit_scale = getattr(model, "logit_scale", 1.0)
    head_scale = logit_scale**2 if kind == "nesterov_triangle" else logit_scale
    head = {id(model.classifier.weight)} if head_scale != 1.0 else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim > 1 and id(p) not in head]
    no_decay = [p for p in trainable if p.ndim <= 1 and id(p) not in norm_biases]
    biases = [p for p in trainable if id(p) in norm_biases]
    groups = [
        group
        for group in (
            {"params": decay, "weight_decay": weight_decay, "lr": lr},
            {
                "params": [p for p in trainable if id(p) in head],
                "weight_decay": weight_decay / head_scale,
                "lr": lr * head_scale,
            },
            {"params": no_decay, "weight_decay": 0.0, "lr": lr},
            {"params": biases, "weight_decay": 0.0, "lr": lr * scale},
        )
        if group["params"]
    ]
    total = epochs * steps_per_epoch
    if kind == "nesterov_triangle":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=setup.momentum, nesterov=True)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _Triangle(total, setup.lr_end))
    optimizer = torch.optim.AdamW(groups, lr=lr)
    # OneCycleLR divides by its warm-up length in steps, pct_start * total - 1: zero at 5 steps.
    warmup = 0.2 if total != 5 else 0.3
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=total, pct_start=warmup
    )
    return optimizer, scheduler


TRIANGLE = (0.2, 0.23)  # nesterov_triangle: start (x peak lr), peak position (share of steps)


class _Triangle:
    """The lr factor of step i: linear from TRIANGLE's start to 1 at its peak, then to `end`
    (train.lr_end). A class, not a closure, so that the scheduler's state (with it) can be saved for
    resuming."""

    def __init__(self, total: int, end: float) -> None:
        self.total, self.peak, self.end = total, max(1, round(TRIANGLE[1] * total)), end

    def __call__(self, step: int) -> float:
        start = TRIANGLE[0]
        if step < self.peak:
            return start + (1 - start) * step / self.peak
        return 1 + (self.end - 1) * min(1.0, (step - self.peak) / max(1, self.total - self.peak))


def train_one_epoch(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batches: Iterator[Batch],
    device: torch.device,
    total: int | None = None,
    ranks: Ranks = Ranks(),
    after_step: Callable[[], None] | None = None,
    precision: str = "float32",
) -> dict[str, float]:
    """One pass over `batches`; returns mean loss (and its parts), train accuracy, images/s, over
    the global batches of all processes. `after_step` runs after every optimizer step (weight
    averaging)."""
    model.train()
    sums: dict[str, float] = {}
    correct = seen = 0
    start = time.perf_counter()
    for batch in tqdm(batches, total=total, leave=False, disable=not sys.stderr.isatty()):
        with precision_autocast(device, precision):
            out = loss_fn(model, batch)
        y = batch.y
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step()
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
    # Channels-last memory, weights here and batches in `iterate_batches`: oneDNN's CPU convolutions
    # then skip a layout reorder per layer (1.7-2x for the convnets, docs/recipe.md measures it).
    model.to(setup.device, memory_format=torch.channels_last)
    step_model = data_parallel(model, setup.ranks, setup.device)  # model itself for one process
    averaged = weight_average(model, setup.ema_decay)
    steps = steps_per_epoch(len(train[0]), setup.batch_size, setup.max_steps)
    lookahead = Lookahead(model, steps * setup.epochs) if setup.lookahead else None
    progress = restore(model, optimizer, scheduler, setup, averaged, lookahead)
    kept = model if averaged is None else averaged.module  # what is validated, selected and saved
    live = _open_live(setup.live_dir if setup.ranks.main else None)
    for row in progress.history:  # a resumed run: DVC deleted the stage's outputs before rerunning it
        _log_live(live, row)
    for epoch in range(progress.next_epoch, setup.epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        lr = optimizer.param_groups[0]["lr"]
        generator = torch.Generator().manual_seed(setup.seed * 10_007 + epoch)  # shuffle + augment
        epoch_batches = (
            batches(epoch, generator)
            if batches is not None
            else iterate_batches(*train, setup, generator, epoch_augmentation(generator, train[0], setup, epoch))
        )
        stats = train_one_epoch(
            step_model,
            loss_fn,
            optimizer,
            scheduler,
            epoch_batches,
            setup.device,
            steps,
            setup.ranks,
            _after_step(model, averaged, lookahead, epoch),
            setup.precision,
        )
        if lookahead is not None:
            lookahead.end_epoch()
        if setup.bn_recalibration:
            recalibrate_bn(kept, train[0], setup)
        val_stats = evaluate(kept, *val, setup.mean, setup.std, setup.eval_batch_size, setup.device, setup.input_size)
        row = {"epoch": epoch, **stats, "val_acc": val_stats["acc"], "val_loss": val_stats["loss"], "lr": lr}
        progress.history.append(row)
        # Ties keep the earlier, less trained epoch; without selection every epoch replaces the last.
        if val_stats["acc"] > progress.best_val_acc or not setup.select_best:
            progress.best_val_acc, progress.best_epoch = val_stats["acc"], epoch
            progress.best_state = {k: v.detach().clone() for k, v in kept.state_dict().items()}
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
            save_resume(setup, model, optimizer, scheduler, progress, averaged, lookahead)
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


class Lookahead:
    """airbench's lookahead (train.lookahead): from epoch START_EPOCH (0-based) on, every EVERY steps
    the running average of the weights and BN statistics takes a step toward the model, and the model
    becomes the average; at each epoch's end the model is set to the average again. The average's
    decay grows as DECAY x (step / total)^3: almost none early, when the weights must move fast, and
    strong over the last epochs of a short high-lr run, whose late steps' noise it cancels. Unlike
    `train.ema_decay`'s average, training goes on from the averaged weights, so there is no lag
    between what trains and what is validated. Every rank holds the same weights and so the same
    average; the state is in the resume file."""

    START_EPOCH, EVERY, DECAY = 3, 5, 0.95**5

    def __init__(self, model: nn.Module, total_steps: int) -> None:
        self.model, self.total, self.step = model, total_steps, 0
        self.average: dict[str, Tensor] | None = None

    def _floats(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def after_step(self, epoch: int) -> None:
        self.step += 1
        if epoch < self.START_EPOCH or self.step % self.EVERY:
            return
        if self.average is None:
            self.average = {k: v.detach().clone() for k, v in self._floats().items()}
            return
        decay = self.DECAY * (self.step / self.total) ** 3
        for name, value in self._floats().items():
            self.average[name].lerp_(value, 1 - decay)
            value.copy_(self.average[name])

    @torch.no_grad()
    def end_epoch(self) -> None:
        if self.average is not None:
            for name, value in self._floats().items():
                value.copy_(self.average[name])

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "average": self.average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.average = state["step"], state["average"]


def _after_step(
    model: nn.Module, averaged: AveragedModel | None, lookahead: Lookahead | None, epoch: int
) -> Callable[[], None] | None:
    """What runs after every optimizer step of `epoch`: the lookahead pull, then the weight average."""
    if averaged is None and lookahead is None:
        return None

    def after_step() -> None:
        if lookahead is not None:
            lookahead.after_step(epoch)
        if averaged is not None:
            averaged.update_parameters(model)

    return after_step


def weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of the weights and BN statistics, updated after every step
    (train.ema_decay; 0 = none): what is validated, selected and saved. Averaging the last few
    hundred steps of a short high-lr run cancels much of the noise of its last steps (airbench's
    lookahead; docs/recipe.md measures it)."""
    if decay == 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


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
    fake_quant: bool = False,
) -> FitSetup:
    """FitSetup from params.yaml's `train` section and the stage's own seed stream.

    Without best-epoch selection there is nothing to stop early for, so `train.patience` is not read;
    for `fake_quant` (QAT: its observers and frozen BN are buffers no average may blend, and its
    fake-quant steps run in float32) none of `train.ema_decay`, `train.lookahead` and `train.precision`
    is read.
    """
    t = params.train
    return FitSetup(
        optimizer=t.optimizer,
        momentum=t.momentum,  # read by nesterov_triangle alone, declared with the optimizer it belongs to
        bn_bias_lr_scale=t.bn_bias_lr_scale,
        lr_end=t.lr_end,
        ema_decay=t.ema_decay if not fake_quant else 0.0,
        lookahead=t.lookahead if not fake_quant else False,
        precision=t.precision if not fake_quant else "float32",
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
        alternating_flip=params.train.alternating_flip,
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
    """`fit` with the optimizer and schedule of `setup.optimizer` (`make_optimizer`)."""
    steps = steps_per_epoch(len(train[0]), setup.batch_size, setup.max_steps)
    optimizer, scheduler = make_optimizer(model, lr, weight_decay, setup.epochs, steps, setup)
    return fit(model, loss_fn, optimizer, scheduler, train, val, setup, on_epoch_start, batches)
