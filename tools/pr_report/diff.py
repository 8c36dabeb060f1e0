"""Turn DVC's diffs (`dvc params/metrics diff`, `dvc plots diff --json`) into a pull-request report.

Pure functions of what the dvc commands print, so the report is tested on hand-made diffs and the
entry point (`tools/pr_report/run.py`) only runs dvc and writes files. The headline table exists because a
reviewer scans for "did accuracy drop, did the model grow or slow down"; DVC's own tables follow it
unchanged so nothing is hidden.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tools import formatting as fmt

# Leaf metric names worth a headline row, by which way is better. Matched on the leaf so that
# `int8.accuracy`, `val_acc`, `teacher_ensemble_val_acc` and `test.macro_f1` all qualify; timings of
# the training run itself (`wall_s`, `train_images_per_s`) are machine noise and stay out.
_HIGHER_IS_BETTER = re.compile(r"(acc|accuracy|f1|agreement|throughput_ips)$")
_LOWER_IS_BETTER = re.compile(r"^(size_bytes|params)$|latency_\w+_ms$")


def higher_is_better(leaf: str) -> bool | None:
    """True / False for headline metrics, None for the rest."""
    if _HIGHER_IS_BETTER.search(leaf):
        return True
    return False if _LOWER_IS_BETTER.search(leaf) else None


@dataclass(frozen=True)
class MetricChange:
    path: str  # metrics file, e.g. metrics/evaluate/int8.json
    metric: str  # dotted key inside it, e.g. latency_p50_ms
    old: float | None  # None: absent at the base revision
    new: float | None  # None: absent in the workspace

    @property
    def leaf(self) -> str:
        return self.metric.rsplit(".", 1)[-1]

    @property
    def verdict(self) -> str:
        """'better' / 'worse' / 'same', or '' when one side is missing."""
        if self.old is None or self.new is None:
            return ""
        if self.new == self.old:
            return "same"
        return "better" if (self.new > self.old) == higher_is_better(self.leaf) else "worse"


def headline_changes(metrics_diff: dict[str, dict[str, dict[str, Any]]]) -> list[MetricChange]:
    """Pick the headline metrics out of `dvc metrics diff --json`, sorted by file then key."""
    changes = []
    for path, metrics in sorted(metrics_diff.items()):
        for metric, values in sorted(metrics.items()):
            change = MetricChange(path, metric, _number(values.get("old")), _number(values.get("new")))
            if higher_is_better(change.leaf) is not None:
                changes.append(change)
    return changes


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def format_change(change: MetricChange) -> str:
    """The change in the metric's unit (tools/formatting.py), e.g. `+1.0 KB (+50.0%)`, `+0.10 points`."""
    if change.old is None or change.new is None:
        return "new" if change.old is None else "removed"
    return fmt.metric_change(change.leaf, change.old, change.new)


def headline_table(changes: list[MetricChange], base_label: str) -> str:
    """Markdown table of headline metric changes; one row per (file, metric)."""
    if not changes:
        return "No headline metric (accuracy, F1, size, parameters, latency, throughput) changed.\n"
    lines = [
        f"| File | Metric | {base_label} | workspace | Change | Verdict |",
        "|---|---|---:|---:|---:|---|",
    ]
    for c in changes:
        lines.append(
            f"| {c.path} | {c.metric} | {fmt.metric(c.leaf, c.old)} | {fmt.metric(c.leaf, c.new)} "
            f"| {format_change(c)} | {c.verdict} |"
        )
    return "\n".join(lines) + "\n"


@dataclass
class PlotDiff:
    changed: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> Vega-Lite spec
    only_workspace: dict[str, dict[str, Any]] = field(default_factory=dict)  # no data at the base
    unchanged: list[str] = field(default_factory=list)


def split_plots(plots_json: dict[str, Any]) -> PlotDiff:
    """Sort the plots of `dvc plots diff --json` by whether their data differs between revisions.

    DVC tags each data row with its `rev`. A plot with data in one revision only is a new plot, or
    one whose data is not in git at the base (e.g. an ignored dvclive folder): shown apart.
    """
    diff = PlotDiff()
    for plot_id, renders in sorted(plots_json.get("data", {}).items()):
        for render in renders:
            if render.get("type") != "vega":
                continue
            spec = render["content"]
            rows = _rows_by_rev(spec)
            if len(rows) < 2:
                diff.only_workspace[plot_id] = spec
            elif any(r != next(iter(rows.values())) for r in rows.values()):
                diff.changed[plot_id] = spec
            else:
                diff.unchanged.append(plot_id)
    return diff


def _rows_by_rev(spec: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The spec's inline data rows grouped by revision, without the `rev` tag itself."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in spec.get("data", {}).get("values", []):
        rows.setdefault(row.get("rev"), []).append({k: v for k, v in row.items() if k != "rev"})
    return rows


def plot_filename(plot_id: str) -> str:
    """A flat, shell-safe PNG name for a plot id (`plots/data/class_counts.csv` ->
    `plots_data_class_counts.csv.png`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", plot_id).strip("_") + ".png"


def render_report(
    base_label: str,
    params_md: str,
    metrics_md: str,
    headline: str,
    plots: PlotDiff,
    images: dict[str, str],
    plots_url: str | None = None,
) -> str:
    """Assemble the Markdown report.

    `images` maps plot ids to image paths relative to the report. With `plots_url` (CI: the run
    page holding the images as an artifact) the plots become a list instead of inline images,
    because a PR comment cannot show files that live only on the runner.
    """
    parts = [
        f"# Experiment report: workspace vs `{base_label}`\n",
        "## Headline metrics\n",
        headline,
        "## Params changed (`dvc params diff --md`)\n",
        params_md.strip() + "\n" if params_md.strip() else "No params changed.\n",
        "## Metrics changed (`dvc metrics diff --md`)\n",
        metrics_md.strip() + "\n" if metrics_md.strip() else "No metrics changed.\n",
        "## Plots changed (`dvc plots diff`)\n",
        _plots_section(list(plots.changed), images, plots_url) or "No plot changed.\n",
    ]
    if plots.only_workspace:
        parts += [
            "## Plots with no data at the base revision\n",
            _plots_section(list(plots.only_workspace), images, plots_url),
        ]
    if plots.unchanged:
        parts.append("Unchanged plots: " + ", ".join(f"`{p}`" for p in plots.unchanged) + "\n")
    return "\n".join(parts)


def _plots_section(plot_ids: list[str], images: dict[str, str], plots_url: str | None) -> str:
    if not plot_ids:
        return ""
    if plots_url:
        names = "\n".join(f"- `{plot_id}`: `{images[plot_id]}`" for plot_id in plot_ids)
        return f"Rendered images are in the `pr-report` artifact of [this run]({plots_url}):\n\n{names}\n"
    return "\n".join(f"### `{plot_id}`\n\n![{plot_id}]({images[plot_id]})\n" for plot_id in plot_ids)
