"""Size, integer-kernel count and batch-1 latency of every student variant, FP32 vs INT8, ORT vs OpenVINO.

Latency and size do not depend on trained weights, so the models are freshly initialised and the
INT8 ranges calibrated on noise; accuracy of the variants comes from pipeline runs (see the report).
Usage: python -m tools.studies.int8_variants [--sizes 64 224] [--width 0.25] [--out reports/int8_variants.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgekd.config import STUDENT_ARCHS, convnet_shape
from edgekd.deploy.export import export_onnx
from edgekd.deploy.gates import conv_kernels
from edgekd.deploy.metadata import ModelMeta
from edgekd.deploy.sessions import make_runner
from edgekd.eval.latency import measure_latency
from edgekd.train.models import build_model
from edgekd.train.quant import convert, prepare_qat


def export_fp32_int8(model: nn.Module, meta: ModelMeta, tmp: Path) -> tuple[Path, Path]:
    """FP32 and INT8 ONNX files of `model` exported as the pipeline does, INT8 ranges calibrated on noise."""
    torch.manual_seed(0)
    model.eval()
    size = meta.image_size
    qat = prepare_qat(model, size)
    with torch.no_grad():
        for _ in range(4):  # calibrate ranges: (16, 3, H, W) noise
            qat(torch.randn(16, 3, size, size))
    stem = f"{meta.arch}_{size}"
    return (
        export_onnx(model, tmp / f"{stem}_fp32.onnx", meta, opset=17),
        export_onnx(convert(qat), tmp / f"{stem}_int8.onnx", meta, opset=17),
    )


def variant_row(arch: str, width: float, size: int, tmp: Path, warmup: int, runs: int) -> dict:
    torch.manual_seed(0)
    stem = "small" if convnet_shape(arch) else "imagenet"  # a convnet has one stem, its whitening conv
    meta = ModelMeta(
        classes=list("abcde"), image_size=size, mean=[0.5] * 3, std=[0.25] * 3, arch=arch, width=width, stem=stem
    )
    fp32, int8 = export_fp32_int8(build_model(arch, 5, width, stem=stem), meta, tmp)
    x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    row = {
        "arch": arch,
        "width": width,
        "image_size": size,
        "fp32_bytes": fp32.stat().st_size,
        "int8_bytes": int8.stat().st_size,
        "int8_convs": conv_kernels(int8),
    }
    for runtime in ("onnxruntime", "openvino"):
        for name, path in (("fp32", fp32), ("int8", int8)):
            lat = measure_latency(make_runner(path, runtime, threads=1), x, warmup, runs)
            row[f"{runtime}_{name}_p50_ms"] = round(lat.p50_ms, 4)
            row[f"{runtime}_{name}_p90_ms"] = round(lat.p90_ms, 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--archs", nargs="+", default=list(STUDENT_ARCHS))
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("reports/int8_variants.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for arch in args.archs:
                rows.append(variant_row(arch, args.width, size, Path(tmp), args.warmup, args.runs))
                print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": platform.processor() or platform.machine(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
