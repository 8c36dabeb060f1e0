"""A torch stage's process set-up: seeds, deterministic kernels, the device and its CPU threads."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from edgekd.errors import UserError
from edgekd.parallel import claim_slot


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a CPU generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def precision_autocast(device: torch.device, precision: str) -> torch.autocast:
    """The arithmetic of train.precision on `device`: bfloat16 autocast (convs and matmuls in
    bfloat16, their weights kept in float32), or float32 as written."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


def configure_determinism() -> None:
    """Deterministic kernels where PyTorch has them.

    Bit-identical results hold on one CPU kind: float kernels differ between instruction sets
    (AVX2 vs AVX512-VNNI), and so do the training trajectories. On CUDA this is best effort:
    `warn_only` stays on because some backward kernels the models use (adaptive average pooling)
    have no deterministic CUDA version; cuBLAS gets the workspace setting its determinism needs.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def select_device(name: str, threads: int) -> torch.device:
    """`auto` picks CUDA when present; on CPU the thread count is set explicitly for repeatability, and
    kernels are deterministic where PyTorch has them (`configure_determinism`). With several
    experiments on the machine (edgekd.parallel), first waits for this run's slot: its cores, and its
    GPU."""
    configure_determinism()
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("params: train.device='cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    slot = claim_slot(torch.cuda.device_count() if name == "cuda" else 0)
    if name == "cpu":
        torch.set_num_threads(threads)
    if slot is not None and slot.gpu is not None:
        torch.cuda.set_device(slot.gpu)
        return torch.device("cuda", slot.gpu)
    return torch.device(name)
