"""How `prepare` scales with the image count: peak anonymous memory and time, into reports/scale.md.

    python -m tools.scale.run --work /tmp/edgekd-scale --out reports

Generates one demo tree of the largest count (250x250 grains, `edgekd.data.demo`, once, reused),
links smaller trees to its first images per class, and runs the `prepare` stage on each tree at
each image size under `tools.scale.memory.measure`. The real rice sample is measured too, as the
reference point. Every run writes into the work folder, never into the repository's pipeline.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from edgekd.data.demo import VARIETIES, generate
from edgekd.runtime import run_stage
from tools.machine import code_commit, machine_info
from tools.scale.memory import measure

log = logging.getLogger("edgekd")
REPO = Path(__file__).resolve().parents[2]
MB = 2**20


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


def prepare_run(work: Path, root: Path, image_size: int) -> dict:
    """One `prepare` stage run on `root` at `image_size`; its time, peak memory and data report."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(root=str(root), image_size=image_size, cache_limit_mb=10**6)
    params_path = work / f"params-{image_size}.yaml"
    params_path.write_text(yaml.safe_dump(params))
    out, metrics = work / "prepared", work / "data.json"
    cmd = [sys.executable, "-m", "stages.prepare", "--root", str(root), "--out", str(out),
           "--metrics", str(metrics), "--plots", str(work / "plots"), "--params", str(params_path)]
    run = measure(cmd, log_path=str(work / "prepare.log"), cwd=str(REPO))
    if run.returncode != 0:
        raise SystemExit(f"prepare failed on {root} (see {work / 'prepare.log'})")
    report = json.loads(metrics.read_text())
    cache = sum(f.stat().st_size for f in out.glob("*_images.npy"))
    for f in out.iterdir():
        f.unlink()
    return {"images": report["images"]["total"], "image_size": image_size, "seconds": round(run.seconds, 1),
            "images_per_s": round(report["images"]["total"] / run.seconds, 1),
            "peak_anon_mb": round(run.peak_anon_bytes / MB, 1), "cache_mb": round(cache / MB, 1),
            "near_pairs": report["duplicates"]["near_pairs"]}


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    lines = [
        "# Scale: `prepare` memory and time against the image count",
        "",
        f"Command: `{results['command']}` at commit `{results['commit']}`, on {m['cpu']} "
        f"({m['cores']} cores, {', '.join(m['simd']) or 'no AVX2'}).",
        "",
        "Peak anonymous memory is `RssAnon` summed over the stage's process and its decoding workers, "
        "sampled every 0.1 s: what the stage copied or computed. Pages of the memory-mapped splits "
        "are file cache and not in it. The decoded cache is the size of the split arrays on disk; "
        "the stage needs twice that free while it runs.",
        "",
        "| data | images | image size | time | images/s | peak anonymous memory | decoded cache |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        lines.append(f"| {r['data']} | {r['images']} | {r['image_size']} px | {r['seconds']:.0f} s | "
                     f"{r['images_per_s']:.0f} | {r['peak_anon_mb']:.0f} MB | {r['cache_mb']:.0f} MB |")
    (out / "scale.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, type=Path, help="scratch folder (trees, prepared data)")
    parser.add_argument("--out", default=REPO / "reports", type=Path)
    parser.add_argument("--counts", nargs="+", type=int, default=[5000, 20000, 75000])
    parser.add_argument("--image-sizes", nargs="+", type=int, default=[224, 64])
    parser.add_argument("--real", type=Path, help="a real ImageFolder tree to measure too (the rice sample)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    commit, runs = code_commit(REPO), []
    trees = [(f"demo {n}", demo_tree(args.work, n, max(args.counts))) for n in sorted(args.counts)]
    for name, root in ([("rice sample", args.real)] if args.real else []) + trees:
        for size in args.image_sizes:
            runs.append({"data": name, **prepare_run(args.work, root, size)})
            log.info("scale: %s at %d px: %s", name, size, json.dumps(runs[-1]))
    write_report({"command": "python -m tools.scale.run " + " ".join(sys.argv[1:]), "commit": commit,
                  "machine": machine_info(), "runs": runs}, args.out)


if __name__ == "__main__":
    run_stage(main)
