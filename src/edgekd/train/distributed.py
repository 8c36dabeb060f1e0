"""Data-parallel training on several processes, GPUs or machines, with PyTorch's own engine.

A training stage stays one command (`python -m stages.train_teacher ...`, what dvc.yaml runs).
With `distributed.nproc_per_node` or `distributed.nnodes` above 1 it re-executes itself under
torchrun (`torch.distributed.run`), which starts one process per device and sets RANK, WORLD_SIZE
and LOCAL_RANK; every process then joins the process group (`process_group_backend`). The model
is wrapped in DistributedDataParallel, each process trains on its share of every global batch
(`train.batch_size` images in all, the same shuffle and augmentation draws as one process), the
gradients are averaged, and rank 0 alone writes checkpoints, metrics, curves and resume files.

On GPUs, batch norm is synchronised (SyncBatchNorm), so a step sees the statistics of the whole
global batch as one process would. PyTorch has no CPU SyncBatchNorm: on CPU each process
normalises its own share, which is the one difference from a single process
(tests/test_distributed.py states the tolerance).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from edgekd.config import DistributedConfig
from edgekd.parallel import claim_slots_across_exec

log = logging.getLogger("edgekd")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and logs progress."""
        return self.rank == 0


def relaunch_under_torchrun(cfg: DistributedConfig) -> None:
    """Replace this process by torchrun running the same stage when `cfg` asks for more than one
    process; a no-op for one process and inside torchrun."""
    endpoint = cfg.rdzv_endpoint  # read in every case: the whole section is the stage's params
    rendezvous = (
        ["--standalone"]
        if cfg.nnodes == 1
        else ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=edgekd"]
    )
    if cfg.world_size == 1 or "LOCAL_RANK" in os.environ:
        return
    claim_slots_across_exec(cfg.nproc_per_node, torch.cuda.device_count())  # torchrun keeps them (edgekd.parallel)
    module = sys.modules["__main__"].__spec__.name  # e.g. stages.train_teacher
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={cfg.nproc_per_node}",
        f"--nnodes={cfg.nnodes}",
        *rendezvous,
        "-m",
        module,
        *sys.argv[1:],
    ]
    log.info("distributed: %d processes per node x %d nodes: %s", cfg.nproc_per_node, cfg.nnodes, " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


def process_group_backend(device: torch.device) -> str:
    """The process group's backend for training on `device`: gloo for CPU tensors in every case,
    and NCCL for CUDA tensors on GPUs.

    NCCL alone reduces CUDA tensors only, and the small collectives of a training run are on CPU
    (`sum_over_ranks`, `agree_on`; `wait_for_all_ranks` too: PyTorch runs a barrier on the CPU
    backend of a group that has one). PyTorch routes each collective to the backend of its
    tensors' device, so DDP's gradients and SyncBatchNorm still go through NCCL.
    """
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def join_process_group(device: torch.device) -> tuple[Ranks, torch.device]:
    """Under torchrun: join the process group and take this process's GPU; else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Ranks(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(process_group_backend(device))
    ranks = Ranks(dist.get_rank(), dist.get_world_size())
    if not ranks.main:
        logging.getLogger("edgekd").setLevel(logging.WARNING)  # one progress log, rank 0's
    return ranks, device


def leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def data_parallel(model: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """The module a training step calls: `model` itself for one process, else its DDP wrapper
    (batch norm synchronised on GPUs). Either way `model` holds the trained weights."""
    if ranks.world == 1:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def sum_over_ranks(values: list[float], ranks: Ranks) -> list[float]:
    """Element-wise sum of `values` over all processes (the whole global batch's statistics),
    reduced as a float64 CPU tensor (gloo) whatever the training device."""
    if ranks.world == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def agree_on(flag: bool, ranks: Ranks) -> bool:
    """Rank 0's `flag`, on every process: one decision where each process could take its own.

    E.g. early stopping: validation runs on every process, and on CPU, without synchronised batch
    norm, their accuracies can differ; a process that left the epoch loop alone would leave the
    others waiting forever in the next epoch's gradient all-reduce. Rank 0's view is the one that
    counts, as rank 0 writes the checkpoint and metrics.
    """
    if ranks.world == 1:
        return flag
    decision = torch.tensor([flag], dtype=torch.uint8)  # on CPU (gloo), as in sum_over_ranks
    dist.broadcast(decision, src=0)
    return bool(decision.item())


def wait_for_all_ranks(ranks: Ranks) -> None:
    """Return once every process has got here, e.g. all have read a file rank 0 is about to delete."""
    if ranks.world > 1:
        dist.barrier()
