"""The PR report: pure diff formatting, a synthetic DVC repo, and a tiny real pipeline end to end."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from tiny_pipeline import REPRO_LOG, sh

from edgekd.errors import UserError
from tools.pr_report.diff import (
    MetricChange,
    PlotDiff,
    format_change,
    headline_changes,
    headline_table,
    plot_filename,
    render_report,
    split_plots,
)
from tools.pr_report.run import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# ---------------------------------------------------------------- pure functions

METRICS_DIFF = {
    "metrics/evaluate.json": {
        "int8.accuracy": {"old": 0.88, "new": 0.9, "diff": 0.02},
        "int8.size_bytes": {"old": 300_000, "new": 600_000, "diff": 300_000},
        "fp32.latency_p50_ms": {"old": 2.0, "new": 1.5, "diff": -0.5},
        "int8_agreement": {"old": None, "new": 0.99},
        "fp32.n_test": {"old": 100, "new": 100, "diff": 0},  # not a headline metric
    },
    "metrics/teacher_resnet18.json": {"test.accuracy": {"old": 0.8, "new": 0.7, "diff": -0.1}},
    "metrics/distill.json": {
        "teacher_ensemble_val_acc": {"old": 0.5, "new": 0.6, "diff": 0.1},
        "params": {"old": 118_557, "new": 300_000, "diff": 181_443},
        "wall_s": {"old": 9.4, "new": 12.0, "diff": 2.6},  # machine noise, not a headline
    },
}


def test_headline_keeps_headline_metrics_with_direction_aware_verdicts():
    rows = {(c.path, c.metric): c for c in headline_changes(METRICS_DIFF)}
    assert set(rows) == {
        ("metrics/evaluate.json", "int8.accuracy"),
        ("metrics/evaluate.json", "int8.size_bytes"),
        ("metrics/evaluate.json", "fp32.latency_p50_ms"),
        ("metrics/evaluate.json", "int8_agreement"),
        ("metrics/teacher_resnet18.json", "test.accuracy"),
        ("metrics/distill.json", "teacher_ensemble_val_acc"),
        ("metrics/distill.json", "params"),
    }
    assert rows["metrics/evaluate.json", "int8.accuracy"].verdict == "better"
    assert rows["metrics/evaluate.json", "int8.size_bytes"].verdict == "worse"  # bigger model
    assert rows["metrics/evaluate.json", "fp32.latency_p50_ms"].verdict == "better"  # faster
    assert rows["metrics/teacher_resnet18.json", "test.accuracy"].verdict == "worse"
    assert rows["metrics/evaluate.json", "int8_agreement"].verdict == ""  # nothing to compare with
    assert rows["metrics/distill.json", "teacher_ensemble_val_acc"].verdict == "better"
    assert rows["metrics/distill.json", "params"].verdict == "worse"


def test_format_change_uses_units_and_relative_change():
    assert format_change(MetricChange("m", "int8.size_bytes", 2000, 3000)) == "+1.0 KB (+50.0%)"
    assert format_change(MetricChange("m", "fp32.latency_p50_ms", 2.0, 1.5)) == "-0.500 ms (-25.0%)"
    assert format_change(MetricChange("m", "int8.openvino_latency_p90_ms", 1.0, 1.1)) == "+0.100 ms (+10.0%)"
    assert format_change(MetricChange("m", "fp32.accuracy", 0.0, 0.5)) == "+50.00 points"
    assert format_change(MetricChange("m", "fp32.accuracy", 0.99, 0.985)) == "-0.50 points"
    assert format_change(MetricChange("m", "params", 100_000, 150_000)) == "+50.0 K (+50.0%)"
    assert format_change(MetricChange("m", "fp32.accuracy", None, 0.5)) == "new"
    assert format_change(MetricChange("m", "fp32.accuracy", 0.5, None)) == "removed"


def test_headline_table_rows_and_empty_case():
    table = headline_table(headline_changes(METRICS_DIFF), "main")
    assert "| File | Metric | main | workspace | Change | Verdict |" in table
    assert "| metrics/evaluate.json | int8.size_bytes | 0.300 MB | 0.600 MB | +0.300 MB (+100.0%) | worse |" in table
    assert headline_table([], "main").startswith("No headline metric")


def _vega(rows_by_rev: dict[str, list[dict]]) -> dict:
    values = [{**row, "rev": rev} for rev, rows in rows_by_rev.items() for row in rows]
    return {"type": "vega", "revisions": list(rows_by_rev), "content": {"data": {"values": values}}}


def test_split_plots_separates_changed_workspace_only_and_unchanged():
    same = [{"actual": "a", "predicted": "a"}]
    plots = {
        "data": {
            "plots/confusion_int8.csv": [_vega({"workspace": [{"actual": "a", "predicted": "b"}], "main": same})],
            "plots/tradeoff.csv": [_vega({"workspace": same, "main": same})],
            "dvclive/distill/plots/metrics/loss.tsv": [_vega({"workspace": same})],
        }
    }
    diff = split_plots(plots)
    assert list(diff.changed) == ["plots/confusion_int8.csv"]
    assert list(diff.only_workspace) == ["dvclive/distill/plots/metrics/loss.tsv"]
    assert diff.unchanged == ["plots/tradeoff.csv"]
    assert diff.changed["plots/confusion_int8.csv"] is plots["data"]["plots/confusion_int8.csv"][0]["content"]


def test_plot_filename_is_flat_and_safe():
    assert plot_filename("plots/data/class_counts.csv") == "plots_data_class_counts.csv.png"
    assert plot_filename("dvclive/distill/plots/metrics/val acc.tsv") == "dvclive_distill_plots_metrics_val_acc.tsv.png"


def test_render_report_inline_images_or_links():
    plots = PlotDiff(
        changed={"plots/tradeoff.csv": {}}, only_workspace={"dvclive/a.tsv": {}}, unchanged=["plots/data/x.csv"]
    )
    images = {"plots/tradeoff.csv": "plots/plots_tradeoff.csv.png", "dvclive/a.tsv": "plots/dvclive_a.tsv.png"}
    local = render_report("main (abc)", "", "", "h\n", plots, images)
    assert "No params changed." in local and "No metrics changed." in local
    assert "![plots/tradeoff.csv](plots/plots_tradeoff.csv.png)" in local
    assert local.index("## Plots with no data at the base revision") < local.index("![dvclive/a.tsv]")
    assert "Unchanged plots: `plots/data/x.csv`" in local
    ci = render_report("main (abc)", "", "", "h\n", plots, images, plots_url="https://ci/run/1")
    assert "![" not in ci and "[this run](https://ci/run/1)" in ci
    assert "- `plots/tradeoff.csv`: `plots/plots_tradeoff.csv.png`" in ci
    assert "No plot changed." in render_report("main", "", "", "h\n", PlotDiff(), {})


# ---------------------------------------------------------------- synthetic DVC repo

DVC_YAML = """\
stages:
  evaluate:
    cmd: "true"
    params: [student]
    metrics:
      - metrics/evaluate.json:
          cache: false
    plots:
      - plots/confusion_int8.csv:
          cache: false
          template: confusion
          x: actual
          y: predicted
      - plots/tradeoff.csv:
          cache: false
          x: size_kb
          y: accuracy
