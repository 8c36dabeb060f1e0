"""Process-wide set-up shared by every stage: one-line errors, seed streams, metrics files and the
record of which params a stage read. Imports no torch (edgekd.train.device sets up torch stages)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from edgekd import config
from edgekd.errors import UserError

log = logging.getLogger("edgekd")

# Set to a folder, every stage writes there which params keys it read (tests/test_dvc_contract.py
# compares them with the stage's `params:` in dvc.yaml).
PARAMS_TRACE_ENV = "EDGEKD_PARAMS_TRACE"


def stream_seed(seed: int, name: str) -> int:
    """A seed of its own for `name` (e.g. 'teacher/resnet18'), derived from the training seed.

    Teachers seeded alike would see the same batch order and augmentations, which makes the
    ensemble less diverse; a hash keeps the streams apart and still fixed by `seed`.
    """
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:4], "little")


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a UserError becomes one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    _write_params_trace()


def _write_params_trace() -> None:
    folder = os.environ.get(PARAMS_TRACE_ENV)
    if not folder:
        return
    record = {"argv": sys.argv[1:], "params": sorted(config.read_keys())}
    name = hashlib.sha256(json.dumps(record["argv"]).encode()).hexdigest()[:16]
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{name}.json").write_text(json.dumps(record))


def write_metrics(path: str | Path, metrics: dict) -> None:
    """A small, diff-friendly JSON file (git-tracked DVC metrics)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
