"""The benchmark's rows: every model on the same test split, every ONNX file timed in one process.

Our students' accuracy comes from the `evaluate@<model>` stages (metrics/evaluate/<model>.json); their latency is
measured again here, back to back with the seed framework's models, so that ratios compare like
with like on a shared, noisy CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd
import torch
from dvc.repo import Repo

from edgekd.config import Params, StudentConfig
from edgekd.data.batches import ModelInputs, load_split
from edgekd.data.images import load_image
from edgekd.data.prepared import load_info
from edgekd.deploy.metadata import read_metadata
from edgekd.deploy.sessions import make_runner
from edgekd.eval.latency import measure_speed
from edgekd.eval.metrics import classification_metrics, predict_all
from edgekd.train.checkpoints import load_teachers
from edgekd.train.evaluation import evaluate, predict_logits
from edgekd.train.losses import ensemble_logits, prepare_teachers
from edgekd.train.models import count_params
from tools import formatting as fmt

NOTES = ["OpenVINO p50: the same ONNX file in OpenVINO (1 thread), the other well-kept CPU runtime tried."]
SEED_NOTES = [
    "Seed models: the framework's published students, run at their own input size and normalisation. "
    "They were trained on 80 % of the full dataset, so some of these test images may have been in "
    "their training set: their accuracy here is, if anything, flattered.",
    "p50 / seed INT8: batch-1 p50 in onnxruntime divided by the seed INT8 model's, measured in this run.",
]


def notes(seed_cfg: dict | None) -> list[str]:
    return [*(SEED_NOTES if seed_cfg else []), *NOTES]


def variant_row(student: StudentConfig, image_size: int, evaluation: dict) -> dict:
    fp32, int8 = evaluation["fp32"], evaluation["int8"]
    return {
        "variant": f"{student.arch} w{student.width:g} {image_size}px",
        "arch": student.arch,
        "width": student.width,
        "image_size": image_size,
        "fp32_accuracy": fp32["accuracy"],
        "int8_accuracy": int8["accuracy"],
        "fp32_size_bytes": fp32["size_bytes"],
        "int8_size_bytes": int8["size_bytes"],
        "fp32_latency_p50_ms": fp32["latency_p50_ms"],
        "int8_latency_p50_ms": int8["latency_p50_ms"],
    }


def teacher_rows(params: Params, prepared: Path, teachers_dir: Path) -> tuple[list[dict], np.ndarray]:
    """Test accuracy of each teacher and of their logit-averaged ensemble (PyTorch, CPU), and the
    ensemble's test predictions."""
    info = load_info(prepared)
    images, labels = load_split(prepared, "test")
    cpu = torch.device("cpu")
    models, _ = load_teachers(teachers_dir, params.teachers.archs, info)
    rows = []
    for arch, model in zip(params.teachers.archs, models):
        acc = evaluate(model, images, labels, info.mean, info.std, params.train.eval_batch_size, cpu)["acc"]
        stem = params.teachers.stem(arch)
        rows.append(
            {
                "model": f"teacher {arch}" + ("" if stem == "imagenet" else f" ({stem} stem)"),
                "accuracy": acc,
                "params": count_params(model),
            }
        )
    teachers = prepare_teachers(models)
    logits = predict_logits(
        lambda x: ensemble_logits(teachers, x), images, info.mean, info.std, params.train.eval_batch_size, cpu
    )
    rows.append(
        {
            "model": "teacher ensemble (mean logits)",
            "accuracy": (logits.argmax(1) == labels).float().mean().item(),
            "params": sum(r["params"] for r in rows),
        }
    )
    return rows, logits.argmax(1).numpy()


def missed_images(
    paths: list[str],
    labels: np.ndarray,
    classes: list[str],
    predictions: dict[str, np.ndarray],
    max_rows: int | None = None,
) -> dict:
    """Every test image that at least one model gets wrong, with each model's answer: shows whether
    the misses are shared (hard or mislabelled images) or one model's own. With `max_rows`, only the
    first images (test order) are listed; the counts are always of all of them."""
    wrong = np.stack([pred != labels for pred in predictions.values()])  # (models, N)
    missed = np.flatnonzero(wrong.any(0))
    rows = [
        {
            "image": paths[i],
            "class": classes[labels[i]],
            "predicted": {name: classes[pred[i]] for name, pred in predictions.items()},
        }
        for i in missed[:max_rows]
    ]
    return {
        "models": list(predictions),
        "missed_by_any": len(missed),
        "missed_by_all": int(wrong.all(0).sum()),
        "rows": rows,
    }


