"""Prepared images as an exported file sees them, without torch: the evaluation of ONNX files (stage
`evaluate`) reads the prepared split with numpy and feeds onnxruntime float32 batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from edgekd.data.images import normalize_array, resize_square


@dataclass(frozen=True)
class ArrayInputs:
    """uint8 images (N, 3, H, W), possibly memory-mapped, as a file of input side `size` sees them:
    resized by the rule of its metadata, as `predict` resizes (`resize_square`), when the sides
    differ, and normalised a slice at a time, so whole-split work holds one batch of floats. Slicing
    gives float32 (B, 3, size, size); iterating gives batches."""

    images: np.ndarray
    size: int
    mean: Sequence[float]
    std: Sequence[float]
    batch_size: int = 256

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, rows: slice) -> np.ndarray:
        x = np.asarray(self.images[rows])
        if x.shape[-1] != self.size:
            x = np.stack([resize_square(img.transpose(1, 2, 0), self.size).transpose(2, 0, 1) for img in x])
        return normalize_array(x, self.mean, self.std)

    def __iter__(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self), self.batch_size):
            yield self[start : start + self.batch_size]
