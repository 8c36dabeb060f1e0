"""The shared training loop on real rice images: learning, selection, early stop, resume, determinism."""

import csv
import dataclasses
import shutil

import pytest
import torch
from torch import nn

from edgekd.data.batches import load_split
from edgekd.data.prepared import load_info
from edgekd.train.batching import alternating_flips, epoch_augmentation, iterate_batches, steps_per_epoch
from edgekd.train.device import seed_everything
from edgekd.train.engine import Lookahead, fit, make_optimizer, train_one_epoch
from edgekd.train.evaluation import evaluate
from edgekd.train.fit_setup import FitSetup
from edgekd.train.losses import ce_loss_fn
from edgekd.train.models import HEAD_SCALE, build_model, fit_whitening
from edgekd.train.resume import fingerprint, resume_file


@pytest.fixture(scope="module")
def data(prepared_small):
    info = load_info(prepared_small)
    return info, load_split(prepared_small, "train"), load_split(prepared_small, "val")


def _setup(info, tmp_path=None, epochs=3, **kw):
    live = None if tmp_path is None else tmp_path / "live"
    return FitSetup(
        epochs=epochs,
        batch_size=16,
        eval_batch_size=64,
        seed=7,
        mean=info.mean,
        std=info.std,
        live_dir=live,
        resume_path=None if live is None else resume_file(live),
        **kw,
    )


def _run(info, train, val, setup, lr=0.01, on_epoch_start=None):
    seed_everything(0)  # what each stage does first
    model = build_model("mobilenet_v3_small", len(info.classes), 0.25)
    optimizer, scheduler = make_optimizer(model, lr, 0.05, setup.epochs, steps_per_epoch(len(train[0]), 16))
    result = fit(model, ce_loss_fn(0.1), optimizer, scheduler, train, val, setup, on_epoch_start)
    return model, result


def test_training_steps_on_real_images_reduce_loss(data):
    info, train, _ = data
    seed_everything(0)
    model = build_model("mobilenet_v3_small", len(info.classes), 0.25)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    setup = _setup(info)
    batch = next(iterate_batches(*train, setup, torch.Generator().manual_seed(0), augment=None))
    before = model.classifier[-1].weight.detach().clone()
    losses = [
        train_one_epoch(model, ce_loss_fn(0.0), optimizer, None, iter([batch]), setup.device)["loss"] for _ in range(8)
    ]
    assert losses[-1] < 0.7 * losses[0]
    assert not torch.equal(before, model.classifier[-1].weight)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One uninterrupted 3-epoch run, shared by the selection, resume and determinism tests."""
    info, train, val = data
    tmp_path = tmp_path_factory.mktemp("reference")
    model, result = _run(info, train, val, _setup(info, tmp_path, fingerprint="run"))
    return tmp_path, model, result


def test_fit_selects_best_val_epoch_and_logs_curves(data, reference):
    info, _, val = data
    tmp_path, model, result = reference
    assert result.epochs_run == 3 and len(result.history) == 3
    assert result.best_val_acc == max(row["val_acc"] for row in result.history)
    assert evaluate(model, *val, info.mean, info.std)["acc"] == pytest.approx(result.best_val_acc)
    with open(tmp_path / "live/plots/metrics/val_acc.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert not resume_file(tmp_path / "live").exists()  # removed after success


def test_training_runs_in_channels_last_memory(data, reference):
    """Weights and batches alike (engine.fit measures 1.7-2x on the convnets): a contiguous batch
    or model would make oneDNN reorder every layer's input."""
    info, train, _ = data
    _, model, _ = reference
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    batch = next(iterate_batches(*train, _setup(info), torch.Generator().manual_seed(0), augment=None))
    assert batch.x.is_contiguous(memory_format=torch.channels_last) and not batch.x.is_contiguous()


def test_without_selection_the_last_epoch_is_kept(data, reference):
    info, train, val = data
    _, _, ref = reference
    model, last = _run(info, train, val, _setup(info, select_best=False))
    assert last.best_epoch == 2 and last.best_val_acc == ref.history[-1]["val_acc"]
    assert evaluate(model, *val, info.mean, info.std)["acc"] == pytest.approx(ref.history[-1]["val_acc"])


