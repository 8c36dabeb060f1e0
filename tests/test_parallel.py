"""Experiments side by side (`dvc queue start -j N`): a slot, and its cores, per stage process;
latency measured with the machine to itself."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_pipeline import sh

from edgekd.errors import UserError
from edgekd.parallel import PARALLEL_RUNS_ENV, SLOTS_DIR_ENV, cpu_share, parallel_runs, visible_devices, whole_machine

REPO = Path(__file__).resolve().parents[1]

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


# `python -m stages.prepare argv...`, its decoding held back PAUSE_S s after reporting the cores the
# stage may use and the decoding processes it will start.
PREPARE = """
import json, os, runpy, sys, time
from edgekd.data import decode, prepare
decode_all = prepare.decode_all

def reported(*args, **kwargs):
    print(json.dumps({"affinity": sorted(os.sched_getaffinity(0)), "workers": decode.decode_workers()}),
          flush=True)
    time.sleep(float(os.environ["PAUSE_S"]))
    return decode_all(*args, **kwargs)

prepare.decode_all = reported
sys.argv[0] = "stages/prepare.py"
runpy.run_module("stages.prepare", run_name="__main__")
"""


def test_prepare_holds_its_slot_while_decoding(two_runs, small_rice_tree, tmp_path):
    """`prepare` decodes with one process per core of its slot, and holds the slot until it ends:
    a latency measurement started while it decodes waits for it."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update({"root": str(small_rice_tree), "image_size": 32})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [
        sys.executable,
        "-c",
        PREPARE,
        "--root",
        str(small_rice_tree),
        "--out",
        str(tmp_path / "prepared"),
        "--metrics",
        str(tmp_path / "data.json"),
        "--plots",
        str(tmp_path / "plots"),
        "--params",
        str(tmp_path / "params.yaml"),
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env={**two_runs, "PAUSE_S": "1.5"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        decoding = json.loads(proc.stdout.readline() or "{}")
        started = time.time()
        with whole_machine():
            waited = time.time() - started
    finally:
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    cores = sorted(os.sched_getaffinity(0))
    assert decoding["affinity"] in [list(cpu_share(i, 2, cores)) for i in range(2)]  # one slot's cores
    assert decoding["workers"] == len(decoding["affinity"])
    assert waited > 1.0  # the slot was held past the decoding pause, until prepare ended
    assert "parallel runs: slot" in err


# A torchrun launch: take argv[1] slots across an exec, then become a process that reports the cores
# and GPUs it was left and lives argv[2] s (as torchrun lives as long as its training processes).
EXEC_LAUNCHER = """
import os, sys
from edgekd.parallel import claim_slots_across_exec
claim_slots_across_exec(int(sys.argv[1]))
launched = ("import json, os, sys, time; print(json.dumps({'affinity': sorted(os.sched_getaffinity(0)), "
            "'at': time.time()}), flush=True); time.sleep(float(sys.argv[1]))")
os.execv(sys.executable, [sys.executable, "-c", launched, sys.argv[2]])
"""


def test_a_torchrun_launch_holds_a_slot_per_process_across_the_exec(two_runs):
    launch = subprocess.Popen(
        [sys.executable, "-c", EXEC_LAUNCHER, "2", "1.5"], env=two_runs, stdout=subprocess.PIPE, text=True
    )
    launched = json.loads(launch.stdout.readline() or "{}")  # printed after the exec
    started = time.time()
    with whole_machine():
        waited = time.time() - started
    launch.communicate(timeout=60)
    assert launch.returncode == 0
    assert launched["affinity"] == sorted(os.sched_getaffinity(0))  # both slots' cores: all of them
    assert waited > 1.0  # the exec'd launcher kept both slots until it ended


# A latency measurement's start: take every slot, report when it has them.
WHOLE = """
import json, time
from edgekd.parallel import whole_machine
with whole_machine():
    print(json.dumps({"at": time.time()}), flush=True)
"""


def _wait_for_a_claimer_at_the_gate(slots: Path) -> None:
    deadline = time.time() + 30
    with open(slots / "gate.lock", "a+") as gate:
        while True:
            try:
                fcntl.flock(gate, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            fcntl.flock(gate, fcntl.LOCK_UN)
            assert time.time() < deadline, "no claimer took the gate"
            time.sleep(0.02)


def test_a_claim_of_several_slots_is_served_first_and_never_deadlocks(two_runs):
    """Behind the gate: a two-slot claim waiting for a running stage (and holding the free slot
    meanwhile) keeps later claims waiting, a one-slot one and a whole-machine one, and none of
    them deadlocks with it (a whole-machine claim holding slot 0 would, waiting for slot 1)."""
    holder = _claimer(two_runs, 1.5)
    assert holder.stdout.readline()  # it has its slot
    pair = subprocess.Popen(
        [sys.executable, "-c", EXEC_LAUNCHER, "2", "0.5"], env=two_runs, stdout=subprocess.PIPE, text=True
    )
    _wait_for_a_claimer_at_the_gate(Path(two_runs[SLOTS_DIR_ENV]))  # the pair, holding slot 1
    single = _claimer(two_runs, 0.0)  # slot 1 was free, but the pair asked first
    whole = subprocess.Popen([sys.executable, "-c", WHOLE], env=two_runs, stdout=subprocess.PIPE, text=True)
    try:
        pair_at = json.loads(pair.communicate(timeout=30)[0])["at"]
        single_at = _report(single)["at"]
        whole_at = json.loads(whole.communicate(timeout=30)[0])["at"]
    finally:
        for proc in (pair, single, whole):
            proc.kill()
    holder.communicate(timeout=60)
    assert pair.returncode == 0 and whole.returncode == 0
    assert pair_at < single_at and pair_at < whole_at


def test_a_claim_of_more_slots_than_runs_fails_in_one_line(two_runs):
    proc = subprocess.run(
        [sys.executable, "-c", EXEC_LAUNCHER, "3", "0"], env=two_runs, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert f"this stage needs 3 slots of {PARALLEL_RUNS_ENV}=2" in proc.stderr


def test_the_ranks_see_their_slots_gpus():
    assert visible_devices([1, 0], None) == "1,0"  # local rank r -> the r-th slot's GPU
    assert visible_devices([1], "4,6") == "6"  # indices among what is already visible
    assert visible_devices([0, 0], None) is None  # slots sharing a GPU: left as it is
    assert visible_devices([], None) is None


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
            assert "Running stage 'evaluate@int8'" in logs and "parallel runs: the machine to itself" in logs, logs
            assert "Running stage 'export" not in logs  # nothing upstream of bench.* reran
        shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=tiny_repo).stdout)
        runs = {
            exp["name"]: exp["data"]["params"]["params.yaml"]["data"]["bench"]["runs"]
            for rev in shown
            for exp_list in (rev.get("experiments") or [])
            for exp in exp_list["revs"]
        }
        assert runs == {"runs-11": 11, "runs-12": 12}
    finally:
        sh("dvc", "queue", "stop", "--kill", cwd=tiny_repo, check=False)
