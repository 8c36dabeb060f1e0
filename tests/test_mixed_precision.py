"""Layer-wise sensitivity and bit allocation (edgekd.train.mixed_precision) on tiny models."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from edgekd.errors import UserError
from edgekd.train.mixed_precision import (
    allocate_activation_bits,
    allocate_bits,
    average_bits,
    layer_sensitivity,
    logits_of,
    per_layer,
    read_bits,
)
from edgekd.train.quant import calibrate, layer_weights, prepare_qat, quantized_layers, set_layer_bits

REPO = Path(__file__).resolve().parents[1]


def _fragile_model() -> nn.Module:
    """Conv-ReLU x3, pool, linear. The second conv is fragile: each of its filters holds one weight
    20x larger than the others, on an input channel the first conv always zeroes. The float model
    never sees it, but a per-channel grid wide enough for it leaves 4-bit steps so coarse that every
    other weight of the layer rounds to 0."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    with torch.no_grad():
        model[0].weight[7].zero_()
        model[0].bias[7] = -1.0  # channel 7 is 0 after the ReLU, always
        model[2].weight[:, 7, 1, 1] = 20 * model[2].weight.abs().max()
        model[8].weight.mul_(30)  # confident logits, so that a changed answer shows in the KL
    return model.eval()


def test_a_deliberately_fragile_layer_ranks_first():
    model = _fragile_model()
    images = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    batches = [images[:32], images[32:]]
    calibrated = calibrate(prepare_qat(model, 16), batches)
    layers = quantized_layers(calibrated)
    assert len(layers) == 4 and layer_weights(calibrated)[layers[-1]] == 32
    labels = logits_of(model, batches).argmax(1)
    result = layer_sensitivity(calibrated, logits_of(model, batches), labels, batches)
    ranked = sorted(result["layers"], key=lambda name: -result["layers"][name]["weight4_kl"])
    assert ranked[0] == layers[1], result["layers"]
    fragile = result["layers"][layers[1]]
    assert fragile["weight4_kl"] > 10 * max(m["weight4_kl"] for n, m in result["layers"].items() if n != layers[1])
    assert result["fp32_acc"] == 1.0  # labels are the float model's own answers


def test_four_bit_weights_take_at_most_16_levels_per_channel():
    calibrated = calibrate(prepare_qat(_fragile_model(), 16), [torch.randn(8, 3, 16, 16)])
    layer = quantized_layers(calibrated)[2]
    set_layer_bits(calibrated, layer, weight_bits=4)
    module = calibrated.get_submodule(layer)
    quantized = module.weight_fake_quant(module.weight)
    for channel in quantized:
        assert len(torch.unique(channel)) <= 16


def _brute_force(sens, weights, budget, keep):
    best = None
    free = [n for n in weights if n not in keep]
    for r in range(len(free) + 1):
        for four in itertools.combinations(free, r):
            bits = {n: 4 if n in four else 8 for n in weights}
            if average_bits(bits, weights) <= budget + 1e-12:
                cost = sum(sens[n] for n in four)
                best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_allocation_meets_the_budget_at_the_least_sensitivity_deterministically(seed):
    rng = random.Random(seed)
    names = [f"layer{i}" for i in range(9)]
    weights = {n: rng.randint(100, 500) for n in names}
    weights[names[0]], weights[names[-1]] = rng.randint(5, 20), rng.randint(5, 20)  # small, as in a CNN
    sens = {n: rng.random() for n in names}
    keep = [names[0], names[-1]]
    for budget in (4.6, 5.0, 6.5):
        bits = allocate_bits(sens, weights, budget, keep)
        assert bits == allocate_bits(sens, weights, budget, keep)
        assert set(bits.values()) <= {4, 8} and bits[names[0]] == bits[names[-1]] == 8
        assert average_bits(bits, weights) <= budget
        cost = sum(sens[n] for n in names if bits[n] == 4)
        assert cost == pytest.approx(_brute_force(sens, weights, budget, keep))


def test_allocation_edges():
    weights, sens = {"a": 100, "b": 100, "c": 200}, {"a": 0.1, "b": 0.2, "c": 0.35}
    assert allocate_bits(sens, weights, 8.0) == {"a": 8, "b": 8, "c": 8}
    assert allocate_bits(sens, weights, 4.0) == {"a": 4, "b": 4, "c": 4}
    assert allocate_bits(sens, weights, 6.0) == {"a": 4, "b": 4, "c": 8}  # c holds half the weights
    with pytest.raises(ValueError, match="kept at 8 bits"):
        allocate_bits(sens, weights, 5.0, keep_8bit=["c"])
    with pytest.raises(ValueError, match="4..8"):
        allocate_bits(sens, weights, 3.0)


def test_activation_bits_go_to_the_layers_that_gain_most_from_16_bits(tmp_path):
    gain = {"a": 0.5, "b": 0.0, "c": 2.0, "d": 0.5, "e": -0.1}
    assert allocate_activation_bits(gain, 0.4) == {"a": 16, "b": 8, "c": 16, "d": 8, "e": 8}  # tie: a first
    assert allocate_activation_bits(gain, 0.6) == {"a": 16, "b": 8, "c": 16, "d": 16, "e": 8}
    # a share beyond the layers that gain leaves the others at 8 bits; 0 keeps every layer at 8
    assert allocate_activation_bits(gain, 1.0) == {"a": 16, "b": 8, "c": 16, "d": 16, "e": 8}
    assert set(allocate_activation_bits(gain, 0.0).values()) == {8}
    with pytest.raises(ValueError, match="share must be in 0..1"):
        allocate_activation_bits(gain, 1.5)
    path = tmp_path / "activation_bits.csv"
    path.write_text("layer,act16_kl_gain,activation_bits\na,0.5,16\nb,0,8\n")
    assert read_bits(path, "activation_bits") == {"a": 16, "b": 8}
    with pytest.raises(UserError, match="activation_bits.csv: not a bit allocation with column weight_bits"):
        read_bits(path)
    path.write_text("layer,act16_kl_gain,activation_bits\na,0.5,4\n")
    with pytest.raises(UserError, match=r"activation_bits must be in \[8, 16\]"):
        read_bits(path, "activation_bits")


def test_the_shipped_16_bit_plan_names_every_layer_of_the_student():
    """studies/a16_bits.csv (stage qat_kd@a16): one row `*`, spelled out as each quantized layer at 16."""
    model = prepare_qat(_fragile_model(), 8)
    plan = per_layer(read_bits(REPO / "studies/a16_bits.csv", "activation_bits"), model)
    assert plan == {layer: 16 for layer in quantized_layers(model)} and len(plan) == 4
    assert per_layer({"0": 4}, model) == {"0": 4}  # an allocation stays as it is


def test_a_star_row_must_stand_alone(tmp_path):
    path = tmp_path / "bits.csv"
    path.write_text("layer,weight_bits\n*,8\n0,4\n")
    with pytest.raises(UserError, match="bits.csv: a row `\\*` \\(every layer\\) must be the only row"):
        read_bits(path)
