"""Tooling outside the library: the benchmark, the pull-request report, the demo-data generator and
one-off studies. It imports `edgekd`; `edgekd` never imports it."""
