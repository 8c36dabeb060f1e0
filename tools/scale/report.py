"""reports/scale.md from one or several scale measurements (`tools.scale.run`'s scale.json files).

    python -m tools.scale.report /tmp/scale-a/scale.json /tmp/scale-b/scale.json --out reports

A larger pipeline measured later joins the earlier measurements in one report, each row marked
with the command that measured it. Stage tables compare only when measured with the same params.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgekd.runtime import run_stage

# What tools.scale.run records for one measurement, and write_report reads.
MEASUREMENT_KEYS = {
    "command",
    "commit",
    "machine",
    "runs",
    "pipelines",
    "pipeline_image_size",
    "pipeline_params",
    "throughput",
}


def read_measurements(files: list[Path]) -> list[dict]:
    """Every measurement in `files`, in order; a scale.json holds a list of them or one. Stage
    tables from other params, image sizes or stages are refused: their columns would not compare;
    so is a data set staged twice, whose one column would hide the other measurement."""
    measurements = []
    for path in files:
        try:
            data = json.loads(path.read_text())
            found = data["measurements"] if "measurements" in data else [data]
        except (OSError, ValueError, TypeError) as err:
            raise SystemExit(f"{path}: not a scale.json written by tools.scale.run ({err})") from None
        if not all(isinstance(m, dict) and MEASUREMENT_KEYS <= m.keys() for m in found):
            raise SystemExit(
                f"{path}: not a scale.json written by tools.scale.run (it lacks one of "
                f"{', '.join(sorted(MEASUREMENT_KEYS))})"
            )
        measurements += found
    staged = [
        (m["pipeline_params"], m["pipeline_image_size"], [s["stage"] for s in stages])
        for m in measurements
        for stages in m["pipelines"].values()
    ]
    if any(s != staged[0] for s in staged):
        raise SystemExit(
            f"{', '.join(map(str, files))}: stage tables measured with different pipeline params, image sizes or stages"
        )
    names = [name for m in measurements for name in m["pipelines"]]
    if len(set(names)) < len(names):
        raise SystemExit(
            f"{', '.join(map(str, files))}: a data set's stages measured twice "
            f"({', '.join(sorted({n for n in names if names.count(n) > 1}))}); join one of them"
        )
    return measurements


def write_report(measurements: list[dict], out: Path, joined_by: str | None = None) -> None:
    """scale.json (every measurement as measured) and scale.md: the prepare runs, every stage
    against the image count, and the training speed from the mapped splits."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps({"measurements": measurements}, indent=2) + "\n")
    several = len(measurements) > 1
    lines = ["# Scale: memory and time against the image count", ""]
    for i, m in enumerate(measurements, 1):
        machine = m["machine"]
        lines.append(
            f"{f'{i}. ' if several else ''}Command: `{m['command']}` at commit `{m['commit']}`, "
            f"on {machine['cpu']} ({machine['cores']} cores, {', '.join(machine['simd']) or 'no AVX2'})."
        )
    if joined_by:
        lines += ["", f"Joined into this report by `{joined_by}`."]
    lines += [
        "",
        "Peak anonymous memory is `RssAnon` summed over a stage's process and every process it starts "
        "(decoding workers), sampled every 0.1 s: what the stage copied or computed. Pages of the "
        "memory-mapped splits are file cache and not in it. The demo trees are the demo generator's "
        "250x250 grains; the smaller trees are the first images per class of the largest.",
        "",
        "## `prepare`",
        "",
        "The decoded cache is the size of the split arrays on disk; the stage needs twice that free while it runs.",
        "",
        "| data | images | image size | time | images/s | peak anonymous memory | decoded cache |"
        + (" command |" if several else ""),
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if several else ""),
    ]
    for i, m in enumerate(measurements, 1):
        for r in m["runs"]:
            lines.append(
                f"| {r['data']} | {r['images']} | {r['image_size']} px | {r['seconds']:.0f} s | "
                f"{r['images_per_s']:.0f} | {r['peak_anon_mb']:.0f} MB | {r['cache_mb']:.0f} MB |"
                + (f" {i} |" if several else "")
            )
    pipelines = {name: stages for m in measurements for name, stages in m["pipelines"].items()}
    if pipelines:
        staged = next(m for m in measurements if m["pipelines"])
        names = list(pipelines)
        by_stage = {n: {s["stage"]: s for s in stages} for n, stages in pipelines.items()}
        lines += [
            "",
            f"## Every stage, at {staged['pipeline_image_size']} px",
            "",
            "Each stage's dvc.yaml command, as DVC resolves it, in a scratch workspace with these params "
            f"over params.yaml: `{json.dumps(staged['pipeline_params'])}`. Epochs are short (a fixed "
            "number of batches); every whole-split pass (validation, the teachers on one view of the "
            "train split, calibration, export checks, evaluation) runs on the full split. The peak ratio "
            f"is {names[-1]}'s peak over {names[0]}'s.",
            "",
            "| stage | " + " | ".join(f"{n}: time | {n}: peak memory" for n in names) + " | peak ratio |",
            "|---|" + "---:|---:|" * len(names) + "---:|",
        ]
        for stage in by_stage[names[0]]:
            cells = [by_stage[n][stage] for n in names]
            ratio = cells[-1]["peak_anon_mb"] / cells[0]["peak_anon_mb"]
            lines.append(
                f"| {stage} | "
                + " | ".join(f"{c['seconds']:.0f} s | {c['peak_anon_mb']:.0f} MB" for c in cells)
                + f" | {ratio:.2f} |"
            )
    for speed in (m["throughput"] for m in measurements if m["throughput"]):
        lines += [
            "",
            "## Training from memory-mapped splits",
            "",
            f"Training steps on {speed['data']} at {speed['image_size']} px, train.threads="
            f"{speed['threads']}, batch {speed['batch_size']}, from the mapped train split and from an "
            "in-RAM copy of it: median images/s over alternating rounds (`tools.scale.throughput`).",
            "",
            "| model | steps x rounds | memory-mapped | in RAM | ratio |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, r in speed["models"].items():
            lines.append(
                f"| {name} | {r['steps']} x {r['rounds']} | {r['memory_mapped']:.0f} img/s | "
                f"{r['in_ram']:.0f} img/s | {r['ratio']:.3f} |"
            )
    (out / "scale.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="scale.json files, earliest first")
    parser.add_argument("--out", required=True, type=Path, help="folder for scale.md and the merged scale.json")
    args = parser.parse_args()
    write_report(read_measurements(args.files), args.out, "python -m tools.scale.report " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    run_stage(main)
