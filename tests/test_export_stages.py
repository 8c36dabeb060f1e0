"""Export and evaluation run one stage instance per model (dvc.yaml `foreach`): a variant whose export
fails costs that variant only, and the deployable file is still exported and measured."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from tiny_pipeline import set_params, sh

from edgekd.deploy.metadata import read_export_checks


def test_a_failing_variant_leaves_every_other_file_exported_and_measured(tiny_repo: Path):
    dvc_yaml = tiny_repo / "dvc.yaml"
    pipeline = yaml.safe_load(dvc_yaml.read_text())
    # A variant that cannot export: an FP32 checkpoint exported as a fake-quant one.
    pipeline["vars"][0]["onnx_models"]["broken"] = {
        "checkpoint": "models/student_fp32.pt",
        "file": "broken",
        "kind": "quantized",
    }
    dvc_yaml.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    set_params(tiny_repo, {"export": {"opset": 18}})  # every export reruns

    proc = sh("dvc", "repro", "--keep-going", cwd=tiny_repo, check=False)  # make repro

    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output  # the failure is not hidden
    assert "models/student_fp32.pt: not a QAT checkpoint of this project" in output
    ran = set(re.findall(r"Running stage '([^']+)'", output))
    assert {f"export@{name}" for name in ("fp32", "int8", "baseline", "broken")} <= ran
    assert "evaluate@broken" not in ran and not (tiny_repo / "models/broken.onnx").exists()
    assert (tiny_repo / "models/student_int8.onnx").is_file()
    assert read_export_checks(tiny_repo / "models/student_int8.onnx")["parity_int8_torch"]["images"] > 0
    status = sh("dvc", "status", "export@int8", "evaluate@int8", cwd=tiny_repo).stdout
    assert "up to date" in status, status
