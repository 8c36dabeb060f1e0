"""Resuming a killed training stage: an epoch checkpoint beside its dvclive folder, tied to the run's
params and data by a fingerprint, read by every process and deleted by rank 0 alone."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from edgekd.train.checkpoints import load_checkpoint, save_checkpoint
from edgekd.train.distributed import wait_for_all_ranks
from edgekd.train.fit_setup import FitSetup

log = logging.getLogger("edgekd")


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
class Progress:
    """Everything besides model/optimizer/scheduler that a resumed run must restore."""

    next_epoch: int = 0
    best_val_acc: float = -1.0
    best_epoch: int = -1
    best_state: dict[str, Tensor] | None = None
    averaged_state: dict[str, Tensor] | None = None  # the weight average (train.ema_decay), if any
    lookahead_state: dict[str, Any] | None = None  # engine.Lookahead's (train.lookahead), if any
    history: list[dict[str, float]] = field(default_factory=list)


def save_resume(
    setup: FitSetup,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    progress: Progress,
    averaged: nn.Module | None = None,
    lookahead: Any | None = None,
) -> None:
    """`averaged` (train.ema_decay) and `lookahead` (train.lookahead, engine.Lookahead): the weight
    averages, saved through their own `state_dict`."""
    if averaged is not None:
        progress.averaged_state = averaged.state_dict()
    if lookahead is not None:
        progress.lookahead_state = lookahead.state_dict()
    save_checkpoint(
        setup.resume_path,
        {
            "fingerprint": setup.fingerprint,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "torch_rng": torch.get_rng_state(),  # dropout draws from the global generator
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "progress": vars(progress),
        },
    )


def restore(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    setup: FitSetup,
    averaged: nn.Module | None = None,
    lookahead: Any | None = None,
) -> Progress:
    """Load the resume file if it belongs to this exact run; rank 0 deletes it if it is stale.

    Every process reads the file and decides before rank 0 may delete it (a barrier); otherwise a
    process that had just found the file could fail to read it. Only rank 0 writes and deletes it.
    """
    path = None if setup.resume_path is None else Path(setup.resume_path)
    state = load_checkpoint(path) if path is not None and path.is_file() else None
    wait_for_all_ranks(setup.ranks)
    if state is None:
        return Progress()
    if state.get("fingerprint") != setup.fingerprint:
        log.info("ignoring %s: written for other params or data", path)
        if setup.ranks.main:
            path.unlink()
        return Progress()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    progress = Progress(**state["progress"])
    if averaged is not None and progress.averaged_state is not None:
        averaged.load_state_dict(progress.averaged_state)
    if lookahead is not None and progress.lookahead_state is not None:
        lookahead.load_state_dict(progress.lookahead_state)
    log.info("resuming from %s after epoch %d", path, progress.next_epoch)
    return progress


def resume_file(live_dir: str | Path) -> Path:
    """`<live dir>.resume.pt`, beside the dvclive folder and outside every declared output: DVC deletes
    a stage's outputs before running it (none are `persist`, so the run-cache works), and a resume
    file inside one would be gone exactly when it is needed."""
    live_dir = Path(live_dir)
    return live_dir.with_name(live_dir.name + ".resume.pt")