def onnx_float_params(path: Path) -> int:
    """Weights of an FP32 ONNX graph (its float initializers)."""
    graph = onnx.load(str(path)).graph
    return int(sum(np.prod(t.dims) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT))


def seed_inputs(prepared: Path, root: Path, seed_cfg: dict, max_pixels: int) -> tuple[ModelInputs, np.ndarray]:
    """Test images decoded again at the seed models' own size, normalised a batch at a time as they
    expect (uint8 held, 4x less than floats)."""
    info = load_info(prepared)
    manifest = pd.read_csv(prepared / "test.csv")
    size = int(seed_cfg["image_size"])
    images = np.stack([load_image(root / p, size, max_pixels) for p in manifest["path"]])  # (N, H, W, 3)
    x = ModelInputs(torch.from_numpy(images).permute(0, 3, 1, 2), None, seed_cfg["mean"], seed_cfg["std"])
    labels = manifest["class"].map({c: i for i, c in enumerate(info.classes)}).to_numpy()
    return x, labels


def main_rows(
    params: Params, repo: Path, main_eval: dict, seed_cfg: dict | None, max_missed_rows: int | None = None
) -> tuple[list[dict], int, dict]:
    """The main table's rows, the number of test images, and the images our models miss; the seed
    framework's models run beside ours when `seed_cfg` names them."""
    prepared, models = repo / "prepared", repo / "models"
    info = load_info(prepared)
    images, labels = load_split(prepared, "test")
    rows, ensemble_preds = teacher_rows(params, prepared, models / "teachers")
    predictions = {"teacher ensemble": ensemble_preds}
    class_index = {c: i for i, c in enumerate(info.classes)}
    for key, name, file in [
        ("baseline", "student baseline (no KD), FP32", "baseline.onnx"),
        ("fp32", "student distilled, FP32", "student_fp32.onnx"),
        ("int8", "student distilled + QAT, INT8", "student_int8.onnx"),
        ("ptq", "student distilled + PTQ, INT8 (control)", "student_ptq_int8.onnx"),
        ("mixed", "student distilled + mixed QAT, INT8/INT4 weights", "student_mixed.onnx"),
        ("a16", "student distilled + QAT, 16-bit activations", "student_a16w8.onnx"),
        ("mixed_a16", "student distilled + mixed QAT, 16/8-bit activations", "student_mixed_a16.onnx"),
        ("baseline_int8", "student baseline + QAT, INT8 (no KD)", "baseline_int8.onnx"),
    ]:
        m, size = main_eval[key], read_metadata(models / file).image_size
        x = ModelInputs(images, size, info.mean, info.std)
        # the evaluate stage's own per-image answers (test order), which its accuracy counts
        answers = pd.read_csv(repo / "plots" / f"confusion_{key}.csv")["predicted"]
        predictions[f"student {key}"] = answers.map(class_index).to_numpy()
        rows.append(
            {
                "model": name,
                "accuracy": m["accuracy"],
                "macro_f1": m["macro_f1"],
                "size_bytes": m["size_bytes"],
                "params": m["params"],
                **measure_speed(models / file, x, params.bench),
            }
        )
    if seed_cfg:
        rows += seed_rows(params, repo, seed_cfg)
        seed_int8_p50 = rows[-1]["latency_p50_ms"]
        for row in rows:
            if "latency_p50_ms" in row:
                row["p50_vs_seed_int8"] = row["latency_p50_ms"] / seed_int8_p50
    paths = pd.read_csv(prepared / "test.csv")["path"].tolist()
    return rows, len(labels), missed_images(paths, labels.numpy(), info.classes, predictions, max_missed_rows)


