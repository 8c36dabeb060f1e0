"""A team's DVC remote: what one member pushes, a fresh clone pulls, and `dvc repro` then runs nothing."""

import json
from pathlib import Path

from tiny_pipeline import commit_all, sh

# Outputs of the stages at both ends of the pipeline (cached by DVC, not by git).
CACHED = [
    "prepared/train_images.npy",
    "models/teachers/resnet18.pt",
    "models/soft_targets.pt",
    "models/student_int8.onnx",
    "models/student_mixed.onnx",
]


def test_push_then_pull_into_a_fresh_clone_reproduces_nothing(tiny_repo: Path, tmp_path: Path):
    remote = tmp_path / "team-remote"  # a directory remote, as on a shared disk
    sh("dvc", "remote", "add", "-d", "team", str(remote), cwd=tiny_repo)
    commit_all(tiny_repo, "team remote")
    pushed = sh("dvc", "push", cwd=tiny_repo).stdout
    assert "pushed" in pushed and sum(1 for f in remote.rglob("*") if f.is_file()) >= len(CACHED)

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(tiny_repo), str(clone), cwd=tmp_path)
    assert not any((clone / path).exists() for path in CACHED)  # git holds none of them
    sh("dvc", "pull", cwd=clone)
    for path in CACHED:
        assert (clone / path).read_bytes() == (tiny_repo / path).read_bytes(), path
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=clone).stdout
    repro = sh("dvc", "repro", cwd=clone).stdout
    assert "Running stage" not in repro and "Data and pipelines are up to date" in repro
    metrics = json.loads((clone / "metrics/evaluate/int8.json").read_text())
    assert metrics == json.loads((tiny_repo / "metrics/evaluate/int8.json").read_text())
