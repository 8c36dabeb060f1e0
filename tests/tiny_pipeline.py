"""A throwaway git + DVC copy of this project with tiny params, for end-to-end pipeline tests.

Building one runs the whole `dvc repro -P` once (the deployed model and the studies; a few minutes
on 2 cores); tests then work on cheap copies of it (`cp -a` keeps .git and the DVC cache), so each
can change params, rerun, fail or check out without touching the others or this checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

from edgekd.config import Params, params_from_dict
from edgekd.runtime import PARAMS_TRACE_ENV

REPO = Path(__file__).resolve().parents[1]

TINY_OVERRIDES = {
    "data": {"image_size": 32},
    "train": {"batch_size": 16, "threads": 1},  # tiny models: a second thread only adds overhead
    "teachers": {"epochs": 1},
    "student": {"epochs": 1},
    "kd": {"views": 2},
    "qat": {"epochs": 1, "freeze_bn_epoch": 1, "freeze_observer_epoch": 1},
    # 1-epoch models: logits span ~200 fine steps of their output grid, and the same rounding noise
    # that is 4-6 steps for a trained student reaches 15-34 here (measured; 34: the stock
    # mobilenet_v3_small student); agreement 1.0 on val.
    "export": {"quantized": {"max_logit_steps": 48, "min_agreement": 0.8}},
    "bench": {"warmup": 2, "runs": 10, "batch": 4},
}


# Commits made by the tests (and by `dvc exp run`) need an identity, whatever the machine's git config.
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


# Beside the template repo: what its `dvc repro` printed, and which params each stage read.
REPRO_LOG, PARAMS_TRACE = "repro.log", "params-trace"


def sh(*cmd: str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command, capturing text output; a failure shows its output in the assertion."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **GIT_ENV, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def deep_update(base: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if isinstance(value, dict):
            deep_update(base.setdefault(key, {}), value)
        else:
            base[key] = value
    return base


def set_params(repo: Path, overrides: dict) -> None:
    """Merge nested `overrides` into the repo's params.yaml."""
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump(deep_update(yaml.safe_load(path.read_text()), overrides), sort_keys=False))


def repo_params(overrides: dict | None = None) -> Params:
    """This checkout's params.yaml with nested `overrides` merged in: every value a test does not set
    comes from there, the one place defaults are written (edgekd.config declares none)."""
    return params_from_dict(deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), overrides or {}))


def project_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files: what a clone (or the next commit) holds."""
    out = sh("git", "ls-files", "-co", "--exclude-standard", cwd=REPO).stdout
    return [f for f in out.splitlines() if (REPO / f).is_file() and not f.startswith("data")]


def copy_project(dest: Path) -> Path:
    for rel in project_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    return dest


def make_tiny_project(dest: Path, data_root: Path) -> Path:
    """Project copy with tiny params on `data_root`, committed, not reproduced."""
    copy_project(dest)
    set_params(dest, deep_update({"data": {"root": str(data_root)}}, TINY_OVERRIDES))
    sh("git", "init", "-q", cwd=dest)
    commit_all(dest, "tiny project")
    return dest


def make_tiny_repo(dest: Path, data_root: Path) -> Path:
    """`make_tiny_project`, fully reproduced (both pipeline files), committed again; the run's output
    and params trace are kept beside it (REPRO_LOG, PARAMS_TRACE)."""
    make_tiny_project(dest, data_root)
    proc = sh("dvc", "repro", "-P", cwd=dest, env={PARAMS_TRACE_ENV: str(dest.parent / PARAMS_TRACE)})
    (dest.parent / REPRO_LOG).write_text(proc.stdout + proc.stderr)
    commit_all(dest, "tiny run")
    return dest


def commit_all(repo: Path, message: str) -> None:
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", message, cwd=repo)


def clone_tiny_repo(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest, symlinks=True)
    return dest


# One student change shared by the tests that need a rerun of every student stage (each rerun costs
# about a minute): a wider student at a smaller input than the teachers' views.
CHANGED_STUDENT = {"student": {"width": 0.5, "image_size": 16}}


def make_changed_student_repo(template: Path, dest: Path) -> Path:
    """A copy of the reproduced tiny project with CHANGED_STUDENT set (uncommitted) and `dvc repro`
    (the deployed model's pipeline, as a user's experiment) run again; its output is kept beside it
    (REPRO_LOG)."""
    clone_tiny_repo(template, dest)
    set_params(dest, CHANGED_STUDENT)
    proc = sh("dvc", "repro", cwd=dest)
    (dest.parent / REPRO_LOG).write_text(proc.stdout + proc.stderr)
    return dest
