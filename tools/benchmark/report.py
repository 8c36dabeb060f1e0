"""Render the benchmark results (a plain dict, also saved as JSON) as Markdown and a trade-off plot.

Pure functions of the results dict, so the report can be regenerated and tested without a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tools import formatting as fmt

MAIN_COLUMNS = [
    ("model", "model"),
    ("accuracy", "test acc"),
    ("macro_f1", "macro-F1"),
    ("size_bytes", "size"),
    ("params", "params"),
    ("latency_p50_ms", "p50"),
    ("latency_p90_ms", "p90"),
    ("throughput_ips", "throughput @32"),
    ("p50_vs_seed_int8", "p50 / seed INT8"),
    ("openvino_latency_p50_ms", "OpenVINO p50"),
]
VARIANT_COLUMNS = [
    ("variant", "variant"),
    ("fp32_accuracy", "FP32 acc"),
    ("int8_accuracy", "INT8 acc"),
    ("fp32_size_bytes", "FP32 size"),
    ("int8_size_bytes", "INT8 size"),
    ("fp32_latency_p50_ms", "FP32 p50"),
    ("int8_latency_p50_ms", "INT8 p50"),
]


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    body = ["| " + " | ".join(fmt.metric(k, row.get(k)) for k, _ in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def pipeline_rows(pipeline: dict) -> list[dict]:
    rows = [{"stage": name, "seconds": f"{sec:.0f} s"} for name, sec in pipeline["stages"].items()]
    rows.append({"stage": "**total (full run)**", "seconds": f"{pipeline['total_s']:.0f} s"})
    inc = pipeline.get("incremental")
    if inc:
        rows.append(
            {
                "stage": f"incremental `{inc['command']}`",
                "seconds": f"{inc['total_s']:.0f} s ({100 * inc['ratio']:.0f} % of full)",
            }
        )
    return rows


def goal_rows(goals: Sequence[dict]) -> list[dict]:
    return [{"goal": g["goal"], "measured": g["measured"], "met": "yes" if g["met"] else "**MISSED**"} for g in goals]


def simd_text(machine: dict) -> str:
    """INT8-vs-FP32 latency depends on VNNI: say which of the relevant CPU features this machine has."""
    if "simd" not in machine:  # reports written before the field existed
        return ""
    has_vnni = any("vnni" in f for f in machine["simd"])
    return f" ({', '.join(machine['simd']) or 'no AVX2 or NEON'}; {'with' if has_vnni else 'no'} VNNI)"


def misses_section(results: dict) -> list[str]:
    """One row per test image that a model misses; a cell is that model's answer, ✓ when right."""
    misses = results.get("misses")
    if misses is None:  # reports written before misses were recorded
        return []
    names = misses["models"]
    rows = [
        {
            "image": f"`{r['image']}`",
            "class": r["class"],
            **{n: "✓" if r["predicted"][n] == r["class"] else r["predicted"][n] for n in names},
        }
        for r in misses["rows"]
    ]
    missed = misses.get("missed_by_any", len(rows))
    listed = f" The first {len(rows)} in test order:" if len(rows) < missed else ""
    return [
        "## Test images missed",
        "",
        f"{missed} of the {results['test_images']} test images are missed by at least one of these "
        f"models, {misses['missed_by_all']} by all of them. A cell is the class the model predicted "
        f"(✓: the true class).{listed}",
        "",
        markdown_table(rows, [("image", "image"), ("class", "true class"), *[(n, n) for n in names]]),
        "",
    ]


def int8_export_section(results: dict) -> list[str]:
    """How closely the INT8 file follows the integer torch model it was converted from (export stage)."""
    checks = results.get("int8_export")
    if not checks:  # reports written before the export stage measured it
        return []
    rows = [
        {
            "split": split,
            "images": c["images"],
            "agreement": c["top1_agreement"],
            "max_diff": f"{c['max_abs_diff']:.4g}",
            "steps": f"{c['max_abs_diff'] / checks['output_step']:.1f}",
        }
        for split, c in (
            ("val (gated)", checks["parity_int8_torch"]),
            ("test (reported)", checks["parity_int8_torch_test"]),
        )
    ]
    return [
        "## INT8 file vs the integer torch model",
        "onnxruntime running the INT8 file against PyTorch's converted integer model (the same integers "
        f"in two engines); output grid step {checks['output_step']:.4g}. Fake-quant model vs the file on val: "
        f"top-1 agreement {fmt.percent(checks['parity_fake_quant']['top1_agreement'])}.",
        "",
        markdown_table(
            rows,
            [
                ("split", "split"),
                ("images", "images"),
                ("agreement", "top-1 agreement"),
                ("max_diff", "max abs logit diff"),
                ("steps", "in output steps"),
            ],
        ),
        "",
    ]


