"""The prepared-data format every training, export and evaluation stage reads, and the one way a
stage turns it into model input.

`prepared/{train,val,test}.csv` (path, class, group), `prepared/{split}_images.npy` (uint8
(N, 3, H, W) RGB), `prepared/{split}_labels.npy` (int64 (N,)), `prepared/info.json` (classes,
image_size, mean, std). Stages read it through `load_split` / `load_info` and feed models
`normalize(resize_batch(x))` (`ModelInputs`), a batch at a time.

The image arrays are memory-mapped, never read whole: a stage's RAM holds the batches it touches,
and the pages it has read are file cache the OS can drop, so a split larger than RAM still trains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from edgekd.errors import DataError

SPLITS = ("train", "val", "test")
CHUNK = 1024  # images per copy or pass over a split: bounds the RAM of whole-split work


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
    """(images uint8 (N, 3, H, W), memory-mapped; labels int64 (N,)) of one split. Copy-on-write
    mapping: the tensor is writable as torch expects, and the file is never changed. No pickle is
    ever loaded."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images_path, labels_path = (Path(prepared_dir) / f"{split}_{part}.npy" for part in ("images", "labels"))
    try:
        images = np.load(images_path, mmap_mode="c", allow_pickle=False)
        labels = np.load(labels_path, allow_pickle=False)
    except FileNotFoundError as err:
        raise DataError(f"{err.filename}: not found; run the prepare stage first") from None
    except (ValueError, OSError) as err:
        raise DataError(f"{images_path}: unreadable prepared split ({err})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3 or labels.shape != images.shape[:1]:
        raise DataError(f"{images_path}: expected uint8 (N, 3, H, W) images and N labels, got "
                        f"{images.dtype} {images.shape} and {labels.shape[0] if labels.ndim else 0} labels")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def write_prepared(out_dir: Path, images: np.ndarray, rel: list[str], labels: np.ndarray,
                   groups: np.ndarray, split: np.ndarray, classes: list[str], size: int) -> None:
    """Each split's manifest and arrays, by class then path; `images` (N, S, S, 3) in scan order is
    read a chunk at a time (it is the memory-mapped staging file in `prepare`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for s, name in enumerate(SPLITS):
        idx = np.flatnonzero(split == s)
        idx = idx[np.lexsort((np.array(rel)[idx], labels[idx]))]  # by class, then path
        pd.DataFrame({"path": [rel[i] for i in idx], "class": [classes[labels[i]] for i in idx],
                      "group": groups[idx]}).to_csv(out_dir / f"{name}.csv", index=False)
        chw = np.lib.format.open_memmap(out_dir / f"{name}_images.npy", "w+", np.uint8, (len(idx), 3, size, size))
        for start in range(0, len(idx), CHUNK):
            chw[start:start + CHUNK] = images[idx[start:start + CHUNK]].transpose(0, 3, 1, 2)
        chw.flush()
        del chw
        np.save(out_dir / f"{name}_labels.npy", labels[idx])
    mean, std = channel_stats(images, np.flatnonzero(split == 0))
    info = {"classes": classes, "image_size": size, "mean": mean, "std": std}
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")


def channel_stats(images: np.ndarray, rows: np.ndarray | None = None) -> tuple[list[float], list[float]]:
    """Exact per-channel mean/std in 0..1 units of (N, S, S, 3) uint8 (the `rows` given, else all),
    via 256-bin histograms accumulated a chunk at a time."""
    rows = np.arange(len(images)) if rows is None else rows
    hists = np.zeros((3, 256), dtype=np.int64)
    for start in range(0, len(rows), CHUNK):
        chunk = images[rows[start:start + CHUNK]]  # (B, S, S, 3)
        for c in range(3):
            hists[c] += np.bincount(chunk[..., c].ravel(), minlength=256)
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for hist in hists.astype(np.float64):
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


@dataclass(frozen=True)
class ModelInputs:
    """uint8 images (N, 3, H, W) as a model of input side `size` sees them, moved to `device`,
    resized and normalised there a slice at a time: whole-split work (calibration, sensitivity,
    export checks, evaluation, predictions) holds one batch of floats, never the split's. Slicing
    gives a float tensor; iterating gives batches."""

    images: Tensor
    size: int | None
    mean: Sequence[float]
    std: Sequence[float]
    batch_size: int = 256
    device: torch.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, rows: slice) -> Tensor:
        return normalize(resize_batch(self.images[rows].to(self.device), self.size), self.mean, self.std)

    def __iter__(self) -> Iterator[Tensor]:
        for start in range(0, len(self), self.batch_size):
            yield self[start:start + self.batch_size]
