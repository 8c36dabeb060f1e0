"""What each part of the fast training recipe buys: the student trained from scratch with the
benchmark config's recipe, then once per part with that part alone changed, on val.

The parts are the recipe's params (docs/recipe.md); each variant changes one part back to what a
generic recipe does (AdamW one-cycle at params.yaml's lr and weight decay, BN biases at the lr, no
label smoothing, zero-padded random crops + flips, random flips each epoch, float32 steps) or, for
the weight average (ema) that the benchmark leaves off, turns it on. The student is the `baseline` stage's (CE,
epoch selection on val) at --epochs, a short budget: a ranking of the parts, not their value after a
full schedule. Reported per variant: val accuracy of the selected epoch and of the last,
flip-averaged val accuracy, training images/s and minutes, each as the mean over --seeds (± std with
several). Val only: the test split is never loaded. The architecture's parts (the whitening conv,
dirac init, the head's scale) are not switches; docs/recipe.md gives their measured reasons.
Usage: python -m tools.studies.recipe_ablation --root ../shared/datasets/cifar10
       [--config tools/benchmark/cifar10.yaml] [--set train.precision=float32 ...] [--epochs 3] [--seeds 42]
       [--parts optimizer ...]
       [--out reports/cifar10/recipe_ablation.json]  (also writes the .md)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
import yaml

from edgekd.config import Params, params_from_dict
from edgekd.data.batches import load_split
from edgekd.data.prepare import prepare_dataset
from edgekd.data.prepared import load_info
from edgekd.errors import UserError
from edgekd.runtime import run_stage
from edgekd.train.device import select_device
from edgekd.train.evaluation import predict_logits
from edgekd.train.losses import FlipAveraged
from tools import formatting as fmt
from tools.machine import code_commit, machine_info
from tools.studies.report_files import write_report
from tools.studies.student_seeds import merge_overrides, train_student, with_overrides

RECIPE = "recipe"
EMA_DECAY = 0.98  # per step: an average over the last ~50 steps, ~1.3 epochs of 40,000 images at batch 1024


def parts(defaults: dict) -> dict[str, tuple[str, dict]]:
    """Part -> (what the variant does, its overrides by section). `defaults` is params.yaml, whose
    optimizer, lr and weight decay are the generic recipe's."""
    return {
        "optimizer": (
            f"AdamW one-cycle as params.yaml has it (lr {defaults['student']['lr']}, weight decay "
            f"{defaults['train']['weight_decay']}, BN biases at the lr) instead of Nesterov SGD on the triangle",
            {
                "train": {
                    "optimizer": "adamw_onecycle",
                    "weight_decay": defaults["train"]["weight_decay"],
                    "bn_bias_lr_scale": defaults["train"]["bn_bias_lr_scale"],
                },
                "student": {"lr": defaults["student"]["lr"]},
            },
        ),
        "lr_end": (
            f"the lr falls to 0 at the last step instead of {defaults['train']['lr_end']}x its peak (airbench "
            "keeps 0.07x and averages the weights every 5 steps; without an average the last steps' noise stays "
            "in the weights)",
            {"train": {"lr_end": 0.0}},
        ),
        "bn_bias_lr": ("BN biases at the lr (bn_bias_lr_scale 1)", {"train": {"bn_bias_lr_scale": 1.0}}),
        "label_smoothing": ("no label smoothing", {"train": {"label_smoothing": 0.0}}),
        "augment": (
            "crop_flip (4 px zero-padded crops + flips) instead of 2 px reflected shifts + flips",
            {"train": {"augment": "crop_flip"}},
        ),
        "precision": ("float32 training steps instead of bfloat16", {"train": {"precision": "float32"}}),
        "alternating_flip": (
            "each epoch draws every image's mirror at random instead of mirroring it in every other epoch",
            {"train": {"alternating_flip": False}},
        ),
        "ema": (f"weight average on (ema_decay {EMA_DECAY})", {"train": {"ema_decay": EMA_DECAY}}),
        "lookahead": (
            "lookahead off: the weights are never pulled toward their running average",
            {"train": {"lookahead": False}},
        ),
        "norm_after_pool": (
            "conv-BN-ReLU -> max-pool in training instead of conv -> max-pool -> BN -> ReLU",
            {"train": {"norm_after_pool": False}},
        ),
    }


def variant(raw: dict, overrides: dict, epochs: int, seed: int) -> Params:
    """`raw` with one part's overrides, the student at `epochs` and `seed`."""
    out = merge_overrides(raw, overrides)
    out["student"] = {**out["student"], "epochs": epochs, "seed": seed}
    return params_from_dict(out)


def with_settings(raw: dict, settings: list[str]) -> dict:
    """`raw` with each `section.key=value` of `settings` (the value read as YAML) applied."""
    overrides: dict[str, dict] = {}
    for setting in settings:
        name, sep, value = setting.partition("=")
        section, dot, key = name.partition(".")
        if not sep or not dot or not isinstance(raw.get(section), dict) or key not in raw[section]:
            raise UserError(f"--set: {setting!r} is not SECTION.KEY=VALUE with a key params.yaml has")
        overrides.setdefault(section, {})[key] = yaml.safe_load(value)
    return merge_overrides(raw, overrides)


