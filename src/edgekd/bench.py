"""Latency and throughput of ONNX files on CPU, with the runtime settings fixed and stated.

Timing rules (see ../shared/notes/quantization.md): onnxruntime at ORT_ENABLE_ALL (the NCHWc
layout transform runs only at that level), a fixed intra-op thread count, sequential execution,
warm-up runs discarded, percentiles over many batch-1 runs. OpenVINO reads the same ONNX file; it is
measured too because it runs the integer graph of a ReLU/no-SE MobileNetV3 as fast as FP32.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from .config import BenchConfig
from .errors import UserError

RUNTIMES = ("onnxruntime", "openvino")

Runner = Callable[[np.ndarray], np.ndarray]  # (B, 3, H, W) float32 -> (B, classes) logits


def ort_session(path: str | Path, threads: int = 1, optimized_path: str | Path | None = None,
                level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                ) -> ort.InferenceSession:
    """CPU session; `optimized_path` saves the graph ORT actually runs (to count integer kernels)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # the "optimized model is hardware specific" warning is expected
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for bad files
        raise UserError(f"{path}: onnxruntime cannot load this model ({str(err).splitlines()[0]})") from None


def make_runner(path: str | Path, runtime: str = "onnxruntime", threads: int = 1) -> Runner:
    """A callable running the model on one runtime; same input/output contract for both."""
    if runtime == "onnxruntime":
        sess = ort_session(path, threads)
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})[0]
    if runtime == "openvino":
        import openvino as ov  # imported lazily: only benchmarks need it

        core = ov.Core()
        # f32 precision hint: otherwise a bf16-capable CPU may silently run FP32 models in bf16.
        compiled = core.compile_model(str(path), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()

        def run(x: np.ndarray) -> np.ndarray:
            # Reshape + copy into the request's own tensor: measured ~50 us faster per call than
            # request.infer({0: x}) at 64 px, where Python overhead is most of the latency.
            request.get_input_tensor(0).shape = x.shape
            request.get_input_tensor(0).data[:] = x
            request.infer()
            return request.get_output_tensor(0).data.copy()

        return run
    raise UserError(f"params: bench.runtime={runtime!r} is invalid; allowed: one of {list(RUNTIMES)}")


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
    record, on real preprocessed inputs `x` (N, 3, H, W) float32 (repeated up to `bench.batch`)."""
    run = make_runner(path, "onnxruntime", bench.threads)
    lat = measure_latency(run, x[:1], bench.warmup, bench.runs)
    ov = measure_latency(make_runner(path, "openvino", bench.threads), x[:1], bench.warmup, bench.runs)
    batched = np.resize(x, (bench.batch, *x.shape[1:]))  # (B, 3, H, W)
    throughput = measure_throughput(run, batched, max(1, bench.warmup // 10), max(10, bench.runs // 10))
    return {"latency_p50_ms": lat.p50_ms, "latency_p90_ms": lat.p90_ms, "latency_runs": lat.runs,
            "throughput_ips": throughput,
            "openvino_latency_p50_ms": ov.p50_ms, "openvino_latency_p90_ms": ov.p90_ms}


def classification_metrics(labels: np.ndarray, preds: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro-F1, per-class recall and the confusion matrix (rows = actual), numpy only.

    A class never predicted and never present scores F1 0 and counts in the macro mean, so a model
    that ignores a class is not flattered.
    """
    k = len(classes)
    confusion = np.bincount(labels * k + preds, minlength=k * k).reshape(k, k)  # (actual, predicted)
    tp = np.diag(confusion).astype(np.float64)
    actual, predicted = confusion.sum(1), confusion.sum(0)
    recall = np.divide(tp, actual, out=np.zeros(k), where=actual > 0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k),
                   where=(precision + recall) > 0)
    return {"accuracy": float(tp.sum() / max(1, len(labels))), "macro_f1": float(f1.mean()),
            "per_class_recall": dict(zip(classes, recall.round(6).tolist())),
            "confusion": confusion.tolist()}


def predict_all(run: Runner, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Logits (N, C) for float inputs (N, 3, H, W), in batches (the files have a dynamic batch axis)."""
    return np.concatenate([run(x[i:i + batch]) for i in range(0, len(x), batch)])
