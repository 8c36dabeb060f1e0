"""Stage `export@<model>`: one checkpoint -> one ONNX file with metadata, gated against its torch model
on val (edgekd.deploy.gates: check_fp32_export, check_int8_export). The figures of the checks it
passed are written into the file itself (metadata `export_checks`, edgekd.deploy.metadata).

One model per stage instance (dvc.yaml's `foreach`), so a study variant that fails its gate costs
that variant only, and a change to one recipe reruns only its export. Mixed-precision models keep
their 4-bit weights as INT4 and their 16-bit outputs as UINT16, at the opset those types need
(`file_opset`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from edgekd.config import load_params
from edgekd.data.batches import ModelInputs, load_split
from edgekd.deploy.export import export_onnx
from edgekd.deploy.gates import check_fp32_export, check_int8_export, compare
from edgekd.deploy.metadata import attach_export_checks, meta_from_checkpoint
from edgekd.deploy.onnx_rewrite import file_opset, store_int4_weights, store_int16_activations
from edgekd.deploy.sessions import make_runner
from edgekd.runtime import run_stage
from edgekd.train.checkpoints import load_model
from edgekd.train.device import select_device
from edgekd.train.models import count_params, model_from_spec
from edgekd.train.quant import convert_for_export, load_qat_model

log = logging.getLogger("edgekd")


def model_input(images, payload: dict) -> ModelInputs:
    """Images (N, 3, H, W) uint8 as the checkpoint's model sees them: its size, its normalisation."""
    return ModelInputs(images, payload["image_size"], payload["mean"], payload["std"])


def export_fp32(checkpoint: str, onnx_path: Path, val, cfg) -> dict:
    model, payload = load_model(checkpoint)
    opset = file_opset(cfg.opset, wide_types=False)
    export_onnx(model, onnx_path, meta_from_checkpoint(payload, "fp32", count_params(model)), opset)
    return {"parity": check_fp32_export(model, onnx_path, model_input(val, payload), cfg.fp32), "opset": opset}


def export_quantized(checkpoint: str, onnx_path: Path, val, test, cfg) -> dict:
    fake_quant, payload = load_qat_model(checkpoint)
    integer, grids = convert_for_export(fake_quant)  # grids: the layers with 16-bit outputs
    params = count_params(model_from_spec(payload["model"]))
    four = [layer for layer, bits in payload.get("weight_bits", {}).items() if bits == 4]
    precision = "int8" + ("+int4" if four else "") + ("+a16" if grids else "")  # mixed: where allocated
    opset = file_opset(cfg.opset, wide_types=bool(four or grids))
    export_onnx(integer, onnx_path, meta_from_checkpoint(payload, precision, params), opset)
    int4 = [integer.get_submodule(layer).weight().int_repr().numpy() for layer in four]
    if int4:
        store_int4_weights(onnx_path, int4)
    if grids:
        store_int16_activations(onnx_path, grids)
    # The integer torch model is the reference, unless 16-bit outputs leave only the fake-quant one.
    reference = fake_quant if grids else integer
    checks = check_int8_export(
        None if grids else integer, fake_quant, onnx_path, model_input(val, payload), cfg.quantized
    )
    checks.update(int4_layers=len(int4), int16_activation_layers=len(grids), opset=opset)
    # Reported only, never gated or tuned on: the same comparison on the test split.
    checks["parity_fake_quant_test" if grids else "parity_int8_torch_test"] = compare(
        reference, make_runner(onnx_path), model_input(test, payload)
    )
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="prepared-data folder (val split gates, test split reported)")
    parser.add_argument("--checkpoint", required=True, help="FP32 checkpoint, or fake-quant checkpoint (qat, ptq)")
    parser.add_argument(
        "--kind",
        choices=("fp32", "quantized"),
        required=True,
        help="fp32: a float model; quantized: a fake-quant checkpoint, exported as integers",
    )
    parser.add_argument("--out", required=True, help="ONNX file to write")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    p = load_params(args.params)
    select_device("cpu", p.train.threads)
    val, onnx_path = load_split(args.data, "val")[0], Path(args.out)
    if args.kind == "quantized":
        checks = export_quantized(args.checkpoint, onnx_path, val, load_split(args.data, "test")[0], p.export)
    else:
        checks = export_fp32(args.checkpoint, onnx_path, val, p.export)
    attach_export_checks(onnx_path, checks)
    log.info("export %s (%d B): %s", onnx_path, onnx_path.stat().st_size, json.dumps(checks))


if __name__ == "__main__":
    run_stage(main)
