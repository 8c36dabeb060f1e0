"""One way to write every quantity the reports show: the benchmark report, the pull-request report
and the studies all format through here, so a size, an accuracy or a latency reads the same in each.

Units: sizes in decimal MB/KB (what `ls -l` and the goals use), accuracies as percent with two
decimals and their differences in points, latencies in ms with three decimals, throughput in
images per second, ratios as `0.20x`. `metric(key, value)` picks the unit from a metrics key
(the leaf names of metrics/*.json: `accuracy`, `size_bytes`, `latency_p50_ms`, ...).
"""

from __future__ import annotations

import re
from typing import Any

MISSING = "–"
# Leaf names holding a fraction shown as a percentage: accuracies, agreement, recall.
_FRACTION = re.compile(r"(^|_)(acc|accuracy|agreement|recall)$")


def percent(fraction: float, digits: int = 2) -> str:
    return f"{100 * fraction:.{digits}f} %"


def points(delta: float) -> str:
    """A difference of two fractions, in percentage points (`+0.10 points`)."""
    return f"{100 * delta:+.2f} points"


def size(nbytes: float) -> str:
    return f"{nbytes / 1e6:.3f} MB" if abs(nbytes) >= 1e5 else f"{nbytes / 1e3:.1f} KB"


def count(n: float) -> str:
    """Parameter counts: `1.52 M`, `152.3 K`, `950`."""
    if abs(n) >= 1e6:
        return f"{n / 1e6:.2f} M"
    return f"{n / 1e3:.1f} K" if abs(n) >= 1e3 else f"{n:.0f}"


def milliseconds(ms: float) -> str:
    return f"{ms:.3f} ms"


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def throughput(images_per_s: float) -> str:
    return f"{images_per_s:,.0f} img/s"


def ratio(x: float) -> str:
    return f"{x:.2f}x"


def score(x: float) -> str:
    """Scores in 0..1 that are not accuracies (macro-F1)."""
    return f"{x:.4f}"


def metric(key: str, value: Any) -> str:
    """`value` of the metric named `key` (a leaf or a dotted path) in its unit."""
    if value is None:
        return MISSING
    if isinstance(value, str) or isinstance(value, bool):
        return str(value)
    leaf = key.rsplit(".", 1)[-1]
    if _FRACTION.search(leaf):
        return percent(value)
    if leaf.endswith("size_bytes"):
        return size(value)
    if leaf == "params":
        return count(value)
    if leaf.endswith("_ms"):
        return milliseconds(value)
    if leaf.endswith("throughput_ips"):
        return throughput(value)
    if leaf.endswith("f1"):
        return score(value)
    if leaf.startswith("p50_vs") or leaf.endswith("ratio"):
        return ratio(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def metric_change(key: str, old: float, new: float) -> str:
    """`new - old` in the metric's unit, plus the relative change where it means something:
    `+0.10 points` for accuracies, `+1.0 KB (+50.0%)` for sizes, `-0.500 ms (-25.0%)` for latencies."""
    if _FRACTION.search(key.rsplit(".", 1)[-1]):
        return points(new - old)
    sign = "+" if new >= old else "-"
    delta = sign + metric(key, abs(new - old))
    return delta if old == 0 else f"{delta} ({(new - old) / abs(old):+.1%})"