def run_variant(params: Params, data: Path, device: torch.device) -> dict:
    model, result, setup = train_student(params, data, device)
    info, (images, labels) = load_info(data), load_split(data, "val")
    size = params.student.image_size or info.image_size
    flip = predict_logits(FlipAveraged(model), images, info.mean, info.std, setup.eval_batch_size, device, size)
    return {
        "best_epoch": result.best_epoch + 1,
        "val_acc": result.best_val_acc,
        "last_epoch_val_acc": result.history[-1]["val_acc"],
        "val_acc_flip": (flip.argmax(1) == labels).float().mean().item(),
        "images_per_s": result.train_images_per_s,
        "train_minutes": sum(row["seconds"] for row in result.history) / 60,
    }


def summarize(runs: list[dict]) -> dict:
    """Per figure, its mean over the seeds' runs and (with two or more) their std."""
    out = {}
    for key in ("val_acc", "last_epoch_val_acc", "val_acc_flip", "images_per_s", "train_minutes"):
        values = [r[key] for r in runs]
        out[key] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None}
    return out


def ablate(
    raw: dict, defaults: dict, names: list[str], epochs: int, seeds: list[int], data: Path, device, settings=()
) -> list:
    """The recipe's row (the config's, with `settings` applied), then one per part in `names`, each with
    its runs per seed and their summary; `delta_val_acc` is the variant's mean val accuracy minus the
    recipe's."""
    recipe = "the benchmark config's recipe" + (f" with {', '.join(settings)}" if settings else "")
    variants = {RECIPE: (recipe, {}), **{n: parts(defaults)[n] for n in names}}
    rows = []
    for name, (change, overrides) in variants.items():
        runs = []
        for seed in seeds:
            runs.append({"seed": seed, **run_variant(variant(raw, overrides, epochs, seed), data, device)})
            print(json.dumps({"part": name, **runs[-1]}), flush=True)
        rows.append({"part": name, "change": change, "overrides": overrides, "runs": runs, **summarize(runs)})
    for row in rows:
        row["delta_val_acc"] = row["val_acc"]["mean"] - rows[0]["val_acc"]["mean"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="ImageFolder tree (data.root)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--config", type=Path, default=Path("tools/benchmark/cifar10.yaml"))
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="changes to the config's recipe for every row, e.g. train.precision=float32 where bfloat16 is slow",
    )
    parser.add_argument("--epochs", type=int, default=3, help="student epochs of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--parts", nargs="+", help="default: every part")
    parser.add_argument("--out", type=Path, default=Path("reports/cifar10/recipe_ablation.json"))
    args = parser.parse_args()
    defaults = yaml.safe_load(args.params.read_text())
    known = list(parts(defaults))
    unknown = [p for p in args.parts or [] if p not in known]
    if unknown:
        raise UserError(f"--parts: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    raw = with_settings(with_overrides(args.params, args.config, args.root), args.set)
    params = params_from_dict(raw)
    device = select_device(params.train.device, params.train.threads)
    with tempfile.TemporaryDirectory() as tmp:
        prepare_dataset(params.data.root, tmp, params.data, params.seed)
        rows = ablate(raw, defaults, args.parts or known, args.epochs, args.seeds, Path(tmp), device, args.set)
    report = {
        "command": (
            f"python -m tools.studies.recipe_ablation --root {args.root} --params {args.params} "
            f"--config {args.config}"
            + (f" --set {' '.join(args.set)}" if args.set else "")
            + f" --epochs {args.epochs} --seeds {' '.join(map(str, args.seeds))}"
            + (f" --parts {' '.join(args.parts)}" if args.parts else "")
            + f" --out {args.out}"
        ),
        "commit": code_commit(Path.cwd()),
        "machine": machine_info(),
        "student": {"arch": params.student.arch, "width": params.student.width, "epochs": args.epochs},
        "rows": rows,
    }
    write_report(args.out, report, markdown(report))


def markdown(report: dict) -> str:
    m, s = report["machine"], report["student"]
    seeds = len(report["rows"][0]["runs"])

    def figure(stats: dict, unit) -> str:
        return unit(stats["mean"]) + ("" if stats["std"] is None else f" ± {100 * stats['std']:.2f}")

    lines = [
        "# What each part of the fast recipe buys (val)",
        "",
        f"Made by `{report['command']}` at {report['commit']} on {m['cpu']}, {m['cores']} cores, "
        f"torch {m['versions']['torch']}. Student {s['arch']} w{s['width']} trained from scratch for "
        f"{s['epochs']} epochs (the `baseline` stage's training, epoch selection on val), "
        f"{seeds} seed{'s' if seeds > 1 else ''} per row"
        + (" (mean ± std)" if seeds > 1 else "; differences below the seed-to-seed spread say nothing")
        + ". Each row changes one part of the recipe of the first.",
        "",
        "| part | change | val acc | vs recipe | last-epoch val acc | flip-averaged val acc | img/s | minutes |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['part']} | {r['change']} | {figure(r['val_acc'], fmt.percent)} | "
            f"{'' if r['part'] == RECIPE else fmt.points(r['delta_val_acc'])} | "
            f"{figure(r['last_epoch_val_acc'], fmt.percent)} | {figure(r['val_acc_flip'], fmt.percent)} | "
            f"{r['images_per_s']['mean']:.0f} | {r['train_minutes']['mean']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_stage(main)
