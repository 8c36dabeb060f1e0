"""How the pipeline scales with the image count: peak anonymous memory and time, into reports/scale.md.

    python -m tools.scale.run --work /tmp/edgekd-scale --out reports --real ../shared/datasets/rice-image

Generates one demo tree of the largest count (250x250 grains, `edgekd.data.demo`, once, reused),
links smaller trees to its first images per class, and runs the `prepare` stage on each tree at
each image size under `tools.scale.memory.measure`. The real rice sample is measured too, as the
reference point, with the training speed from its memory-mapped splits against the same splits
read into RAM (`tools.scale.throughput`). On the `--pipeline-counts` trees every stage of dvc.yaml
runs, in order, with the commands DVC resolves for it, on short training (PIPELINE_PARAMS): the
stages' peak memory against the image count. Every run writes into the work folder, never into
the repository's pipeline.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from dvc.repo import Repo

from edgekd.config import load_params
from edgekd.data.demo import VARIETIES, generate
from edgekd.runtime import run_stage
from tools.machine import code_commit, machine_info
from tools.scale.memory import measure
from tools.scale.report import write_report
from tools.scale.throughput import memory_mapped_vs_in_ram

log = logging.getLogger("edgekd")
REPO = Path(__file__).resolve().parents[2]
MB = 2**20
# Short training for the whole-pipeline runs: what is measured is each stage's memory against the
# image count, so every epoch is a fixed 20 batches (train.max_steps_per_epoch) and every
# whole-split pass (validation, soft targets on one view, calibration, export checks, evaluation)
# runs on the full split. Models of 20 steps have near-tied logits, which flip top-1 between the
# two integer engines: the export gates are set not to stop the run (they are measured, not tested).
PIPELINE_PARAMS = {
    "teachers": {"epochs": 1},
    "student": {"epochs": 1},
    "kd": {"views": 1},
    "qat": {"epochs": 2, "freeze_bn_epoch": 1, "freeze_observer_epoch": 1},
    "train": {"max_steps_per_epoch": 20},
    "export": {"quantized": {"max_logit_steps": 10**6, "min_agreement": 0.0}},
}


def demo_tree(work: Path, images: int, largest: int) -> Path:
    """A tree of `images` demo grains: the largest one generated once, smaller ones as links to
    its first images per class (the same files, so only the count differs between runs)."""
    per_class, full = images // len(VARIETIES), work / f"tree-{largest}"
    if not (full / "done").exists():
        generate(full, per_class=largest // len(VARIETIES), workers=len(os.sched_getaffinity(0)))
        (full / "done").touch()
    if images == largest:
        return full
    tree = work / f"tree-{images}"
    for variety in VARIETIES:
        (tree / variety.name).mkdir(parents=True, exist_ok=True)
        for i in range(1, per_class + 1):
            link = tree / variety.name / f"{variety.name} ({i}).png"
            if not link.exists():
                link.symlink_to(full / variety.name / link.name)
    return tree


def scale_params(root: Path, image_size: int, **sections: dict) -> dict:
    """The repository's params with the data at `root`, `image_size` and no cache limit, and
    `sections` merged over their sections."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(root=str(root), image_size=image_size, cache_limit_mb=10**6)
    for name, values in sections.items():
        params[name].update(values)
    return params


def measured_stage(cmd: list[str], log_path: Path, cwd: Path) -> tuple[float, float]:
    """Run one stage command under `measure`: its seconds and peak anonymous memory in MB."""
    run = measure(cmd, log_path=str(log_path), cwd=str(cwd))
    if run.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed (see {log_path})")
    return round(run.seconds, 1), round(run.peak_anon_bytes / MB, 1)


