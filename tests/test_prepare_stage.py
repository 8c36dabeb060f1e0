"""`python -m stages.prepare` end to end on a small real tree, as dvc.yaml runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from edgekd.data.batches import load_split
from edgekd.data.prepared import load_info

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, root: Path, **data) -> subprocess.CompletedProcess:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update({"root": str(root), "image_size": 32, **data})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [
        sys.executable,
        "-m",
        "stages.prepare",
        "--root",
        str(root),
        "--out",
        str(tmp_path / "prepared"),
        "--metrics",
        str(tmp_path / "metrics/data.json"),
        "--plots",
        str(tmp_path / "plots/data"),
        "--params",
        str(tmp_path / "params.yaml"),
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_stage_writes_every_declared_output(small_rice_tree, tmp_path):
    proc = _run(tmp_path, small_rice_tree)
    assert proc.returncode == 0, proc.stderr
    info = load_info(tmp_path / "prepared")
    assert info.image_size == 32 and len(info.classes) == 5
    sizes = [len(load_split(tmp_path / "prepared", s)[1]) for s in ("train", "val", "test")]
    assert sizes == [65, 15, 20]
    metrics = json.loads((tmp_path / "metrics/data.json").read_text())
    assert metrics["images"] == {"total": 100, "train": 65, "val": 15, "test": 20}
    assert metrics["unreadable"]["count"] == 0 and metrics["duplicates"]["exact_groups"] == 0
    counts = pd.read_csv(tmp_path / "plots/data/class_counts.csv")
    assert counts.columns.tolist() == ["class", "images", "train", "val", "test"]  # dvc.yaml x/y
    assert counts["images"].tolist() == [20] * 5
    assert pd.read_csv(tmp_path / "plots/data/image_sizes.csv").to_dict("records") == [
        {"size": "250x250", "images": 100}
    ]
    assert "prepare: 100 images (train 65, val 15, test 20)" in proc.stderr


def test_stage_fails_in_one_line_on_a_missing_root(tmp_path):
    proc = _run(tmp_path, tmp_path / "no such dir")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: data root {tmp_path / 'no such dir'} does not exist or is not a folder (data.root)"
    )
    assert not (tmp_path / "prepared").exists()


def test_stage_rejects_bad_data_params(small_rice_tree, tmp_path):
    proc = _run(tmp_path, small_rice_tree, image_size=16)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: params: data.image_size=16 is invalid; allowed: an integer >= 32")
