"""Data-parallel training: 2 CPU processes (torchrun, gloo) against one with the same global batch.

Each process takes half of every global batch, drawn and augmented as one process draws them, and
DDP averages the gradients: without batch norm, the trained weights equal one process's up to
float rounding (tolerance 1e-5 relative). PyTorch has no CPU SyncBatchNorm, so a model with batch
norm normalises each process's 8 images instead of all 16 (edgekd.train.distributed): through the
stage command, the stated tolerance is val accuracy within 2 of the 15 val images.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from edgekd.data.batches import load_split
from edgekd.train.checkpoints import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
EXACT_TOLERANCE = 1e-5
VAL_IMAGES_TOLERANCE = 2
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def run_worker(*args: str, alone: bool = False, timeout: float = 300) -> None:
    """tests/ddp_worker.py with `args` in 2 processes under torchrun (gloo), or `alone`; 1 thread each.

    Past `timeout` the launcher is terminated, not killed: a worker waiting in a collective that
    another one never joins waits forever, and torchrun, which starts each worker in a session of
    its own, stops them only on a signal it can handle.
    """
    launcher = [sys.executable] if alone else TORCHRUN
    with subprocess.Popen(
        [*launcher, str(REPO / "tests" / "ddp_worker.py"), *args], env={**os.environ, "OMP_NUM_THREADS": "1"}
    ) as run:
        try:
            assert run.wait(timeout) == 0
        except subprocess.TimeoutExpired:
            run.terminate()
            raise


def _run(tmp_path: Path, name: str, processes: int, stage: list[str], prepared: Path) -> tuple[dict, dict, str]:
    """One stage run with `processes` training processes; (metrics, state dict, stderr)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(batch_size=16, eval_batch_size=64, threads=1)
    raw["teachers"]["epochs"] = 2
    raw["student"].update(epochs=2, width=0.25)
    raw["distributed"]["nproc_per_node"] = processes
    params = tmp_path / f"{name}.yaml"
    params.write_text(yaml.safe_dump(raw))
    out, metrics = tmp_path / f"{name}.pt", tmp_path / f"{name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            *stage,
            "--data",
            str(prepared),
            "--out",
            str(out),
            "--metrics",
            str(metrics),
            "--live",
            str(tmp_path / f"live_{name}"),
            "--params",
            str(params),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(metrics.read_text()), load_checkpoint(out)["state_dict"], run.stderr


def epochs_logged(live: Path) -> int:
    """Epochs in a run's dvclive curves (one row per epoch, rank 0's)."""
    return len((live / "plots/metrics/val_acc.tsv").read_text().splitlines()) - 1  # a header line


def _relative_distance(a: dict, b: dict) -> float:
    keys = [k for k, v in a.items() if v.is_floating_point()]
    diff = torch.sqrt(sum(((a[k] - b[k]).double() ** 2).sum() for k in keys))
    return float(diff / torch.sqrt(sum((a[k].double() ** 2).sum() for k in keys)))


@pytest.mark.parametrize(
    "stage",
    [["stages.train_teacher", "--arch", "resnet18"], ["stages.train_student", "--mode", "baseline"]],
    ids=["teacher", "student"],
)
def test_two_processes_train_like_one_with_the_same_global_batch(prepared_small, tmp_path, stage):
    one, one_weights, _ = _run(tmp_path, "one", 1, stage, prepared_small)
    two, two_weights, log = _run(tmp_path, "two", 2, stage, prepared_small)
    assert "distributed: 2 processes per node x 1 nodes" in log and "torch.distributed.run" in log
    assert log.count("epoch 1/2") == 1  # rank 0 alone reports progress
    assert one_weights.keys() == two_weights.keys()
    assert round(abs(one["val_acc"] - two["val_acc"]) * 15) <= VAL_IMAGES_TOLERANCE  # float32 accuracies: count images
    assert epochs_logged(tmp_path / "live_one") == epochs_logged(tmp_path / "live_two") == 2
    # and a second run of the same 2-process command gives the same weights
    _, again, _ = _run(tmp_path, "again", 2, stage, prepared_small)
    assert all(torch.equal(two_weights[k], again[k]) for k in two_weights)


def test_without_batch_norm_two_processes_compute_what_one_does(prepared_small, tmp_path):
    run_worker("fit", str(prepared_small), str(tmp_path / "one.pt"), alone=True)
    run_worker("fit", str(prepared_small), str(tmp_path / "two.pt"))
    one, two = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("one", "two"))
    assert _relative_distance(one["trained"], one["initial"]) > 0.01  # it trained
    assert _relative_distance(one["trained"], two["trained"]) < EXACT_TOLERANCE
    steps = 3 * (len(load_split(prepared_small, "train")[1]) // 16)
    assert (tmp_path / "one.pt.rank0").read_text() == str(16 * steps)
    assert [(tmp_path / f"two.pt.rank{r}").read_text() for r in (0, 1)] == [str(8 * steps)] * 2  # half each
