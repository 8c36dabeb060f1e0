"""Process-wide set-up shared by every stage: one seed, the device, CPU threads, one-line errors."""

from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import UserError

log = logging.getLogger("edgekd")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch from the one params.yaml seed; returns a CPU generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


def select_device(name: str, threads: int) -> torch.device:
    """`auto` picks CUDA when present; on CPU the thread count is set explicitly for repeatability."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("params: train.device='cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        torch.set_num_threads(threads)
    return torch.device(name)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a UserError becomes one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def write_metrics(path: str | Path, metrics: dict) -> None:
    """A small, diff-friendly JSON file (git-tracked DVC metrics)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
