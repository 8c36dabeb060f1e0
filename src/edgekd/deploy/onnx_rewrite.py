"""Rewrites of an exported ONNX file for the types the torch exporter cannot write: INT4 weights and
UINT16 activations (opset 21 and later), and the opset each file is written at. onnx and numpy only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from edgekd.errors import require

WIDE_TYPES_OPSET = 21  # the first opset with INT4 and UINT16 QuantizeLinear/DequantizeLinear


def file_opset(requested: int, wide_types: bool) -> int:
    """The opset a file is exported at: `export.opset`, raised to 21 for a file that stores INT4
    weights or UINT16 activations (those types do not exist before it). The one place that decides."""
    return max(requested, WIDE_TYPES_OPSET) if wide_types else requested


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
        matches = [
            i
            for i in graph.initializer
            if i.data_type == onnx.TensorProto.INT8
            and tuple(i.dims) == weights.shape
            and np.array_equal(onnx.numpy_helper.to_array(i), weights)
        ]
        require(
            len(matches) == 1,
            path,
            f"{len(matches)} INT8 initializers match a 4-bit layer of shape {weights.shape}; expected exactly one",
        )
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
        marked = [
            n
            for n in graph.node
            if n.op_type == "QuantizeLinear"
            and values[n.input[1]].size == 1
            and np.float32(values[n.input[1]]) == np.float32(placeholder)
        ]
        require(bool(marked), path, f"no QuantizeLinear carries the placeholder scale of {layer}")
        scale_name, zp_name = f"a16_{i}_scale", f"a16_{i}_zero_point"
        values[scale_name], values[zp_name] = np.array(scale, dtype=np.float32), np.array(zero_point, dtype=np.uint16)
        graph.initializer.extend(onnx.numpy_helper.from_array(values[n], n) for n in (scale_name, zp_name))
        for quantize in marked:
            readers = [n for n in graph.node if quantize.output[0] in n.input]
            require(
                all(n.op_type == "DequantizeLinear" for n in readers),
                path,
                f"the output of {layer} is read by {sorted({n.op_type for n in readers})}, not only DequantizeLinear",
            )
            for node in (quantize, *readers):
                node.input[1], node.input[2] = scale_name, zp_name
    _save_rewritten(model, path)
    return len(grids)


def _load_at_wide_opset(path: Path) -> onnx.ModelProto:
    """An exported file about to get INT4 or UINT16 tensors. It must already be at an opset that has
    those types (`file_opset`): raising the number alone would claim a conversion that never ran."""
    model = onnx.load(str(path))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    require(
        opset >= WIDE_TYPES_OPSET,
        path,
        f"opset {opset} has no INT4/UINT16 Quantize/DequantizeLinear; "
        f"export it at file_opset(export.opset, wide_types=True) = {WIDE_TYPES_OPSET} or later",
    )
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
