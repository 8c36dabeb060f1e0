"""Teacher-ensemble logits computed once for a fixed set of augmented views of the training set.

Running three teachers on every distillation batch made KD ~5x slower than the student's own
training (densenet121 alone is most of it). A teacher's output depends only on its input image, so
the ensemble is run once over `kd.views` augmented copies of the training set and distillation
epoch e trains on view e mod V with those stored targets (the idea of FKD, Shen & Xing 2022,
arXiv:2112.01528). The student then trains at its own speed for many more epochs, and a
`student.*`, `kd.temperature` or `kd.ensemble` experiment never runs a teacher: each teacher's
logits are stored, and the student stages combine them (`combine_teachers`).

The logits are stored as float16 (STORED_DTYPE), half the file and the RAM of float32: its
rounding, at most 2^-11 of a logit, is far below what a temperature-softened target resolves, and
the soft_targets stage reports the largest rounding error and how often the ensemble's top-1 on
the views changed.

With `kd.targets: flip_mean` the teachers label each training image once instead, their logits
averaged over the image and its mirror (test-time flip averaging), and the students train on fresh
augmentations of every epoch against those per-image targets: two teacher passes over the split in
all, where V views cost V. A 2 px shift or a flip changes what a CIFAR-10 teacher sees little, and the
flip-averaged ensemble is the more accurate teacher (docs/recipe.md measures both).

Views are re-rendered from their seeds instead of stored (V x 40 MB of pixels at 64 px would fill
the DVC cache); a hash of every view, taken when its targets were computed, makes a re-render that
differs by one pixel fail loudly instead of training on mismatched targets. A view is its table of
augmentation parameters (`view_parameters`, a few numbers an image): its pixels are rendered a batch
at a time, on the training device, from the uint8 batch, so no stage ever holds a view in RAM.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from edgekd.config import Params
from edgekd.errors import UserError
from edgekd.train.augment import apply_augmentation, draw_augmentation, rows_of
from edgekd.train.batching import Batch, BatchSource, LossFn, epoch_augmentation, iterate_batches
from edgekd.train.checkpoints import load_checkpoint, save_checkpoint
from edgekd.train.device import precision_autocast
from edgekd.train.evaluation import predict_logits
from edgekd.train.fit_setup import FitSetup
from edgekd.train.losses import (
    FlipAveraged,
    ce_loss_fn,
    confidence_ensemble,
    confidence_weights,
    kd_loss_fn,
    teacher_logits,
)

RENDER_CHUNK = 256  # images augmented per generator call; part of a view's definition
STORED_DTYPE = torch.float16  # of the stored teacher logits


def view_parameters(images: Tensor, seed: int, view: int, augment: str) -> dict[str, Tensor]:
    """The augmentation table (one row per image) of copy number `view` of uint8 images (N, 3, H, W):
    the same on every call, drawn RENDER_CHUNK images per generator call."""
    generator = torch.Generator().manual_seed(seed * 7_919 + view)  # apart from fit's epoch seeds
    side = images.shape[-1]
    chunks = [
        draw_augmentation(min(RENDER_CHUNK, len(images) - start), side, generator, augment)
        for start in range(0, len(images), RENDER_CHUNK)
    ]
    return {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}


def render_view(
    images: Tensor,
    params: dict[str, Tensor],
    augment: str,
    batch_size: int = RENDER_CHUNK,
    device: torch.device = torch.device("cpu"),
) -> Iterator[Tensor]:
    """The view's pixels, `batch_size` images at a time in image order, rendered on `device`."""
    for start in range(0, len(images), batch_size):
        rows = slice(start, start + batch_size)
        yield apply_augmentation(images[rows].to(device), rows_of(params, rows), augment)


def view_hash(images: Tensor, params: dict[str, Tensor], augment: str) -> str:
    """Hash of a view's pixels in image order, rendered chunk by chunk (no view is ever held)."""
    return _chunks_hash(render_view(images, params, augment))


