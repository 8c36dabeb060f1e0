"""ONNX export with self-describing metadata, plus the checks that make an export trustworthy.

A model file must carry its own preprocessing (classes, input size, mean/std, resize rule), so that
`predict` never guesses; parity with torch is measured on real images, and the INT8 graph is
checked for what onnxruntime actually runs after graph optimisation (every Conv an integer kernel).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
import torch
from torch import nn

from edgekd.config import Fp32Gates, QuantizedGates
from edgekd.data.images import RESIZE_METHOD
from edgekd.deploy.sessions import Runner, make_runner, ort_session
from edgekd.errors import UserError
from edgekd.train.engine import evaluation_mode

INPUT_NAME, OUTPUT_NAME = "input", "logits"
REQUIRED_METADATA = ("classes", "image_size", "mean", "std", "resize")
INTEGER_CONVS = {"QLinearConv", "ConvInteger"}
FLOAT_CONVS = {"Conv", "FusedConv"}  # any domain: com.microsoft(.nchwc) variants are float too
# The TorchScript exporter (the one that exports FX-converted integer models) writes opsets up to 20;
# a file at a later opset is converted from 20 by onnx's version converter.
TORCHSCRIPT_MAX_OPSET = 20
WIDE_TYPES_OPSET = 21  # the first opset with INT4 and UINT16 QuantizeLinear/DequantizeLinear


def file_opset(requested: int, wide_types: bool) -> int:
    """The opset a file is exported at: `export.opset`, raised to 21 for a file that stores INT4
    weights or UINT16 activations (those types do not exist before it). The one place that decides."""
    return max(requested, WIDE_TYPES_OPSET) if wide_types else requested


@dataclass(frozen=True)
class ModelMeta:
    """Everything inference needs besides the weights; stored as ONNX metadata_props."""

    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    resize: str = RESIZE_METHOD
    arch: str = ""
    width: float = 0.0
    stem: str = ""
    precision: str = "fp32"
    params: int = 0  # parameter count of the FP32 network (INT8 initializers add scales)

    def to_props(self) -> dict[str, str]:
        return {"classes": json.dumps(self.classes), "image_size": str(self.image_size),
                "mean": json.dumps(self.mean), "std": json.dumps(self.std), "resize": self.resize,
                "arch": self.arch, "width": str(self.width), "stem": self.stem, "precision": self.precision,
                "params": str(self.params)}


def read_metadata(path: str | Path) -> ModelMeta:
    """Parse and validate the metadata of an ONNX file; a file without it is refused, not guessed."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf decode errors have many types
        raise UserError(f"{path}: not a readable ONNX model ({type(err).__name__})") from None
    props = {p.key: p.value for p in model.metadata_props}
    missing = [k for k in REQUIRED_METADATA if k not in props]
    if missing:
        raise UserError(f"{path}: ONNX metadata lacks {missing}; export it with `python -m "
                        "stages.export` so preprocessing is not guessed")
    try:
        meta = ModelMeta(classes=[str(c) for c in json.loads(props["classes"])],
                         image_size=int(props["image_size"]),
                         mean=[float(v) for v in json.loads(props["mean"])],
                         std=[float(v) for v in json.loads(props["std"])],
                         resize=props["resize"], arch=props.get("arch", ""),
                         width=float(props.get("width", 0) or 0), stem=props.get("stem", ""),
                         precision=props.get("precision", ""),
                         params=int(props.get("params", 0) or 0))
    except (ValueError, TypeError) as err:
        raise UserError(f"{path}: malformed ONNX metadata ({err})") from None
    if meta.resize != RESIZE_METHOD:
        raise UserError(f"{path}: unknown resize rule {meta.resize!r}; this code implements {RESIZE_METHOD!r}")
    if len(meta.mean) != 3 or len(meta.std) != 3 or min(meta.std) <= 0 or meta.image_size < 1 \
            or not meta.classes:
        raise UserError(f"{path}: ONNX metadata out of range (need 3 mean, 3 positive std, classes)")
    return meta


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
            torch.onnx.export(model.eval(), (example,), str(raw), dynamo=False,
                              opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
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


def store_int4_weights(path: str | Path, int4_weights: list[np.ndarray]) -> int:
    """Store the given integer weights of an exported INT8 file as INT4 initializers (opset 21).

    The torch export writes every quantized weight as an INT8 initializer feeding a
    DequantizeLinear; a layer with 4-bit weights holds values in -7..7 there. Each array of
    `int4_weights` (the converted torch model's integer weights of one 4-bit layer) is found by
    shape and value, stored as INT4 (two per byte) with an INT4 zero point of its own, and the
    file must be at opset 21 or later (`file_opset`). onnxruntime runs such a layer as
    DequantizeLinear -> float Conv: it saves bytes, not time. Returns the number of layers stored.
    """
    path = Path(path)
    model = _load_at_wide_opset(path)
    graph = model.graph
    for weights in int4_weights:
        matches = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8
                   and tuple(i.dims) == weights.shape and np.array_equal(onnx.numpy_helper.to_array(i), weights)]
        require(len(matches) == 1, path, f"{len(matches)} INT8 initializers match a 4-bit layer of shape "
                f"{weights.shape}; expected exactly one")
        init = matches[0]
        require(int(weights.min()) >= -8 and int(weights.max()) <= 7, path, "a 4-bit layer's weights exceed -8..7")
        init.CopyFrom(int4_tensor(init.name, weights))
        zero_points = {i.name: i for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] == init.name:
                zp = onnx.numpy_helper.to_array(zero_points[node.input[2]])
                name = f"{init.name}_zp_int4"
                graph.initializer.append(int4_tensor(name, zp))
                node.input[2] = name
    _save_rewritten(model, path)  # INT8 zero points left behind go
    return len(int4_weights)


