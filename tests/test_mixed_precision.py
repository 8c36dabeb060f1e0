"""Layer-wise sensitivity and bit allocation (edgekd.train.mixed_precision) on tiny models."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

from edgekd.train.mixed_precision import allocate_bits, average_bits, layer_sensitivity, logits_of
from edgekd.train.quant import calibrate, layer_weights, prepare_qat, quantized_layers, set_layer_bits


def _fragile_model() -> nn.Module:
    """Conv-ReLU x3, pool, linear. The second conv is fragile: each of its filters holds one weight
    20x larger than the others, on an input channel the first conv always zeroes. The float model
    never sees it, but a per-channel grid wide enough for it leaves 4-bit steps so coarse that every
    other weight of the layer rounds to 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
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