def _chunks_hash(chunks: Iterable[Tensor]) -> str:
    """Hash of the pixels of consecutive chunks of images: the same as of their concatenation."""
    h = hashlib.sha256()
    for pixels in chunks:
        h.update(pixels.cpu().contiguous().numpy())
    return h.hexdigest()[:16]


def compute_soft_targets(
    teachers: Sequence[nn.Module], images: Tensor, params: Params, info: Any, device: torch.device
) -> dict:
    """Every teacher's float32 logits (V, N, K, C) on every view and the views' pixel hashes
    (`stored` rounds them to what is saved); for kd.targets "flip_mean" one "view", the images
    themselves, labelled with each teacher's mean logits over the image and its mirror.

    Each teacher's logits are kept, not their combination, so that how they are combined
    (kd.ensemble, `combine_teachers`) is a student-side choice: switching it reruns no teacher.
    """
    seed, augment, kind, batch_size = params.seed, params.train.augment, params.kd.targets, params.train.eval_batch_size
    mean, std = info.mean, info.std
    common = {"seed": seed, "augment": augment, "num_images": len(images), "kind": kind}
    label = partial(_teacher_pass, teachers, params.train.precision)
    if kind == "flip_mean":  # kd.views is not read: nothing depends on it
        logits = predict_logits(FlipAveraged(label), images, mean, std, batch_size, device)
        return {"teacher_logits": logits[None], "view_hashes": [_pixels_hash(images)], **common}
    logits, hashes = [], []
    for view in tqdm(range(params.kd.views), desc="soft targets", leave=False, disable=not sys.stderr.isatty()):
        table = view_parameters(images, seed, view, augment)
        hashes.append(view_hash(images, table, augment))
        logits.append(
            torch.cat(
                [
                    predict_logits(label, pixels, mean, std, batch_size, device)
                    for pixels in render_view(images, table, augment, batch_size, device)
                ]
            )
        )
    return {"teacher_logits": torch.stack(logits), "view_hashes": hashes, **common}


def _teacher_pass(teachers: Sequence[nn.Module], precision: str, x: Tensor) -> Tensor:
    """Every teacher's float32 logits (B, K, C), computed in the arithmetic the teachers trained in
    (train.precision): under bfloat16 autocast their convs run 1.7-2x as fast on a CPU with
    AVX512-BF16 (docs/recipe.md), and the logits differ from float32 ones by bfloat16 rounding only
    (on CIFAR-10 the mean ensemble's top-1 on the train split: 95.13 % in float32, 95.10 % under
    autocast; docs/cifar10.md). Returned as float32, so the flip mean is taken in float32.
    Evaluation stays float32."""
    with precision_autocast(x.device, precision):
        return teacher_logits(teachers, x).float()


def _pixels_hash(images: Tensor) -> str:
    """Hash of unaugmented images (the one "view" of kd.targets flip_mean), as `view_hash` computes it."""
    return _chunks_hash(images[start : start + RENDER_CHUNK] for start in range(0, len(images), RENDER_CHUNK))


def stored(targets: dict) -> dict:
    """The soft targets as saved: the teacher logits rounded to STORED_DTYPE."""
    return {**targets, "teacher_logits": targets["teacher_logits"].to(STORED_DTYPE)}


def combine_teachers(teacher_logits: Tensor, labels: Tensor, ensemble: str) -> tuple[Tensor, Tensor]:
    """The soft targets (V, N, C) of teacher logits (V, N, K, C) under kd.ensemble, and each teacher's
    mean weight (K,). "mean" averages the teachers' logits; "confidence" weights each teacher per
    sample by how well it fits that sample's label (losses.confidence_weights)."""
    v, n, k, c = teacher_logits.shape
    if ensemble == "mean":
        return teacher_logits.mean(dim=2), torch.full((k,), 1 / k)
    flat, flat_labels = teacher_logits.reshape(v * n, k, c), labels.repeat(v)
    return (confidence_ensemble(flat, flat_labels).view(v, n, c), confidence_weights(flat, flat_labels).mean(dim=0))


