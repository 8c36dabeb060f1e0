"""Several experiments on one machine (`dvc queue start -j N`): each stage keeps to its own share
of the CPU cores and its own GPU, and latency is measured with the machine to itself.

DVC's queue workers run experiments side by side and know nothing of the hardware: N runs of
train.threads threads each oversubscribe the cores, all would train on GPU 0, and every latency
figure would be measured under the others' load. With EDGEKD_PARALLEL_RUNS=N in the environment of
`dvc queue start -j N`, every stage process that computes takes one of N slots first: slot i is an
exclusive lock on a file in EDGEKD_SLOTS_DIR, held until the process exits, however it exits (the
kernel drops the lock with the file). Slot i pins the process to the i-th share of the cores and,
on a machine with GPUs, to GPU i mod count. A stage that measures latency (`whole_machine`) takes
every slot: it waits until no other stage computes, and no other starts until it is done.

Pinning changes where a stage runs, never what it computes: train.threads stays as params.yaml
says (a thread count changes float summation order), so a queued experiment's metrics are those
of the same params run alone. Stages under torchrun use their own ranks' devices and take no slot.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

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
    return tuple(cpus[index * per:(index + 1) * per]) if per else (cpus[index % len(cpus)],)


def _lock(index: int, blocking: bool) -> IO | None:
    handle = open(slots_dir() / f"slot-{index}.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.close()
        return None
    return handle


def claim_slot(gpus: int = 0) -> Slot | None:
    """Wait for a free slot of EDGEKD_PARALLEL_RUNS, keep it for this process's life, and pin the
    process to its cores (and GPU, of `gpus`). None, and no pinning, for one run or under torchrun."""
    runs = parallel_runs()
    if runs == 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    if _claimed:
        return _claimed[0]
    start = time.perf_counter()
    while True:
        for index in range(runs):
            handle = _lock(index, blocking=False)
            if handle is not None:
                _held.append(handle)
                slot = Slot(index, runs, cpu_share(index, runs, list(os.sched_getaffinity(0))),
                            index % gpus if gpus else None)
                os.sched_setaffinity(0, slot.cpus)
                _claimed.append(slot)
                log.info("parallel runs: slot %d of %d after %.1f s wait, cores %s%s", index, runs,
                         time.perf_counter() - start, list(slot.cpus),
                         "" if slot.gpu is None else f", GPU {slot.gpu}")
                return slot
        time.sleep(POLL_SECONDS)


@contextlib.contextmanager
def whole_machine() -> Iterator[None]:
    """Hold every slot for the duration: wait for running stages of other experiments to end, and
    keep new ones from starting (for latency measurement). Nothing to wait for with one run."""
    runs = parallel_runs()
    if runs == 1:
        yield
        return
    start = time.perf_counter()
    handles = [_lock(index, blocking=True) for index in range(runs)]  # in order: no two waiters deadlock
    log.info("parallel runs: the machine to itself (all %d slots) after %.1f s wait", runs,
             time.perf_counter() - start)
    try:
        yield
    finally:
        for handle in handles:
            handle.close()
