"""How far a good quantized file and a broken one are from their reference: the figures the export
gates (`export.quantized.max_logit_steps`, `export.quantized.min_agreement`) are sized from.

For every quantized file of a reproduced workspace (the `onnx_models` of kind `quantized` of dvc.yaml
and studies/dvc.yaml), on every split (train, val, test: more images than the gate's val alone):
- the file against its reference (the converted integer torch model; the fake-quant model for a file
  with 16-bit activations): max |logit| difference in output steps and top-1 agreement;
- the known broken kind that keeps top-1 answers: the same weights with the activation ranges
  recalibrated on val (other integers), against the file.
Usage: python -m tools.studies.export_gates [--repo .] [--out reports/export_gates.json] (also writes the .md)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from edgekd.config import as_dict, load_params
from edgekd.data.batches import ModelInputs, load_split
from edgekd.data.prepared import SPLITS
from edgekd.deploy.gates import compare, output_step
from edgekd.deploy.sessions import make_runner
from edgekd.runtime import run_stage
from edgekd.train.device import select_device
from edgekd.train.quant import calibrate, convert, load_qat_model, wide_outputs
from tools.machine import code_commit, machine_info
from tools.studies.report_files import write_report

REPO = Path(__file__).resolve().parents[2]


def quantized_files(repo: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (fake-quant checkpoint, ONNX file), as the export stages of both pipeline files pair them."""
    models = {
        name: m
        for path in ("dvc.yaml", "studies/dvc.yaml")
        for name, m in yaml.safe_load((repo / path).read_text())["vars"][0]["onnx_models"].items()
    }
    return {
        name: (repo / m["checkpoint"], repo / "models" / f"{m['file']}.onnx")
        for name, m in models.items()
        if m["kind"] == "quantized"
    }


def distance(reference, path: Path, images: ModelInputs, step: float) -> dict:
    parity = compare(reference, make_runner(path), images)
    return {
        "images": parity["images"],
        "max_steps": round(parity["max_abs_diff"] / step, 2),
        "agreement": round(parity["top1_agreement"], 4),
    }


def measure_file(checkpoint: Path, path: Path, splits: dict) -> dict:
    fake_quant, payload = load_qat_model(checkpoint)
    wide = bool(wide_outputs(fake_quant))  # 16-bit outputs: no integer torch reference
    reference = fake_quant if wide else convert(fake_quant)
    step = output_step(path)

    def inputs(images):
        return ModelInputs(images, payload["image_size"], payload["mean"], payload["std"])

    # The broken kind: the same weights, ranges recalibrated on val (BN, weights untouched).
    recalibrated = calibrate(load_qat_model(checkpoint)[0], inputs(splits["val"]))
    broken = recalibrated if wide else convert(recalibrated)
    return {
        "reference": "fake-quant" if wide else "integer torch",
        "output_step": step,
        "good": {s: distance(reference, path, inputs(x), step) for s, x in splits.items()},
        "ranges_recalibrated_on_val": {s: distance(broken, path, inputs(x), step) for s, x in splits.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="a reproduced workspace (prepared/, models/)")
    parser.add_argument("--out", type=Path, default=REPO / "reports/export_gates.json")
    args = parser.parse_args()
    params = load_params(args.repo / "params.yaml")
    select_device("cpu", params.train.threads)
    splits = {s: load_split(args.repo / "prepared", s)[0] for s in SPLITS}
    files = {}
    for name, (checkpoint, path) in quantized_files(args.repo).items():
        files[name] = measure_file(checkpoint, path, splits)
        print(name, json.dumps(files[name]), flush=True)
    report = {
        "command": "python -m tools.studies.export_gates " + " ".join(sys.argv[1:]),
        "commit": code_commit(REPO),
        "machine": machine_info(),
        "data_root": params.data.root,
        "gates": as_dict(params.export.quantized),
        "files": files,
    }
    write_report(args.out, report, markdown(report))


def markdown(report: dict) -> str:
    m, g = report["machine"], report["gates"]
    lines = [
        "# Export gates: good and broken files against their reference",
        "",
        f"Command: `{report['command']}` at commit `{report['commit']}`, on {m['cpu']} "
        f"({m['cores']} cores; {', '.join(m['simd'])}), data `{report['data_root']}`.",
        "",
        f"Gates: max |logit| difference <= {g['max_logit_steps']} output steps, top-1 agreement >= "
        f"{g['min_agreement']} (on val). Broken: the same weights with the ranges recalibrated on val.",
        "",
        "| file | reference | file vs | split | images | max steps | agreement |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for name, f in report["files"].items():
        for kind, label in (("good", "reference"), ("ranges_recalibrated_on_val", "broken")):
            for split, d in f[kind].items():
                lines.append(
                    f"| {name} | {f['reference']} | {label} | {split} | {d['images']} | "
                    f"{d['max_steps']:.1f} | {d['agreement']:.4f} |"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_stage(main)
