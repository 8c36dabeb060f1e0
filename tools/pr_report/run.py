"""`make report`: compare the workspace with a base git revision and write a Markdown report.

    python -m tools.pr_report.run --base main --out reports/pr [--plots-url URL]

Writes OUT/report.md and OUT/plots/*.png (changed plots rendered offline with vl-convert from the
Vega-Lite specs `dvc plots diff --json` returns). Metrics and plots files are git-tracked
(`cache: false`), so this works on a plain clone without `dvc pull` and without network.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import vl_convert

from edgekd.errors import UserError
from edgekd.runtime import run_stage
from tools.pr_report.diff import headline_changes, headline_table, plot_filename, render_report, split_plots

log = logging.getLogger("edgekd")


def _dvc(args: list[str], repo: Path) -> str:
    """Run `dvc ARGS` in the repo (same interpreter as ours); a failure becomes one line."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"report: `dvc {' '.join(args)}` failed: {last}")
    return proc.stdout


def _base_label(base: str, repo: Path) -> str:
    """`base (short sha)`; a missing base is the usual CI mistake (shallow clone), so say how to fix it."""
    proc = subprocess.run(
        ["git", "rev-parse", "--short", "--verify", "--quiet", f"{base}^{{commit}}"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise UserError(
            f"report: base revision '{base}' not found in git; pass BASE=<branch|tag|sha> "
            "(in CI check out with fetch-depth: 0)"
        )
    return f"{base} ({proc.stdout.strip()})"


def write_report(repo: Path, base: str, out: Path, plots_url: str | None = None) -> Path:
    """Run the three dvc diffs against `base`, render changed plots to PNG, write out/report.md."""
    label = _base_label(base, repo)
    params_md = _dvc(["params", "diff", base, "--md"], repo)
    metrics_md = _dvc(["metrics", "diff", base, "--md"], repo)
    metrics_diff = json.loads(_dvc(["metrics", "diff", base, "--json"], repo) or "{}")
    headline = headline_table(headline_changes(metrics_diff), base)
    plots = split_plots(json.loads(_dvc(["plots", "diff", base, "--json"], repo) or "{}"))

    (out / "plots").mkdir(parents=True, exist_ok=True)
    for stale in (out / "plots").glob("*.png"):  # a plot unchanged now must not linger from last run
        stale.unlink()
    images = {}
    for plot_id, spec in {**plots.changed, **plots.only_workspace}.items():
        image = Path("plots") / plot_filename(plot_id)
        (out / image).write_bytes(vl_convert.vegalite_to_png(spec, scale=1))
        images[plot_id] = image.as_posix()
    report = out / "report.md"
    report.write_text(render_report(label, params_md, metrics_md, headline, plots, images, plots_url))
    log.info("report: %s (%d plots rendered)", report, len(images))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="main", help="git revision to compare the workspace with")
    parser.add_argument("--out", type=Path, default=Path("reports/pr"), help="report folder")
    parser.add_argument("--repo", type=Path, default=Path("."), help="repository root")
    parser.add_argument("--plots-url", help="link plots to this URL instead of inlining (CI run page)")
    args = parser.parse_args()
    write_report(args.repo, args.base, args.repo / args.out, args.plots_url)


if __name__ == "__main__":
    run_stage(main)
