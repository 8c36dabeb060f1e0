"""Deterministic synthetic rice grains: the offline demo dataset (`data/rice-demo`).

Each image is one grain on black, 250x250, like the Rice Image dataset. A variety is defined by
the length, width and colour measured on the real sample (shared/datasets/README.md); spreads are
widened and every grain gets a random zoom, so classes overlap a little and a small CNN does not
reach 100 %. Accuracy on this data says nothing about real rice; it exists so that the whole
pipeline runs offline in minutes.

Bytes are reproducible: every image has its own RNG seeded by (seed, variety, index), pixels are
computed in numpy only (no PIL filters), and PNGs are written with fixed encoder settings and no
metadata, so `data.dvc` pins the generator's output.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIDE = 250
DEFAULT_SEED = 0  # the bytes pinned by data.dvc: this seed and DEFAULT_PER_CLASS
DEFAULT_PER_CLASS = 120  # 600 images: the whole pipeline runs in minutes on 2 cores
SPREAD = 2.2  # widens the measured std of length/width: the classes must overlap a little
ZOOM_STD = 0.08  # per-image zoom jitter (camera distance), hides absolute size partly
COLOUR_SPREAD = 1.2  # widens the measured per-grain colour std
EXPOSURE_STD = 0.03  # per-image brightness gain jitter
WHITE_BALANCE_STD = 2.5  # per-image, per-channel colour offset jitter


@dataclass(frozen=True)
class Variety:
    name: str
    length: tuple[float, float]  # px, mean and std along the grain's long axis
    width: tuple[float, float]  # px, across
    rgb: tuple[float, float, float]  # mean grain colour
    rgb_std: float  # per-grain colour spread
    taper: float  # how much one end is thinner (pointed long grains)
    bend: float  # max curvature of the long axis
    chalk: float  # probability of a bright chalky core (Arborio's white centre)


# Morphology of the real sample (shared/datasets/README.md), 300 images per variety.
VARIETIES = (
    Variety("Arborio", (139, 7), (71, 5), (212, 212, 217), 10, 0.10, 0.04, 0.7),
    Variety("Basmati", (197, 13), (46, 3), (218, 219, 238), 6, 0.20, 0.08, 0.0),
    Variety("Ipsala", (197, 10), (91, 6), (237, 237, 233), 6, 0.05, 0.03, 0.1),
    Variety("Jasmine", (168, 27), (53, 8), (211, 223, 230), 13, 0.25, 0.10, 0.0),
    Variety("Karacadag", (114, 6), (71, 4), (204, 204, 224), 7, 0.05, 0.02, 0.1),
)


def render_grain(variety: Variety, rng: np.random.Generator) -> np.ndarray:
    """One (250, 250, 3) uint8 image of a grain of `variety`."""
    zoom = rng.normal(1.0, ZOOM_STD)
    half_len = max(rng.normal(variety.length[0], SPREAD * variety.length[1]), 40) * zoom / 2
    half_wid = max(rng.normal(variety.width[0], SPREAD * variety.width[1]), 20) * zoom / 2
    half_len = min(half_len, 112.0)  # keep the whole grain inside the frame
    angle = rng.uniform(0, np.pi)
    margin = max(IMAGE_SIDE / 2 - half_len - 6, 0)
    cx, cy = IMAGE_SIDE / 2 + rng.uniform(-margin, margin, size=2) * 0.5

    y, x = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE].astype(np.float64) + 0.5  # (250, 250) each
    u = ((x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)) / half_len  # along the grain
    v = (-(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)) / half_wid  # across
    v = v - rng.uniform(-1, 1) * variety.bend * half_len / half_wid * u**2  # a slight curve
    v = v / (1 + rng.uniform(-1, 1) * variety.taper * u)  # one end thinner than the other
    r = u**2 + v**2  # < 1 inside the grain
    alpha = np.clip((1 - r) / 0.12, 0, 1)  # soft edge, ~1-2 px
    shade = 0.78 + 0.22 * np.sqrt(np.clip(1 - r, 0, 1))  # domed grain: darker towards the rim
    if rng.random() < variety.chalk:
        shade = shade + 0.08 * np.exp(-((u * 2.5) ** 2 + (v * 2.0) ** 2))

    colour = np.array(variety.rgb) + rng.normal(0, COLOUR_SPREAD * variety.rgb_std)
    colour = colour * rng.normal(1.0, EXPOSURE_STD) + rng.normal(0, WHITE_BALANCE_STD, size=3)
    # Blur is linear and the colour uniform: blurring the grey map once equals blurring RGB.
    img = _blur(alpha * shade, rng.uniform(0.6, 1.4))[:, :, None] * colour  # (250, 250, 3)
    img = img + rng.normal(size=img.shape) * 0.25 * np.sqrt(img)  # shot noise, none on black
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (H, W), numpy only so the bytes do not depend on PIL filters."""
    radius = 3
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    height, width = img.shape
    padded = np.pad(img, radius)  # (H + 6, W + 6), zeros = black
    rows = sum(w * padded[k : k + height, :] for k, w in enumerate(taps))  # (H, W + 6)
    return sum(w * rows[:, k : k + width] for k, w in enumerate(taps))  # (H, W)


def _write_grain(out: Path, seed: int, v_idx: int, i: int) -> Path:
    variety = VARIETIES[v_idx]
    path = out / variety.name / f"{variety.name} ({i}).png"
    rng = np.random.default_rng([seed, v_idx, i])
    Image.fromarray(render_grain(variety, rng)).save(path, format="PNG", optimize=False, compress_level=6)
    return path


def generate(out: str | Path, seed: int = DEFAULT_SEED, per_class: int = DEFAULT_PER_CLASS,
             workers: int = 1) -> list[Path]:
    """Write `<out>/<Variety>/<Variety> (<i>).png` (file names with spaces, like the real set), in
    `workers` processes for large trees (the bytes do not depend on it)."""
    out = Path(out)
    for variety in VARIETIES:
        (out / variety.name).mkdir(parents=True, exist_ok=True)
    v_idx, index = zip(*[(v, i) for v in range(len(VARIETIES)) for i in range(1, per_class + 1)])
    write = partial(_write_grain, out, seed)
    if workers == 1:
        return list(map(write, v_idx, index))
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(write, v_idx, index, chunksize=64))
