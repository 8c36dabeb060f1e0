"""Per-layer batch-1 cost of each conv kind in onnxruntime, FP32 vs INT8: what a fast INT8 student is made of.

Each kind is measured as a stack of 1 and of 9 identical conv+BN+ReLU layers behind a 3->C 1x1
adapter, exported exactly as the pipeline exports students (FX QAT -> convert -> QDQ ONNX); the
per-layer cost is the difference divided by 8, so the input/output quantize and adapter cancel out.
Usage: python -m tools.studies.int8_layers [--out reports/int8_layers.json]  (also writes the .md next to it)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

from edgekd.deploy.metadata import ModelMeta
from edgekd.deploy.sessions import make_runner
from edgekd.eval.latency import measure_latency
from tools.studies.int8_variants import export_fp32_int8
from tools.studies.report_files import write_report

# (channels, spatial size): the shapes a 64 px MobileNetV3-Small passes through at width 0.25-0.5
SHAPES = ((16, 32), (32, 16), (64, 8), (128, 4))
KINDS = {
    "depthwise 3x3": lambda c: c,
    "grouped 3x3 (8 ch/group)": lambda c: c // 8,
    "dense 3x3": lambda c: 1,
    "pointwise 1x1": None,
}


def stack(channels: int, kind: str, depth: int) -> nn.Module:
    groups = KINDS[kind]
    layers = [Conv2dNormActivation(3, channels, 1, activation_layer=nn.ReLU)]
    for _ in range(depth):
        kernel, g = (1, 1) if groups is None else (3, groups(channels))
        layers.append(Conv2dNormActivation(channels, channels, kernel, groups=g, activation_layer=nn.ReLU))
    return nn.Sequential(*layers)


def p50_ms(model: nn.Module, size: int, tmp: Path, warmup: int, runs: int) -> tuple[float, float]:
    """p50 of the FP32 and INT8 exports of `model` (best of 3 repeats against scheduler noise)."""
    meta = ModelMeta(classes=["a"], image_size=size, mean=[0.5] * 3, std=[0.25] * 3)
    x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    paths = export_fp32_int8(model, meta, tmp)
    return tuple(min(measure_latency(make_runner(p), x, warmup, runs).p50_ms for _ in range(3)) for p in paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("reports/int8_layers.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for channels, size in SHAPES:
            for kind in KINDS:
                one = p50_ms(stack(channels, kind, 1), size, Path(tmp), args.warmup, args.runs)
                nine = p50_ms(stack(channels, kind, 9), size, Path(tmp), args.warmup, args.runs)
                fp32_us, int8_us = ((b - a) / 8 * 1000 for a, b in zip(one, nine))
                rows.append(
                    {
                        "kind": kind,
                        "channels": channels,
                        "size": size,
                        "fp32_us": round(fp32_us, 2),
                        "int8_us": round(int8_us, 2),
                        "int8_over_fp32": round(int8_us / fp32_us, 2),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    write_report(args.out, {"rows": rows}, markdown(rows, args))


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# Per-layer cost of conv kinds in onnxruntime, FP32 vs INT8",
        "",
        f"Made by `python -m tools.studies.int8_layers --out {args.out}` on {platform.machine()}, "
        f"onnxruntime {ort.__version__}, 1 thread, ORT_ENABLE_ALL, batch 1, p50 of {args.runs} runs "
        "(best of 3). Per layer = (stack of 9 - stack of 1) / 8, so the input quantize, the "
        "adapter conv and the output dequantize cancel out. INT8: the pipeline's export (U8 "
        "activations, S8 per-channel weights, QDQ, every conv a QLinearConv).",
        "",
        "| kind | channels | px | FP32 us/layer | INT8 us/layer | INT8 / FP32 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['kind']} | {r['channels']} | {r['size']} | {r['fp32_us']:.2f} | {r['int8_us']:.2f} | "
        f"{r['int8_over_fp32']:.2f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
