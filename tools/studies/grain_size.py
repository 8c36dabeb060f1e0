"""How big and how elongated the grains of each variety are: why augmentation must keep scale.

A pixel belongs to the grain when its grey level exceeds --threshold (the background is black).
Area: grain pixels as a fraction of the frame. Elongation: sqrt of the ratio of the two principal
variances of the grain's pixel coordinates (length / width). Reads the original images (every one,
at their own resolution); the split does not matter here, nothing is trained.
Usage: python -m tools.studies.grain_size --root ../shared/datasets/rice-image [--out reports/grain_size.json]
       (also writes the .md)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from edgekd.config import load_params
from edgekd.data.images import load_rgb
from edgekd.data.scan import scan_tree
from tools import formatting as fmt


def grain_shape(rgb: np.ndarray, threshold: int) -> tuple[float, float]:
    """(area fraction, elongation) of the bright object in an RGB uint8 (H, W, 3) image."""
    mask = rgb.mean(axis=2) > threshold
    ys, xs = np.nonzero(mask)
    if len(xs) < 3:
        return float(mask.mean()), float("nan")
    small, large = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(float)))
    return float(mask.mean()), float(np.sqrt(large / small)) if small > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="ImageFolder tree (data.root)")
    parser.add_argument("--threshold", type=int, default=60, help="grey level above which a pixel is grain")
    parser.add_argument("--out", type=Path, default=Path("reports/grain_size.json"))
    args = parser.parse_args()
    scan = scan_tree(args.root)
    max_pixels = load_params().data.max_image_pixels  # run from the repository root
    rows = [(label, *grain_shape(load_rgb(path, max_pixels), args.threshold)) for path, label in scan.files]
    frame = pd.DataFrame(rows, columns=["variety", "area", "elongation"])
    table = frame.groupby("variety").agg(
        images=("area", "size"),
        area_mean=("area", "mean"),
        area_std=("area", "std"),
        elongation_mean=("elongation", "mean"),
        elongation_std=("elongation", "std"),
    )
    table["area_spread"] = table.area_std / table.area_mean
    command = f"python -m tools.studies.grain_size --root {args.root} --threshold {args.threshold} --out {args.out}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"command": command, "varieties": table.round(4).reset_index().to_dict(orient="records")}, indent=1)
        + "\n"
    )
    lines = [
        "# Grain size and shape per variety",
        "",
        f"Made by `{command}`. Grain = pixels whose mean RGB level exceeds {args.threshold} (black background).",
        "",
        "| variety | images | grain area % of frame | spread (std / mean) | elongation (length / width) |",
        "|---|---:|---:|---:|---:|",
    ]
    for variety, r in table.iterrows():
        lines.append(
            f"| {variety} | {int(r.images)} | {100 * r.area_mean:.2f} +- {100 * r.area_std:.2f} | "
            f"{fmt.percent(r.area_spread, 1)} | {r.elongation_mean:.2f} +- {r.elongation_std:.2f} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
