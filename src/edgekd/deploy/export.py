"""ONNX export of a torch model (FP32, or FX-converted integer) with its metadata attached
(edgekd.deploy.metadata): the only deploy module that runs torch's exporter. The INT4/UINT16
rewrites are in edgekd.deploy.onnx_rewrite, the checks in edgekd.deploy.gates.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import onnx.version_converter
import onnxruntime as ort
import torch
from torch import nn

from edgekd.deploy.metadata import INPUT_NAME, OUTPUT_NAME, ModelMeta
from edgekd.deploy.sessions import ort_session

# The TorchScript exporter (the one that exports FX-converted integer models) writes opsets up to 20;
# a file at a later opset is converted from 20 by onnx's version converter.
TORCHSCRIPT_MAX_OPSET = 20


def export_onnx(model: nn.Module, path: str | Path, meta: ModelMeta, opset: int) -> Path:
    """Export at `opset` (`file_opset`) with a dynamic batch axis, fold constants, shorten names,
    attach metadata, check.

    The TorchScript exporter (dynamo=False) is the one that exports FX-converted integer models;
    its raw output repeats casts/constants per layer and carries long tensor names, which cost
    ~100 KB at width 0.25 — onnxruntime's BASIC level (portable constant folding, standard ops only)
    and renaming remove that without touching a single weight. Opsets past what it writes are reached
    by onnx's version converter, which rewrites every node whose definition changed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, meta.image_size, meta.image_size)  # (B, 3, H, W)
    with tempfile.TemporaryDirectory() as tmp:
        raw, folded = Path(tmp) / "raw.onnx", Path(tmp) / "folded.onnx"
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation/tracer notices
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model.eval(),
                (example,),
                str(raw),
                dynamo=False,
                opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        ort_session(raw, optimized_path=folded, level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        onnx_model = onnx.load(str(folded))
    if opset > TORCHSCRIPT_MAX_OPSET:
        onnx_model = onnx.version_converter.convert_version(onnx_model, opset)
    _shorten_names(onnx_model.graph)
    onnx.helper.set_model_props(onnx_model, meta.to_props())
    onnx.checker.check_model(onnx_model, full_check=True)
    tmp_path = path.with_name(path.name + ".tmp")
    onnx.save(onnx_model, str(tmp_path))
    tmp_path.replace(path)  # never leave a half-written model where the next stage reads
    return path


def _shorten_names(graph: onnx.GraphProto) -> None:
    """Rename internal tensors to t0, t1, ... and drop node names/doc strings (graph I/O kept)."""
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.name, node.doc_string = "", ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    del graph.value_info[:]
