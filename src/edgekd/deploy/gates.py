"""The checks that make an export trustworthy: parity with the torch model on real images, and what
onnxruntime actually runs after graph optimisation (every Conv of a quantized file an integer
kernel, but those on INT4 weights or 16-bit activations). Sized in docs/int8.md#export-checks.
"""

from __future__ import annotations

import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgekd.config import Fp32Gates, QuantizedGates
from edgekd.deploy.metadata import OUTPUT_NAME
from edgekd.deploy.sessions import Runner, make_runner, ort_session
from edgekd.errors import UserError, require
from edgekd.train.evaluation import evaluation_mode

INTEGER_CONVS = {"QLinearConv", "ConvInteger"}
FLOAT_CONVS = {"Conv", "FusedConv"}  # any domain: com.microsoft(.nchwc) variants are float too


def float_convs_expected(path: str | Path) -> int:
    """Convs of an exported file that onnxruntime has no integer kernel for: those reading or writing
    a tensor on a grid other than 8 bits (INT4 weights, UINT16 activations). Every other Conv of a
    quantized file must run as an integer kernel."""
    graph = onnx.load(str(path)).graph
    zero_point_type = {i.name: i.data_type for i in graph.initializer}
    producer = {name: node for node in graph.node for name in node.output}
    readers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)

    def off_grid(node) -> bool:
        return (
            node is not None
            and node.op_type in ("QuantizeLinear", "DequantizeLinear")
            and len(node.input) > 2
            and zero_point_type.get(node.input[2]) in (onnx.TensorProto.INT4, onnx.TensorProto.UINT16)
        )

    def output_quantizers(conv) -> list:
        tensors, found = [conv.output[0]], []
        while tensors:
            for node in readers[tensors.pop()]:
                (tensors.append(node.output[0]) if node.op_type in ("Relu", "Clip") else found.append(node))
        return found

    return sum(
        any(off_grid(producer.get(name)) for name in conv.input) or any(map(off_grid, output_quantizers(conv)))
        for conv in graph.node
        if conv.op_type == "Conv"
    )


def conv_kernels(path: str | Path) -> dict[str, int]:
    """Count integer vs float Conv kernels in the graph onnxruntime runs (ORT_ENABLE_ALL)."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort_session(path, optimized_path=optimized)
        ops = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    return {"integer": sum(ops[o] for o in INTEGER_CONVS), "float": sum(ops[o] for o in FLOAT_CONVS)}


@torch.no_grad()
def compare(model: nn.Module, run: Runner, images: torch.Tensor, batch: int = 256) -> dict[str, float]:
    """Max |logit| difference and top-1 agreement between a torch model and an ONNX runner.

    The torch model runs in `evaluation_mode`: a fake-quant reference must not move its ranges
    while it is being compared.
    """
    max_diff, agree = 0.0, 0
    with evaluation_mode(model):
        for start in range(0, len(images), batch):
            x = images[start : start + batch]  # (B, 3, H, W) float, normalised
            ref = model(x).float().numpy()
            out = run(x.numpy())
            max_diff = max(max_diff, float(np.abs(ref - out).max()))
            agree += int((ref.argmax(1) == out.argmax(1)).sum())
    return {"max_abs_diff": max_diff, "top1_agreement": agree / len(images), "images": len(images)}


def output_step(path: str | Path) -> float:
    """The step of an 8-bit grid over the range the logits come out on: the scale of the graph's last
    DequantizeLinear times (its integer range / 255). For an 8-bit output that is its scale; a file
    with 16-bit logits is measured on the same coarse scale, so one step bound means the same on
    every path."""
    graph = onnx.load(str(path)).graph
    producer = next((n for n in graph.node if OUTPUT_NAME in n.output), None)
    if producer is None or producer.op_type != "DequantizeLinear":
        raise UserError(f"{path}: {OUTPUT_NAME!r} does not come from a DequantizeLinear; not an INT8 export")
    inits = {i.name: i for i in graph.initializer}
    scale = float(onnx.numpy_helper.to_array(inits[producer.input[1]]))
    zero_point = inits.get(producer.input[2]) if len(producer.input) > 2 else None
    wide = zero_point is not None and zero_point.data_type in (onnx.TensorProto.UINT16, onnx.TensorProto.INT16)
    return scale * (65535 / 255 if wide else 1.0)


def check_fp32_export(model: nn.Module, path: str | Path, images: torch.Tensor, cfg: Fp32Gates) -> dict:
    """Parity of an FP32 ONNX file with its torch model on real images; raises when it is off."""
    parity = compare(model, make_runner(path), images)
    require(
        parity["max_abs_diff"] <= cfg.parity_atol,
        path,
        f"max |logit| diff vs torch {parity['max_abs_diff']:.2e} > export.fp32.parity_atol={cfg.parity_atol}",
    )
    return parity


def check_int8_export(
    int8_model: nn.Module | None, fake_quant: nn.Module, path: str | Path, images: torch.Tensor, cfg: QuantizedGates
) -> dict:
    """The gates a quantized file must pass, on real images; raises on the first that fails.

    - every Conv runs as an integer kernel in onnxruntime (a float Conv is a broken export), except
      those on INT4 weights or UINT16 activations (`float_convs_expected`), which it runs in float;
    - against the reference model: max |logit| difference within export.quantized.max_logit_steps
      steps of the output grid (`output_step`; the sharp check: a file with other integers is 20+
      steps off while its top-1 answers may still agree) and top-1 agreement >=
      export.quantized.min_agreement (docs/int8.md#export-checks: how both were sized).
    The reference is the converted integer torch model (the same integers in another engine), with
    the fake-quant model's distance reported, not gated: fake-quant simulates requantization in
    float, and its distance from either integer engine is a property of QAT, not of the export. A
    model with 16-bit activations has no integer torch model (`int8_model` None): the fake-quant
    model is its reference, under the same two bounds.
    """
    convs = conv_kernels(path)
    expected = float_convs_expected(path)
    require(
        convs["float"] == expected,
        path,
        f"{convs['float']} Conv(s) run in float in onnxruntime, "
        f"expected {expected} (those on INT4 weights or 16-bit activations)",
    )
    runner = make_runner(path)
    step = output_step(path)
    reference, name = (fake_quant, "fake-quant") if int8_model is None else (int8_model, "integer torch")
    parity = compare(reference, runner, images)
    parity["max_abs_diff_steps"] = parity["max_abs_diff"] / step
    require(
        parity["max_abs_diff_steps"] <= cfg.max_logit_steps,
        path,
        f"max |logit| diff vs the {name} model {parity['max_abs_diff_steps']:.1f} output steps > "
        f"export.quantized.max_logit_steps={cfg.max_logit_steps}",
    )
    require(
        parity["top1_agreement"] >= cfg.min_agreement,
        path,
        f"top-1 agreement with the {name} model {parity['top1_agreement']:.4f} < "
        f"export.quantized.min_agreement={cfg.min_agreement}",
    )
    if int8_model is None:
        return {"parity_fake_quant": parity, "output_step": step, "conv_kernels": convs}
    return {
        "parity_int8_torch": parity,
        "parity_fake_quant": compare(fake_quant, runner, images),
        "output_step": step,
        "conv_kernels": convs,
    }
