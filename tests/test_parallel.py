"""Experiments side by side (`dvc queue start -j N`): a slot, and its cores, per stage process;
latency measured with the machine to itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekd.errors import UserError
from edgekd.parallel import PARALLEL_RUNS_ENV, SLOTS_DIR_ENV, cpu_share, parallel_runs, whole_machine
from tiny_pipeline import sh

# A stage's start: claim a slot, report it and the cores the process may use, hold it for argv[1] s.
CLAIMER = """
import json, os, sys, time
from edgekd.parallel import claim_slot
slot = claim_slot()
print(json.dumps({"index": slot.index, "cpus": list(slot.cpus), "affinity": sorted(os.sched_getaffinity(0)),
                  "at": time.time()}), flush=True)
time.sleep(float(sys.argv[1]))
"""


@pytest.fixture
def two_runs(tmp_path, monkeypatch) -> dict:
    env = {PARALLEL_RUNS_ENV: "2", SLOTS_DIR_ENV: str(tmp_path / "slots")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return {**os.environ, **env}


def _claimer(env: dict, hold_s: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLAIMER, str(hold_s)], env=env, stdout=subprocess.PIPE, text=True)


def _report(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return json.loads(out)


def test_cores_are_cut_into_one_share_per_run():
    assert [cpu_share(i, 2, [3, 2, 1, 0]) for i in range(2)] == [(0, 1), (2, 3)]
    assert [cpu_share(i, 3, list(range(7))) for i in range(3)] == [(0, 1), (2, 3), (4, 5)]
    assert [cpu_share(i, 3, [0, 1]) for i in range(3)] == [(0,), (1,), (0,)]  # fewer cores than runs


def test_each_stage_takes_a_free_slot_and_keeps_to_its_cores(two_runs):
    first, second = _claimer(two_runs, 2.0), _claimer(two_runs, 2.0)
    time.sleep(0.5)
    started = time.time()
    third = _claimer(two_runs, 0.0)  # both slots taken: waits for one to end
    a, b, c = _report(first), _report(second), _report(third)
    assert {a["index"], b["index"]} == {0, 1}
    for report in (a, b, c):
        assert report["affinity"] == report["cpus"]
    cores = sorted(os.sched_getaffinity(0))
    assert a["cpus"] != b["cpus"] or len(cores) == 1
    assert c["at"] - started > 1.0  # it started only when a slot was given back


def test_latency_waits_for_running_stages_and_holds_off_new_ones(two_runs):
    holder = _claimer(two_runs, 2.0)
    time.sleep(0.5)
    started = time.time()
    with whole_machine():
        waited = time.time() - started
        newcomer = _claimer(two_runs, 0.0)
        time.sleep(1.0)
        assert newcomer.poll() is None  # no slot while the latency is measured
        released = time.time()
    assert waited > 1.0  # until the running stage ended
    assert _report(newcomer)["at"] >= released
    _report(holder)


def test_parallel_runs_value_is_checked(monkeypatch):
    monkeypatch.delenv(PARALLEL_RUNS_ENV, raising=False)
    assert parallel_runs() == 1
    monkeypatch.setenv(PARALLEL_RUNS_ENV, "two")
    with pytest.raises(UserError, match=f"{PARALLEL_RUNS_ENV}='two': expected a whole number >= 1"):
        parallel_runs()


def test_queued_experiments_run_side_by_side_with_latency_alone(tiny_repo: Path, tmp_path: Path):
    """Two queued experiments that rerun `evaluate` only, on two queue workers: both succeed, each
    stage took a slot, and each latency measurement had the machine to itself."""
    env = {PARALLEL_RUNS_ENV: "2", SLOTS_DIR_ENV: str(tmp_path / "slots")}
    for name, runs in (("runs-11", 11), ("runs-12", 12)):
        sh("dvc", "exp", "run", "--queue", "-n", name, "-S", f"bench.runs={runs}", cwd=tiny_repo)
    sh("dvc", "queue", "start", "-j", "2", cwd=tiny_repo, env=env)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            status = sh("dvc", "queue", "status", cwd=tiny_repo).stdout
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(2)
        assert status.count("Success") == 2, status
        for name in ("runs-11", "runs-12"):
            logs = sh("dvc", "queue", "logs", name, cwd=tiny_repo).stdout
            assert "Running stage 'evaluate'" in logs and "parallel runs: the machine to itself" in logs, logs
            assert "Running stage 'export'" not in logs  # nothing upstream of bench.* reran
        shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=tiny_repo).stdout)
        runs = {exp["name"]: exp["data"]["params"]["params.yaml"]["data"]["bench"]["runs"]
                for rev in shown for exp_list in (rev.get("experiments") or []) for exp in exp_list["revs"]}
        assert runs == {"runs-11": 11, "runs-12": 12}
    finally:
        sh("dvc", "queue", "stop", "--kill", cwd=tiny_repo, check=False)
