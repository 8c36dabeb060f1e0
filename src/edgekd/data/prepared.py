"""The prepared-data format every training, export and evaluation stage reads, and the one way a
stage turns it into model input.

`prepared/{train,val,test}.csv` (path, class, group), `prepared/{split}.npz` (`images` uint8
(N, 3, H, W) RGB, `labels` int64 (N,)), `prepared/info.json` (classes, image_size, mean, std).
Stages read it through `load_split` / `load_info` and feed models `normalize(resize_batch(x))`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from edgekd.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetInfo:
    classes: list[str]
    image_size: int
    mean: list[float]  # per RGB channel, 0..1 units, train split
    std: list[float]


def load_info(prepared_dir: str | Path) -> DatasetInfo:
    path = Path(prepared_dir) / "info.json"
    try:
        raw = json.loads(path.read_text())
        return DatasetInfo(list(raw["classes"]), int(raw["image_size"]),
                           [float(v) for v in raw["mean"]], [float(v) for v in raw["std"]])
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run the prepare stage first") from None
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: malformed prepared-data info ({err})") from None


def load_split(prepared_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, H, W), labels int64 (N,)) of one split; no pickle is ever loaded."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(prepared_dir) / f"{split}.npz"
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run the prepare stage first") from None
    except (KeyError, ValueError, OSError) as err:
        raise DataError(f"{path}: unreadable prepared split ({err})") from None
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def write_prepared(out_dir: Path, images: np.ndarray, rel: list[str], labels: np.ndarray,
                   groups: np.ndarray, split: np.ndarray, classes: list[str], size: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for s, name in enumerate(SPLITS):
        idx = np.flatnonzero(split == s)
        idx = idx[np.lexsort((np.array(rel)[idx], labels[idx]))]  # by class, then path
        pd.DataFrame({"path": [rel[i] for i in idx], "class": [classes[labels[i]] for i in idx],
                      "group": groups[idx]}).to_csv(out_dir / f"{name}.csv", index=False)
        chw = np.ascontiguousarray(images[idx].transpose(0, 3, 1, 2))  # (N, 3, S, S)
        np.savez(out_dir / f"{name}.npz", images=chw, labels=labels[idx])
    mean, std = channel_stats(images[split == 0])
    info = {"classes": classes, "image_size": size, "mean": mean, "std": std}
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean/std in 0..1 units of (N, S, S, 3) uint8, via 256-bin histograms."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(3):
        hist = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
        m = float((hist * levels).sum() / hist.sum())
        var = float((hist * (levels - m) ** 2).sum() / hist.sum())
        mean.append(round(m, 6))
        std.append(round(max(var, 1e-12) ** 0.5, 6))
    return mean, std


def resize_batch(images: Tensor, size: int | None) -> Tensor:
    """uint8 (B, 3, H, W) -> (B, 3, size, size), antialiased bilinear; as is when size is None or H."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    return TF.resize(images, [size, size], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (B, 3, H, W) -> float32 (x / 255 - mean) / std, the only input the models ever see."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


def model_batches(images: Tensor, size: int, mean: Sequence[float], std: Sequence[float],
                  batch_size: int) -> list[Tensor]:
    """uint8 images (N, 3, H, W) as a model of input side `size` sees them, in batches (no augmentation)."""
    images = resize_batch(images, size)
    return [normalize(images[i:i + batch_size], mean, std) for i in range(0, len(images), batch_size)]
