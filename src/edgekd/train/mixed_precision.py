"""Layer-wise mixed precision: what fewer bits cost each layer, and which layers get them.

Sensitivity is measured directly, one layer at a time, on a calibrated PTQ model (every layer in the
INT8 scheme of edgekd.train.quant): that layer's weights lowered to 4 bits (per-channel symmetric
-7..7), or its output activations raised to 16 bits, everything else unchanged. Calibration observes
the float activations (fake-quant off), so the other layers' ranges do not depend on the layer
being changed, and each variant only re-derives one layer's grid from the ranges already observed:
a whole sweep costs one forward pass of val per variant. The cost of a variant is the mean KL
divergence of its val logits from the FP32 model's (and its accuracy drop, for the record).

Allocation picks the layers whose weights go to 4 bits: the least summed sensitivity under a budget
on the average weight bits (`qat.avg_weight_bits`), solved exactly as a 0/1 knapsack over the
layers' weight counts; the first and last layers can be kept at 8 bits (they see the raw pixels
and produce the logits, and hold few weights). For mixed 16/8, the layers whose outputs gain most
from 16 bits (the largest KL reduction) keep 16-bit activations, a share `qat.act16_share` of them.
"""

from __future__ import annotations

import copy
import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgekd.errors import UserError
from edgekd.train.quant import ACTIVATION_RANGES, WEIGHT_RANGES, layer_weights, quantized_layers, set_layer_bits


@torch.no_grad()
def logits_of(model: nn.Module, batches: Iterable[Tensor]) -> Tensor:
    return torch.cat([model(x) for x in batches])


def kl_from(reference: Tensor, logits: Tensor) -> float:
    """Mean over samples of KL(softmax(reference) || softmax(logits))."""
    return F.kl_div(
        F.log_softmax(logits, 1), F.log_softmax(reference, 1), reduction="batchmean", log_target=True
    ).item()


def layer_sensitivity(
    calibrated: torch.fx.GraphModule, fp32_logits: Tensor, labels: Tensor, batches: Iterable[Tensor]
) -> dict:
    """Per layer: KL to FP32 and accuracy with its weights at 4 bits, and KL with its output at 16 bits;
    the all-INT8 model's figures as the reference. `batches`: the val inputs, normalised."""

    def score(model: nn.Module) -> tuple[float, float]:
        logits = logits_of(model, batches)
        return kl_from(fp32_logits, logits), (logits.argmax(1) == labels).float().mean().item()

    ref_kl, ref_acc = score(calibrated)
    fp32_acc = (fp32_logits.argmax(1) == labels).float().mean().item()
    weights = layer_weights(calibrated)
    layers = {}
    for layer in quantized_layers(calibrated):
        w4, a16 = copy.deepcopy(calibrated), copy.deepcopy(calibrated)
        set_layer_bits(w4, layer, weight_bits=4)
        set_layer_bits(a16, layer, activation_bits=16)
        (w4_kl, w4_acc), (a16_kl, _) = score(w4), score(a16)
        layers[layer] = {
            "weights": weights[layer],
            "weight4_kl": w4_kl,
            "weight4_acc_drop": ref_acc - w4_acc,
            "act16_kl": a16_kl,
            "act16_kl_gain": ref_kl - a16_kl,
        }
    return {"fp32_acc": fp32_acc, "int8_acc": ref_acc, "int8_kl": ref_kl, "layers": layers}


def allocate_bits(
    sensitivity: dict[str, float], weights: dict[str, int], avg_weight_bits: float, keep_8bit: Iterable[str] = ()
) -> dict[str, int]:
    """Weight bits per layer (4 or 8): the least summed sensitivity of the 4-bit layers such that the
    average over all weights is <= `avg_weight_bits`. Exact (0/1 knapsack on weight counts: the
    layers kept at 8 bits carry the most sensitivity that fits), deterministic (ties keep the earlier
    layer at 8 bits). Raises ValueError when the budget cannot be met with `keep_8bit` at 8 bits."""
    if not 4 <= avg_weight_bits <= 8:
        raise ValueError(f"avg_weight_bits must be in 4..8, got {avg_weight_bits}")
    total = sum(weights.values())
    fixed = [layer for layer in weights if layer in set(keep_8bit)]
    free = [layer for layer in weights if layer not in set(keep_8bit)]
    # 8 * kept + 4 * (total - kept) <= budget * total  <=>  kept <= (budget - 4) * total / 4
    capacity = int(np.floor((avg_weight_bits - 4) * total / 4 + 1e-9)) - sum(weights[f] for f in fixed)
    if capacity < 0:
        raise ValueError(
            f"avg_weight_bits={avg_weight_bits}: the layers kept at 8 bits ({', '.join(fixed)}) alone exceed it"
        )
    best = np.zeros(capacity + 1)  # best[c]: most sensitivity kept at 8 bits within c weights
    took = np.zeros((len(free), capacity + 1), dtype=bool)
    for i, layer in enumerate(free):
        w, value = weights[layer], max(float(sensitivity[layer]), 0.0)
        if w > capacity:
            continue
        candidate = best[: capacity + 1 - w] + value
        better = candidate > best[w:]
        took[i, w:] = better
        best[w:] = np.where(better, candidate, best[w:])
    kept, c = set(fixed), capacity
    for i in range(len(free) - 1, -1, -1):
        if took[i, c]:
            kept.add(free[i])
            c -= weights[free[i]]
    return {layer: 8 if layer in kept else 4 for layer in weights}


def allocate_activation_bits(kl_gain: dict[str, float], share: float) -> dict[str, int]:
    """Output bits per layer (8 or 16): the round(share * layers) layers with the largest KL gain from
    16-bit outputs get 16 bits, provided the gain is positive; ties keep the earlier layer first."""
    if not 0 <= share <= 1:
        raise ValueError(f"share must be in 0..1, got {share}")
    count = int(np.floor(share * len(kl_gain) + 0.5))
    ranked = sorted(kl_gain, key=lambda layer: -kl_gain[layer])  # stable: graph order among ties
    wide = {layer for layer in ranked[:count] if kl_gain[layer] > 0}
    return {layer: 16 if layer in wide else 8 for layer in kl_gain}


def average_bits(bits: dict[str, int], weights: dict[str, int]) -> float:
    return sum(bits[layer] * weights[layer] for layer in weights) / sum(weights.values())


def read_bits(path: str | Path, column: str = "weight_bits") -> dict[str, int]:
    """A bits-per-layer CSV (layer, ..., weight_bits or activation_bits) as {layer: bits}: one of the
    `allocate_bits` stage, or a fixed plan whose one row `*` names every layer (studies/a16_bits.csv)."""
    allowed = {"weight_bits": WEIGHT_RANGES, "activation_bits": ACTIVATION_RANGES}[column]
    try:
        with open(path, newline="") as f:
            bits = {row["layer"]: int(row[column]) for row in csv.DictReader(f)}
    except (OSError, KeyError, ValueError) as err:
        raise UserError(
            f"{path}: not a bit allocation with column {column} ({err}); rerun the allocate_bits stage"
        ) from None
    if not bits or not set(bits.values()) <= set(allowed):
        raise UserError(f"{path}: {column} must be in {sorted(allowed)}")
    if "*" in bits and len(bits) > 1:
        raise UserError(f"{path}: a row `*` (every layer) must be the only row")
    return bits


def per_layer(bits: dict[str, int], model: torch.fx.GraphModule) -> dict[str, int]:
    """`read_bits`' result for this model's layers: a `*` plan spelled out, layer by layer."""
    return {layer: bits["*"] for layer in quantized_layers(model)} if "*" in bits else bits
