"""`make bench` end to end on a tiny run: experiments, restored workspace, report tables' shape."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from shared_data import SEED_MODELS, require
from tiny_pipeline import repo_params, sh

from edgekd.config import load_params
from edgekd.data.batches import load_split, normalize
from edgekd.data.images import load_image
from edgekd.data.prepared import load_info
from edgekd.deploy.sessions import ort_session
from edgekd.errors import UserError
from edgekd.train.checkpoints import load_teachers
from tools.benchmark import comparison
from tools.benchmark.comparison import missed_images
from tools.benchmark.experiments import overrides_to_args, parse_stage_log
from tools.benchmark.report import MAIN_COLUMNS, VARIANT_COLUMNS, markdown_table
from tools.benchmark.run import load_config, read_evaluations, write_report
from tools.machine import SIMD_FLAGS

DEFAULT_ARCH = repo_params().student.arch
REPO = Path(__file__).resolve().parents[1]
RICE_CONFIG = REPO / "tools/benchmark/rice.yaml"


def test_overrides_become_hydra_set_params():
    args = overrides_to_args(
        {
            "data": {"root": "../x", "image_size": 48},
            "student.width": 0.5,
            "teachers": {"archs": ["resnet18", "densenet121"]},
        }
    )
    assert args == [
        "-S",
        "data.root=../x",
        "-S",
        "data.image_size=48",
        "-S",
        "student.width=0.5",
        "-S",
        "teachers.archs=[resnet18,densenet121]",
    ]


def test_stage_log_times_stages_and_lists_skipped():
    lines = [
        (0.0, "Reproducing experiment 'x'"),
        (1.0, "Stage 'prepare' didn't change, skipping"),
        (2.0, "Running stage 'baseline':"),
        (5.5, "> python -m ..."),
        (7.0, "Running stage 'distill':"),
        (15.0, "Stage 'studies/dvc.yaml:sensitivity' didn't change, skipping"),
        (16.0, "Running stage 'studies/dvc.yaml:export@ptq':"),
        (20.0, "Ran experiment(s): neat-exp"),
    ]
    run = parse_stage_log(lines, end_time=21.0)
    assert run.name == "neat-exp"
    assert run.stage_s == {"baseline": 5.0, "distill": 8.0, "export@ptq": 4.0}  # a study stage by its name
    assert run.skipped == ["prepare", "sensitivity"]
    assert run.total_s == 21.0


def test_table_has_one_cell_per_column():
    table = markdown_table([{"model": "a", "accuracy": 0.5}], MAIN_COLUMNS).splitlines()
    assert len(table) == 3 and table[2].count("|") == len(MAIN_COLUMNS) + 1


@pytest.mark.parametrize("config", sorted((REPO / "tools/benchmark").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load(config: Path):
    cfg, raw = load_config(config), yaml.safe_load(config.read_text())
    base = load_config(config.parent / raw["base"]) if "base" in raw else {}
    assert cfg == {**base, **{k: cfg[k] for k in raw if k != "base"}} and "base" not in cfg
    for key, value in raw.items():  # its own values win; mappings keep the base's other keys
        if key != "base" and not isinstance(value, dict):
            assert cfg[key] == value


def test_config_extends_its_base_key_by_key(tmp_path: Path):
    cfg = yaml.safe_load(RICE_CONFIG.read_text())
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "top.yaml").write_text(
        yaml.safe_dump(
            {
                "base": "base.yaml",
                "overrides": {"student": {"epochs": 3}},
                "student_seeds": [7],
                "goals": {"bench_max_minutes": 5},
            }
        )
    )
    top = load_config(tmp_path / "top.yaml")
    assert top["overrides"] == {**cfg["overrides"], "student": {**cfg["overrides"]["student"], "epochs": 3}}
    assert top["student_seeds"] == [7] and top["seed_models"] == cfg["seed_models"]
    assert top["goals"] == {**cfg["goals"], "bench_max_minutes": 5}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda cfg: cfg["goals"].update(int8_max_dorp=0.1), r"unknown goals\.int8_max_dorp \(known: "),
        (lambda cfg: cfg["goals"].pop("mixed_max_drop"), r"missing goals\.mixed_max_drop \(set with"),
        (lambda cfg: cfg.pop("title"), r"missing title$"),
        (lambda cfg: cfg["seed_models"].pop("int8"), r"missing seed_models\.int8$"),
        (lambda cfg: cfg["published"].pop("source"), r"missing published\.source$"),
    ],
)
def test_config_names_what_is_wrong_in_one_line(tmp_path: Path, change, message):
    cfg = yaml.safe_load(RICE_CONFIG.read_text())
    change(cfg)
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match=r"bench.yaml: " + message):
        load_config(tmp_path / "bench.yaml")


def test_missed_images_lists_each_wrong_image_once_with_every_answer():
    labels = np.array([0, 1, 2, 1])
    misses = missed_images(
        ["a.jpg", "b.jpg", "c.jpg", "d.jpg"],
        labels,
        ["x", "y", "z"],
        {"p": np.array([0, 2, 2, 0]), "q": np.array([0, 2, 1, 1])},
    )
    assert misses["models"] == ["p", "q"]
    assert [r["image"] for r in misses["rows"]] == ["b.jpg", "c.jpg", "d.jpg"]
    assert misses["rows"][0] == {"image": "b.jpg", "class": "y", "predicted": {"p": "z", "q": "z"}}
    assert misses["rows"][2]["predicted"] == {"p": "x", "q": "y"}
    assert misses["missed_by_all"] == 1  # b.jpg
    listed = missed_images(
        ["a.jpg", "b.jpg", "c.jpg", "d.jpg"],
        labels,
        ["x", "y", "z"],
        {"p": np.array([0, 2, 2, 0]), "q": np.array([0, 2, 1, 1])},
        max_rows=2,
    )
    assert [r["image"] for r in listed["rows"]] == ["b.jpg", "c.jpg"]
    assert listed["missed_by_any"] == 3 and listed["missed_by_all"] == 1


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


def expected_accuracies(repo: Path, seed_cfg: dict, misses: dict) -> list[float]:
    """Test accuracy of each main-table row (in its order), counted here from answers given per image:
    teachers run again (torch), the ensemble and the students from the report's per-image answers
    (the students' also from the evaluate stage's plots/confusion_<name>.csv), the seed models run
    again (onnxruntime) on the test images decoded at their own size and normalisation."""
    params, prepared = load_params(repo / "params.yaml"), repo / "prepared"
    info, (images, labels) = load_info(prepared), load_split(prepared, "test")
    accuracies = []
    teachers, _ = load_teachers(repo / "models/teachers", params.teachers.archs, info)
    with torch.no_grad():
        for teacher in teachers:
            answers = teacher.eval()(normalize(images, info.mean, info.std)).argmax(1)
            accuracies.append((answers == labels).sum().item() / len(labels))
    answered = {r["image"]: r["predicted"] for r in misses["rows"]}  # images someone gets wrong
    manifest = pd.read_csv(prepared / "test.csv")
    for name, key in (
        ("teacher ensemble", None),
        ("student baseline", "baseline"),
        ("student fp32", "fp32"),
        ("student int8", "int8"),
        ("student ptq", "ptq"),
        ("student mixed", "mixed"),
        ("student a16", "a16"),
        ("student mixed_a16", "mixed_a16"),
        ("student baseline_int8", "baseline_int8"),
    ):
        right = sum(
            answered.get(path, {name: cls})[name] == cls for path, cls in zip(manifest["path"], manifest["class"])
        )
        if key is not None:
            confusion = pd.read_csv(repo / "plots" / f"confusion_{key}.csv")
            assert (confusion["actual"] == confusion["predicted"]).sum() == right, key
        accuracies.append(right / len(manifest))
    mean, std = np.float32(seed_cfg["mean"]).reshape(1, 3, 1, 1), np.float32(seed_cfg["std"]).reshape(1, 3, 1, 1)
    size, root = seed_cfg["image_size"], repo / params.data.root
    pixels = np.stack([load_image(root / p, size, params.data.max_image_pixels) for p in manifest["path"]])
    x = ((pixels.transpose(0, 3, 1, 2) / np.float32(255) - mean) / std).astype(np.float32)
    for precision in ("fp32", "int8"):
        sess = ort_session(seed_cfg[precision])
        name = sess.get_inputs()[0].name
        answers = np.concatenate([sess.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])
        accuracies.append(float((answers.argmax(1) == labels.numpy()).mean()))
    return accuracies


def test_benchmark_on_tiny_run_writes_report_and_restores_main_run(tiny_project: Path):
    tiny_repo = tiny_project  # its first, forced run reproduces everything
    require(SEED_MODELS, "reference/seed-models/rice-image/")
    rice = yaml.safe_load(RICE_CONFIG.read_text())
    config = {
        "title": rice["title"],
        "overrides": {"student": {"epochs": 1}},
        "student_seeds": [42, 1],
        "study_seeds": 1,  # the studies at seed 42 only, the deployed model's stages at both
        "compare_ensembles": ["confidence"],
        "variants": [{"bench.runs": 12}],  # reruns evaluate alone: the variant machinery, cheaply
        "seed_models": {
            "fp32": str(SEED_MODELS / "student_fp32_qat.onnx"),
            "int8": str(SEED_MODELS / "student_int8_static.onnx"),
            "image_size": 224,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
        "goals": rice["goals"],
        "published": rice["published"],
    }
    (tiny_repo / "bench.yaml").write_text(yaml.safe_dump(config))
    # curves another run left (a teacher of other params): no stage of this pipeline declares them
    stale = tiny_repo / "dvclive/teacher_vgg11/plots/metrics"
    stale.mkdir(parents=True)
    for name, value in (("val_acc", 0.5), ("seconds", 10.0), ("images_per_s", 100.0)):
        (stale / f"{name}.tsv").write_text(f"step\t{name}\n0\t{value}\n")

    sh("python", "-m", "tools.benchmark.run", "--config", "bench.yaml", "--out", "reports", cwd=tiny_repo)

    results = json.loads((tiny_repo / "reports/benchmark.json").read_text())
    names = [row["model"] for row in results["main"]]
    assert names[:4] == [
        "teacher resnet18",
        "teacher mobilenet_v2",
        "teacher densenet121",
        "teacher ensemble (mean logits)",
    ]
    assert [n.split(",")[0] for n in names[4:12]] == [
        "student baseline (no KD)",
        "student distilled",
        "student distilled + QAT",
        "student distilled + PTQ",
        "student distilled + mixed QAT",
        "student distilled + QAT",
        "student distilled + mixed QAT",
        "student baseline + QAT",
    ]
    assert names[12].startswith("seed FP32") and names[13].startswith("seed INT8")
    seed_int8_p50 = results["main"][13]["latency_p50_ms"]
    for row in results["main"]:
        if "latency_p50_ms" in row:
            assert 0 < row["latency_p50_ms"] <= row["latency_p90_ms"]
            assert row["p50_vs_seed_int8"] == pytest.approx(row["latency_p50_ms"] / seed_int8_p50, rel=1e-12)
    assert [r["accuracy"] for r in results["main"]] == pytest.approx(
        expected_accuracies(tiny_repo, config["seed_models"], results["misses"]), abs=1e-6
    )

    # The deployed model's recipes over both student seeds, the studies' at the first alone; the main
    # seed's figures are the main table's.
    recipes = {r["key"]: r for r in results["recipes"]}
    assert list(recipes) == ["baseline", "fp32", "ptq", "baseline_int8", "int8", "a16", "mixed_a16", "mixed"]
    main_acc = {r["model"]: r["accuracy"] for r in results["main"]}
    assert recipes["int8"]["seeds"]["42"] == main_acc["student distilled + QAT, INT8"]
    assert recipes["mixed_a16"]["seeds"]["42"] == main_acc["student distilled + mixed QAT, 16/8-bit activations"]
    assert recipes["baseline"]["seeds"]["42"] == main_acc["student baseline (no KD), FP32"]
    for key, row in recipes.items():
        if key not in ("baseline", "fp32", "int8"):
            assert list(row["seeds"]) == ["42"] and row["std"] is None
            continue
        assert list(row["seeds"]) == ["42", "1"]
        values = list(row["seeds"].values())
        assert row["mean"] == pytest.approx(np.mean(values)) and row["std"] == pytest.approx(np.std(values, ddof=1))
    # every training stage's img/s and its val accuracy per training minute, from its dvclive curves
    training = {r["model"]: r for r in results["training"]}
    assert list(training) == [
        *(f"teacher_{arch}" for arch in ("resnet18", "mobilenet_v2", "densenet121")),
        *("baseline", "distill", "qat", "qat_a16", "qat_mixed", "qat_mixed_a16", "qat_scratch"),
    ]
    distill_curve = pd.read_csv(tiny_repo / "dvclive/distill/plots/metrics/val_acc.tsv", sep="\t")
    assert [a for _, a in training["distill"]["curve"]] == pytest.approx(distill_curve["val_acc"].tolist())
    for row in training.values():  # the curve's minutes are rounded to 3 decimals
        assert row["images_per_s"] > 0 and row["curve"][-1][0] == pytest.approx(row["train_minutes"], abs=5e-4)
    assert (tiny_repo / "reports/benchmark_training.png").stat().st_size > 0
    # kd.ensemble mean (the main scheme) vs confidence, on val, over the same seeds
    ensembles = {r["model"]: r for r in results["ensembles"]}
    assert list(ensembles) == ["kd.ensemble: mean", "kd.ensemble: confidence"]
    assert all(list(r["seeds"]) == ["42", "1"] for r in ensembles.values())
    distill_val = json.loads((tiny_repo / "metrics/distill.json").read_text())["val_acc"]
    assert ensembles["kd.ensemble: mean"]["seeds"]["42"] == distill_val  # the restored main run's

    # A variant departs from the main run's params.
    assert [(v["arch"], v["width"]) for v in results["variants"]] == [(DEFAULT_ARCH, 0.25)] * 2
    pipeline = results["pipeline"]
    assert {"prepare", "train_teacher@resnet18", "distill", "qat", "export@int8", "evaluate@int8"} <= set(
        pipeline["stages"]
    )
    incremental = pipeline["incremental"]
    assert incremental["command"] == "dvc exp run -S student.seed=1" and incremental["teachers_skipped"]
    assert {"train_teacher@resnet18", "train_teacher@mobilenet_v2", "train_teacher@densenet121"} <= set(
        incremental["skipped"]
    )
    # its share of the full run (a goal judged on real data: on tiny data teachers cost next to nothing)
    assert incremental["ratio"] == pytest.approx(incremental["total_s"] / pipeline["total_s"])
    assert not {s for s in incremental["stages_run"] if s.startswith("train_teacher") or s == "soft_targets"}
    assert all(isinstance(g["met"], bool) for g in results["goals"])
    wall = next(g for g in results["goals"] if g["goal"].startswith("whole benchmark"))
    assert wall["measured"] == f"{results['bench_wall_s'] / 60:.1f} min" and wall["met"]  # a tiny run: minutes

    markdown = (tiny_repo / "reports/benchmark.md").read_text()
    assert markdown.startswith("# Benchmark") and "Command: `make bench" in markdown
    assert set(results["machine"]["simd"]) <= set(SIMD_FLAGS)
    assert re.search(r"Machine: .*, \d+ cores \(.*(with|no) VNNI\)", markdown)
    main_table = table_after(markdown, "## Main table")
    assert len(main_table) == 14 and all(len(r) == len(MAIN_COLUMNS) for r in main_table)
    ratio = [key for key, _ in MAIN_COLUMNS].index("p50_vs_seed_int8")  # the ratios as the table shows them
    assert [r[ratio] for r in main_table] == [
        f"{row['p50_vs_seed_int8']:.2f}x" if "p50_vs_seed_int8" in row else "–" for row in results["main"]
    ]
    # The misses table agrees with the accuracies: one non-✓ cell per image a model gets wrong.
    miss_table = table_after(markdown, "## Test images missed")
    assert len(miss_table) == len(results["misses"]["rows"]) > 0
    for column, row in enumerate(results["main"][3:12], start=2):  # ensemble, then the 8 students
        wrong = sum(r[column] != "✓" for r in miss_table)
        assert wrong == round((1 - row["accuracy"]) * results["test_images"]), row["model"]
    variant_table = table_after(markdown, "## Student variants")
    assert len(variant_table) == 2 and all(len(r) == len(VARIANT_COLUMNS) for r in variant_table)
    # study_seeds 1: the seed-1 run is the deployed model's pipeline alone (no -P)
    assert re.search(r"incremental `dvc exp run -S student.seed=1`", markdown)
    recipe_table = table_after(markdown, "## Recipes over 2 student seeds")
    assert [r[0] for r in recipe_table] == [r["model"] for r in results["recipes"]]
    assert recipe_table[4][1] == f"{100 * recipes['int8']['mean']:.2f} % ± {100 * recipes['int8']['std']:.2f}"
    assert recipe_table[4][-2:] == ["98.07 %", "0.310 MB"] and recipe_table[0][-2:] == ["–", "–"]  # published
    assert len(table_after(markdown, "## Teacher ensemble: mean vs confidence")) == 2
    assert (tiny_repo / "reports/benchmark_tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (tiny_repo / "reports/benchmark.log").read_text()  # every experiment's console output
    assert log.count("$ dvc exp run") == 5 and "$ dvc exp run -S student.seed=1\n" in log
    assert "Running stage 'distill'" in log

    # The workspace holds the main run again, not the last variant (which timed 12 runs, not 10).
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    assert params["bench"]["runs"] == 10 and params["student"]["seed"] == 42
    evaluation = read_evaluations(tiny_repo)  # metrics and trade-off rows
    assert len(evaluation) == 8 and {row["latency_runs"] for row in evaluation.values()} == {10}
    assert evaluation["int8"]["size_bytes"] == results["variants"][0]["int8_size_bytes"]

    # The same results under CIFAR-10's config, which has no seed models: no seed rows or ratios,
    # its own goals on the recipes' means, the published figures of its table.
    cifar = load_config(REPO / "tools/benchmark/cifar10.yaml")
    no_seed = {
        **results,
        "title": cifar["title"],
        "published": cifar["published"],
        "notes": comparison.notes(None) + cifar["notes"],
        "main": [
            {k: v for k, v in row.items() if k != "p50_vs_seed_int8"}
            for row in results["main"]
            if not row["model"].startswith("seed")
        ],
    }
    write_report(no_seed, tiny_repo / "reports/cifar10", cifar["goals"])
    markdown = (tiny_repo / "reports/cifar10/benchmark.md").read_text()
    assert markdown.startswith(f"# {cifar['title']}") and "seed INT8" not in markdown
    assert len(table_after(markdown, "## Main table")) == 12
    goals = {g["goal"]: g for g in no_seed["goals"]}
    assert not any("seed INT8" in name or "incremental" in name for name in goals)
    gain = next(g for name, g in goals.items() if name.startswith("distilled FP32 student >= the baseline"))
    min_gain = cifar["goals"]["kd_min_gain"]
    assert f"+ {100 * min_gain:.1f} point (mean of 2 student seeds)" in [n for n, g in goals.items() if g is gain][0]
    kd = recipes["fp32"]["mean"] - recipes["baseline"]["mean"]
    assert gain["measured"].endswith(f"({100 * kd:+.2f} points)") and gain["met"] == (kd >= min_gain - 1e-9)
    int8 = next(g for name, g in goals.items() if name.startswith("INT8 >= 90.00 %"))
    assert int8["measured"] == f"{100 * recipes['int8']['mean']:.2f} %"
    assert next(name for name in goals if name.startswith("INT8 file <=")) == "INT8 file <= 1.000 MB"
    recipe_table = table_after(markdown, "## Recipes over 2 student seeds")
    assert recipe_table[1][-2:] == ["96.34 %", "9.200 MB"] and recipe_table[2][-2:] == ["–", "–"]  # fp32, ptq
    assert "Its teachers: DenseNet-190-40 97.03 %, WRN-28-10 97.24 %, WRN-28-4 96.66 %." in markdown