def prepare_run(work: Path, root: Path, image_size: int, keep: bool = False) -> dict:
    """One `prepare` stage run on `root` at `image_size` into work/prepared (emptied afterwards
    unless `keep`); its time, peak memory and data report."""
    params_path = work / f"params-{image_size}.yaml"
    params_path.write_text(yaml.safe_dump(scale_params(root, image_size)))
    out, metrics = work / "prepared", work / "data.json"
    cmd = [
        sys.executable,
        "-m",
        "stages.prepare",
        "--root",
        str(root),
        "--out",
        str(out),
        "--metrics",
        str(metrics),
        "--plots",
        str(work / "plots"),
        "--params",
        str(params_path),
    ]
    seconds, peak_mb = measured_stage(cmd, work / "prepare.log", REPO)
    report = json.loads(metrics.read_text())
    cache = sum(f.stat().st_size for f in out.glob("*_images.npy"))
    if not keep:
        shutil.rmtree(out)
    return {
        "images": report["images"]["total"],
        "image_size": image_size,
        "seconds": seconds,
        "images_per_s": round(report["images"]["total"] / seconds, 1),
        "peak_anon_mb": peak_mb,
        "cache_mb": round(cache / MB, 1),
        "near_pairs": report["duplicates"]["near_pairs"],
    }


def pipeline_run(work: Path, root: Path, image_size: int) -> list[dict]:
    """Every stage of dvc.yaml on `root`, in pipeline order, in a scratch workspace with its own
    params (PIPELINE_PARAMS) and the commands DVC resolves from them: each stage's time and peak memory."""
    space = work / f"pipeline-{root.name}"
    shutil.rmtree(space, ignore_errors=True)
    space.mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", space / "dvc.yaml")
    (space / "weights").symlink_to(REPO / "weights")
    (space / "params.yaml").write_text(yaml.safe_dump(scale_params(root, image_size, **PIPELINE_PARAMS)))
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=space, check=True)
    stages = [stage for stage in Repo(str(space)).index.stages if stage.cmd]  # dvc.yaml order: upstream first
    runs = []
    for stage in stages:
        seconds, peak_mb = measured_stage(shlex.split(stage.cmd), space / f"{stage.name}.log", space)
        runs.append({"stage": stage.name, "seconds": seconds, "peak_anon_mb": peak_mb})
        log.info("scale: %s on %s: %.0f s, %.0f MB", stage.name, root.name, seconds, peak_mb)
    shutil.rmtree(space)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, type=Path, help="scratch folder (trees, prepared data)")
    parser.add_argument("--out", default=REPO / "reports", type=Path)
    parser.add_argument("--counts", nargs="+", type=int, default=[5000, 20000, 75000])
    parser.add_argument("--image-sizes", nargs="+", type=int, default=[224, 64])
    parser.add_argument(
        "--pipeline-counts",
        nargs="*",
        type=int,
        default=[5000, 75000],
        help="tree sizes (among --counts) on which every stage runs",
    )
    parser.add_argument("--real", type=Path, help="a real ImageFolder tree to measure too (the rice sample)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    params, commit, runs, throughput = load_params(REPO / "params.yaml"), code_commit(REPO), [], {}
    trees = [(f"demo {n}", demo_tree(args.work, n, max(args.counts))) for n in sorted(args.counts)]
    for name, root in ([("rice sample", args.real)] if args.real else []) + trees:
        for size in args.image_sizes:
            keep = name == "rice sample" and size == params.data.image_size
            runs.append({"data": name, **prepare_run(args.work, root, size, keep)})
            log.info("scale: %s at %d px: %s", name, size, json.dumps(runs[-1]))
            if keep:  # the training speed on the real sample, from its prepared splits
                models = {
                    f"student ({params.student.arch}, width {params.student.width})": (
                        params.student.arch,
                        params.student.width,
                        40,
                    ),
                    "teacher resnet18": ("resnet18", 1.0, 10),
                }
                throughput = {
                    "data": name,
                    "image_size": size,
                    "threads": params.train.threads,
                    "batch_size": params.train.batch_size,
                    "models": memory_mapped_vs_in_ram(args.work / "prepared", params, models),
                }
                log.info("scale: training speed %s", json.dumps(throughput))
                shutil.rmtree(args.work / "prepared")
    pipelines = {
        f"demo {n}": pipeline_run(args.work, demo_tree(args.work, n, max(args.counts)), params.data.image_size)
        for n in sorted(args.pipeline_counts)
    }
    current = {
        "command": "python -m tools.scale.run " + " ".join(sys.argv[1:]),
        "commit": commit,
        "machine": machine_info(),
        "runs": runs,
        "pipelines": pipelines,
        "pipeline_image_size": params.data.image_size,
        "pipeline_params": PIPELINE_PARAMS,
        "throughput": throughput,
    }
    write_report([current], args.out)


if __name__ == "__main__":
    run_stage(main)
