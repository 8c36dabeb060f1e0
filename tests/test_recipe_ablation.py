"""The recipe ablation (tools/studies/recipe_ablation.py): each variant changes its part alone, and
the runs on real CIFAR-10 images are the student's own training, reproducible, summarised per part."""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from edgekd.config import as_dict
from edgekd.errors import UserError
from tools.studies import recipe_ablation
from tools.studies.recipe_ablation import RECIPE, ablate, parts, variant
from tools.studies.student_seeds import train_student, with_overrides

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = yaml.safe_load((REPO / "params.yaml").read_text())


def bench_recipe() -> dict:
    return with_overrides(REPO / "params.yaml", REPO / "tools/benchmark/cifar10.yaml", Path("unused"))


def flat(params) -> dict:
    return {f"{section}.{key}": value for section, values in as_dict(params).items() if isinstance(values, dict)
            for key, value in values.items()}  # fmt: skip


@pytest.mark.parametrize("part", list(parts(DEFAULTS)))
def test_a_variant_changes_its_part_and_nothing_else(part):
    raw = bench_recipe()
    recipe, changed = flat(variant(raw, {}, 3, 42)), flat(variant(raw, parts(DEFAULTS)[part][1], 3, 42))
    differing = {key for key in recipe if recipe[key] != changed[key]}
    expected = {f"{section}.{key}" for section, values in parts(DEFAULTS)[part][1].items() for key in values}
    assert differing == expected  # every override is a real change of the benchmark's recipe
    assert recipe["student.epochs"] == 3 and recipe["student.seed"] == 42


def tiny(raw: dict) -> dict:
    """The benchmark recipe at the scale of 300 images: a small convnet, batches of 60."""
    raw["train"] = {**raw["train"], "batch_size": 60, "eval_batch_size": 100}
    raw["student"] = {**raw["student"], "arch": "convnet_d1_16_32_32", "lr": 0.5}
    return raw


def test_every_part_trains_the_student_on_real_images_and_rows_summarise_the_seeds(prepared_cifar):
    raw = tiny(bench_recipe())
    rows = ablate(raw, DEFAULTS, ["label_smoothing", "ema"], 3, [42, 1], prepared_cifar, torch.device("cpu"))
    assert [r["part"] for r in rows] == [RECIPE, "label_smoothing", "ema"]
    for row in rows:
        assert [run["seed"] for run in row["runs"]] == [42, 1]
        values = [run["val_acc"] for run in row["runs"]]
        assert row["val_acc"]["mean"] == pytest.approx(statistics.mean(values))
        assert row["val_acc"]["std"] == pytest.approx(statistics.stdev(values))
        assert row["delta_val_acc"] == pytest.approx(row["val_acc"]["mean"] - rows[0]["val_acc"]["mean"])
        for run in row["runs"]:
            assert 0.1 < run["val_acc"] <= 1 and 0 <= run["val_acc_flip"] <= 1  # chance: 0.1
            assert run["images_per_s"] > 0 and run["train_minutes"] > 0 and 1 <= run["best_epoch"] <= 3
    # the recipe's row is the student's own training with those params, reproduced
    model, result, _ = train_student(variant(raw, {}, 3, 42), prepared_cifar, torch.device("cpu"))
    assert rows[0]["runs"][0]["val_acc"] == result.best_val_acc
    assert rows[0]["runs"][0]["last_epoch_val_acc"] == result.history[-1]["val_acc"]
    # a weight average changes what is trained and selected
    assert [r["val_acc"] for r in rows[2]["runs"]] != [r["val_acc"] for r in rows[0]["runs"]]
    assert recipe_ablation.markdown({"command": "c", "commit": "x", "machine": MACHINE, "student": STUDENT,
                                     "rows": rows}).count("\n| ") == 4  # fmt: skip


MACHINE = {"cpu": "cpu", "cores": 2, "versions": {"torch": torch.__version__}}
STUDENT = {"arch": "convnet_d1_16_32_32", "width": 1.0, "epochs": 3}


def test_an_unknown_part_fails_in_one_line_before_anything_runs(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "tools.studies.recipe_ablation", "--root", str(tmp_path / "none"),
         "--parts", "ema", "whitening", "--out", str(tmp_path / "a.json")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: --parts: unknown whitening (known: optimizer, lr_end, bn_bias_lr, label_smoothing, augment, precision, "
        "alternating_flip, ema, lookahead, norm_after_pool)"
    ]
    assert not (tmp_path / "a.json").exists()


def test_set_changes_the_recipe_of_every_row_and_bad_settings_fail_in_one_line(tmp_path):
    raw = recipe_ablation.with_settings(bench_recipe(), ["train.precision=float32", "train.lr_end=0"])
    assert raw["train"]["precision"] == "float32" and raw["train"]["lr_end"] == 0
    assert bench_recipe()["train"]["precision"] == "bfloat16"  # the config itself is untouched
    recipe, changed = flat(variant(raw, {}, 3, 42)), flat(variant(raw, parts(DEFAULTS)["ema"][1], 3, 42))
    assert recipe["train.precision"] == changed["train.precision"] == "float32"
    for bad in ("train.precison=float32", "precision=float32", "train.precision"):
        with pytest.raises(UserError, match=r"^--set: .* is not SECTION.KEY=VALUE with a key params.yaml has$"):
            recipe_ablation.with_settings(bench_recipe(), [bad])
    run = subprocess.run(
        [sys.executable, "-m", "tools.studies.recipe_ablation", "--root", str(tmp_path / "none"),
         "--set", "train.lr_ends=0", "--out", str(tmp_path / "a.json")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: --set: 'train.lr_ends=0' is not SECTION.KEY=VALUE with a key params.yaml has"
    ]
    assert not (tmp_path / "a.json").exists()
