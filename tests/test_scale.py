"""The scale tooling: anonymous memory is measured over a command's whole process tree."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from edgekd.config import load_params
from tools.scale.memory import measure
from tools.scale.report import read_measurements, write_report
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


def measurement(command: str, pipelines: dict, params: dict | None = None) -> dict:
    return {
        "command": command,
        "commit": "abc1234",
        "runs": [],
        "throughput": {},
        "machine": {"cpu": "cpu", "cores": 2, "simd": ["avx2"]},
        "pipelines": pipelines,
        "pipeline_image_size": 64,
        "pipeline_params": params or {"train": {"max_steps_per_epoch": 20}},
    }


def stage_runs(prepare_mb: float, export_mb: float) -> list[dict]:
    return [
        {"stage": "prepare", "seconds": 10.0, "peak_anon_mb": prepare_mb},
        {"stage": "export", "seconds": 20.0, "peak_anon_mb": export_mb},
    ]


def test_report_joins_a_later_larger_pipeline_to_earlier_ones(tmp_path):
    first = tmp_path / "a.json"
    first.write_text(json.dumps(measurement("run a", {"demo 5000": stage_runs(1000, 500)})))
    later = tmp_path / "b.json"
    later.write_text(json.dumps({"measurements": [measurement("run b", {"demo 75000": stage_runs(1100, 400)})]}))
    write_report(read_measurements([first, later]), tmp_path / "out")
    report = (tmp_path / "out" / "scale.md").read_text()
    assert "1. Command: `run a`" in report and "2. Command: `run b`" in report
    assert "| prepare | 10 s | 1000 MB | 10 s | 1100 MB | 1.10 |" in report
    assert "| export | 20 s | 500 MB | 20 s | 400 MB | 0.80 |" in report
    merged = json.loads((tmp_path / "out" / "scale.json").read_text())["measurements"]
    assert [m["command"] for m in merged] == ["run a", "run b"]


def test_report_refuses_stage_tables_from_other_params(tmp_path):
    files = [tmp_path / "a.json", tmp_path / "b.json"]
    files[0].write_text(json.dumps(measurement("a", {"demo 5000": stage_runs(1, 1)})))
    files[1].write_text(json.dumps(measurement("b", {"demo 75000": stage_runs(1, 1)}, {"train": {}})))
    with pytest.raises(SystemExit, match="different pipeline params"):
        read_measurements(files)
    files[1].write_text(json.dumps(measurement("b", {"demo 75000": stage_runs(1, 1)[:1]})))
    with pytest.raises(SystemExit, match="or stages"):
        read_measurements(files)
    files[1].write_text(json.dumps(measurement("b", {"demo 5000": stage_runs(1, 1)})))
    with pytest.raises(SystemExit, match=r"measured twice \(demo 5000\)"):
        read_measurements(files)
    files[1].write_text(json.dumps({key: value for key, value in measurement("b", {}).items() if key != "machine"}))
    with pytest.raises(SystemExit, match="b.json: not a scale.json"):
        read_measurements(files)
    files[1].write_text("[1, 2]")
    with pytest.raises(SystemExit, match="b.json: not a scale.json"):
        read_measurements(files)