def seed_rows(params: Params, repo: Path, seed_cfg: dict) -> list[dict]:
    """The seed framework's FP32 and INT8 files (in this order) on the same test images."""
    prepared = repo / "prepared"
    info = load_info(prepared)
    seed_x, seed_labels = seed_inputs(prepared, repo / params.data.root, seed_cfg, params.data.max_image_pixels)
    seed_params = onnx_float_params(repo / seed_cfg["fp32"])
    rows = []
    for precision in ("fp32", "int8"):
        path = repo / seed_cfg[precision]
        preds = predict_all(make_runner(path, "onnxruntime", params.bench.threads), seed_x).argmax(1)
        m = classification_metrics(seed_labels, preds, info.classes)
        rows.append(
            {
                "model": f"seed {precision.upper()} ({path.name}, {seed_cfg['image_size']} px)",
                "accuracy": m["accuracy"],
                "macro_f1": m["macro_f1"],
                "size_bytes": path.stat().st_size,
                "params": seed_params,
                **measure_speed(path, seed_x, params.bench),
            }
        )
    return rows


# The seed framework's table, row by row, with the evaluate-stage model that answers each row.
RECIPES = [
    ("baseline", "FP32 scratch (CE, no teachers)"),
    ("fp32", "FP32 KD"),
    ("ptq", "PTQ INT8 of FP32 KD (control)"),
    ("baseline_int8", "QAT scratch, INT8"),
    ("int8", "QAT KD, INT8"),
    ("a16", "QAT KD, 16-bit activations (8-bit weights)"),
    ("mixed_a16", "QAT KD, mixed 16/8 activations"),
    ("mixed", "QAT KD, mixed 8/4 weights (INT8/INT4)"),
]


def spread(values: dict[str, float]) -> dict:
    """Mean and sample standard deviation (n - 1) of per-seed figures, with the figures themselves."""
    series = pd.Series(values, dtype=float)
    return {
        "mean": float(series.mean()),
        "std": float(series.std()) if len(series) > 1 else None,  # one seed has no spread
        "seeds": {str(k): v for k, v in values.items()},
    }


def recipe_rows(evaluations: dict[int, dict]) -> list[dict]:
    """Test accuracy of each recipe over the student seeds that ran it (the evaluate stage of each
    seed's run; the studies may run at the first seed only, `study_seeds`); size is the same for every
    seed (the same architecture and bits), read from the first."""
    first = next(iter(evaluations.values()))
    return [
        {
            "model": name,
            "key": key,
            "size_bytes": first[key]["size_bytes"],
            **spread({seed: ev[key]["accuracy"] for seed, ev in evaluations.items() if key in ev}),
        }
        for key, name in RECIPES
        if key in first
    ]


def ensemble_rows(val: dict[str, dict[int, float]]) -> list[dict]:
    """Val accuracy of the distilled FP32 student per kd.ensemble scheme over student seeds: val,
    because choosing a scheme is model selection."""
    return [{"model": f"kd.ensemble: {scheme}", **spread(per_seed)} for scheme, per_seed in val.items()]


def live_curve_folders(repo: Path) -> list[Path]:
    """The dvclive curve folders (`dvclive/<stage>/plots/metrics`) that the pipelines' stages declare
    as outputs under the workspace's params, in pipeline order: a folder another run left behind (a
    teacher of other `teachers.archs`, say) is not one of them."""
    with Repo(str(repo)) as dvc_repo:
        paths = [Path(out.fs_path) for stage in dvc_repo.index.stages for out in stage.outs]
    return [path for path in paths if path.parts[-4] == "dvclive" and path.parts[-2:] == ("plots", "metrics")]


def training_rows(repo: Path) -> list[dict]:
    """Every training stage of the workspace's run, from its dvclive curves: images/s (augmentation,
    and fake quant for QAT, included), epochs, training minutes, and the val accuracy reached after
    each epoch against the minutes spent so far (the accuracy-vs-CPU-minutes curve)."""
    rows = []
    for curves in live_curve_folders(repo):
        if not (curves / "val_acc.tsv").is_file():
            continue
        table = pd.concat(
            [
                pd.read_csv(curves / f"{name}.tsv", sep="\t", index_col="step")
                for name in ("val_acc", "seconds", "images_per_s")
            ],
            axis=1,
        )
        minutes = table["seconds"].cumsum() / 60
        rows.append(
            {
                "model": curves.parents[1].name,
                "epochs": len(table),
                "images_per_s": float((table["seconds"] * table["images_per_s"]).sum() / table["seconds"].sum()),
                "train_minutes": float(minutes.iloc[-1]),
                "val_acc": float(table["val_acc"].iloc[-1]),
                "curve": [[round(float(m), 3), float(a)] for m, a in zip(minutes, table["val_acc"])],
            }
        )
    return rows


