"""`make bench` end to end on a tiny run: experiments, restored workspace, report tables' shape."""

import json
import re
from pathlib import Path

import numpy as np
import yaml

from src.benchmark import SIMD_FLAGS
from src.edgekd.comparison import missed_images
from src.edgekd.config import StudentConfig
from src.edgekd.experiments import overrides_to_args, parse_stage_log
from src.edgekd.report import MAIN_COLUMNS, VARIANT_COLUMNS, format_value, markdown_table
from tiny_pipeline import REPO, sh

DEFAULT_ARCH = StudentConfig().arch

SEED_MODELS = REPO.parent / "shared/reference/seed-models/rice-image"


def test_overrides_become_hydra_set_params():
    args = overrides_to_args({"data": {"root": "../x", "image_size": 48}, "student.width": 0.5,
                              "teachers": {"archs": ["resnet18", "densenet121"]}})
    assert args == ["-S", "data.root=../x", "-S", "data.image_size=48", "-S", "student.width=0.5",
                    "-S", "teachers.archs=[resnet18,densenet121]"]


def test_stage_log_times_stages_and_lists_skipped():
    lines = [(0.0, "Reproducing experiment 'x'"), (1.0, "Stage 'prepare' didn't change, skipping"),
             (2.0, "Running stage 'baseline':"), (5.5, "> python -m ..."), (7.0, "Running stage 'distill':"),
             (20.0, "Ran experiment(s): neat-exp")]
    run = parse_stage_log(lines, end_time=21.0)
    assert run.name == "neat-exp"
    assert run.stage_s == {"baseline": 5.0, "distill": 13.0}
    assert run.skipped == ["prepare"]
    assert run.total_s == 21.0


def test_format_and_table():
    assert format_value("accuracy", 0.99804) == "99.80"
    assert format_value("size_bytes", 130250) == "0.130 MB"
    assert format_value("size_bytes", 48000) == "48.0 KB"
    assert format_value("latency_p50_ms", None) == "–"
    table = markdown_table([{"model": "a", "accuracy": 0.5}], MAIN_COLUMNS).splitlines()
    assert len(table) == 3 and table[2].count("|") == len(MAIN_COLUMNS) + 1


def test_missed_images_lists_each_wrong_image_once_with_every_answer():
    labels = np.array([0, 1, 2, 1])
    misses = missed_images(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], labels, ["x", "y", "z"],
                           {"p": np.array([0, 2, 2, 0]), "q": np.array([0, 2, 1, 1])})
    assert misses["models"] == ["p", "q"]
    assert [r["image"] for r in misses["rows"]] == ["b.jpg", "c.jpg", "d.jpg"]
    assert misses["rows"][0] == {"image": "b.jpg", "class": "y", "predicted": {"p": "z", "q": "z"}}
    assert misses["rows"][2]["predicted"] == {"p": "x", "q": "y"}
    assert misses["missed_by_all"] == 1  # b.jpg


def table_after(markdown: str, heading: str) -> list[list[str]]:
    """Rows (cells) of the first Markdown table after `heading`, header and rule excluded."""
    section = markdown.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]


def test_benchmark_on_tiny_run_writes_report_and_restores_main_run(tiny_repo: Path):
    config = {
        "overrides": {"student": {"epochs": 1}},
        "variants": [{"student.width": 0.5}, {"student.arch": "mobilenet_v3_small"}],
        "seed_models": {"fp32": str(SEED_MODELS / "student_fp32_qat.onnx"),
                        "int8": str(SEED_MODELS / "student_int8_static.onnx"),
                        "image_size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    }
    (tiny_repo / "bench.yaml").write_text(yaml.safe_dump(config))

    sh("python", "-m", "src.benchmark", "--config", "bench.yaml", "--out", "reports", cwd=tiny_repo)

    results = json.loads((tiny_repo / "reports/benchmark.json").read_text())
    names = [row["model"] for row in results["main"]]
    assert names[:4] == ["teacher resnet18", "teacher mobilenet_v2", "teacher densenet121",
                         "teacher ensemble (mean logits)"]
    assert [n.split(",")[0] for n in names[4:7]] == ["student baseline (no KD)", "student distilled",
                                                     "student distilled + QAT"]
    assert names[7].startswith("seed FP32") and names[8].startswith("seed INT8")
    assert results["main"][8]["p50_vs_seed_int8"] == 1.0
    for row in results["main"]:
        assert 0.0 <= row["accuracy"] <= 1.0
        if "latency_p50_ms" in row:
            assert 0 < row["latency_p50_ms"] <= row["latency_p90_ms"]

    # Each variant departs from the main run: the second one is back at width 0.25.
    assert [(v["arch"], v["width"]) for v in results["variants"]] == [
        (DEFAULT_ARCH, 0.25), (DEFAULT_ARCH, 0.5), ("mobilenet_v3_small", 0.25)]
    pipeline = results["pipeline"]
    assert {"prepare", "train_teacher@resnet18", "distill", "qat", "export", "evaluate"} <= set(pipeline["stages"])
    incremental = pipeline["incremental"]
    assert incremental["teachers_skipped"]
    assert {"train_teacher@resnet18", "train_teacher@mobilenet_v2", "train_teacher@densenet121"} <= set(
        incremental["skipped"])
    assert 0 < incremental["ratio"] < 1
    assert all(isinstance(g["met"], bool) for g in results["goals"])
    wall = next(g for g in results["goals"] if g["goal"].startswith("whole benchmark"))
    assert wall["measured"] == f"{results['bench_wall_s'] / 60:.1f} min" and wall["met"]  # a tiny run: minutes

    markdown = (tiny_repo / "reports/benchmark.md").read_text()
    assert markdown.startswith("# Benchmark") and "Command: `make bench" in markdown
    assert set(results["machine"]["simd"]) <= set(SIMD_FLAGS)
    assert re.search(r"Machine: .*, \d+ cores \(.*(with|no) VNNI\)", markdown)
    main_table = table_after(markdown, "## Main table")
    assert len(main_table) == 9 and all(len(r) == len(MAIN_COLUMNS) for r in main_table)
    # The misses table agrees with the accuracies: one non-✓ cell per image a model gets wrong.
    miss_table = table_after(markdown, "## Test images missed")
    assert len(miss_table) == len(results["misses"]["rows"]) > 0
    for column, row in enumerate([results["main"][i] for i in (3, 4, 5, 6)], start=2):
        wrong = sum(r[column] != "✓" for r in miss_table)
        assert wrong == round((1 - row["accuracy"]) * results["test_images"]), row["model"]
    variant_table = table_after(markdown, "## Student variants")
    assert len(variant_table) == 3 and all(len(r) == len(VARIANT_COLUMNS) for r in variant_table)
    assert re.search(r"incremental `dvc exp run -S student.width=0.5`", markdown)
    assert (tiny_repo / "reports/benchmark_tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The workspace holds the main run again (width 0.25), not the last variant.
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    assert params["student"]["width"] == 0.25
    evaluation = json.loads((tiny_repo / "metrics/evaluate.json").read_text())
    assert evaluation["int8"]["size_bytes"] == results["variants"][0]["int8_size_bytes"]
