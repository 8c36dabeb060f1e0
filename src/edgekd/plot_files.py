"""The small CSV files the stages write for `dvc plots` (git-tracked, declared `cache: false`)."""

from __future__ import annotations

import csv
from pathlib import Path


def write_csv(path: str | Path, header: list[str], rows) -> None:
    """A diff-friendly CSV file: a header line, then the rows; its folder is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
