"""A failed experiment loses nothing: bad params fail before training, and `git checkout .` (params,
git-tracked metrics, plots and curves) plus `dvc checkout` (models, prepared data from the DVC cache)
bring back every previous output byte for byte."""

import hashlib
from pathlib import Path

from tiny_pipeline import sh

OUTPUT_DIRS = ("models", "prepared", "metrics", "plots", "dvclive")


def output_hashes(repo: Path) -> dict[str, str]:
    return {
        str(p.relative_to(repo)): hashlib.md5(p.read_bytes()).hexdigest()
        for d in OUTPUT_DIRS
        for p in sorted((repo / d).rglob("*"))
        if p.is_file()
    }


def test_bad_param_fails_first_stage_in_one_line_and_checkout_restores_everything(tiny_repo: Path):
    before = output_hashes(tiny_repo)
    assert any(k.startswith("models/teachers/") for k in before)

    proc = sh("dvc", "exp", "run", "-S", "student.width=-1", cwd=tiny_repo, check=False)

    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("error: params:")]
    assert errors == ["error: params: student.width=-1.0 is invalid; allowed: 0 < width <= 4"]
    assert "epoch" not in output.lower()  # failed before any training step
    after = output_hashes(tiny_repo)
    untouched = [k for k in before if k.startswith(("models/teachers/", "prepared/"))]
    assert untouched and all(after.get(k) == before[k] for k in untouched)

    sh("git", "checkout", ".", cwd=tiny_repo)
    sh("dvc", "checkout", cwd=tiny_repo)

    assert output_hashes(tiny_repo) == before
    status = sh("dvc", "status", cwd=tiny_repo).stdout
    assert "up to date" in status