def mean_std(row: dict) -> str:
    if row["std"] is None:
        return f"{fmt.percent(row['mean'])} (1 seed)"
    return f"{fmt.percent(row['mean'])} ± {100 * row['std']:.2f}"


def per_seed(row: dict) -> str:
    return ", ".join(f"{fmt.percent(v)} ({seed})" for seed, v in row["seeds"].items())


def recipes_section(results: dict) -> list[str]:
    """The seed framework's table, row by row, as mean ± std over student seeds."""
    recipes = results.get("recipes")
    if not recipes:  # reports written before recipes were run over seeds
        return []
    published = results.get("published") or {}
    by_key = published.get("recipes", {})
    rows = [
        {
            **r,
            "accuracy": mean_std(r),
            "per_seed": per_seed(r),
            "published_accuracy": by_key.get(r["key"], {}).get("accuracy"),
            "published_size_bytes": by_key.get(r["key"], {}).get("size_bytes"),
        }
        for r in recipes
    ]
    columns = [
        ("model", "recipe"),
        ("accuracy", "test acc, mean ± std"),
        ("per_seed", "per seed"),
        ("size_bytes", "file size"),
    ]
    if by_key:
        columns += [("published_accuracy", "seed, published acc"), ("published_size_bytes", "seed, published size")]
    n = len(recipes[0]["seeds"])
    return [
        f"## Recipes over {n} student seeds (test split)",
        f"Each recipe trained once per `student.seed` (teachers and their soft targets shared); test accuracy "
        f"as mean ± sample std over the {n} seeds (in points), then each seed's figure. Sizes are the files "
        "of the main run. The physical floor of 4-bit weights is 0.5 byte per parameter; 16-bit activations "
        "save no byte (their convs run in float in onnxruntime).",
        *published_lines(published),
        "",
        markdown_table(rows, columns),
        "",
    ]


def published_lines(published: dict) -> list[str]:
    """Where the seed framework's published figures beside ours come from, and its teachers'."""
    if not published:
        return []
    teachers = ", ".join(f"{name} {fmt.percent(acc)}" for name, acc in published.get("teachers", {}).items())
    return ["", f"Seed, published: {published['source']}" + (f" Its teachers: {teachers}." if teachers else "")]


def ensembles_section(results: dict) -> list[str]:
    """kd.ensemble schemes on val over student seeds (choosing one is model selection: val, not test)."""
    ensembles = results.get("ensembles")
    if not ensembles or len({r["model"] for r in ensembles}) < 2:
        return []
    rows = [{"model": r["model"], "accuracy": mean_std(r), "per_seed": per_seed(r)} for r in ensembles]
    return [
        "## Teacher ensemble: mean vs confidence-weighted (val split)",
        "The same teachers and views; only how their logits are combined into soft targets differs. The "
        "distilled FP32 student's val accuracy (`dvc exp run -S kd.ensemble=... -S student.seed=N distill`), "
        "because choosing a scheme is model selection; mean ± sample std over student seeds.",
        "",
        markdown_table(rows, [("model", "scheme"), ("accuracy", "val acc, mean ± std"), ("per_seed", "per seed")]),
        "",
    ]


