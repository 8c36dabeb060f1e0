"""`make bench`: the whole pipeline on the real rice sample as DVC experiments, then one report.

1. a forced full `dvc exp run` with the benchmark overrides (tools/benchmark/rice.yaml) at the first
   of `student_seeds`, stages timed;
2. one incremental experiment per further student seed (`-S student.seed=N`, the first one timed:
   teachers and soft targets must be skipped), so every student recipe is reported as mean ± std;
   the studies (studies/dvc.yaml) run at the first `study_seeds` seeds (default: all), the deployed
   model's stages at every seed;
3. per scheme of `compare_ensembles` and per student seed, `dvc exp run -S kd.ensemble=X ... distill`
   (that stage alone), compared with the main scheme on val, where a recipe is chosen;
4. `variants` (e.g. `-S student.width=0.5`), each departing from the main run;
5. `dvc exp apply` of the main run, so the workspace holds the main-row models and metrics;
6. every model on the same test split, every ONNX file timed back to back in this one process,
   the seed framework's models included; reports/benchmark.{json,md}, the trade-off PNG and
   benchmark.log (every experiment's console output).
DVC's run cache is cleared first so that every stage really runs and is timed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import yaml

from edgekd.config import load_params
from edgekd.deploy.metadata import read_export_checks
from edgekd.errors import UserError
from edgekd.runtime import run_stage
from tools.benchmark import comparison
from tools.benchmark.comparison import GOALS
from tools.benchmark.experiments import ExperimentRun, overrides_to_args, run_experiment
from tools.benchmark.report import plot_tradeoff, plot_training, render_markdown
from tools.machine import code_commit, machine_info

SEED_MODEL_KEYS = ("fp32", "int8", "image_size", "mean", "std")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="tools/benchmark/rice.yaml")
    parser.add_argument("--out", default="reports", help="folder for benchmark.{md,json,png}")
    parser.add_argument(
        "--render-only", action="store_true", help="rebuild benchmark.md and the plot from an existing benchmark.json"
    )
    args = parser.parse_args()
    out = Path(args.out)
    cfg = load_config(Path(args.config))
    if args.render_only:
        write_report(json.loads((out / "benchmark.json").read_text()), out, cfg["goals"])
        return
    start = time.perf_counter()
    repo = Path.cwd()
    commit = code_commit(repo)  # before the runs rewrite params.yaml, metrics and the lock
    command = (
        f"make {cfg.get('make_target', 'bench')}  "
        f"(python -m tools.benchmark.run --config {args.config} --out {args.out})"
    )

    shutil.rmtree(repo / ".dvc" / "cache" / "runs", ignore_errors=True)
    seeds = cfg.get("student_seeds") or [load_params().student.seed]
    # -P (--all-pipelines): the studies (studies/dvc.yaml) beside the deployed model, in every run
    full = run_experiment(["-f", "-P", *overrides_to_args(cfg["overrides"]), "-S", f"student.seed={seeds[0]}"], repo)
    runs = [full]
    main_eval = read_evaluations(repo)
    params = load_params()
    main_params_text = (repo / "params.yaml").read_text()

    def departing(overrides: dict, targets: tuple[str, ...] = ("-P",)) -> ExperimentRun:
        (repo / "params.yaml").write_text(main_params_text)  # each experiment departs from the main run
        runs.append(run_experiment([*overrides_to_args(overrides), *targets], repo))
        return runs[-1]

    evaluations, val = {seeds[0]: main_eval}, {params.kd.ensemble: {seeds[0]: distill_val_accuracy(repo)}}
    incremental = []
    study_seeds = cfg.get("study_seeds", len(seeds))
    for index, seed in enumerate(seeds[1:], start=1):
        # without -P: the deployed model's pipeline (dvc.yaml) alone
        studies = index < study_seeds
        incremental.append(({"student.seed": seed}, departing({"student.seed": seed}, ("-P",) if studies else ())))
        # the studies' files in the workspace are the previous run's when they did not run
        evaluations[seed] = read_evaluations(repo, None if studies else deployed_models(repo))
        val[params.kd.ensemble][seed] = distill_val_accuracy(repo)
    for scheme in cfg.get("compare_ensembles", []):
        val[scheme] = {}
        for seed in seeds:
            departing({"kd.ensemble": scheme, "student.seed": seed}, targets=("distill",))
            val[scheme][seed] = distill_val_accuracy(repo)
    variants = [comparison.variant_row(params.student, params.student_image_size, main_eval)]
    for variant in cfg.get("variants", []):
        run = departing(variant)
        v_params = load_params()
        variants.append(comparison.variant_row(v_params.student, v_params.student_image_size, read_evaluations(repo)))
        incremental.append((variant, run))

    subprocess.run(["dvc", "exp", "apply", full.name], cwd=repo, check=True)
    if read_evaluations(repo) != main_eval:
        raise RuntimeError("dvc exp apply did not restore the main run's metrics")

    params = load_params()
    main_rows, test_images, misses = comparison.main_rows(
        params, repo, main_eval, cfg.get("seed_models"), cfg.get("max_missed_rows")
    )
    pipeline = comparison.pipeline_summary(full, incremental)
    results = {
        "title": cfg["title"],
        "command": command,
        "commit": commit,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "data_root": params.data.root,
        "test_images": test_images,
        "overrides": cfg["overrides"],
        "experiment": full.name,
        "main": main_rows,
        "misses": misses,
        "recipes": comparison.recipe_rows(evaluations),
        "ensembles": comparison.ensemble_rows(val),
        "variants": variants,
        "pipeline": pipeline,
        "int8_export": read_export_checks(repo / "models" / "student_int8.onnx"),
        "training": comparison.training_rows(repo),
        "published": cfg.get("published"),
        "notes": comparison.notes(cfg.get("seed_models")) + cfg.get("notes", []),
        "bench_wall_s": round(time.perf_counter() - start),
    }
    write_report(results, out, cfg["goals"])
    # Written here, not by a shell redirect: `dvc exp run` resets git-tracked files such as this one.
    (out / "benchmark.log").write_text("\n".join(line for run in runs for line in run.output) + "\n")


def read_evaluations(repo: Path, names: list[str] | None = None) -> dict[str, dict]:
    """Every `evaluate@<name>` stage's figures in the workspace (or those of `names`), by model name:
    its metrics (accuracy, size, p50) and the rest of its trade-off row (macro-F1, p90, throughput, ...)."""
    return {
        path.stem: {
            **read_json(path),
            **pd.read_csv(repo / "plots" / "tradeoff" / f"{path.stem}.csv").iloc[0].to_dict(),
        }
        for path in sorted((repo / "metrics" / "evaluate").glob("*.json"))
        if names is None or path.stem in names
    }


def deployed_models(repo: Path) -> list[str]:
    """The models dvc.yaml (the deployed model's pipeline, without the studies) exports and evaluates."""
    return list(yaml.safe_load((repo / "dvc.yaml").read_text())["vars"][0]["onnx_models"])


def distill_val_accuracy(repo: Path) -> float:
    """The distilled student's val accuracy in the workspace's last run."""
    return read_json(repo / "metrics" / "distill.json")["val_acc"]


def load_config(path: Path) -> dict:
    """The benchmark config; a missing section, an unknown goal or an incomplete seed-model entry is
    named in one line before anything runs."""
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{path}: cannot read the benchmark config ({err})") from None
    if isinstance(cfg, dict) and "base" in cfg:  # another config, with this one's keys on top
        cfg = merged(load_config(path.parent / cfg.pop("base")), cfg)
    problems = [f"missing {key}" for key in ("title", "overrides", "goals") if key not in (cfg or {})]
    if not problems:
        problems += [
            f"unknown goals.{key} (known: {', '.join(GOALS)})" for key in cfg["goals"] or {} if key not in GOALS
        ]
        if "mixed_max_size_vs_int8" in cfg["goals"] and "mixed_max_drop" not in cfg["goals"]:
            problems.append("missing goals.mixed_max_drop (set with goals.mixed_max_size_vs_int8)")
        problems += [
            f"missing seed_models.{key}"
            for key in SEED_MODEL_KEYS
            if "seed_models" in cfg and key not in (cfg["seed_models"] or {})
        ]
        problems += [
            f"missing published.{key}"
            for key in ("source", "recipes")
            if "published" in cfg and key not in (cfg["published"] or {})
        ]
    if problems:
        raise UserError(f"{path}: {'; '.join(problems)}")
    return cfg


def merged(base: dict, top: dict) -> dict:
    """`top` over `base`: mappings merged key by key, any other value replaced."""
    out = dict(base)
    for key, value in top.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def write_report(results: dict, out: Path, targets: dict) -> None:
    """Goals are computed from the measured rows and the config's targets, so a re-render
    (`--render-only`) applies the current ones."""
    results["goals"] = comparison.goals(results, results["variants"][0]["width"], targets)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_tradeoff(results["variants"], out / "benchmark_tradeoff.png")
    if results.get("training"):
        plot_training(results["training"], out / "benchmark_training.png")
    (out / "benchmark.md").write_text(render_markdown(results))
    print(render_markdown(results))


if __name__ == "__main__":
    run_stage(main)
