"""Checkpoint files: written atomically, read only as plain tensors and containers.

A `.pt` file is a pickle; unpickling an untrusted one can run arbitrary code. Every load therefore
uses `torch.load(weights_only=True)`, which only rebuilds tensors and plain Python containers, and
a file that needs anything else is refused. Writes go to a temporary name in the same folder and
are renamed into place, so a killed run never leaves a half-written model where the next stage
(or a resumed run) would read it.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekd.errors import UserError
from edgekd.train.models import model_from_spec


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """torch.save to `<path>.tmp*`, fsync, then os.replace: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict with weights_only=True; anything else is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found (run the stage that writes it first)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own text goes on to suggest weights_only=False: name only the offending global.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        culprit = f" ({found.group(1)})" if found else ""
        raise UserError(
            f"{path}: refused to load: it contains objects other than tensors and plain containers"
            f"{culprit}; it may be malicious or from another tool"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict):
        raise UserError(f"{path}: expected a checkpoint dict, got {type(payload).__name__}")
    return payload


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from its checkpoint: the arch kwargs stored inside make it self-describing."""
    payload = load_checkpoint(path)
    try:
        spec = payload["model"]
        model = model_from_spec(spec)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise UserError(f"{path}: not a model checkpoint of this project ({type(err).__name__}: {err})") from None
    return model, payload


def load_teachers(folder: str | Path, archs: Sequence[str], info: Any) -> tuple[list[nn.Module], list[dict]]:
    """Teachers `<folder>/<arch>.pt` and their checkpoints, checked against the prepared data
    (`info`: classes, image_size) they will be fed."""
    models, payloads = [], []
    for arch in archs:
        path = Path(folder) / f"{arch}.pt"
        model, payload = load_model(path)
        if payload["classes"] != list(info.classes) or payload["image_size"] != info.image_size:
            raise UserError(
                f"{path}: trained on other classes or image size than the prepared data; rerun train_teacher@{arch}"
            )
        models.append(model)
        payloads.append(payload)
    return models, payloads


def model_payload(model: nn.Module, spec: dict, info: Any, **extra: Any) -> dict[str, Any]:
    """The checkpoint contract: state dict + model kwargs (`spec`: arch, width, stem; the classes
    come from `info`) + the preprocessing the model expects."""
    return {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model": {
            "arch": spec["arch"],
            "num_classes": len(info.classes),
            "width": float(spec["width"]),
            "stem": spec["stem"],
        },
        "classes": list(info.classes),
        "image_size": int(info.image_size),
        "mean": [float(m) for m in info.mean],
        "std": [float(s) for s in info.std],
        **extra,
    }