"""


def _write_state(repo: Path, width: float, int8_acc: float, confusion: str) -> None:
    (repo / "params.yaml").write_text(f"student:\n  width: {width}\nkd:\n  temperature: 4.0\n")
    metrics = {"fp32": {"accuracy": 0.9, "size_bytes": 40_000}, "int8": {"accuracy": int8_acc, "size_bytes": 12_000}}
    (repo / "metrics/evaluate.json").write_text(json.dumps(metrics))
    (repo / "plots/confusion_int8.csv").write_text("actual,predicted\n" + confusion)
    (repo / "plots/tradeoff.csv").write_text("model,size_kb,accuracy\nfp32,40,0.9\n")


@pytest.fixture
def synthetic_repo(tmp_path: Path) -> Path:
    """A git+DVC repo whose HEAD has one state and whose workspace has another (no pipeline run)."""
    repo = tmp_path / "repo"
    (repo / "metrics").mkdir(parents=True)
    (repo / "plots").mkdir()
    sh("git", "init", "-q", cwd=repo)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=repo)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    _write_state(repo, 0.25, 0.88, "a,a\nb,a\n")
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "base", cwd=repo)
    _write_state(repo, 0.5, 0.91, "a,a\nb,b\n")
    return repo


def test_write_report_on_synthetic_repo(synthetic_repo: Path):
    out = synthetic_repo / "reports/pr"
    (out / "plots").mkdir(parents=True)
    (out / "plots/stale.png").write_bytes(PNG_MAGIC)  # left over from an earlier report
    report = write_report(synthetic_repo, "HEAD", out).read_text()

    assert "| params.yaml | student.width | 0.25   | 0.5         |" in report
    assert "| metrics/evaluate.json | int8.accuracy | 88.00 % | 91.00 % | +3.00 points | better |" in report
    assert "fp32.accuracy" not in report  # unchanged metrics stay out
    assert "![plots/confusion_int8.csv](plots/plots_confusion_int8.csv.png)" in report
    assert "Unchanged plots: `plots/tradeoff.csv`" in report
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["plots_confusion_int8.csv.png"]
    assert (out / "plots/plots_confusion_int8.csv.png").read_bytes().startswith(PNG_MAGIC)


def test_write_report_unknown_base_is_one_line_user_error(synthetic_repo: Path):
    with pytest.raises(UserError, match="base revision 'no-such-branch' not found.*fetch-depth: 0"):
        write_report(synthetic_repo, "no-such-branch", synthetic_repo / "reports/pr")


# ---------------------------------------------------------------- the real pipeline, end to end


def test_make_report_lists_width_change_and_student_deltas(changed_student_repo: Path):
    # The tiny project, committed, then reproduced again with student.width 0.5 (conftest)
    repo = changed_student_repo
    rerun = (repo.parent / REPRO_LOG).read_text()
    for arch in ("resnet18", "mobilenet_v2", "densenet121"):
        assert f"Stage 'train_teacher@{arch}' didn't change, skipping" in rerun
    (repo / ".deps-installed").touch()  # requirements are installed already: no pip run
    sh("make", "report", "BASE=HEAD", cwd=repo)
    report = (repo / "reports/pr/report.md").read_text()

    assert re.search(r"\| params\.yaml \| student\.width +\| 0\.25 +\| 0\.5 +\|", report)
    for model in ("fp32", "int8", "baseline"):  # a wider student: every exported file grows
        assert re.search(
            rf"\| metrics/evaluate/{model}\.json \| size_bytes \| .* [KM]B \| .* [KM]B \| \+.* \| worse \|", report
        ), model
    assert "metrics/teacher_" not in report  # teachers were not retrained
    # The size/latency trade-off moved: rendered to a PNG that the report shows.
    assert "![tradeoff](plots/tradeoff.png)" in report
    assert (repo / "reports/pr/plots/tradeoff.png").read_bytes().startswith(PNG_MAGIC)
