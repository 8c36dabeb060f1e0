"""How much the student's val accuracy depends on the seed alone: the noise floor of every val comparison.

Trains the baseline student (the `baseline` stage's recipe: CE, same schedule, augmentation and epoch
selection on val) once per seed on a freshly prepared split (the split itself uses params' `seed`, so
every run sees the same images), and reports val accuracy of the selected epoch, of the last epoch,
and of the selected model averaged over the 8 flips/quarter turns of each image (test-time
augmentation, which the deployed models do not do). Val only: the test split is never loaded.
With --soft-targets (a `soft_targets` stage output for the same data and params) it trains the
`distill` stage's recipe instead (CE + KD, kd.* from params or --alpha): the teachers' views and
logits stay those of the file, the seed changes the student's initialisation and batch order.
Usage: python -m tools.studies.student_seeds --root ../shared/datasets/rice-image --seeds 42 1 2 3 4
       [--config tools/benchmark/rice.yaml] [--soft-targets models/soft_targets.pt [--alpha A]]
       [--out reports/student_seeds.json]  (also writes the .md)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from edgekd.config import Params, as_dict, params_from_dict
from edgekd.data.batches import load_split
from edgekd.data.prepare import prepare_dataset
from edgekd.data.prepared import load_info
from edgekd.train import student
from edgekd.train.device import seed_everything, select_device
from edgekd.train.engine import FitResult
from edgekd.train.evaluation import predict_logits
from edgekd.train.fit_setup import FitSetup
from edgekd.train.soft_targets import load_soft_targets
from tools import formatting as fmt
from tools.machine import machine_info
from tools.studies.report_files import write_report


def dihedral_mean(model: nn.Module):
    """Logits callable: mean softmax over the 8 flips/rot90s, label-preserving for grains seen from above."""

    def predict(x: Tensor) -> Tensor:
        views = [torch.rot90(v, k, dims=(-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]
        return torch.stack([model(v).softmax(1) for v in views]).mean(0)

    return predict


def merge_overrides(raw: dict, overrides: dict) -> dict:
    """A copy of the params `raw` with `overrides` ({section: {key: value}}, a benchmark config's
    shape) applied key by key; a value that is not a mapping replaces its whole entry (`seed`)."""
    out = copy.deepcopy(raw)
    for section, values in overrides.items():
        out[section] = {**out[section], **values} if isinstance(values, dict) else values
    return out


def with_overrides(params_path: Path, config: Path | None, root: Path) -> dict:
    """params.yaml with the benchmark config's overrides (as `make bench` applies them) and data.root."""
    overrides = yaml.safe_load(config.read_text())["overrides"] if config else {}
    raw = merge_overrides(yaml.safe_load(params_path.read_text()), overrides)
    raw["data"] = {**raw["data"], "root": str(root)}
    return raw


def recipe(params: Params, distilled: bool) -> str:
    return f"CE + KD (alpha {params.kd.alpha}, T {params.kd.temperature})" if distilled else "CE"


def read_targets(raw: dict, data: Path, soft_targets: Path | None) -> dict | None:
    """A `soft_targets` file checked against the prepared train split and combined as params say
    (the views were rendered with the params' seed, not the student's)."""
    if soft_targets is None:
        return None
    params = params_from_dict(raw)
    return load_soft_targets(soft_targets, load_split(data, "train"), params, len(load_info(data).classes))


def train_student(
    params: Params, data: Path, device: torch.device, targets: dict | None = None
) -> tuple[nn.Module, FitResult, FitSetup]:
    """The `baseline` stage's training (CE), or `distill`'s on `targets` (`load_soft_targets`), in
    this process at `student.seed`, without the stage's files (`edgekd.train.student`). Returns the
    model (eval mode, the selected epoch's weights)."""
    seed_everything(params.student.seed)
    info, train, val = load_info(data), load_split(data, "train"), load_split(data, "val")
    model, result, setup = student.train_student(params, info, train, val, device, targets)
    return model.eval(), result, setup