def training_section(results: dict) -> list[str]:
    """Each training stage's img/s and minutes, and the students' val accuracy per training minute."""
    rows = results.get("training")
    if not rows:  # reports written before the curves were read
        return []
    table = [
        {
            "model": r["model"],
            "epochs": r["epochs"],
            "img/s": f"{r['images_per_s']:.0f}",
            "minutes": f"{r['train_minutes']:.1f}",
            "val": fmt.percent(r["val_acc"]),
            "curve": ", ".join(f"{m:.1f} min {fmt.percent(a)}" for m, a in r["curve"]),
        }
        for r in rows
    ]
    return [
        "## Training: img/s and accuracy per CPU-minute (the main run, seed of the first row)",
        "Every training stage's images per second (augmentation included; QAT with fake quant), its "
        "training minutes on this machine (validation excluded) and its val accuracy after each epoch "
        "against the minutes spent so far, read from its dvclive curves.",
        "",
        markdown_table(
            table,
            [
                ("model", "stage"),
                ("epochs", "epochs"),
                ("img/s", "train img/s"),
                ("minutes", "train minutes"),
                ("val", "last val acc"),
                ("curve", "val acc after each epoch"),
            ],
        ),
        "",
        "![training](benchmark_training.png)",
        "",
    ]


def plot_training(rows: Sequence[dict], path: Path) -> None:
    """Val accuracy against training minutes, one line per training stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for row in rows:
        minutes, accuracy = zip(*row["curve"])
        ax.plot(minutes, [100 * a for a in accuracy], "o-", markersize=3, label=row["model"])
    ax.set_xlabel("training minutes (2 cores; validation excluded)")
    ax.set_ylabel("val accuracy, %")
    ax.set_title("Accuracy per CPU-minute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def render_markdown(results: dict) -> str:
    machine = results["machine"]
    timed = [(key, title) for key, title in MAIN_COLUMNS if any(key in row for row in results["main"])]
    parts = [
        f"# {results.get('title', 'Benchmark: distilled, quantized rice classifier vs the seed models')}",
        "",
        f"Command: `{results['command']}`  ",
        *([f"Commit: {results['commit']}  "] if "commit" in results else []),
        f"Date: {results['date']}  ",
        f"Machine: {machine['cpu']}, {machine['cores']} cores{simd_text(machine)}; "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()),
        f"Data: `{results['data_root']}`, test split of {results['test_images']} images "
        "(never used for training or model selection).",
        "",
        "## Goals",
        markdown_table(goal_rows(results["goals"]), [("goal", "goal"), ("measured", "measured"), ("met", "met")]),
        "",
        "## Main table (same test split, same machine, same run)",
        "Latency: batch 1, 1 thread, median (p50) and p90 over repeated runs after warm-up; "
        "throughput at batch 32. Teachers and their ensemble are PyTorch models (accuracy only).",
        "",
        markdown_table(results["main"], timed),
        "",
        *[f"- {note}" for note in results.get("notes", [])],
        "",
        *recipes_section(results),
        *training_section(results),
        *ensembles_section(results),
        *int8_export_section(results),
        *misses_section(results),
        "## Student variants (accuracy / latency / size trade-off)",
        "",
        markdown_table(results["variants"], VARIANT_COLUMNS),
        "",
        "![trade-off](benchmark_tradeoff.png)",
        "",
        "## Pipeline cost",
        "",
        markdown_table(pipeline_rows(results["pipeline"]), [("stage", "stage"), ("seconds", "wall time")]),
        "",
    ]
    return "\n".join(parts)


def plot_tradeoff(variants: Sequence[dict], path: Path) -> None:
    """Accuracy vs latency, marker area ~ file size, FP32 and INT8 of each variant joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for row in variants:
        xs = [row["fp32_latency_p50_ms"], row["int8_latency_p50_ms"]]
        ys = [100 * row["fp32_accuracy"], 100 * row["int8_accuracy"]]
        sizes = [row["fp32_size_bytes"] / 2e3, row["int8_size_bytes"] / 2e3]
        (line,) = ax.plot(xs, ys, "-", alpha=0.5)
        ax.scatter(
            xs[:1],
            ys[:1],
            s=sizes[:1],
            color=line.get_color(),
            marker="o",
            alpha=0.7,
            label=f"{row['variant']} (o FP32, ^ INT8)",
        )
        ax.scatter(xs[1:], ys[1:], s=sizes[1:], color=line.get_color(), marker="^", alpha=0.7)
    ax.set_xlabel("batch-1 p50 latency, ms (1 thread)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title("Student variants: accuracy vs latency (marker area ~ file size)")
    ax.grid(alpha=0.3)
    # below the axes: inside, it hides whichever points fall in its corner
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, markerscale=0.5)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
