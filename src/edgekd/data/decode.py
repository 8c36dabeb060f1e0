"""Decode every image once: the resized pixels the cache keeps, and the per-image features the
duplicate search and the data report use (exact digest, dihedral pHashes, size, foreground).

Decoding runs in worker processes, one per core (pHash and resizing hold the GIL, threads would
not scale). Pixels go straight into a caller-supplied array, in `prepare` a memory-mapped file, so
the RAM needed is the features (~300 bytes an image) plus the images in flight, whatever the count.
"""

from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image
from tqdm import tqdm

from edgekd.data.images import UnreadableImage, load_rgb, resize_square

PHASH_SIZE = 16  # pHash side: 16x16 = 256 bits (see dihedral_phashes)
FOREGROUND_GREY = 60  # grain pixels: grey level above this (the rice background is black)


@dataclass
class Decoded:
    """Per readable image, in scan order."""

    paths: list[Path]
    classes: list[str]
    images: np.ndarray  # (N, S, S, 3) uint8, resized (the first N rows of the caller's array)
    exact: list[bytes]  # digest of the full-resolution decoded pixels
    phash: np.ndarray  # (N, 8, 4) uint64: 256-bit pHash of the 8 dihedral transforms
    sizes: np.ndarray  # (N, 2) int: original (width, height)
    area: np.ndarray  # (N,) foreground fraction
    brightness: np.ndarray  # (N,) mean grey of the foreground
    unreadable: list[tuple[Path, str]]


_DIHEDRAL = (None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM,
             Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270,
             Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE)


def dihedral_phashes(rgb: np.ndarray) -> np.ndarray:
    """(8, 4) uint64: 256-bit pHashes of the image under every flip / 90-degree rotation.

    256 bits, not imagehash's default 64: single grains on black are so alike that 64-bit hashes
    of distinct real grains often collide (~7,000 pairs at distance 0 in the 5,020-image sample),
    while at 256 bits distinct grains are >= 6 bits apart and true copies 0.
    imagehash.phash first shrinks to 64x64 grey; doing that once and transposing the small image
    costs 1/8 of hashing 8 full-size copies (the filter is symmetric, so the results match).
    """
    side = PHASH_SIZE * 4  # imagehash's highfreq_factor
    small = Image.fromarray(rgb).convert("L").resize((side, side), Image.Resampling.LANCZOS)
    bits = [imagehash.phash(small if t is None else small.transpose(t), hash_size=PHASH_SIZE).hash
            for t in _DIHEDRAL]
    packed = np.packbits(np.stack(bits).reshape(8, -1), axis=1)  # (8, 32) bytes, big-endian
    return packed.view(">u8").astype(np.uint64)  # (8, 4)


def _decode_one(path: Path, size: int, max_pixels: int) -> tuple | str:
    """(pixels, digest, pHashes, (width, height), foreground, brightness), or the reason it is unreadable."""
    try:
        rgb = load_rgb(path, max_pixels)  # (H, W, 3)
    except UnreadableImage as err:
        return str(err)
    grey = rgb.mean(axis=2)  # (H, W)
    fg = grey > FOREGROUND_GREY
    digest = hashlib.blake2b(np.asarray(rgb.shape).tobytes() + rgb.tobytes(), digest_size=16).digest()
    return (resize_square(rgb, size), digest, dihedral_phashes(rgb), (rgb.shape[1], rgb.shape[0]),
            float(fg.mean()), float(grey[fg].mean()) if fg.any() else 0.0)


DECODE_CHUNK = 64  # files per task sent to a worker process


def decode_workers() -> int:
    """One decoding process per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_all(files: list[tuple[Path, str]], size: int, max_pixels: int,
               pixels: np.ndarray | None = None) -> Decoded:
    """Decode every file once. The resized pixels of the k-th readable file are written to
    `pixels[k]` ((len(files), size, size, 3) uint8; allocated in RAM when None)."""
    if pixels is None:
        pixels = np.empty((len(files), size, size, 3), dtype=np.uint8)
    decode = partial(_decode_one, size=size, max_pixels=max_pixels)
    kept, bad = [], []  # kept: (path, class, digest, pHashes, size, foreground, brightness)
    with ProcessPoolExecutor(min(decode_workers(), max(1, len(files) // DECODE_CHUNK))) as pool:
        results = pool.map(decode, [f[0] for f in files], chunksize=DECODE_CHUNK)
        for (path, label), r in tqdm(zip(files, results), total=len(files), desc="decode",
                                     disable=not sys.stderr.isatty()):
            if isinstance(r, str):
                bad.append((path, r))
            else:
                pixels[len(kept)] = r[0]
                kept.append((path, label, *r[1:]))
    paths, classes, exact, phash, sizes, area, brightness = map(list, zip(*kept)) if kept else [[]] * 7
    return Decoded(
        paths=paths, classes=classes, images=pixels[:len(paths)], exact=exact,
        phash=np.stack(phash) if phash else np.zeros((0, 8, 4), np.uint64),
        sizes=np.array(sizes, dtype=np.int64).reshape(-1, 2),
        area=np.array(area), brightness=np.array(brightness), unreadable=bad,
    )
