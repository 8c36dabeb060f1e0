"""Where a study's report goes: its figures as JSON, and the same as Markdown beside it."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out: Path, report: dict, markdown: str) -> None:
    """`report` as JSON at `out` (the figures other tools read) and `markdown` at `out` with `.md`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown)
