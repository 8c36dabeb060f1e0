"""Several experiments on one machine (`dvc queue start -j N`): each stage keeps to its own share
of the CPU cores and its own GPU, and latency is measured with the machine to itself.

DVC's queue workers run experiments side by side and know nothing of the hardware: N runs of
train.threads threads each oversubscribe the cores, all would train on GPU 0, and every latency
figure would be measured under the others' load. With EDGEKD_PARALLEL_RUNS=N in the environment of
`dvc queue start -j N`, every stage process that computes takes slots of the N first: slot i is an
exclusive lock on a file in EDGEKD_SLOTS_DIR, held until the process exits, however it exits (the
kernel drops the lock with the file). Slot i is the i-th share of the cores and, on a machine with
GPUs, GPU i mod count; a process is pinned to the cores of the slots it holds, and the processes
it starts inherit the pinning.

- One slot: every stage that computes in one process (`select_device`), and `prepare`, whose
  decoding processes are one per core of its slot (`edgekd.data.decode.decode_workers`).
- k slots at once (`claim_slots`): a stage that starts k processes, each a slot's worth of work.
  A stage re-executed under torchrun takes `distributed.nproc_per_node` slots in the launching
  process, before the exec (`claim_slots_across_exec`): the torchrun launcher keeps them until it
  exits, and it outlives its training processes, which take none themselves.
- Every slot (`whole_machine`): a stage that measures latency; it waits until no other stage
  computes, and no other starts until it is done.

Slots are taken through a gate (one more lock file): one claimer at a time waits for its slots
while the others queue behind it, so a claim of several slots is never starved by single ones and
two claims never deadlock holding part of what each needs.

Pinning changes where a stage runs, never what it computes: train.threads stays as params.yaml
says (a thread count changes float summation order), so a queued experiment's metrics are those
of the same params run alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from edgekd.errors import UserError

log = logging.getLogger("edgekd")

PARALLEL_RUNS_ENV = "EDGEKD_PARALLEL_RUNS"  # experiments sharing this machine; unset or 1 = no slots
SLOTS_DIR_ENV = "EDGEKD_SLOTS_DIR"  # where the slot locks live; every worker must see the same folder
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Slot:
    index: int
    runs: int
    cpus: tuple[int, ...]  # the cores this process may run on
    gpu: int | None  # the GPU it trains on; None without CUDA


_held: list[IO] = []  # this process's open slot file: a lock lasts as long as its file is open
_claimed: list[Slot] = []  # and its slot, so that a second claim returns the first


def parallel_runs() -> int:
    """EDGEKD_PARALLEL_RUNS as a count (1 when unset); anything else is a one-line error."""
    raw = os.environ.get(PARALLEL_RUNS_ENV, "1")
    if not raw.isdigit() or int(raw) < 1:
        raise UserError(f"{PARALLEL_RUNS_ENV}={raw!r}: expected a whole number >= 1 (the -j of dvc queue start)")
    return int(raw)


def slots_dir() -> Path:
    folder = Path(os.environ.get(SLOTS_DIR_ENV) or Path(tempfile.gettempdir()) / f"edgekd-slots-{os.getuid()}")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cpu_share(index: int, runs: int, cpus: list[int]) -> tuple[int, ...]:
    """Slot `index`'s cores: the sorted cores cut into `runs` equal runs of consecutive ones (the
    remainder unused); with fewer cores than runs, slots share cores round-robin."""
    cpus = sorted(cpus)
    per = len(cpus) // runs
    return tuple(cpus[index * per : (index + 1) * per]) if per else (cpus[index % len(cpus)],)


def _lock(index: int, blocking: bool) -> IO | None:
    handle = open(slots_dir() / f"slot-{index}.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.close()
        return None
    return handle


@contextlib.contextmanager
def _gate() -> Iterator[None]:
    """One claimer at a time: whoever holds the gate waits for its slots, the others for the gate."""
    with open(slots_dir() / "gate.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file drops the lock


def claim_slots(count: int = 1, gpus: int = 0) -> tuple[Slot, ...] | None:
    """Wait until `count` slots of EDGEKD_PARALLEL_RUNS are free, take them all at once and keep
    them for this process's life, and pin the process to their cores (each slot's GPU: its index
    mod `gpus`). None, and no pinning, for one run or inside torchrun (WORLD_SIZE > 1: the
    launching process holds the slots, see `claim_slots_across_exec`). A second claim in the same
    process returns the first."""
    runs = parallel_runs()
    if runs == 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    if _claimed:
        return tuple(_claimed)
    if not 1 <= count <= runs:
        raise UserError(
            f"this stage needs {count} slots of {PARALLEL_RUNS_ENV}={runs}: run it with "
            f"{PARALLEL_RUNS_ENV} (and dvc queue start -j) of at least {count}, or with fewer "
            "processes"
        )
    start = time.perf_counter()
    taken: dict[int, IO] = {}
    with _gate():  # holding part of the slots while waiting for the rest is safe behind the gate
        while True:
            for index in range(runs):
                if index not in taken and len(taken) < count:
                    handle = _lock(index, blocking=False)
                    if handle is not None:
                        taken[index] = handle
            if len(taken) == count:
                break
            time.sleep(POLL_SECONDS)
    cpus = list(os.sched_getaffinity(0))
    slots = tuple(
        Slot(index, runs, cpu_share(index, runs, cpus), index % gpus if gpus else None) for index in sorted(taken)
    )
    _held.extend(taken[slot.index] for slot in slots)
    _claimed.extend(slots)
    os.sched_setaffinity(0, sorted({cpu for slot in slots for cpu in slot.cpus}))
    gpu_ids = [slot.gpu for slot in slots if slot.gpu is not None]
    log.info(
        "parallel runs: slot%s %s of %d after %.1f s wait, cores %s%s",
        "s" if count > 1 else "",
        ", ".join(str(slot.index) for slot in slots),
        runs,
        time.perf_counter() - start,
        sorted(os.sched_getaffinity(0)),
        f", GPU {', '.join(map(str, gpu_ids))}" if gpu_ids else "",
    )
    return slots


def claim_slot(gpus: int = 0) -> Slot | None:
    """`claim_slots(1, gpus)`: the one slot of a stage that computes in one process."""
    slots = claim_slots(1, gpus)
    return None if slots is None else slots[0]


def claim_slots_across_exec(nproc: int, gpus: int = 0) -> tuple[Slot, ...] | None:
    """In a process about to replace itself (os.exec*) by a launcher of `nproc` processes on this
    machine (torchrun): `claim_slots(nproc, gpus)`, with the locks kept open across the exec, so
    the launcher holds them until it exits. The launcher and what it starts inherit the pinning to
    the slots' cores; on GPUs, CUDA_VISIBLE_DEVICES becomes the slots' GPUs when they are distinct,
    so that local rank r trains on the r-th slot's GPU (with more runs than GPUs, slots share GPUs,
    and the ranks keep torchrun's GPUs 0..nproc-1 of what is visible)."""
    slots = claim_slots(nproc, gpus)
    if slots is None:
        return None
    for handle in _held:
        os.set_inheritable(handle.fileno(), True)
    visible = visible_devices(
        [slot.gpu for slot in slots if slot.gpu is not None], os.environ.get("CUDA_VISIBLE_DEVICES")
    )
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    elif gpus:
        log.warning(
            "parallel runs: slots %s share GPUs; the %d processes use GPUs 0..%d",
            [slot.index for slot in slots],
            nproc,
            nproc - 1,
        )
    return slots


def visible_devices(gpus: list[int], current: str | None) -> str | None:
    """CUDA_VISIBLE_DEVICES naming `gpus` (indices among the devices `current` makes visible, all
    when unset), in order; None when there are none or two are the same."""
    if not gpus or len(set(gpus)) != len(gpus):
        return None
    names = [name.strip() for name in current.split(",")] if current else [str(i) for i in range(max(gpus) + 1)]
    return ",".join(names[gpu] for gpu in gpus)


@contextlib.contextmanager
def whole_machine() -> Iterator[None]:
    """Hold every slot for the duration: wait for running stages of other experiments to end, and
    keep new ones from starting (for latency measurement). Nothing to wait for with one run."""
    runs = parallel_runs()
    if runs == 1:
        yield
        return
    start = time.perf_counter()
    with _gate():  # claimers that come later wait for the gate, then for the slots
        handles = [_lock(index, blocking=True) for index in range(runs)]
    log.info("parallel runs: the machine to itself (all %d slots) after %.1f s wait", runs, time.perf_counter() - start)
    try:
        yield
    finally:
        for handle in handles:
            handle.close()
