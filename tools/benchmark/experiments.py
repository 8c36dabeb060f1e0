"""Run DVC experiments and time their stages, for the benchmark and its report.

Per-stage wall time is read from DVC's own output ("Running stage 'x':" / "Stage 'x' didn't change,
skipping") as it streams, so the pipeline needs no extra timing outputs.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from edgekd.errors import UserError

# Stage names as DVC prints them; a stage of studies/dvc.yaml by its name alone (`studies/dvc.yaml:ptq` ->
# `ptq`): names are unique across the two pipeline files.
_RUNNING = re.compile(r"^Running stage '(?:[^':]+:)?([^']+)'")
_SKIPPED = re.compile(r"^Stage '(?:[^':]+:)?([^']+)' didn't change, skipping")
_EXP_NAME = re.compile(r"^Ran experiment\(s\): (\S+)")


@dataclass
class ExperimentRun:
    name: str | None
    total_s: float
    stage_s: dict[str, float] = field(default_factory=dict)  # stages that ran, in order
    skipped: list[str] = field(default_factory=list)
    output: list[str] = field(default_factory=list)  # the command and everything DVC and the stages printed


def overrides_to_args(overrides: dict, prefix: str = "") -> list[str]:
    """Nested mapping -> `-S key.sub=value` arguments for `dvc exp run` (Hydra syntax)."""
    args: list[str] = []
    for key, value in overrides.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            args += overrides_to_args(value, prefix=f"{name}.")
        elif isinstance(value, (list, tuple)):
            args += ["-S", f"{name}=[{','.join(str(v) for v in value)}]"]
        else:
            args += ["-S", f"{name}={value}"]
    return args


def parse_stage_log(lines: Iterable[tuple[float, str]], end_time: float) -> ExperimentRun:
    """Turn timestamped DVC output lines into per-stage wall times and skipped stages."""
    run = ExperimentRun(name=None, total_s=0.0)
    current: tuple[str, float] | None = None
    first: float | None = None
    for stamp, line in lines:
        first = stamp if first is None else first
        m, s, e = _RUNNING.match(line), _SKIPPED.match(line), _EXP_NAME.match(line)
        if m or s or e:
            if current is not None:
                run.stage_s[current[0]] = stamp - current[1]
                current = None
        if m:
            current = (m.group(1), stamp)
        elif s:
            run.skipped.append(s.group(1))
        elif e:
            run.name = e.group(1)
    if current is not None:
        run.stage_s[current[0]] = end_time - current[1]
    run.total_s = end_time - (first if first is not None else end_time)
    return run


def run_experiment(args: list[str], cwd: Path) -> ExperimentRun:
    """`dvc exp run ARGS`, echoing its output, timing each stage; fails loudly on a failed run."""
    cmd = ["dvc", "exp", "run", *args]
    print(f"$ {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    lines: list[tuple[float, str]] = [(start, "")]
    with subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))
            sys.stdout.write(line)
            sys.stdout.flush()
    end = time.monotonic()
    if proc.returncode != 0:
        raise UserError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}; see its output above")
    run = parse_stage_log(lines, end)
    run.output = [f"$ {' '.join(cmd)}", *(line for _, line in lines[1:])]
    return run