def pipeline_summary(full: Any, incremental: list) -> dict:
    summary: dict[str, Any] = {"stages": full.stage_s, "total_s": full.total_s, "experiment": full.name}
    if incremental:  # the first incremental run: (overrides, ExperimentRun)
        variant, run = incremental[0]
        summary["incremental"] = {
            "command": " ".join(run.output[0].split()[1:]) if run.output else "",
            "total_s": run.total_s,
            "ratio": run.total_s / full.total_s,
            "stages_run": list(run.stage_s),
            "skipped": run.skipped,
            # no stage that runs a teacher: training them or computing their soft targets
            "teachers_skipped": not any(s.startswith("train_teacher") or s == "soft_targets" for s in run.stage_s),
        }
    return summary


# The goals a benchmark config may set (`goals:`), each checked only when set: rice and CIFAR-10 ask
# different things. Accuracy goals compare means over student seeds where the recipes were run over
# several (differences smaller than the seed-to-seed spread say nothing otherwise).
GOALS = (
    "fp32_min_accuracy",
    "int8_min_accuracy",
    "int8_max_drop",
    "kd_min_gain",
    "int8_min_gain_vs_baseline",
    "int8_max_p50_vs_seed_int8",
    "int8_max_size_bytes",
    "int8_max_size_at_width",
    "mixed_max_size_vs_int8",
    "mixed_max_drop",
    "mixed_a16_max_drop_vs_fp32",
    "incremental_max_share",
    "bench_max_minutes",
)


