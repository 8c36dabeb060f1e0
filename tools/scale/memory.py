"""Peak anonymous memory of a command and every process it starts, sampled while it runs.

Anonymous memory (`RssAnon` in /proc/<pid>/status) is what a process has copied or computed:
heap, decoded arrays, tensors. Pages of a memory-mapped file are not in it (the OS can drop and
re-read them), which is the distinction the bounded-memory data format relies on. Linux only.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

import psutil

SAMPLE_SECONDS = 0.1


@dataclass(frozen=True)
class Measured:
    peak_anon_bytes: int  # largest sum over the process tree at one sample
    seconds: float
    returncode: int


def anon_bytes(pid: int) -> int:
    """RssAnon of one process; 0 if it has already exited."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def tree_anon_bytes(root: psutil.Process) -> int:
    """RssAnon summed over `root` and its descendants (worker processes included)."""
    try:
        pids = [root.pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return 0
    return sum(anon_bytes(pid) for pid in pids)


def measure(cmd: Sequence[str], log_path: str | None = None, cwd: str | None = None) -> Measured:
    """Run `cmd` to completion, sampling its process tree's anonymous memory every 0.1 s;
    its output goes to `log_path` (or is discarded)."""
    with open(log_path or "/dev/null", "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        root, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            peak = max(peak, tree_anon_bytes(root))
            time.sleep(SAMPLE_SECONDS)
    return Measured(peak, time.perf_counter() - start, proc.returncode)
