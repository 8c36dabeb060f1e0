"""The seed-spread benchmark's pieces: dihedral test-time averaging, params overrides, one seeded run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from edgekd.config import params_from_dict
from edgekd.data.batches import load_split, normalize
from edgekd.data.prepared import load_info
from edgekd.train import student
from edgekd.train.soft_targets import compute_soft_targets, save_soft_targets
from tools.studies.student_seeds import dihedral_mean, read_targets, run_seed, with_overrides

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
    raw = with_overrides(REPO / "params.yaml", REPO / "tools/benchmark/rice.yaml", tmp_path / "rice")
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    bench = yaml.safe_load((REPO / "tools/benchmark/rice.yaml").read_text())["overrides"]
    assert raw["student"]["epochs"] == bench["student"]["epochs"] != base["student"]["epochs"]
    assert raw["student"]["arch"] == base["student"]["arch"]  # keys not overridden are kept
    assert raw["data"]["root"] == str(tmp_path / "rice")
    assert raw["data"]["image_size"] == base["data"]["image_size"]


@pytest.fixture
def trained(monkeypatch) -> dict[str, list]:
    """The models `run_seed` builds and the fit results it gets, in call order (the models end up
    holding the selected epoch's weights), to check its row against them."""
    seen: dict[str, list] = {"models": [], "results": []}
    build, train = student.build_model, student.train_model

    def recording_build(*args, **kwargs):
        seen["models"].append(build(*args, **kwargs))
        return seen["models"][-1]

    def recording_train(*args, **kwargs):
        seen["results"].append(train(*args, **kwargs))
        return seen["results"][-1]

    monkeypatch.setattr(student, "build_model", recording_build)  # what run_seed's training calls
    monkeypatch.setattr(student, "train_model", recording_train)
    return seen


def val_accuracy(model: nn.Module, prepared: Path, views: int = 1) -> float:
    """Val accuracy of `model` computed here; views=8 averages the softmax over every flip/quarter turn."""
    info, (images, labels) = load_info(prepared), load_split(prepared, "val")
    x = normalize(images, info.mean, info.std)
    turned = [torch.rot90(v, k, dims=(-2, -1)) for v in (x, x.flip(-1)) for k in range(4)][:views]
    with torch.no_grad():
        probs = torch.stack([model.eval()(v).softmax(1) for v in turned]).mean(0)
    return round((probs.argmax(1) == labels).float().mean().item(), 4)


def test_one_seed_trains_the_baseline_student_on_real_images_reproducibly(prepared_small, trained):
    seed = 3
    raw = with_overrides(REPO / "params.yaml", None, Path("unused"))
    raw["student"] = {**raw["student"], "epochs": 3}  # enough for the selected epoch not to be the last
    runs = [run_seed(raw, seed, prepared_small, torch.device("cpu")) for _ in range(2)]
    assert runs[0] == {**runs[1], "train_s": runs[0]["train_s"]}  # same seed, same accuracies
    row, history = runs[0], [h["val_acc"] for h in trained["results"][0].history]
    assert row["seed"] == seed and row["val_images"] == len(load_split(prepared_small, "val")[1])
    # the row reports the epoch with the best val accuracy (the first of ties), and the last one
    assert len(history) == 3 and row["best_epoch"] == 1 + history.index(max(history))
    assert row["val_acc"] == round(max(history), 4) and row["last_epoch_val_acc"] == round(history[-1], 4)
    # and the accuracies are those of the model it leaves behind, recomputed here, plain and 8-view
    model = trained["models"][0]
    assert row["val_acc"] == val_accuracy(model, prepared_small)
    assert row["tta8_val_acc"] == val_accuracy(model, prepared_small, views=8)


def test_one_seed_distils_from_stored_soft_targets_with_the_given_alpha(prepared_small, tmp_path, trained):
    """The KD recipe trains on the file's views (rendered with the params' seed) for any student seed."""
    info, (images, _) = load_info(prepared_small), load_split(prepared_small, "train")
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, len(info.classes))).eval()
    raw = with_overrides(REPO / "params.yaml", None, Path("unused"))
    raw["student"] = {**raw["student"], "epochs": 2}
    raw["kd"] = {**raw["kd"], "views": 2}
    path = tmp_path / "soft_targets.pt"
    save_soft_targets(path, compute_soft_targets([teacher], images, params_from_dict(raw), info, torch.device("cpu")))
    targets = read_targets(raw, prepared_small, path)

    def distil(alpha: float) -> dict:
        return run_seed({**raw, "kd": {**raw["kd"], "alpha": alpha}}, 5, prepared_small, torch.device("cpu"), targets)

    first, again, ce_only = distil(0.7), distil(0.7), distil(0.0)
    assert first == {**again, "train_s": first["train_s"]}
    assert first["seed"] == 5
    # each row's accuracies are its own model's, recomputed here (plain and 8-view)
    for row, model in zip((first, again, ce_only), trained["models"], strict=True):
        assert row["val_acc"] == val_accuracy(model, prepared_small)
        assert row["tta8_val_acc"] == val_accuracy(model, prepared_small, views=8)
    # alpha weighs the (untrained) teacher's logits: without them the run ends elsewhere
    assert ce_only != {**first, "train_s": ce_only["train_s"]}
