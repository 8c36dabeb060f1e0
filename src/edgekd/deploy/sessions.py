"""Inference sessions for the exported ONNX files: onnxruntime and OpenVINO behind one callable.

Sessions are fixed and stated (see ../shared/notes/quantization.md): onnxruntime on CPU at
ORT_ENABLE_ALL (the NCHWc layout transform runs only at that level), a fixed intra-op thread count,
sequential execution. OpenVINO reads the same ONNX file; it is offered because it runs the integer
graph of a ReLU/no-SE MobileNetV3 as fast as FP32.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgekd.errors import UserError

RUNTIMES = ("onnxruntime", "openvino")

Runner = Callable[[np.ndarray], np.ndarray]  # (B, 3, H, W) float32 -> (B, classes) logits


def ort_session(
    path: str | Path,
    threads: int = 1,
    optimized_path: str | Path | None = None,
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
        compiled = core.compile_model(
            str(path),
            "CPU",
            {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"},
        )
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