def storage_rounding(teacher_logits: Tensor, labels: Tensor, schemes: Sequence[str]) -> dict:
    """What storing float32 teacher logits (V, N, K, C) as STORED_DTYPE costs: the largest absolute
    rounding error of a logit, and per ensemble scheme the share of view images whose top-1 it changes."""
    saved = teacher_logits.to(STORED_DTYPE).float()
    top1 = {
        name: (
            combine_teachers(saved, labels, name)[0].argmax(-1)
            != combine_teachers(teacher_logits, labels, name)[0].argmax(-1)
        )
        .float()
        .mean()
        .item()
        for name in schemes
    }
    return {
        "stored_logit_max_error": round((saved - teacher_logits).abs().max().item(), 6),
        "stored_top1_changed": top1,
    }


def save_soft_targets(path: str | Path, targets: dict) -> None:
    save_checkpoint(path, stored(targets))


def load_soft_targets(path: str | Path, train: tuple[Tensor, Tensor], params: Params, num_classes: int) -> dict:
    """The stored teacher logits, checked against the training images and the params they must
    belong to (seed, train.augment, kd.targets), combined under kd.ensemble into float32 `logits`
    (V, N, C)."""
    images, labels = train
    seed, augment, kind = params.seed, params.train.augment, params.kd.targets
    targets = load_checkpoint(path)
    logits = targets.get("teacher_logits")
    if (
        not isinstance(logits, Tensor)
        or logits.dtype != STORED_DTYPE
        or logits.ndim != 4
        or targets.get("num_images") != len(images)
        or logits.shape[1] != len(images)
        or logits.shape[3] != num_classes
        or targets.get("seed") != seed
        or targets.get("augment") != augment
        or targets.get("kind", "views") != kind
    ):
        raise UserError(
            f"{path}: soft targets were computed for other training data, classes, seed, "
            "train.augment or kd.targets, or stored in another format; rerun the soft_targets stage"
        )
    targets["logits"], targets["teacher_weights"] = combine_teachers(logits.float(), labels, params.kd.ensemble)
    return targets


def view_batches(images: Tensor, labels: Tensor, targets: dict, setup: FitSetup) -> BatchSource:
    """`fit`'s batch source for distillation: epoch e trains on view e mod V with its teacher logits,
    each batch rendered from its rows of the view's table. Each view is checked against its hash
    the first time it is used."""
    logits, hashes, augment = targets["logits"], targets["view_hashes"], targets["augment"]
    checked: set[int] = set()
    if targets.get("kind") == "flip_mean":
        if _pixels_hash(images) != hashes[0]:
            raise UserError(
                "the training images differ from those the soft targets were computed on; rerun soft_targets"
            )

        def fresh(epoch: int, generator: torch.Generator) -> Iterator[Batch]:
            table = epoch_augmentation(generator, images, setup, epoch)
            yield from iterate_batches(images, labels, setup, generator, table, teacher_logits=logits[0])

        return fresh

    def batches(epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        view = epoch % len(hashes)
        params = view_parameters(images, targets["seed"], view, augment)
        if view not in checked and view_hash(images, params, augment) != hashes[view]:
            raise UserError(
                f"view {view} renders differently from when its soft targets were computed "
                "(augmentation code or library version changed); rerun the soft_targets stage"
            )
        checked.add(view)
        yield from iterate_batches(
            images, labels, setup, generator, partial(rows_of, params), teacher_logits=logits[view]
        )

    return batches


def student_objective(
    params: Params, train: tuple[Tensor, Tensor], setup: FitSetup, targets: dict | None
) -> tuple[LossFn, BatchSource | None]:
    """Loss and batch source of a student run: CE on fresh augmentations when there are no targets
    (`baseline`), CE + KD on the targets' views otherwise (`distill`); None means fit's own batches."""
    if targets is None:
        return ce_loss_fn(params.train.label_smoothing), None
    return (
        kd_loss_fn(params.kd.temperature, params.kd.alpha, params.train.label_smoothing),
        view_batches(*train, targets, setup),
    )
