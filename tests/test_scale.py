"""The scale tooling: anonymous memory is measured over a command's whole process tree."""

from __future__ import annotations

import sys
from pathlib import Path

from edgekd.config import load_params
from tools.scale.memory import measure
from tools.scale.throughput import memory_mapped_vs_in_ram

REPO = Path(__file__).resolve().parents[1]

MB = 2**20

# A parent holding 100 MB that starts a child holding 300 MB: the peak counts both at once.
TREE = """
import subprocess, sys, time
held = bytearray(100 * 2**20)
subprocess.run([sys.executable, "-c", "import time; x = bytearray(300 * 2**20); time.sleep(1.5)"], check=True)
"""
# 1 GB read through a memory-mapped file: file pages, not anonymous memory.
MAPPED = """
import mmap, sys
with open(sys.argv[1], "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
    total = sum(m[i] for i in range(0, len(m), 4096))
import time; time.sleep(1)
"""


def test_peak_counts_every_process_of_the_tree():
    run = measure([sys.executable, "-c", TREE])
    assert run.returncode == 0 and run.seconds >= 1.5
    assert 400 * MB <= run.peak_anon_bytes < 520 * MB


def test_mapped_file_pages_are_not_anonymous(tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(1024 * MB)
    run = measure([sys.executable, "-c", MAPPED, str(big)])
    assert run.returncode == 0 and run.peak_anon_bytes < 100 * MB


def test_training_speed_is_compared_on_the_same_steps_from_both_sources(prepared_small):
    params = load_params(REPO / "params.yaml")
    speed = memory_mapped_vs_in_ram(prepared_small, params, {"student": ("mobilenet_v3_small", 0.25, 2)})
    row = speed["student"]
    assert row["memory_mapped"] > 0 and row["in_ram"] > 0 and (row["steps"], row["rounds"]) == (2, 3)
    assert row["ratio"] == round(row["memory_mapped"] / row["in_ram"], 3)
