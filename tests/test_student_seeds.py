"""The seed-spread benchmark's pieces: dihedral test-time averaging, params overrides, one seeded run."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

from benchmarks.student_seeds import dihedral_mean, run_seed, with_overrides
from src.edgekd.data import load_info, load_split
from src.edgekd.soft_targets import compute_soft_targets, save_soft_targets

REPO = Path(__file__).resolve().parents[1]


def test_dihedral_mean_is_invariant_to_flips_and_quarter_turns_of_the_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5)).eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        plain = model(x).softmax(1)
        averaged = dihedral_mean(model)(x)
        for turned in (torch.rot90(x, 1, dims=(-2, -1)), x.flip(-1), torch.rot90(x.flip(-2), 3, dims=(-2, -1))):
            torch.testing.assert_close(dihedral_mean(model)(turned), averaged)
        # the network itself is not invariant, so the average is not just its plain output
        assert not torch.allclose(model(torch.rot90(x, 1, dims=(-2, -1))).softmax(1), plain, atol=1e-4)
    torch.testing.assert_close(averaged.sum(1), torch.ones(2))


def test_overrides_apply_like_make_bench_and_set_the_data_root(tmp_path):
    raw = with_overrides(REPO / "params.yaml", REPO / "benchmarks/rice.yaml", tmp_path / "rice")
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    bench = yaml.safe_load((REPO / "benchmarks/rice.yaml").read_text())["overrides"]
    assert raw["student"]["epochs"] == bench["student"]["epochs"] != base["student"]["epochs"]
    assert raw["student"]["arch"] == base["student"]["arch"]  # keys not overridden are kept
    assert raw["data"]["root"] == str(tmp_path / "rice")
    assert raw["data"]["image_size"] == base["data"]["image_size"]


def test_one_seed_trains_the_baseline_student_on_real_images_reproducibly(prepared_small):
    seed = 3
    raw = with_overrides(REPO / "params.yaml", None, Path("unused"))
    raw["student"] = {**raw["student"], "epochs": 2}
    runs = [run_seed(raw, seed, prepared_small, torch.device("cpu")) for _ in range(2)]
    assert runs[0] == {**runs[1], "train_s": runs[0]["train_s"]}  # same seed, same accuracies
    row = runs[0]
    assert row["seed"] == seed and row["best_epoch"] in (1, 2) and row["val_images"] > 0
    for key in ("val_acc", "last_epoch_val_acc", "tta8_val_acc"):
        assert 0.0 <= row[key] <= 1.0
    assert row["val_acc"] >= row["last_epoch_val_acc"]  # the selected epoch is the best on val


def test_one_seed_distils_from_stored_soft_targets_with_the_given_alpha(prepared_small, tmp_path):
    """The KD recipe trains on the file's views (rendered with the params' seed) for any student seed."""
    info, (images, labels) = load_info(prepared_small), load_split(prepared_small, "train")
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, len(info.classes))).eval()
    raw = with_overrides(REPO / "params.yaml", None, Path("unused"))
    raw["student"] = {**raw["student"], "epochs": 2}
    targets = tmp_path / "soft_targets.pt"
    save_soft_targets(targets, compute_soft_targets([teacher], images, labels, views=2, seed=raw["seed"],
                                                    mean=info.mean, std=info.std, batch_size=64,
                                                    device=torch.device("cpu")))

    def distil(alpha: float) -> dict:
        return run_seed({**raw, "kd": {**raw["kd"], "alpha": alpha}}, 5, prepared_small, torch.device("cpu"), targets)

    first, again, ce_only = distil(0.7), distil(0.7), distil(0.0)
    assert first == {**again, "train_s": first["train_s"]}
    assert first["seed"] == 5 and 0.0 <= first["val_acc"] <= 1.0
    # alpha weighs the (untrained) teacher's logits: without them the run ends elsewhere
    assert ce_only != {**first, "train_s": ce_only["train_s"]}
