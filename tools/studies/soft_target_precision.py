"""Whether storing the teachers' logits as float16 changes what the student learns.

Computes the soft targets of trained teachers in float32 (the `soft_targets` stage's computation,
before it rounds them for storage), then trains the `distill` recipe once per seed on the float32
logits and once on the same logits rounded as stored, and reports val accuracy of both, their
per-seed difference, and the seed-to-seed spread it is to be compared with. Val only.
Usage: python -m tools.studies.soft_target_precision --root data/rice-demo --teachers models/teachers
       --seeds 42 1 2 [--config tools/benchmark/rice.yaml] [--out reports/soft_target_precision.json]
       (also writes the .md; the teachers must have been trained on the same prepared data)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from edgekd.config import params_from_dict
from edgekd.data.batches import load_split
from edgekd.data.prepare import prepare_dataset
from edgekd.data.prepared import load_info
from edgekd.runtime import run_stage
from edgekd.train.checkpoints import load_teachers
from edgekd.train.device import select_device
from edgekd.train.losses import prepare_teachers
from edgekd.train.soft_targets import STORED_DTYPE, combine_teachers, compute_soft_targets, stored
from tools.machine import code_commit, machine_info
from tools.studies.report_files import write_report
from tools.studies.student_seeds import run_seed, with_overrides

REPO = Path(__file__).resolve().parents[2]


def spread(values: list[float]) -> dict:
    return {
        "mean": round(statistics.mean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="ImageFolder tree (data.root)")
    parser.add_argument("--teachers", type=Path, required=True, help="folder with <arch>.pt per teachers.archs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--config", type=Path, help="benchmark config whose `overrides` apply on top of --params")
    parser.add_argument("--out", type=Path, default=REPO / "reports/soft_target_precision.json")
    args = parser.parse_args()
    raw = with_overrides(args.params, args.config, args.root)
    params = params_from_dict(raw)
    device = select_device(params.train.device, params.train.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        prepare_dataset(params.data.root, data, params.data, params.seed)
        info, (images, labels) = load_info(data), load_split(data, "train")
        val_images = len(load_split(data, "val")[1])
        teachers = prepare_teachers(
            [m.to(device) for m in load_teachers(args.teachers, params.teachers.archs, info)[0]]
        )
        exact = compute_soft_targets(teachers, images, params, info, device)
        per_precision = {
            "float32": exact["teacher_logits"],
            str(STORED_DTYPE).split(".")[-1]: stored(exact)["teacher_logits"].float(),
        }
        for seed in args.seeds:
            row = {"seed": seed}
            for precision, logits in per_precision.items():
                targets = {**exact, "logits": combine_teachers(logits, labels, params.kd.ensemble)[0]}
                row[precision] = run_seed(raw, seed, data, device, targets)["val_acc"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    names = list(per_precision)
    report = {
        "command": "python -m tools.studies.soft_target_precision " + " ".join(sys.argv[1:]),
        "commit": code_commit(REPO),
        "machine": machine_info(),
        "views": params.kd.views,
        "val_images": val_images,
        "rows": rows,
        "summary": {
            **{n: spread([r[n] for r in rows]) for n in names},
            "difference": spread([r[names[1]] - r[names[0]] for r in rows]),
        },
    }
    write_report(args.out, report, markdown(report, names))


def markdown(report: dict, names: list[str]) -> str:
    m, s = report["machine"], report["summary"]
    lines = [
        "# Soft targets: float32 against float16 storage",
        "",
        f"Command: `{report['command']}` at commit `{report['commit']}`, on {m['cpu']} ({m['cores']} cores).",
        "",
        f"The distill recipe trained on the same teachers' logits ({report['views']} views), kept in float32 and "
        f"rounded to float16 as the soft_targets stage stores them; val accuracy on {report['val_images']} "
        "images per student seed.",
        "",
        "| seed | " + " | ".join(names) + " | difference |",
        "|---:|" + "---:|" * (len(names) + 1),
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['seed']} | " + " | ".join(f"{r[n]:.4f}" for n in names) + f" | {r[names[1]] - r[names[0]]:+.4f} |"
        )
    lines.append(
        "| mean ± std | "
        + " | ".join(f"{s[n]['mean']:.4f} ± {s[n]['std']:.4f}" for n in names)
        + f" | {s['difference']['mean']:+.4f} ± {s['difference']['std']:.4f} |"
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_stage(main)