def store_int16_activations(path: str | Path, grids: dict[str, tuple[float, float, int]]) -> int:
    """Give the layers with 16-bit outputs their 16-bit grid in an exported file (opset 21).

    `grids` (quant.convert_for_export): per layer, the placeholder scale its output was exported with
    on an 8-bit grid, and its real scale and zero point. The QuantizeLinear with that scale (and those
    of ops that keep their input's grid, such as pooling) and every DequantizeLinear reading their
    outputs get the real scale and a UINT16 zero point of their own (initializers are shared between
    nodes, so none is changed in place). onnxruntime runs a
    conv reading or writing such a tensor as a float Conv between DequantizeLinear and
    QuantizeLinear: 16-bit activations cost time and save no byte. The file must be at opset 21 or
    later (`file_opset`). Returns the number of layers.
    """
    path = Path(path)
    model = _load_at_wide_opset(path)
    graph = model.graph
    values = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    for i, (layer, (placeholder, scale, zero_point)) in enumerate(grids.items()):
        # the layer's QuantizeLinear, and those of ops that share its grid (pooling: same qparams in, out)
        marked = [n for n in graph.node if n.op_type == "QuantizeLinear"
                  and values[n.input[1]].size == 1 and np.float32(values[n.input[1]]) == np.float32(placeholder)]
        require(bool(marked), path, f"no QuantizeLinear carries the placeholder scale of {layer}")
        scale_name, zp_name = f"a16_{i}_scale", f"a16_{i}_zero_point"
        values[scale_name], values[zp_name] = np.array(scale, dtype=np.float32), np.array(zero_point, dtype=np.uint16)
        graph.initializer.extend(onnx.numpy_helper.from_array(values[n], n) for n in (scale_name, zp_name))
        for quantize in marked:
            readers = [n for n in graph.node if quantize.output[0] in n.input]
            require(all(n.op_type == "DequantizeLinear" for n in readers), path, f"the output of {layer} is "
                    f"read by {sorted({n.op_type for n in readers})}, not only DequantizeLinear")
            for node in (quantize, *readers):
                node.input[1], node.input[2] = scale_name, zp_name
    _save_rewritten(model, path)
    return len(grids)


