"""QAT on a tiny student: phases, checkpoint round trip, and fake-quant vs ONNX INT8 on real images."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from tiny_pipeline import repo_params
from torch.ao.nn.intrinsic import qat as nniqat
from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

from edgekd.data.batches import load_split, normalize
from edgekd.data.prepared import load_info
from edgekd.deploy.export import export_onnx
from edgekd.deploy.gates import compare
from edgekd.deploy.metadata import ModelMeta
from edgekd.deploy.sessions import make_runner
from edgekd.train import engine
from edgekd.train.batching import epoch_augmentation, iterate_batches, steps_per_epoch
from edgekd.train.checkpoints import load_checkpoint, model_payload, save_checkpoint
from edgekd.train.evaluation import evaluate, evaluation_mode
from edgekd.train.fit_setup import FitSetup
from edgekd.train.models import build_model
from edgekd.train.quant import (
    apply_bits,
    calibrate,
    convert,
    freeze_qat,
    load_qat_model,
    prepare_qat,
    quantized_layers,
    set_qat_phase,
)

ARCH = repo_params().student.arch  # the default student
SPEC = {"arch": ARCH, "width": 0.25, "stem": "imagenet"}  # a checkpoint's model entry (model_payload)


def _ce(model, batch):
    logits = model(batch.x)
    return {"loss": F.cross_entropy(logits, batch.y), "logits": logits}


def _qat_one_epoch(prepared):
    """One real QAT epoch (the shared engine loop) on the 32 px prepared sample."""
    info = load_info(prepared)
    images, labels = load_split(prepared, "train")
    torch.manual_seed(0)
    model = prepare_qat(build_model(ARCH, len(info.classes), 0.25), info.image_size)
    setup = FitSetup(
        epochs=1, batch_size=16, eval_batch_size=64, seed=0, mean=info.mean, std=info.std, augment="dihedral"
    )
    optimizer, scheduler = engine.make_optimizer(model, 1e-3, 0.0, 1, steps_per_epoch(len(images), 16))
    generator = torch.Generator().manual_seed(0)
    batches = iterate_batches(images, labels, setup, generator, epoch_augmentation(generator, images, setup, 0))
    engine.train_one_epoch(model, _ce, optimizer, scheduler, batches, torch.device("cpu"))
    return model.eval(), info


def test_phases_freeze_observers_and_bn_from_their_epoch():
    model = prepare_qat(build_model(ARCH, 5, 0.25), 32)
    fqs = [m for m in model.modules() if isinstance(m, FakeQuantize)]
    convbns = [m for m in model.modules() if isinstance(m, nniqat.ConvBn2d)]
    assert fqs and convbns
    set_qat_phase(model, 0, freeze_bn_epoch=1, freeze_observer_epoch=2)
    assert all(f.observer_enabled.item() == 1 for f in fqs) and not any(m.freeze_bn for m in convbns)
    set_qat_phase(model, 1, freeze_bn_epoch=1, freeze_observer_epoch=2)
    assert all(f.observer_enabled.item() == 1 for f in fqs) and all(m.freeze_bn for m in convbns)
    set_qat_phase(model, 2, freeze_bn_epoch=1, freeze_observer_epoch=2)
    assert all(f.observer_enabled.item() == 0 for f in fqs)
    assert all(f.fake_quant_enabled.item() == 1 for f in fqs)  # still fake-quantizing


def test_fake_quant_predicts_onnx_int8_and_checkpoint_rebuilds(prepared_small, tmp_path):
    model, info = _qat_one_epoch(prepared_small)
    x = normalize(load_split(prepared_small, "val")[0], info.mean, info.std)  # real val images
    save_checkpoint(tmp_path / "qat.pt", model_payload(model, SPEC, info))
    rebuilt, payload = load_qat_model(tmp_path / "qat.pt")
    with torch.no_grad(), evaluation_mode(model):
        assert torch.equal(rebuilt(x), model(x))  # ranges and folded-BN state come back exactly
    meta = ModelMeta(classes=info.classes, image_size=info.image_size, mean=info.mean, std=info.std)
    integer_model = convert(rebuilt)
    onnx_path = export_onnx(integer_model, tmp_path / "int8.onnx", meta, 17)
    report = compare(rebuilt, make_runner(onnx_path), x)
    assert report["top1_agreement"] >= 0.97, report
    # Rounding ties in requantization differ by one step in a few layers and reach the logits as a
    # few steps of their INT8 grid; a real mismatch (wrong scale, float fallback) is hundreds.
    logit_step = integer_model.get_submodule("classifier.3").scale
    assert report["max_abs_diff"] <= 4 * logit_step, (report, logit_step)


def _ranges(model) -> dict[str, torch.Tensor]:
    return {
        k: v.clone() for k, v in model.state_dict().items() if k.endswith(("scale", "zero_point", "min_val", "max_val"))
    }


def test_evaluating_a_qat_model_never_moves_its_ranges(prepared_small):
    """FakeQuantize observes every forward pass while its observer is on, in eval mode too: without
    evaluation_mode, validating on val would move the INT8 grid towards the val images."""
    model, info = _qat_one_epoch(prepared_small)
    images, labels = load_split(prepared_small, "val")
    before = _ranges(model)
    assert before and all(m.observer_enabled.item() == 1 for m in model.modules() if isinstance(m, FakeQuantize))
    evaluate(model, images * 0 + 255, labels, info.mean, info.std)  # white images: far other ranges
    evaluate(model, images, labels, info.mean, info.std)
    after = _ranges(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the observers are back on afterwards: evaluation changes nothing about training
    assert all(m.observer_enabled.item() == 1 for m in model.modules() if isinstance(m, FakeQuantize))


def test_frozen_and_rebuilt_models_give_the_same_logits_whatever_they_saw(prepared_small, tmp_path):
    model, info = _qat_one_epoch(prepared_small)
    freeze_qat(model)
    assert all(m.freeze_bn for m in model.modules() if isinstance(m, nniqat.ConvBn2d))
    x = normalize(load_split(prepared_small, "val")[0], info.mean, info.std)
    save_checkpoint(tmp_path / "qat.pt", model_payload(model, SPEC, info))
    rebuilt, _ = load_qat_model(tmp_path / "qat.pt")
    with torch.no_grad():
        first = rebuilt(x)
        rebuilt.train()(x * 5)  # even a training-mode pass over other images moves nothing
        assert torch.equal(rebuilt.eval()(x), first) and torch.equal(model(x), first)


def test_qat_stage_keeps_the_last_epoch_frozen(tiny_repo_template):
    """The saved model has every observer off (BN freezing is a module flag, restored by load_qat_model)."""
    payload = load_checkpoint(tiny_repo_template / "models/student_qat.pt")
    flags = {k: v for k, v in payload["state_dict"].items() if k.endswith("observer_enabled")}
    assert flags and all(v.item() == 0 for v in flags.values())
    metrics = json.loads((tiny_repo_template / "metrics/qat.json").read_text())
    params = yaml.safe_load((tiny_repo_template / "params.yaml").read_text())
    assert set(metrics) == {"val_acc_fake_quant", "val_acc_int8_torch"}  # the decision figures only
    curve = (tiny_repo_template / "dvclive/qat/plots/metrics/val_acc.tsv").read_text().splitlines()
    assert len(curve) - 1 == params["qat"]["epochs"]  # every epoch ran: the last one is kept


def test_ptq_calibration_weighs_every_batch_not_the_first(prepared_small):
    """Prepared splits are sorted by class: calibration batches in file order are one class each.
    Every activation range must be the min/max over all of them, as if they came in one batch."""
    info = load_info(prepared_small)
    images, labels = load_split(prepared_small, "train")
    x = normalize(images, info.mean, info.std)
    torch.manual_seed(0)
    fp32 = build_model(ARCH, len(info.classes), 0.25).eval()
    per_class = calibrate(prepare_qat(fp32, info.image_size), [x[labels == c] for c in labels.unique()])
    at_once = calibrate(prepare_qat(fp32, info.image_size), [x])

    def ranges(model):
        return {
            name: (m.scale.item(), m.zero_point.item())
            for name, m in model.named_modules()
            if isinstance(m, FakeQuantize) and m.qscheme == torch.per_tensor_affine
        }

    assert len(ranges(at_once)) > 20 and ranges(per_class) == pytest.approx(ranges(at_once), rel=1e-5)
    # the state a checkpoint saves: the training observers hold the whole-set ranges too
    first = per_class.activation_post_process_0.activation_post_process
    assert isinstance(first, MovingAverageMinMaxObserver)
    assert (first.min_val.item(), first.max_val.item()) == (x.min().item(), x.max().item())


def test_ptq_calibration_takes_the_data_ranges_and_freezes_them(prepared_small):
    info = load_info(prepared_small)
    images = normalize(load_split(prepared_small, "train")[0], info.mean, info.std)
    torch.manual_seed(0)
    fp32 = build_model(ARCH, len(info.classes), 0.25).eval()
    model = calibrate(prepare_qat(fp32, info.image_size), [images[:64]])
    fqs = [m for m in model.modules() if isinstance(m, FakeQuantize)]
    assert all(f.observer_enabled.item() == 0 and f.fake_quant_enabled.item() == 1 for f in fqs)
    # the input's uint8 grid spans the calibration images exactly (min/max include 0)
    first = model.activation_post_process_0
    lo, hi = min(images[:64].min().item(), 0.0), max(images[:64].max().item(), 0.0)
    assert first.scale.item() == pytest.approx((hi - lo) / 255, rel=1e-5)
    with torch.no_grad():
        before = model(images[:32])
        model(images * 3)  # other data after calibration moves nothing
        torch.testing.assert_close(model(images[:32]), before)
        # no training happened: the BN-folded fake-quant model stays close to the float model
        agreement = (model(images).argmax(1) == fp32(images).argmax(1)).float().mean().item()
    assert agreement > 0.9
    assert (convert(model)(images).argmax(1) == model(images).argmax(1)).float().mean().item() > 0.95


def test_converted_weights_stay_in_each_layers_fake_quant_range(prepared_small):
    """A symmetric grid puts each channel's largest weight at 63.5 steps (7 bits) or 7.5 (4 bits);
    the integer model must hold what the fake-quant model computes with: -64..63 and -7..7, where a
    plain round would give 64 and 8. Calibration observes each weight once, so the edge is reached."""
    info = load_info(prepared_small)
    x = normalize(load_split(prepared_small, "val")[0], info.mean, info.std)
    torch.manual_seed(0)
    model = prepare_qat(build_model(ARCH, len(info.classes), 0.25).eval(), info.image_size)
    layers = quantized_layers(model)
    integer = convert(calibrate(apply_bits(model, {layers[3]: 4}), [x]))
    for layer in layers:
        ints = integer.get_submodule(layer).weight().int_repr()
        low, high = (-7, 7) if layer == layers[3] else (-64, 63)
        assert ints.min() >= low and ints.max() <= high, layer
        assert ints.min() == low or ints.max() == high, layer  # the grid is used to its edge
    with torch.no_grad():
        assert (integer(x).argmax(1) == model(x).argmax(1)).float().mean() >= 0.95
