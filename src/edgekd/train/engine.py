"""The one training loop shared by every training stage: teachers, baseline, distill and QAT.

A stage supplies the model, a `loss_fn(model, x, y) -> {"loss", "logits", ...}` closure (CE, KD,
or KD on a fake-quant model) and an optimizer; `fit` runs the epochs, selects the best epoch on
VAL accuracy, optionally stops early, logs curves to dvclive and keeps a resume checkpoint so a
killed stage continues from its last finished epoch with identical results.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.ao.quantization import FakeQuantizeBase
from tqdm import tqdm

from edgekd.data.prepared import ModelInputs, normalize, resize_batch
from edgekd.train.augment import apply_augmentation, draw_augmentation, rows_of
from edgekd.train.checkpoints import load_checkpoint, save_checkpoint
from edgekd.train.distributed import Ranks, agree_on, data_parallel, sum_over_ranks, wait_for_all_ranks
from edgekd.train.models import count_params

log = logging.getLogger("edgekd")


class Batch(NamedTuple):
    x: Tensor  # (B, 3, H, W) normalised float
    y: Tensor  # (B,) int64 labels
    teacher_logits: Tensor | None = None  # (B, C) stored soft targets (distillation), else None


LossFn = Callable[[nn.Module, Batch], dict[str, Tensor]]
BatchSource = Callable[[int, torch.Generator], Iterator[Batch]]  # (epoch, generator) -> batches


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
    max_steps: int | None = None  # train.max_steps_per_epoch: an epoch is a random subset of this many batches
    # True: keep the best-val epoch. False: keep the last one, for QAT, whose BN/observer freeze
    # schedule must reach the weights that are exported (an earlier best-val epoch predates it).
    select_best: bool = True
    ranks: Ranks = Ranks()  # this process among the data-parallel ones (edgekd.train.distributed)


@dataclass
class FitResult:
    best_val_acc: float
    best_epoch: int  # 0-based
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    train_images_per_s: float = 0.0  # training throughput incl. augmentation (and teachers for KD)
    train_seconds: float = 0.0


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, epochs: int,
                   steps_per_epoch: int) -> tuple[torch.optim.Optimizer, Any]:
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


def steps_per_epoch(num_images: int, batch_size: int, max_steps: int | None = None) -> int:
    """Full batches only (a last batch of 1-2 images gives noisy BN statistics); at least one, at
    most `max_steps` (train.max_steps_per_epoch: epochs of a fixed cost on a split of any size)."""
    return min(max(1, num_images // batch_size), max_steps or num_images)


Augmentation = Callable[[Tensor], dict[str, Tensor]]  # a batch's rows -> its augmentation table


def fresh_augmentation(generator: torch.Generator, side: int, kind: str) -> Augmentation:
    """New transforms for every batch, drawn from the epoch's generator (train.augment)."""
    return lambda rows: draw_augmentation(len(rows), side, generator, kind)


def iterate_batches(images: Tensor, labels: Tensor, setup: FitSetup, generator: torch.Generator,
                    augment: Augmentation | None, teacher_logits: Tensor | None = None) -> Iterator[Batch]:
    """Shuffled, augmented, normalised batches: uint8 (N, 3, H, W) -> float (B, 3, H, W) on device,
    with the matching rows of `teacher_logits` (N, C) when given. `augment` gives each batch's
    augmentation table (`fresh_augmentation`, or a stored view's rows), applied on the device;
    None leaves the images as they are. With several processes, each takes every world-th image of
    each global batch, drawn and augmented exactly as for one process."""
    order = torch.randperm(len(images), generator=generator)
    batch = min(setup.batch_size, len(images))
    share = slice(setup.ranks.rank, None, setup.ranks.world)
    for step in range(steps_per_epoch(len(images), setup.batch_size, setup.max_steps)):
        idx = order[step * batch:(step + 1) * batch]
        table = None if augment is None else augment(idx)  # drawn for the global batch on every rank
        idx = idx[share]
        x = images[idx].to(setup.device)  # uint8 crosses to the GPU: 4x less to copy, augmented there
        if table is not None:
            x = apply_augmentation(x, rows_of(table, share), setup.augment)
        x = resize_batch(x, setup.input_size)
        soft = None if teacher_logits is None else teacher_logits[idx].to(setup.device)
        yield Batch(normalize(x, setup.mean, setup.std), labels[idx].to(setup.device), soft)