def _load_at_wide_opset(path: Path) -> onnx.ModelProto:
    """An exported file about to get INT4 or UINT16 tensors. It must already be at an opset that has
    those types (`file_opset`): raising the number alone would claim a conversion that never ran."""
    model = onnx.load(str(path))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    require(opset >= WIDE_TYPES_OPSET, path, f"opset {opset} has no INT4/UINT16 Quantize/DequantizeLinear; "
            f"export it at file_opset(export.opset, wide_types=True) = {WIDE_TYPES_OPSET} or later")
    return model


def _save_rewritten(model: onnx.ModelProto, path: Path) -> None:
    """Drop initializers no node reads, check and save atomically."""
    graph = model.graph
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(model, full_check=True)
    tmp_path = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp_path))
    tmp_path.replace(path)


def int4_tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    """An INT4 initializer holding `values` (-8..7), two per byte in raw data, the first element in
    the low nibble (the ONNX layout; `make_tensor` with a value list would spend a varint on each)."""
    nibbles = (values.astype(np.int8).ravel() & 0x0F).astype(np.uint8)
    if len(nibbles) % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    return onnx.helper.make_tensor(name, onnx.TensorProto.INT4, values.shape, packed.tobytes(), raw=True)


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
        return (node is not None and node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2
                and zero_point_type.get(node.input[2]) in (onnx.TensorProto.INT4, onnx.TensorProto.UINT16))

    def output_quantizers(conv) -> list:
        tensors, found = [conv.output[0]], []
        while tensors:
            for node in readers[tensors.pop()]:
                (tensors.append(node.output[0]) if node.op_type in ("Relu", "Clip") else found.append(node))
        return found

    return sum(any(off_grid(producer.get(name)) for name in conv.input) or any(map(off_grid, output_quantizers(conv)))
               for conv in graph.node if conv.op_type == "Conv")


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
            x = images[start:start + batch]  # (B, 3, H, W) float, normalised
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
    require(parity["max_abs_diff"] <= cfg.parity_atol, path,
            f"max |logit| diff vs torch {parity['max_abs_diff']:.2e} > export.fp32.parity_atol={cfg.parity_atol}")
    return parity


def check_int8_export(int8_model: nn.Module | None, fake_quant: nn.Module, path: str | Path, images: torch.Tensor,
                      cfg: QuantizedGates) -> dict:
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
    require(convs["float"] == expected, path, f"{convs['float']} Conv(s) run in float in onnxruntime, "
            f"expected {expected} (those on INT4 weights or 16-bit activations)")
    runner = make_runner(path)
    step = output_step(path)
    reference, name = (fake_quant, "fake-quant") if int8_model is None else (int8_model, "integer torch")
    parity = compare(reference, runner, images)
    parity["max_abs_diff_steps"] = parity["max_abs_diff"] / step
    require(parity["max_abs_diff_steps"] <= cfg.max_logit_steps, path,
            f"max |logit| diff vs the {name} model {parity['max_abs_diff_steps']:.1f} output steps > "
            f"export.quantized.max_logit_steps={cfg.max_logit_steps}")
    require(parity["top1_agreement"] >= cfg.min_agreement, path,
            f"top-1 agreement with the {name} model {parity['top1_agreement']:.4f} < "
            f"export.quantized.min_agreement={cfg.min_agreement}")
    if int8_model is None:
        return {"parity_fake_quant": parity, "output_step": step, "conv_kernels": convs}
    return {"parity_int8_torch": parity, "parity_fake_quant": compare(fake_quant, runner, images),
            "output_step": step, "conv_kernels": convs}


def meta_from_checkpoint(payload: dict, precision: str, params: int) -> ModelMeta:
    """Metadata from a checkpoint's own preprocessing fields (the contract in edgekd.train.checkpoints.model_payload)."""
    spec = payload["model"]
    return ModelMeta(classes=list(payload["classes"]), image_size=int(payload["image_size"]),
                     mean=list(payload["mean"]), std=list(payload["std"]), arch=spec["arch"],
                     width=float(spec["width"]), stem=spec["stem"], precision=precision, params=params)


def require(ok: bool, path: str | Path, problem: str) -> None:
    """Fail the export loudly: a model that does not match torch must never reach `evaluate`."""
    if not ok:
        raise UserError(f"{path}: {problem}")