def goals(results: dict, width: float, targets: dict) -> list[dict]:
    """Each target of the benchmark config (`goals:`) with the measured figure; a miss is reported,
    not hidden."""
    rows = {r["model"]: r for r in results["main"]}
    pick = lambda prefix: next((r for name, r in rows.items() if name.startswith(prefix)), None)  # noqa: E731
    fp32, int8 = pick("student distilled, FP32"), pick("student distilled + QAT, INT8")
    base = pick("student baseline (no KD)")
    seed_int8, ptq = pick("seed INT8"), pick("student distilled + PTQ")
    mixed, mixed_a16 = pick("student distilled + mixed QAT, INT8/INT4"), pick("student distilled + mixed QAT, 16/8")
    int8_best = min(int8["latency_p50_ms"], int8["openvino_latency_p50_ms"])
    fp32_best = min(fp32["latency_p50_ms"], fp32["openvino_latency_p50_ms"])
    recipes = {r["key"]: r for r in results.get("recipes", [])}
    over = f" (mean of {len(recipes['int8']['seeds'])} student seeds)" if recipes else ""
    # a recipe's test accuracy: its mean over student seeds, or the main run's figure without seeds
    mean = {
        key: recipes[key]["mean"] if key in recipes else row["accuracy"]
        for key, row in (
            ("baseline", base),
            ("fp32", fp32),
            ("int8", int8),
            ("ptq", ptq),
            ("mixed", mixed),
            ("mixed_a16", mixed_a16),
        )
        if row is not None
    }
    pct, t = fmt.percent, targets
    out = [
        (
            "INT8 latency <= FP32 latency (best runtime each)",
            f"{fmt.milliseconds(int8_best)} vs {fmt.milliseconds(fp32_best)}",
            int8_best <= fp32_best,
        )
    ]
    if "fp32_min_accuracy" in t:
        out.append(
            (
                f"distilled FP32 student >= {pct(t['fp32_min_accuracy'])} test accuracy{over}",
                pct(mean["fp32"]),
                mean["fp32"] >= t["fp32_min_accuracy"],
            )
        )
    if "kd_min_gain" in t:
        gain = mean["fp32"] - mean["baseline"]
        out.append(
            (
                f"distilled FP32 student >= the baseline (no KD) + {100 * t['kd_min_gain']:.1f} point{over}",
                f"{pct(mean['fp32'])} vs {pct(mean['baseline'])} ({fmt.points(gain)})",
                gain >= t["kd_min_gain"] - 1e-9,
            )
        )
    if "int8_min_accuracy" in t:
        out.append(
            (
                f"INT8 >= {pct(t['int8_min_accuracy'])} test accuracy{over}",
                pct(mean["int8"]),
                mean["int8"] >= t["int8_min_accuracy"],
            )
        )
    if "int8_max_drop" in t:
        out.append(
            (
                f"INT8 within {100 * t['int8_max_drop']:.1f} point of FP32 (or above it){over}",
                f"INT8 - FP32 = {fmt.points(mean['int8'] - mean['fp32'])}",
                mean["fp32"] - mean["int8"] <= t["int8_max_drop"] + 1e-9,
            )
        )
    if "int8_min_gain_vs_baseline" in t:
        gain = mean["int8"] - mean["baseline"]
        out.append(
            (
                f"INT8 (QAT KD) >= the FP32 baseline (no KD) + {100 * t['int8_min_gain_vs_baseline']:.1f} point{over}",
                f"{pct(mean['int8'])} vs {pct(mean['baseline'])} ({fmt.points(gain)})",
                gain >= t["int8_min_gain_vs_baseline"] - 1e-9,
            )
        )
    if ptq is not None:  # the PTQ control: what QAT buys
        out.append(
            (
                f"QAT KD INT8 >= PTQ INT8 test accuracy{over}",
                f"{pct(mean['int8'])} vs {pct(mean['ptq'])}",
                mean["int8"] >= mean["ptq"],
            )
        )
    if seed_int8 is not None:
        out.append(
            (
                "INT8 >= seed INT8 accuracy",
                f"{pct(int8['accuracy'])} vs {pct(seed_int8['accuracy'])}",
                int8["accuracy"] >= seed_int8["accuracy"],
            )
        )
        if "int8_max_p50_vs_seed_int8" in t:
            out.append(
                (
                    f"deployed (INT8) p50 <= {fmt.ratio(t['int8_max_p50_vs_seed_int8'])} seed INT8 p50",
                    fmt.ratio(int8_best / seed_int8["latency_p50_ms"]),
                    int8_best <= t["int8_max_p50_vs_seed_int8"] * seed_int8["latency_p50_ms"],
                )
            )
    if mixed is not None and "mixed_max_size_vs_int8" in t:
        drop = mean["int8"] - mean["mixed"]
        out.append(
            (
                f"mixed 8/4 file <= {fmt.ratio(t['mixed_max_size_vs_int8'])} the INT8 file, "
                f"<= {100 * t['mixed_max_drop']:.1f} point below the INT8 student{over}",
                f"{fmt.ratio(mixed['size_bytes'] / int8['size_bytes'])}, {fmt.points(-drop)}",
                mixed["size_bytes"] <= t["mixed_max_size_vs_int8"] * int8["size_bytes"]
                and drop <= t["mixed_max_drop"] + 1e-9,
            )
        )
    if mixed_a16 is not None and "mixed_a16_max_drop_vs_fp32" in t:
        drop = mean["fp32"] - mean["mixed_a16"]
        out.append(
            (
                f"mixed 16/8 within {100 * t['mixed_a16_max_drop_vs_fp32']:.1f} point of FP32 (or above it){over}",
                fmt.points(-drop),
                drop <= t["mixed_a16_max_drop_vs_fp32"] + 1e-9,
            )
        )
    if "int8_max_size_bytes" in t and width == t.get("int8_max_size_at_width", width):
        out.append(
            (
                f"INT8 file <= {fmt.size(t['int8_max_size_bytes'])}"
                + (f" at width {width}" if "int8_max_size_at_width" in t else ""),
                fmt.size(int8["size_bytes"]),
                int8["size_bytes"] <= t["int8_max_size_bytes"],
            )
        )
    inc = results["pipeline"].get("incremental")
    if inc and "incremental_max_share" in t:
        out.append(
            (
                f"incremental `{inc['command']}` <= {100 * t['incremental_max_share']:.0f} % of full "
                "pipeline, teachers skipped",
                f"{100 * inc['ratio']:.0f} %, teachers skipped: {inc['teachers_skipped']}",
                inc["ratio"] <= t["incremental_max_share"] and inc["teachers_skipped"],
            )
        )
    if "bench_wall_s" in results and "bench_max_minutes" in t:
        out.append(
            (
                f"whole benchmark (all runs and tables) <= {t['bench_max_minutes']} minutes",
                fmt.minutes(results["bench_wall_s"]),
                results["bench_wall_s"] <= 60 * t["bench_max_minutes"],
            )
        )
    return [{"goal": g, "measured": m, "met": bool(ok)} for g, m, ok in out]
