"""Prepared data as torch model input: the one way a training, calibration or export stage turns
uint8 images into what a model sees, `normalize(resize_batch(x))`, a batch at a time (`ModelInputs`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from edgekd.data.prepared import read_split


def load_split(prepared_dir: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """`read_split` as tensors: images uint8 (N, 3, H, W), memory-mapped; labels int64 (N,)."""
    images, labels = read_split(prepared_dir, split)
    return torch.from_numpy(images), torch.from_numpy(labels)


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