def train_one_epoch(model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, scheduler: Any,
                    batches: Iterator[Batch], device: torch.device,
                    total: int | None = None, ranks: Ranks = Ranks()) -> dict[str, float]:
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


@contextlib.contextmanager
def evaluation_mode(model: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """eval() with every fake-quant observer off for the duration; both restored afterwards.

    PyTorch's FakeQuantize updates its ranges on every forward pass while its observer is enabled,
    in eval mode too: evaluating a QAT model on val images would move its INT8 grid towards them
    (val leaking into the model) and make it a moving reference for export checks.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    was_training = model.training
    quantizers = [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]
    flags = [m.observer_enabled.clone() for m in quantizers]
    model.eval()
    for m in quantizers:
        m.disable_observer()
    try:
        yield
    finally:
        for m, flag in zip(quantizers, flags):
            m.observer_enabled.copy_(flag)
        model.train(was_training)


def predict_logits(fn: Callable[[Tensor], Tensor], images: Tensor, mean: Sequence[float],
                   std: Sequence[float], batch_size: int, device: torch.device, size: int | None = None) -> Tensor:
    """Logits (N, C) for uint8 images (N, 3, H, W), without augmentation, on CPU; each batch resized
    to the model's input side `size` on the device (None: as cached), so no resized split is held."""
    with evaluation_mode(fn), torch.inference_mode():
        return torch.cat([fn(x).float().cpu() for x in ModelInputs(images, size, mean, std, batch_size, device)])


def evaluate(model: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor, mean: Sequence[float],
             std: Sequence[float], batch_size: int = 256, device: torch.device = torch.device("cpu"),
             size: int | None = None) -> dict[str, float]:
    """Accuracy and plain (unsmoothed) cross-entropy of a model or any logits callable, on
    `images` resized to its input side `size` (None: as cached)."""
    logits = predict_logits(model, images, mean, std, batch_size, device, size)
    return {
        "acc": (logits.argmax(1) == labels).float().mean().item(),
        "loss": nn.functional.cross_entropy(logits, labels).item(),
    }


def recalibrate_bn(model: nn.Module, images: Tensor, setup: FitSetup, max_images: int = 512) -> None:
    """Recompute BN running statistics as a plain average over un-augmented training images.

    Short from-scratch runs take only tens of optimizer steps; the running averages (momentum
    0.01 in torchvision's MobileNetV3) then lag far behind the weights and an eval-mode model
    predicts one class for everything although train accuracy rises ("precise BN", Wu & Johnson
    2021, arXiv:2105.07576). Costs one forward pass over `max_images` images. Not for QAT models
    whose BN statistics are deliberately frozen.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    # A seeded random subset in random order: the prepared splits are sorted by class, and
    # single-class batches would miss the between-class part of the variance.
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(setup.seed))[:max_images]
    with torch.no_grad():
        n = len(pick)
        batch = min(setup.batch_size, n)
        for step in range(steps_per_epoch(n, setup.batch_size)):  # full batches: BN needs > 1 value
            x = resize_batch(images[pick[step * batch:(step + 1) * batch]], setup.input_size)  # (B, 3, H, W) uint8
            model(normalize(x.to(setup.device), setup.mean, setup.std))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def fingerprint(*parts: Any) -> str:
    """Hash of tensors, dicts/lists of them and JSON-able values: identifies the params + data
    (+ teacher weights) that a resume file belongs to."""
    h = hashlib.sha256()

    def feed(part: Any) -> None:
        if isinstance(part, Tensor):
            h.update(part.detach().cpu().reshape(-1).view(torch.uint8).numpy())  # no copy of a mapped split
        elif isinstance(part, dict):
            for key in sorted(part):
                h.update(str(key).encode())
                feed(part[key])
        elif isinstance(part, (list, tuple)):
            for item in part:
                feed(item)
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())

    for part in parts:
        feed(part)
    return h.hexdigest()


@dataclass
class _Progress:
    """Everything besides model/optimizer/scheduler that a resumed run must restore."""

    next_epoch: int = 0
    best_val_acc: float = -1.0
    best_epoch: int = -1
    best_state: dict[str, Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def fit(model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, scheduler: Any,
        train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], setup: FitSetup,
        on_epoch_start: Callable[[int], None] | None = None, batches: BatchSource | None = None) -> FitResult:
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
    progress = _restore(model, optimizer, scheduler, setup)
    live = _open_live(setup.live_dir if setup.ranks.main else None)
    for row in progress.history:  # a resumed run: DVC deleted the stage's outputs before rerunning it
        _log_live(live, row)
    steps = steps_per_epoch(len(train[0]), setup.batch_size, setup.max_steps)
    for epoch in range(progress.next_epoch, setup.epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        lr = optimizer.param_groups[0]["lr"]
        generator = torch.Generator().manual_seed(setup.seed * 10_007 + epoch)  # shuffle + augment
        epoch_batches = (batches(epoch, generator) if batches is not None
                         else iterate_batches(*train, setup, generator,
                                         fresh_augmentation(generator, train[0].shape[-1], setup.augment)))
        stats = train_one_epoch(step_model, loss_fn, optimizer, scheduler, epoch_batches, setup.device, steps,
                                setup.ranks)
        if setup.bn_recalibration:
            recalibrate_bn(model, train[0], setup)
        val_stats = evaluate(model, *val, setup.mean, setup.std, setup.eval_batch_size, setup.device,
                             setup.input_size)
        row = {"epoch": epoch, **stats, "val_acc": val_stats["acc"], "val_loss": val_stats["loss"], "lr": lr}
        progress.history.append(row)
        # Ties keep the earlier, less trained epoch; without selection every epoch replaces the last.
        if val_stats["acc"] > progress.best_val_acc or not setup.select_best:
            progress.best_val_acc, progress.best_epoch = val_stats["acc"], epoch
            progress.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        progress.next_epoch = epoch + 1
        log.info("epoch %d/%d loss %.4f train_acc %.4f val_acc %.4f lr %.2e %.1fs %.0f img/s", epoch + 1,
                 setup.epochs, row["loss"], row["train_acc"], row["val_acc"], lr, row["seconds"],
                 row["images_per_s"])
        _log_live(live, row)
        # Rank 0's decision on every process: their val accuracies can differ (agree_on).
        stop = agree_on(setup.patience > 0 and epoch - progress.best_epoch >= setup.patience, setup.ranks)
        if setup.resume_path is not None and setup.ranks.main and progress.next_epoch < setup.epochs and not stop:
            _save_resume(setup, model, optimizer, scheduler, progress)
        if stop:
            log.info("early stop: no val improvement for %d epochs", setup.patience)
            break
    if live is not None:
        live.end()
    # Done: a rerun must start from scratch. No barrier: the other processes read the file only in
    # `_restore`, whose barrier they passed before rank 0 first wrote it.
    if setup.resume_path is not None and setup.ranks.main:
        Path(setup.resume_path).unlink(missing_ok=True)
    model.load_state_dict(progress.best_state)
    return _result(progress)


def _result(progress: _Progress) -> FitResult:
    seconds = sum(row["seconds"] for row in progress.history)
    images = sum(row["seconds"] * row["images_per_s"] for row in progress.history)
    return FitResult(best_val_acc=progress.best_val_acc, best_epoch=progress.best_epoch,
                     epochs_run=len(progress.history), history=progress.history,
                     train_images_per_s=images / seconds if seconds else math.nan, train_seconds=seconds)


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
    if live is None:
        return
    live.step = int(row["epoch"])  # the epoch checkpoint, not dvclive's own counter, is the truth
    for name in ("loss", "train_acc", "val_acc", "val_loss", "lr"):
        live.log_metric(name, row[name])
    live.next_step()


def _save_resume(setup: FitSetup, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 progress: _Progress) -> None:
    save_checkpoint(setup.resume_path, {
        "fingerprint": setup.fingerprint,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "torch_rng": torch.get_rng_state(),  # dropout draws from the global generator
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "progress": vars(progress),
    })


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, setup: FitSetup) -> _Progress:
    """Load the resume file if it belongs to this exact run; rank 0 deletes it if it is stale.

    Every process reads the file and decides before rank 0 may delete it (a barrier); otherwise a
    process that had just found the file could fail to read it. Only rank 0 writes and deletes it.
    """
    path = None if setup.resume_path is None else Path(setup.resume_path)
    state = load_checkpoint(path) if path is not None and path.is_file() else None
    wait_for_all_ranks(setup.ranks)
    if state is None:
        return _Progress()
    if state.get("fingerprint") != setup.fingerprint:
        log.info("ignoring %s: written for other params or data", path)
        if setup.ranks.main:
            path.unlink()
        return _Progress()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    progress = _Progress(**state["progress"])
    log.info("resuming from %s after epoch %d", path, progress.next_epoch)
    return progress


def resume_file(live_dir: str | Path) -> Path:
    """`<live dir>.resume.pt`, beside the dvclive folder and outside every declared output: DVC deletes
    a stage's outputs before running it (none are `persist`, so the run-cache works), and a resume
    file inside one would be gone exactly when it is needed."""
    live_dir = Path(live_dir)
    return live_dir.with_name(live_dir.name + ".resume.pt")


def setup_from_params(params: Any, info: Any, device: torch.device, epochs: int, seed: int,
                      live_dir: str | Path | None, fingerprint_: str, bn_recalibration: bool = True,
                      input_size: int | None = None, select_best: bool = True, ranks: Ranks = Ranks()) -> FitSetup:
    """FitSetup from params.yaml's `train` section and the stage's own seed stream.

    Without best-epoch selection there is nothing to stop early for, so `train.patience` is not read.
    """
    return FitSetup(
        epochs=epochs, batch_size=params.train.batch_size, eval_batch_size=params.train.eval_batch_size,
        seed=seed, mean=info.mean, std=info.std, device=device,
        patience=params.train.patience if select_best else 0,
        live_dir=live_dir, resume_path=None if live_dir is None else resume_file(live_dir),
        fingerprint=fingerprint_, bn_recalibration=bn_recalibration, input_size=input_size,
        select_best=select_best, augment=params.train.augment, max_steps=params.train.max_steps_per_epoch,
        ranks=ranks,
    )


def train_model(model: nn.Module, loss_fn: LossFn, lr: float, weight_decay: float,
                train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], setup: FitSetup,
                on_epoch_start: Callable[[int], None] | None = None, batches: BatchSource | None = None) -> FitResult:
    """`fit` with this project's optimizer and schedule (AdamW + OneCycle)."""
    steps = steps_per_epoch(len(train[0]), setup.batch_size, setup.max_steps)
    optimizer, scheduler = make_optimizer(model, lr, weight_decay, setup.epochs, steps)
    return fit(model, loss_fn, optimizer, scheduler, train, val, setup, on_epoch_start, batches)


def training_summary(result: FitResult, model: nn.Module, wall_s: float) -> dict[str, float]:
    """The metrics every training stage reports (val accuracy of the selected epoch, cost)."""
    return {"val_acc": result.best_val_acc, "best_epoch": result.best_epoch + 1,
            "epochs_run": result.epochs_run, "params": count_params(model),
            "train_images_per_s": round(result.train_images_per_s, 1), "wall_s": round(wall_s, 1)}
