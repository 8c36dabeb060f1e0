"""Where the tests find the read-only shared data: one folder, one environment variable.

`EDGEKD_SHARED` names a folder holding `datasets/rice-image/` (the 5,020-image rice sample),
`datasets/cifar10/` (the CIFAR-10 training images) and
`reference/seed-models/` (the seed framework's ONNX models); by default `../shared` beside the
checkout, as on the team's machines and in CI. A missing folder fails the test in one line that
says what to set, never a silent skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_ENV = "EDGEKD_SHARED"
SHARED = Path(os.environ.get(SHARED_ENV, REPO.parent / "shared"))
RICE_SAMPLE = SHARED / "datasets/rice-image"
CIFAR10 = SHARED / "datasets/cifar10"  # the 50,000 CIFAR-10 training images, <class>/NNNN.jpg
SEED_MODELS = SHARED / "reference/seed-models/rice-image"


def require(path: Path, expected: str) -> Path:
    """`path` if it exists, else a one-line test failure naming the folder and the variable."""
    if not path.exists():
        pytest.fail(f"{path} missing: set {SHARED_ENV} to a folder with {expected} (default ../shared)", pytrace=False)
    return path
