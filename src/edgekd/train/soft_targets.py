"""Teacher-ensemble logits computed once for a fixed set of augmented views of the training set.

Running three teachers on every distillation batch made KD ~5x slower than the student's own
training (densenet121 alone is most of it). A teacher's output depends only on its input image, so
the ensemble is run once over `kd.views` augmented copies of the training set and distillation
epoch e trains on view e mod V with those stored targets (the idea of FKD, Shen & Xing 2022,
arXiv:2112.01528). The student then trains at its own speed for many more epochs, and a
`student.*`, `kd.temperature` or `kd.ensemble` experiment never runs a teacher: each teacher's
logits are stored, and the student stages combine them (`combine_teachers`).

Views are re-rendered from their seeds instead of stored (V x 40 MB of pixels at 64 px would fill
the DVC cache); a hash of every view, taken when its targets were computed, makes a re-render that
differs by one pixel fail loudly instead of training on mismatched targets.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from edgekd.config import Params
from edgekd.errors import UserError
from edgekd.train.augment import augment_batch
from edgekd.train.checkpoints import load_checkpoint, save_checkpoint
from edgekd.train.engine import Batch, BatchSource, FitSetup, LossFn, iterate_batches, predict_logits
from edgekd.train.losses import ce_loss_fn, confidence_ensemble, confidence_weights, kd_loss_fn, teacher_logits

RENDER_CHUNK = 256  # images augmented per generator call; part of a view's definition


def render_view(images: Tensor, seed: int, view: int, augment: str) -> Tensor:
    """Augmented copy number `view` of uint8 images (N, 3, H, W); the same pixels on every call."""
    generator = torch.Generator().manual_seed(seed * 7_919 + view)  # apart from fit's epoch seeds
    return torch.cat([augment_batch(images[start:start + RENDER_CHUNK], generator, augment)
                      for start in range(0, len(images), RENDER_CHUNK)])


def pixel_hash(images: Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:16]


def compute_soft_targets(teachers: Sequence[nn.Module], images: Tensor, labels: Tensor, views: int,
                         seed: int, augment: str, mean: Sequence[float], std: Sequence[float],
                         batch_size: int, device: torch.device) -> dict:
    """Every teacher's logits (V, N, K, C) on every view and the views' pixel hashes.

    Each teacher's logits are kept, not their combination, so that how they are combined
    (kd.ensemble, `combine_teachers`) is a student-side choice: switching it reruns no teacher.
    """
    logits, hashes = [], []
    for view in tqdm(range(views), desc="soft targets", leave=False, disable=not sys.stderr.isatty()):
        pixels = render_view(images, seed, view, augment)
        hashes.append(pixel_hash(pixels))
        logits.append(predict_logits(lambda x: teacher_logits(teachers, x), pixels, mean, std, batch_size, device))
    return {"teacher_logits": torch.stack(logits), "view_hashes": hashes, "seed": seed, "augment": augment,
            "num_images": len(images)}


def combine_teachers(teacher_logits: Tensor, labels: Tensor, ensemble: str) -> tuple[Tensor, Tensor]:
    """The soft targets (V, N, C) of teacher logits (V, N, K, C) under kd.ensemble, and each teacher's
    mean weight (K,). "mean" averages the teachers' logits; "confidence" weights each teacher per
    sample by how well it fits that sample's label (losses.confidence_weights)."""
    v, n, k, c = teacher_logits.shape
    if ensemble == "mean":
        return teacher_logits.mean(dim=2), torch.full((k,), 1 / k)
    flat, flat_labels = teacher_logits.reshape(v * n, k, c), labels.repeat(v)
    return (confidence_ensemble(flat, flat_labels).view(v, n, c),
            confidence_weights(flat, flat_labels).mean(dim=0))


def save_soft_targets(path: str | Path, targets: dict) -> None:
    save_checkpoint(path, targets)


def load_soft_targets(path: str | Path, train: tuple[Tensor, Tensor], seed: int, augment: str,
                      num_classes: int, ensemble: str) -> dict:
    """The stored teacher logits, checked against the training images, seed and augmentation they
    must belong to, combined under `ensemble` into `logits` (V, N, C)."""
    images, labels = train
    targets = load_checkpoint(path)
    logits = targets.get("teacher_logits")
    if (not isinstance(logits, Tensor) or logits.ndim != 4 or targets.get("num_images") != len(images)
            or logits.shape[1] != len(images) or logits.shape[3] != num_classes or targets.get("seed") != seed
            or targets.get("augment") != augment):
        raise UserError(f"{path}: soft targets were computed for other training data, classes, seed or "
                        "train.augment; "
                        "rerun the soft_targets stage")
    targets["logits"], targets["teacher_weights"] = combine_teachers(logits, labels, ensemble)
    return targets


def view_batches(images: Tensor, labels: Tensor, targets: dict,
                 setup: FitSetup) -> BatchSource:
    """`fit`'s batch source for distillation: epoch e trains on view e mod V with its teacher logits."""
    logits, hashes = targets["logits"], targets["view_hashes"]

    def batches(epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        view = epoch % len(hashes)
        pixels = render_view(images, targets["seed"], view, targets["augment"])
        if pixel_hash(pixels) != hashes[view]:
            raise UserError(f"view {view} renders differently from when its soft targets were computed "
                            "(augmentation code or library version changed); rerun the soft_targets stage")
        yield from iterate_batches(pixels, labels, setup, generator, augment=False, teacher_logits=logits[view])

    return batches


def student_objective(params: Params, train: tuple[Tensor, Tensor], setup: FitSetup,
                      targets: dict | None) -> tuple[LossFn, BatchSource | None]:
    """Loss and batch source of a student run: CE on fresh augmentations when there are no targets
    (`baseline`), CE + KD on the targets' views otherwise (`distill`); None means fit's own batches."""
    if targets is None:
        return ce_loss_fn(params.train.label_smoothing), None
    return (kd_loss_fn(params.kd.temperature, params.kd.alpha, params.train.label_smoothing),
            view_batches(*train, targets, setup))
