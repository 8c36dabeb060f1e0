"""Process-wide set-up shared by every stage: seeds, determinism, the device, CPU threads,
one-line errors, and the record of which params a stage read."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgekd import config
from edgekd.errors import UserError
from edgekd.parallel import claim_slot

log = logging.getLogger("edgekd")

# Set to a folder, every stage writes there which params keys it read (tests/test_dvc_contract.py
# compares them with the stage's `params:` in dvc.yaml).
PARAMS_TRACE_ENV = "EDGEKD_PARAMS_TRACE"


def stream_seed(seed: int, name: str) -> int:
    """A seed of its own for `name` (e.g. 'teacher/resnet18'), derived from the training seed.

    Teachers seeded alike would see the same batch order and augmentations, which makes the
    ensemble less diverse; a hash keeps the streams apart and still fixed by `seed`.
    """
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:4], "little")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a CPU generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


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
    """`auto` picks CUDA when present; on CPU the thread count is set explicitly for repeatability.
    With several experiments on the machine (edgekd.parallel), first waits for this run's slot: its
    cores, and its GPU."""
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


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a UserError becomes one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    configure_determinism()
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    _write_params_trace()


def _write_params_trace() -> None:
    folder = os.environ.get(PARAMS_TRACE_ENV)
    if not folder:
        return
    record = {"argv": sys.argv[1:], "params": sorted(config.read_keys())}
    name = hashlib.sha256(json.dumps(record["argv"]).encode()).hexdigest()[:16]
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{name}.json").write_text(json.dumps(record))


def write_metrics(path: str | Path, metrics: dict) -> None:
    """A small, diff-friendly JSON file (git-tracked DVC metrics)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
