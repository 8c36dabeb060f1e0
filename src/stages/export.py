"""Stage `export`: FP32 student, baseline and QAT student -> ONNX with metadata, parity-checked."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from src.edgekd.augment import normalize, resize_batch
from src.edgekd.bench import make_runner
from src.edgekd.ckpt import load_model
from src.edgekd.config import load_params
from src.edgekd.data import load_split
from src.edgekd.export import compare, conv_kernels, export_onnx, meta_from_checkpoint, require
from src.edgekd.models import build_model, count_params
from src.edgekd.quant import convert, load_qat_model
from src.edgekd.runtime import run_stage, seed_everything, select_device, write_metrics

log = logging.getLogger("edgekd")


def model_input(images, payload: dict):
    """Val images (N, 3, H, W) uint8 as the checkpoint's model sees them: its size, its normalisation."""
    return normalize(resize_batch(images, payload["image_size"]), payload["mean"], payload["std"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="prepared-data folder (val split for parity)")
    parser.add_argument("--fp32", nargs=2, action="append", required=True, metavar=("PT", "ONNX"),
                        help="FP32 checkpoint and ONNX file to write (repeatable)")
    parser.add_argument("--qat", nargs=2, required=True, metavar=("PT", "ONNX"))
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    p = load_params(args.params)
    seed_everything(p.seed)
    select_device("cpu", p.train.threads)
    images = load_split(args.data, "val")[0]
    metrics: dict = {}

    for pt, onnx_path in args.fp32:
        model, payload = load_model(pt)
        x = model_input(images, payload)
        export_onnx(model, onnx_path, meta_from_checkpoint(payload, "fp32", count_params(model)), p.export.opset)
        parity = compare(model, make_runner(onnx_path), x)
        require(parity["max_abs_diff"] <= p.export.parity_atol, onnx_path,
                f"max |logit| diff vs torch {parity['max_abs_diff']:.2e} > export.parity_atol={p.export.parity_atol}")
        metrics[Path(onnx_path).stem] = {"parity": parity, "size_bytes": Path(onnx_path).stat().st_size}

    qat, payload = load_qat_model(args.qat[0])
    onnx_path, int8 = args.qat[1], convert(qat)
    x = model_input(images, payload)
    spec = payload["model"]
    params = count_params(build_model(spec["arch"], int(spec["num_classes"]), float(spec["width"])))
    export_onnx(int8, onnx_path, meta_from_checkpoint(payload, "int8", params), p.export.opset)
    runner = make_runner(onnx_path)
    vs_fq, vs_int8, convs = compare(qat, runner, x), compare(int8, runner, x), conv_kernels(onnx_path)
    require(vs_fq["top1_agreement"] >= p.export.min_int8_agreement, onnx_path,
            f"top-1 agreement with the torch QAT model {vs_fq['top1_agreement']:.4f} < "
            f"export.min_int8_agreement={p.export.min_int8_agreement}")
    require(convs["float"] == 0, onnx_path, f"{convs['float']} Conv(s) still run in float in onnxruntime")
    metrics[Path(onnx_path).stem] = {"parity_fake_quant": vs_fq, "parity_int8_torch": vs_int8,
                                     "conv_kernels": convs, "size_bytes": Path(onnx_path).stat().st_size}
    write_metrics(args.metrics, metrics)
    log.info("export: %s", json.dumps(metrics))


if __name__ == "__main__":
    run_stage(main)
