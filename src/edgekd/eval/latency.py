"""Latency and throughput of ONNX files on CPU.

Timing rules (see ../shared/notes/quantization.md): warm-up runs discarded, percentiles over many
batch-1 runs, throughput from the median batch time; the sessions' settings are those of
`edgekd.deploy.sessions`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekd.config import BenchConfig
from edgekd.deploy.sessions import Runner, make_runner


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p90_ms: float
    mean_ms: float
    runs: int


def measure_latency(run: Runner, x: np.ndarray, warmup: int, runs: int) -> Latency:
    """Per-call wall time of `run(x)`; warm-up calls are discarded (allocations, kernel selection)."""
    for _ in range(warmup):
        run(x)
    times = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        start = time.perf_counter_ns()
        run(x)
        times[i] = (time.perf_counter_ns() - start) / 1e6
    p50, p90 = np.percentile(times, [50, 90])
    return Latency(float(p50), float(p90), float(times.mean()), runs)


def measure_throughput(run: Runner, batch: np.ndarray, warmup: int, runs: int) -> float:
    """Images per second at the given batch (median batch time, robust to a noisy shared CPU)."""
    lat = measure_latency(run, batch, warmup, runs)
    return batch.shape[0] / (lat.p50_ms / 1e3)


def measure_speed(path: str | Path, x: np.ndarray, bench: BenchConfig) -> dict:
    """Batch-1 p50/p90 and batch throughput in onnxruntime, and batch-1 OpenVINO latency for the
    record, on real preprocessed inputs `x` (N, 3, H, W) float32, an array or `ModelInputs` (its first
    `bench.batch`, repeated up to that many)."""
    x = np.asarray(x[: bench.batch])
    run = make_runner(path, "onnxruntime", bench.threads)
    lat = measure_latency(run, x[:1], bench.warmup, bench.runs)
    ov = measure_latency(make_runner(path, "openvino", bench.threads), x[:1], bench.warmup, bench.runs)
    batched = np.resize(x, (bench.batch, *x.shape[1:]))  # (B, 3, H, W)
    throughput = measure_throughput(run, batched, max(1, bench.warmup // 10), max(10, bench.runs // 10))
    return {
        "latency_p50_ms": lat.p50_ms,
        "latency_p90_ms": lat.p90_ms,
        "latency_runs": lat.runs,
        "throughput_ips": throughput,
        "openvino_latency_p50_ms": ov.p50_ms,
        "openvino_latency_p90_ms": ov.p90_ms,
    }