def run_seed(raw: dict, seed: int, data: Path, device: torch.device, targets: dict | None = None) -> dict:
    """The student recipe with seed `seed`: CE alone, or CE + KD on `targets` (`load_soft_targets`)."""
    params = params_from_dict({**copy.deepcopy(raw), "student": {**raw["student"], "seed": seed}})
    info, val = load_info(data), load_split(data, "val")
    start = time.perf_counter()
    model, result, setup = train_student(params, data, device, targets)
    tta = predict_logits(
        dihedral_mean(model), val[0], info.mean, info.std, setup.eval_batch_size, device, params.student.image_size
    )
    return {
        "seed": seed,
        "best_epoch": result.best_epoch + 1,
        "val_acc": round(result.best_val_acc, 4),
        "last_epoch_val_acc": round(result.history[-1]["val_acc"], 4),
        "tta8_val_acc": round((tta.argmax(1) == val[1]).float().mean().item(), 4),
        "val_images": len(val[1]),
        "train_s": round(time.perf_counter() - start),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="ImageFolder tree (data.root)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3, 4])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument(
        "--config",
        type=Path,
        default=Path("tools/benchmark/rice.yaml"),
        help="benchmark config whose `overrides` apply on top of --params",
    )
    parser.add_argument("--soft-targets", type=Path, help="train the distill recipe on these teacher logits")
    parser.add_argument("--alpha", type=float, help="kd.alpha for --soft-targets (default: params)")
    parser.add_argument("--out", type=Path, default=Path("reports/student_seeds.json"))
    args = parser.parse_args()
    raw = with_overrides(args.params, args.config, args.root)
    if args.alpha is not None:
        raw["kd"] = {**raw["kd"], "alpha": args.alpha}
    params = params_from_dict(raw)
    device = select_device(params.train.device, params.train.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prepare_dataset(params.data.root, tmp, params.data, params.seed)
        targets = read_targets(raw, Path(tmp), args.soft_targets)
        for seed in args.seeds:
            rows.append(run_seed(raw, seed, Path(tmp), device, targets))
            print(json.dumps(rows[-1]), flush=True)
    summary = {
        key: {
            "mean": round(statistics.mean(r[key] for r in rows), 4),
            "min": min(r[key] for r in rows),
            "max": max(r[key] for r in rows),
        }
        for key in ("val_acc", "last_epoch_val_acc", "tta8_val_acc")
    }
    report = {
        "command": command(args),
        "machine": machine_info(),
        "student": as_dict(params.student),
        "recipe": recipe(params, args.soft_targets is not None),
        "rows": rows,
        "summary": summary,
    }
    write_report(args.out, report, markdown(report))


def command(args: argparse.Namespace) -> str:
    kd = (
        ""
        if args.soft_targets is None
        else f" --soft-targets {args.soft_targets}" + ("" if args.alpha is None else f" --alpha {args.alpha}")
    )
    return (
        f"python -m tools.studies.student_seeds --root {args.root} --seeds {' '.join(map(str, args.seeds))} "
        f"--params {args.params} --config {args.config}{kd} --out {args.out}"
    )


def markdown(report: dict) -> str:
    s, m = report["student"], report["machine"]
    lines = [
        "# Seed-to-seed spread of the student's val accuracy",
        "",
        f"Made by `{report['command']}` on {m['cpu']}, {m['cores']} cores, torch {m['versions']['torch']}. "
        f"Student: {s['arch']} w{s['width']}, {s['epochs']} epochs, lr {s['lr']}, {report['recipe']} "
        f"(the `{'baseline' if report['recipe'] == 'CE' else 'distill'}` stage's recipe); the data split "
        "is the same in every run, only the seed of initialisation, shuffling and (CE) augmentation "
        "changes. Val split only.",
        "",
        "| seed | selected epoch | val acc | last-epoch val acc | selected model, 8-view TTA val acc | train s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['seed']} | {r['best_epoch']} | {fmt.percent(r['val_acc'])} | "
            f"{fmt.percent(r['last_epoch_val_acc'])} | {fmt.percent(r['tta8_val_acc'])} | {r['train_s']} |"
        )
    for key, label in (
        ("val_acc", "val acc"),
        ("last_epoch_val_acc", "last-epoch val acc"),
        ("tta8_val_acc", "8-view TTA val acc"),
    ):
        v = report["summary"][key]
        lines.append(
            f"\n{label}: mean {fmt.percent(v['mean'])}, range {fmt.percent(v['min'])} - {fmt.percent(v['max'])}"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
