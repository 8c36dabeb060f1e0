"""What the prepare stage reports about the data: class and split counts, image sizes, pixel
statistics, duplicates, unreadable files and per-class outliers (metrics/data.json, plots/data/)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from edgekd.data.decode import Decoded
from edgekd.data.prepared import SPLITS, DatasetInfo
from edgekd.data.scan import Scan

OUTLIER_Z = 4.0  # robust z-score (median/MAD) beyond which an image is listed as an outlier
MAX_LISTED = 50  # cap on the file lists written to metrics/data.json


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 * MAD); 0 where the spread is 0."""
    med = np.median(values)
    mad = 1.4826 * np.median(np.abs(values - med))
    return np.zeros_like(values) if mad == 0 else (values - med) / mad


def find_outliers(dec: Decoded, rel: list[str]) -> list[dict]:
    """Images whose foreground area or brightness is far from their own class's distribution."""
    out = []
    classes = np.array(dec.classes)
    for name in sorted(set(dec.classes)):
        idx = np.flatnonzero(classes == name)
        for feature, values in (("foreground_area", dec.area), ("brightness", dec.brightness)):
            z = robust_z(values[idx])
            for k in np.flatnonzero(np.abs(z) > OUTLIER_Z):
                i = idx[k]
                out.append({"path": rel[i], "class": name, "feature": feature,
                            "value": round(float(values[i]), 4), "z": round(float(z[k]), 1)})
    return sorted(out, key=lambda o: -abs(o["z"]))


@dataclass
class DataReport:
    metrics: dict
    class_counts: pd.DataFrame  # class, images, train, val, test
    image_sizes: pd.DataFrame  # size, images


def data_report(scan: Scan, dec: Decoded, rel: list[str], labels: np.ndarray, split: np.ndarray,
            dup_stats: dict, groups: np.ndarray, info: DatasetInfo) -> DataReport:
    counts = pd.DataFrame({"class": scan.classes})
    for s, name in enumerate(SPLITS):
        counts[name] = np.bincount(labels[split == s], minlength=len(scan.classes))
    counts.insert(1, "images", counts[list(SPLITS)].sum(axis=1))
    size_names = [f"{w}x{h}" for w, h in dec.sizes]
    sizes = (pd.Series(size_names, dtype=str).value_counts().rename_axis("size")
             .reset_index(name="images").sort_values(["images", "size"], ascending=[False, True]))
    outliers = find_outliers(dec, rel)
    dup_groups = [[rel[i] for i in np.flatnonzero(groups == g)]
                  for g in np.flatnonzero(np.bincount(groups) > 1)] if len(groups) else []
    w, h = dec.sizes[:, 0], dec.sizes[:, 1]
    metrics = {
        "images": {"total": int(len(labels)), **{n: int((split == s).sum()) for s, n in enumerate(SPLITS)}},
        "classes": {r["class"]: {k: int(r[k]) for k in ("images", *SPLITS)} for _, r in counts.iterrows()},
        "duplicates": {**dup_stats, "groups": dup_groups[:MAX_LISTED]},
        "unreadable": {"count": len(dec.unreadable),
                       "files": [_unreadable_entry(scan, p, r) for p, r in dec.unreadable[:MAX_LISTED]]},
        "ignored_files": scan.ignored,
        "image_size": {"width": _summary(w), "height": _summary(h)},
        "pixels": {"mean": dict(zip("rgb", info.mean)), "std": dict(zip("rgb", info.std))},
        "outliers": {"count": len(outliers), "by_class": _count_by_class(outliers),
                     "files": outliers[:MAX_LISTED]},
    }
    return DataReport(metrics, counts, sizes)


def _count_by_class(outliers: list[dict]) -> dict:
    """{class: {feature: n}}: the file list is capped, these counts are not."""
    counts: dict = {}
    for o in outliers:
        per_class = counts.setdefault(o["class"], {})
        per_class[o["feature"]] = per_class.get(o["feature"], 0) + 1
    return dict(sorted(counts.items()))


def _summary(values: np.ndarray) -> dict:
    return {"min": int(values.min()), "max": int(values.max()), "mean": round(float(values.mean()), 2)}


def _unreadable_entry(scan: Scan, path: Path, reason: str) -> dict:
    """Paths relative to data.root keep metrics identical across machines."""
    return {"path": path.relative_to(scan.root).as_posix(),
            "reason": reason.removeprefix(f"{path}: ")}