def test_early_stopping_on_val(data):
    info, train, val = data
    _, result = _run(info, train, val, _setup(info, epochs=6, patience=2), lr=1e-12)  # val acc cannot move
    assert result.epochs_run == 3 and result.best_epoch == 0


class _Killed(Exception):
    pass


def _kill_at(epoch_to_kill):
    def on_epoch_start(epoch):
        if epoch == epoch_to_kill:
            raise _Killed

    return on_epoch_start


def test_killed_run_resumes_to_identical_results_and_same_seed_is_deterministic(data, reference, tmp_path):
    info, train, val = data
    _, ref_model, ref = reference
    setup = _setup(info, tmp_path / "resumed", fingerprint="run")
    with pytest.raises(_Killed):
        _run(info, train, val, setup, on_epoch_start=_kill_at(2))
    assert setup.resume_path.is_file() and not setup.resume_path.is_relative_to(setup.live_dir)
    shutil.rmtree(setup.live_dir)  # what DVC does to a stage's declared outputs before rerunning it
    started = []
    model, resumed = _run(info, train, val, setup, on_epoch_start=started.append)
    assert started == [2]  # only the missing epoch was trained
    drop = ("seconds", "images_per_s")
    strip = lambda hist: [{k: v for k, v in row.items() if k not in drop} for row in hist]  # noqa: E731
    assert strip(resumed.history) == strip(ref.history)
    for key, value in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    with open(setup.live_dir / "plots/metrics/loss.tsv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f, delimiter="\t")] == [0, 1, 2]
    assert not setup.resume_path.exists()

    # determinism: a fresh run with the same seed reproduces the reference bit for bit
    _, again = _run(info, train, val, _setup(info))  # no dvclive, no resume file
    assert strip(again.history) == strip(ref.history)


def test_stale_resume_file_is_ignored(data, tmp_path):
    info, train, val = data
    setup = _setup(info, tmp_path, epochs=2, fingerprint="old-params")
    with pytest.raises(_Killed):
        _run(info, train, val, setup, on_epoch_start=_kill_at(1))
    started = []
    new = _setup(info, tmp_path, epochs=2, fingerprint="new-params")
    _run(info, train, val, new, on_epoch_start=started.append)
    assert started == [0, 1]  # trained from scratch


def test_fingerprint_sees_values_and_tensor_contents():
    a = torch.zeros(3)
    assert fingerprint({"lr": 0.1}, a) == fingerprint({"lr": 0.1}, torch.zeros(3))
    assert fingerprint({"lr": 0.1}, a) != fingerprint({"lr": 0.2}, a)
    assert fingerprint([{"w": a}]) != fingerprint([{"w": torch.ones(3)}])


@pytest.mark.parametrize("total_steps", range(1, 13))
def test_one_cycle_schedule_runs_to_its_end_at_any_length(total_steps):
    # A run of a few steps (tiny data, one epoch) must train through the whole warm-up and decay.
    model = torch.nn.Linear(4, 2)
    optimizer, scheduler = make_optimizer(model, 0.01, 0.05, 1, total_steps)
    lrs = []  # the lr each step trains with
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert all(0 < lr <= 0.01 for lr in lrs) and lrs[-1] == min(lrs)  # decays to its end
    if total_steps >= 5:  # long enough for a warm-up step (0.2 of the steps)
        assert lrs[0] < max(lrs)


def test_max_steps_caps_each_epoch_at_a_fresh_random_subset(data):
    info, train, _ = data
    capped = _setup(info, max_steps=2)
    full = steps_per_epoch(len(train[0]), 16)
    assert full > 2 and steps_per_epoch(len(train[0]), 16, 2) == 2
    epochs = [list(iterate_batches(*train, capped, torch.Generator().manual_seed(e), augment=None)) for e in (0, 1)]
    assert [len(batches) for batches in epochs] == [2, 2]
    assert not torch.equal(epochs[0][0].y, epochs[1][0].y) or not torch.equal(epochs[0][0].x, epochs[1][0].x)
    assert len(list(iterate_batches(*train, _setup(info), torch.Generator().manual_seed(0), augment=None))) == full


def test_alternating_flip_mirrors_each_image_in_every_other_epoch(data):
    info, train, _ = data

    def first_batch(setup, epoch):  # one generator seed for every epoch: the same order and shifts
        generator = torch.Generator().manual_seed(0)
        return next(iterate_batches(*train, setup, generator, epoch_augmentation(generator, train[0], setup, epoch))).x

    alternating = _setup(info, augment="flip_translate", alternating_flip=True)
    x0, x1, x2 = (first_batch(alternating, epoch) for epoch in range(3))
    assert torch.equal(x1, x0.flip(-1)) and torch.equal(x2, x0)
    random = _setup(info, augment="flip_translate")
    r0, r1 = first_batch(random, 0), first_batch(random, 1)
    assert torch.equal(r0, r1)  # without it, the epoch's generator alone draws the flips
    same = [torch.equal(a, b) for a, b in zip(x0, r0)]
    assert all(s or torch.equal(a, b.flip(-1)) for s, a, b in zip(same, x0, r0))  # only the flips differ
    assert not all(same)
    flips = alternating_flips(2000, 7, 0)
    assert 900 < flips.sum() < 1100 and torch.equal(alternating_flips(2000, 7, 3), ~flips)


RECIPE = {"optimizer": "nesterov_triangle", "momentum": 0.85, "bn_bias_lr_scale": 64.0, "ema_decay": 0.9}


def _run_recipe(info, train, val, setup, on_epoch_start=None):
    """The CIFAR-10 recipe's loop on a small convnet: Nesterov triangle, 64x BN-bias lr, weight EMA."""
    seed_everything(0)
    model = build_model("convnet_d1_16_16", len(info.classes), stem="small")
    fit_whitening(model, train[0], info.mean, info.std)
    optimizer, scheduler = make_optimizer(model, 0.2, 0.001, setup.epochs, steps_per_epoch(len(train[0]), 16), setup)
    return model, fit(model, ce_loss_fn(0.2), optimizer, scheduler, train, val, setup, on_epoch_start)


def test_the_recipe_with_weight_averaging_resumes_to_identical_results(data, tmp_path):
    """The average is part of the resume file: a run killed after epoch 2 ends as the uninterrupted one."""
    info, train, val = data
    ref_model, ref = _run_recipe(info, train, val, _setup(info, tmp_path / "ref", fingerprint="r", **RECIPE))
    setup = _setup(info, tmp_path / "killed", fingerprint="r", **RECIPE)
    with pytest.raises(_Killed):
        _run_recipe(info, train, val, setup, _kill_at(2))
    assert setup.resume_path.is_file()
    model, resumed = _run_recipe(info, train, val, setup)
    assert [r["val_acc"] for r in resumed.history] == [r["val_acc"] for r in ref.history]
    for key, value in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_the_kept_weights_are_the_average_not_the_last_step(data):
    info, train, val = data
    averaged, _ = _run_recipe(info, train, val, _setup(info, epochs=2, select_best=False, **RECIPE))
    plain, _ = _run_recipe(info, train, val, _setup(info, epochs=2, select_best=False, **{**RECIPE, "ema_decay": 0.0}))
    conv = "features.0.0.weight"
    assert not torch.equal(averaged.state_dict()[conv], plain.state_dict()[conv])


def test_lookahead_pulls_every_5_steps_from_epoch_3_and_returns_to_the_average_at_epoch_end():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    lookahead = Lookahead(model, total_steps=20)
    weight = model[0].weight

    def step(epoch: int, value: float) -> None:
        with torch.no_grad():
            weight.fill_(value)
        lookahead.after_step(epoch)

    for value in range(5):  # epochs 0-2: nothing, step 5 included
        step(2, float(value))
    assert lookahead.average is None and weight[0, 0] == 4
    for _ in range(5):  # step 10: the first pull takes the weights as the average
        step(3, 10.0)
    assert torch.equal(lookahead.average["0.weight"], torch.full((2, 2), 10.0))
    for _ in range(4):  # steps 11-14: no pull
        step(3, 20.0)
    assert weight[0, 0] == 20
    step(3, 20.0)  # step 15: the average moves toward the weights by 1 - 0.95^5 (15/20)^3, the weights become it
    pulled = 10 + 10 * (1 - 0.95**5 * (15 / 20) ** 3)
    assert torch.allclose(weight, torch.full((2, 2), pulled)) and torch.equal(lookahead.average["0.weight"], weight)
    assert torch.allclose(model[1].running_mean, torch.zeros(2))  # buffers are averaged too (both 0 here)
    step(3, 50.0)
    lookahead.end_epoch()  # the steps since the last pull are dropped: the model is the average
    assert torch.allclose(weight, torch.full((2, 2), pulled))
    assert "1.num_batches_tracked" not in lookahead.average  # integer buffers are counters, not averaged


def test_lookahead_changes_the_run_from_epoch_3_on_and_resumes_to_identical_results(data, tmp_path):
    info, train, val = data
    # the last epoch's weights kept: the pulls of epoch 5 must be in them
    recipe = {**RECIPE, "ema_decay": 0.0, "lookahead": True, "select_best": False}
    ref_model, ref = _run_recipe(info, train, val, _setup(info, tmp_path / "ref", 5, fingerprint="r", **recipe))
    plain_model, plain = _run_recipe(info, train, val, _setup(info, epochs=5, **{**recipe, "lookahead": False}))
    losses = [[row["loss"] for row in run.history] for run in (ref, plain)]
    assert losses[0][:3] == losses[1][:3] and losses[0][3:] != losses[1][3:]
    conv = "features.0.0.weight"
    assert not torch.equal(ref_model.state_dict()[conv], plain_model.state_dict()[conv])
    setup = _setup(info, tmp_path / "killed", 5, fingerprint="r", **recipe)
    with pytest.raises(_Killed):
        _run_recipe(info, train, val, setup, _kill_at(4))  # the average exists after epoch 3
    model, resumed = _run_recipe(info, train, val, setup)
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in ref.history]
    for key, value in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_nesterov_triangle_groups_and_schedule():
    """BN biases at bn_bias_lr_scale x the lr, a reparametrised head at HEAD_SCALE^2 x the lr under SGD, HEAD_SCALE
    x under AdamW (its decay per step unchanged), no decay on 1-D tensors; the lr factor 0.2 -> 1 at 23 % ->
    train.lr_end."""
    model = build_model("convnet_d1_16_16", 10, stem="small")
    setup = FitSetup(epochs=1, batch_size=8, eval_batch_size=8, seed=0, mean=[0] * 3, std=[1] * 3, **RECIPE)
    optimizer, scheduler = make_optimizer(model, 0.5, 0.01, 1, 100, setup)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    bn = model.features[0][1]
    assert by_param[id(bn.bias)]["lr"] == pytest.approx(0.5 * 0.2 * 64)  # the schedule's first factor, 0.2
    assert id(bn.weight) not in by_param and id(model.whiten[0].weight) not in by_param  # frozen
    head = by_param[id(model.classifier.weight)]
    assert head["lr"] * head["weight_decay"] == pytest.approx(0.5 * 0.2 * 0.01)
    assert head["lr"] == pytest.approx(0.5 * 0.2 * HEAD_SCALE**2)
    assert by_param[id(model.features[0][0].weight)]["weight_decay"] == 0.01
    assert by_param[id(model.whiten[0].bias)]["weight_decay"] == 0.0
    factors = []
    for _ in range(100):
        factors.append(optimizer.param_groups[0]["lr"] / 0.5)
        optimizer.step()
        scheduler.step()
    assert factors[0] == pytest.approx(0.2) and max(factors) == pytest.approx(1.0)
    assert factors.index(max(factors)) == 23 and factors[-1] == pytest.approx(0.07, abs=0.015)
    # train.lr_end sets the last step's factor
    optimizer, scheduler = make_optimizer(model, 0.5, 0.01, 1, 100, dataclasses.replace(setup, lr_end=0.0))
    for _ in range(99):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] / 0.5 == pytest.approx(1 / 77, rel=1e-6)  # 1 step before 0
    # AdamW's step does not grow with the gradient: the head's lr scales with the logit scale itself
    adamw, _ = make_optimizer(model, 0.5, 0.01, 1, 100, dataclasses.replace(setup, optimizer="adamw_onecycle"))
    by_param = {id(p): g for g in adamw.param_groups for p in g["params"]}
    head, conv = by_param[id(model.classifier.weight)], by_param[id(model.features[0][0].weight)]
    assert head["lr"] / conv["lr"] == pytest.approx(HEAD_SCALE) and head["lr"] * head["weight_decay"] == pytest.approx(
        conv["lr"] * conv["weight_decay"]
    )
