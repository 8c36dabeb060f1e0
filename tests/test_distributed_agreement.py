"""What the training processes share: a process group whose backends reduce every tensor they are
given, on GPUs too; one early-stop decision for all; one process deleting a stale resume file.

A CUDA run's process group is checked on CPU through the backend string it would open, read by
PyTorch's own parser (what `init_process_group` does with it); the decisions run in 2 CPU processes
(torchrun, gloo, tests/ddp_worker.py).
"""

import json

import torch
import torch.distributed as dist
from test_distributed import run_worker
from torch.distributed.distributed_c10d import BackendConfig

from edgekd.train.checkpoints import save_checkpoint
from edgekd.train.distributed import Ranks, agree_on, process_group_backend, sum_over_ranks

CUDA = torch.device("cuda", 1)


def _backends(device: torch.device) -> dict[str, str]:
    """Device type -> backend, of the process group that training on `device` opens."""
    return BackendConfig(process_group_backend(device)).get_device_backend_map()


def test_gpu_training_opens_nccl_and_a_cpu_backend_and_cpu_training_gloo():
    assert _backends(CUDA) == {"cpu": "gloo", "cuda": "nccl"}  # DDP's gradients on NCCL
    assert process_group_backend(torch.device("cpu")) == "gloo"


def test_every_tensor_reduced_between_gpu_processes_has_a_backend(monkeypatch):
    """The statistics and decisions are CPU tensors whatever the training device: the group of a
    CUDA run must reduce them (NCCL alone cannot: the run died at the end of its first epoch)."""
    devices = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **kw: devices.append(tensor.device.type))
    monkeypatch.setattr(dist, "broadcast", lambda tensor, *a, **kw: devices.append(tensor.device.type))
    sum_over_ranks([1.0, 2.0], Ranks(0, 2))
    agree_on(True, Ranks(0, 2))
    assert devices and set(devices) <= set(_backends(CUDA))


def test_processes_whose_early_stop_flags_disagree_all_follow_rank_0(tmp_path):
    """Rank 0 stops after 2 of 3 epochs and rank 1 would go on, then the other way round: every
    process runs rank 0's number of epochs and exits (none waits for one that left the loop)."""
    run_worker("early-stop", str(tmp_path / "epochs"), timeout=120)
    assert [json.loads((tmp_path / f"epochs.rank{r}").read_text()) for r in (0, 1)] == [[2, 3]] * 2


def test_only_rank_0_deletes_a_stale_resume_file_after_every_rank_has_read_it(tmp_path):
    resume = tmp_path / "resume.pt"
    save_checkpoint(resume, {"fingerprint": "another run"})
    run_worker("stale-resume", str(tmp_path), timeout=120)  # no rank fails to read or delete it
    assert not resume.exists()
    assert sorted(p.name for p in tmp_path.glob("unlink.*")) == ["unlink.rank0"]
    assert (tmp_path / "unlink.rank0").read_text() == "read.rank0 read.rank1"
