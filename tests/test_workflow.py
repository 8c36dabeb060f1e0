"""Lint the PR workflow (GitHub's schema, offline) and check it does what the PR loop needs.

GitHub Actions cannot run here, so this checks the file against the workflow JSON schema vendored
in check-jsonschema, and asserts the steps that make the report meaningful are present and ordered.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github/workflows/pr.yml"


def schema_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


@pytest.fixture(scope="module")
def steps(workflow: dict) -> list[dict]:
    (job,) = workflow["jobs"].values()
    return job["steps"]


def step_index(steps: list[dict], pattern: str) -> int:
    """Index of the first step whose `run` matches the regex; fails naming the missing command."""
    for i, step in enumerate(steps):
        if re.search(pattern, step.get("run", "")):
            return i
    raise AssertionError(f"no workflow step runs {pattern!r}")


def test_workflow_passes_github_schema():
    result = schema_check(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_a_broken_workflow(tmp_path: Path):
    broken = tmp_path / "pr.yml"
    broken.write_text(WORKFLOW.read_text().replace("runs-on:", "runs_on:"))
    result = schema_check(broken)
    assert result.returncode != 0
    assert "runs-on" in result.stdout


def test_runs_on_pull_requests_with_full_history(workflow: dict, steps: list[dict]):
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert "pull_request" in triggers
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0  # the base branch must exist for the diff
    python = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python@"))
    assert str(python["with"]["python-version"]) == "3.11"
    assert workflow["permissions"]["pull-requests"] == "write"


def test_steps_test_reproduce_report_comment_in_order(steps: list[dict]):
    order = [
        step_index(steps, r"\bmake test\b"),
        step_index(steps, r"dvc remote list"),
        step_index(steps, r"\bmake report BASE=\"origin/\$BASE_REF\""),
        step_index(steps, r"gh pr comment .*--body-file reports/pr/report\.md"),
    ]
    assert order == sorted(order)
    repro = steps[order[1]]["run"]
    assert "dvc repro --pull --allow-missing" in repro and "make repro" in repro
    report = steps[order[2]]
    assert report["env"]["BASE_REF"] == "${{ github.base_ref }}"  # via env: no expression injection


def test_uses_dvc3_flags_only():
    text = WORKFLOW.read_text() + (REPO / "tools/pr_report/run.py").read_text()
    assert "--show-md" not in text  # removed in DVC 3.0; `--md` replaces it
    assert '"--md"' in text


def test_every_make_target_in_workflow_exists():
    targets = set(re.findall(r"\bmake ([a-z][\w-]*)", WORKFLOW.read_text()))
    assert {"deps", "test", "repro", "report"} <= targets
    for target in targets:
        dry = subprocess.run(["make", "-n", target, "BASE=origin/main"], cwd=REPO, capture_output=True, text=True)
        assert dry.returncode == 0, f"make {target}: {dry.stderr}"


def test_make_report_passes_base_and_plots_url():
    dry = subprocess.run(
        ["make", "-n", "report", "BASE=origin/dev", "PLOTS_URL=https://ci/run/7"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0, dry.stderr
    assert '-m tools.pr_report.run --base origin/dev --out reports/pr --plots-url "https://ci/run/7"' in dry.stdout
