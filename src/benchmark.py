"""`make bench`: the whole pipeline on the real rice sample as DVC experiments, then one report.

1. a forced full `dvc exp run` with the benchmark overrides (benchmarks/rice.yaml), stages timed;
2. incremental experiments (e.g. `-S student.width=0.5`): teachers must be skipped;
3. `dvc exp apply` of the main run, so the workspace holds the main-row models and metrics;
4. every model on the same test split, every ONNX file timed back to back in this one process,
   the seed framework's models included; reports/benchmark.{json,md} and the trade-off PNG.
DVC's run cache is cleared first so that every stage really runs and is timed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

import yaml

from src.edgekd import comparison
from src.edgekd.config import load_params
from src.edgekd.experiments import overrides_to_args, run_experiment
from src.edgekd.report import plot_tradeoff, render_markdown
from src.edgekd.runtime import run_stage


# The CPU features that decide whether INT8 convs beat FP32 ones (VNNI) and which kernels run.
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp")


def machine_info() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []

    def first(field: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in lines if line.split(":")[0].strip() == field), "")

    flags = set((first("flags") or first("Features")).split())
    packages = ["torch", "torchvision", "onnxruntime", "openvino", "onnx", "dvc"]
    return {"cpu": first("model name") or platform.processor() or platform.machine(),
            "simd": [f for f in SIMD_FLAGS if f in flags],
            "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "versions": {p: version(p) for p in packages}}


def code_commit(repo: Path) -> str:
    """The commit the benchmark ran on, marked `-dirty` when tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", ":!params.yaml", ":!dvc.lock",
                            ":!metrics", ":!plots", ":!dvclive"], cwd=repo).returncode != 0
    return head.stdout.strip() + ("-dirty" if dirty else "")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="benchmarks/rice.yaml")
    parser.add_argument("--out", default="reports", help="folder for benchmark.{md,json,png}")
    parser.add_argument("--render-only", action="store_true",
                        help="rebuild benchmark.md and the plot from an existing benchmark.json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.render_only:
        write_report(json.loads((out / "benchmark.json").read_text()), out)
        return
    start = time.perf_counter()
    repo = Path.cwd()
    commit = code_commit(repo)  # before the runs rewrite params.yaml, metrics and the lock
    cfg = yaml.safe_load(Path(args.config).read_text())
    command = f"make bench  (python -m src.benchmark --config {args.config} --out {args.out})"

    shutil.rmtree(repo / ".dvc" / "cache" / "runs", ignore_errors=True)
    base = overrides_to_args(cfg["overrides"])
    full = run_experiment(["-f", *base], repo)
    main_eval = read_json(repo / "metrics" / "evaluate.json")
    params = load_params()
    main_params_text = (repo / "params.yaml").read_text()
    variants = [comparison.variant_row(params.student, params.student_image_size, main_eval)]
    incremental = []
    for variant in cfg.get("variants", []):
        (repo / "params.yaml").write_text(main_params_text)  # each variant departs from the main run
        run = run_experiment(overrides_to_args(variant), repo)
        v_params = load_params()
        variants.append(comparison.variant_row(v_params.student, v_params.student_image_size,
                                                 read_json(repo / "metrics" / "evaluate.json")))
        incremental.append((variant, run))

    subprocess.run(["dvc", "exp", "apply", full.name], cwd=repo, check=True)
    if read_json(repo / "metrics" / "evaluate.json") != main_eval:
        raise RuntimeError("dvc exp apply did not restore the main run's metrics")

    params = load_params()
    main_rows, test_images, misses = comparison.main_rows(params, repo, main_eval, cfg["seed_models"])
    pipeline = comparison.pipeline_summary(full, incremental)
    results = {
        "command": command,
        "commit": commit,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "data_root": params.data.root,
        "test_images": test_images,
        "overrides": cfg["overrides"],
        "experiment": full.name,
        "main": main_rows,
        "misses": misses,
        "variants": variants,
        "pipeline": pipeline,
        "int8_export": read_json(repo / "metrics" / "export.json")["student_int8"],
        "notes": comparison.NOTES,
        "bench_wall_s": round(time.perf_counter() - start),
    }
    write_report(results, out)


def write_report(results: dict, out: Path) -> None:
    """Goals are (re)computed from the measured rows, so a re-render applies the current targets."""
    results["goals"] = comparison.goals(results, results["variants"][0]["width"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_tradeoff(results["variants"], out / "benchmark_tradeoff.png")
    (out / "benchmark.md").write_text(render_markdown(results))
    print(render_markdown(results))


if __name__ == "__main__":
    run_stage(main)
