"""Training speed from the memory-mapped splits against the same splits read into RAM.

`load_split` maps the prepared arrays instead of reading them; each batch then gathers its images
from the page cache. This measures what that costs a training step: the same models, threads,
batches and augmentation draws, from the mapped array and from an in-RAM copy of it, alternated
over several rounds so that drift on the machine hits both alike.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch

from edgekd.config import Params
from edgekd.data.batches import load_split
from edgekd.data.prepared import load_info
from edgekd.train.batching import epoch_augmentation, iterate_batches
from edgekd.train.device import seed_everything, select_device
from edgekd.train.engine import train_one_epoch
from edgekd.train.fit_setup import FitSetup
from edgekd.train.losses import ce_loss_fn
from edgekd.train.models import build_model

ROUNDS = 3


def train_images_per_s(
    arch: str, width: float, images: torch.Tensor, labels: torch.Tensor, info, params: Params, steps: int
) -> float:
    """Images/s of `steps` training steps of a fresh `arch` (batch, augmentation and threads from params)."""
    seed_everything(params.seed)
    model = build_model(arch, len(info.classes), width)
    setup = FitSetup(
        epochs=1,
        batch_size=params.train.batch_size,
        eval_batch_size=params.train.eval_batch_size,
        seed=params.seed,
        mean=info.mean,
        std=info.std,
        augment=params.train.augment,
        max_steps=steps,
    )
    generator = torch.Generator().manual_seed(params.seed)
    batches = iterate_batches(images, labels, setup, generator, epoch_augmentation(generator, images, setup, 0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return train_one_epoch(
        model, ce_loss_fn(params.train.label_smoothing), optimizer, None, batches, setup.device, steps
    )["images_per_s"]


def memory_mapped_vs_in_ram(prepared: Path, params: Params, models: dict[str, tuple[str, float, int]]) -> dict:
    """Per model name (arch, width, steps): median images/s over ROUNDS from the mapped train split
    and from an in-RAM copy, and their ratio."""
    select_device("cpu", params.train.threads)
    info = load_info(prepared)
    mapped, labels = load_split(prepared, "train")
    in_ram = torch.from_numpy(np.array(mapped.numpy()))  # the whole split read into private memory
    results = {}
    for name, (arch, width, steps) in models.items():
        train_images_per_s(arch, width, mapped[:256], labels[:256], info, params, 1)  # warm-up
        speeds: dict[str, list[float]] = {"memory_mapped": [], "in_ram": []}
        for _ in range(ROUNDS):
            for source, images in (("memory_mapped", mapped), ("in_ram", in_ram)):
                speeds[source].append(train_images_per_s(arch, width, images, labels, info, params, steps))
        medians = {source: round(statistics.median(values), 1) for source, values in speeds.items()}
        results[name] = {
            **medians,
            "ratio": round(medians["memory_mapped"] / medians["in_ram"], 3),
            "steps": steps,
            "rounds": ROUNDS,
        }
    return results
