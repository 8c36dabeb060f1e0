"""What a measurement ran on: the CPU, its SIMD flags, core count, package versions and the commit.

INT8 speed depends on the CPU's integer dot-product instructions, so every benchmark records them
and compares models only as ratios measured in the same run.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path

# The CPU features that decide whether INT8 convs beat FP32 ones (VNNI) and which kernels run.
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp")


def machine_info() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []

    def first(field: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in lines if line.split(":")[0].strip() == field), "")

    flags = set((first("flags") or first("Features")).split())
    packages = ["torch", "torchvision", "onnxruntime", "openvino", "onnx", "dvc"]
    return {
        "cpu": first("model name") or platform.processor() or platform.machine(),
        "simd": [f for f in SIMD_FLAGS if f in flags],
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in packages},
    }


def code_commit(repo: Path) -> str:
    """The commit the benchmark ran on, marked `-dirty` when tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    dirty = (
        subprocess.run(
            [
                "git",
                "diff",
                "--quiet",
                "HEAD",
                "--",
                ".",
                ":!params.yaml",
                ":!dvc.lock",
                ":!metrics",
                ":!plots",
                ":!dvclive",
            ],
            cwd=repo,
        ).returncode
        != 0
    )
    return head.stdout.strip() + ("-dirty" if dirty else "")
