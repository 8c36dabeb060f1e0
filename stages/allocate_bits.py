"""Stage `allocate_bits`: bits per layer for mixed-precision QAT, from the measured sensitivities:
weight bits (4 or 8) under the budget `qat.avg_weight_bits` for mixed 8/4, output bits (16 or 8) for
the share `qat.act16_share` of layers gaining most for mixed 16/8 (edgekd.train.mixed_precision).

Writes each assignment as a CSV of one line per layer, git-tracked, so `git diff` and the PR report
show which layers changed bits, and their summary (average bits, weights at 4 bits) as metrics. The
two files are apart so that a change of one budget retrains only the model that uses it.
"""

from __future__ import annotations

import argparse
import csv
import logging

from edgekd.config import load_params
from edgekd.errors import UserError
from edgekd.plot_files import write_csv
from edgekd.runtime import run_stage, write_metrics
from edgekd.train.mixed_precision import allocate_activation_bits, allocate_bits, average_bits

log = logging.getLogger("edgekd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sensitivity", required=True, help="the sensitivity stage's per-layer CSV (graph order)")
    parser.add_argument("--out", required=True, help="CSV to write: layer, weights, weight_bits")
    parser.add_argument("--activations-out", required=True, help="CSV to write: layer, act16_kl_gain, activation_bits")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    p = load_params(args.params)
    try:
        with open(args.sensitivity, newline="") as f:
            layers = {row["layer"]: row for row in csv.DictReader(f)}
        weights = {name: int(m["weights"]) for name, m in layers.items()}
        sensitivity = {name: float(m["weight4_kl"]) for name, m in layers.items()}
        act16_gain = {name: float(m["act16_kl_gain"]) for name, m in layers.items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{args.sensitivity}: not a sensitivity table ({err}); rerun the sensitivity stage") from None
    if not layers:
        raise UserError(f"{args.sensitivity}: no layers; rerun the sensitivity stage")
    names = list(layers)  # graph order: the first conv first, the classifier last
    keep = [names[0], names[-1]] if p.qat.keep_first_last_8bit else []
    try:
        bits = allocate_bits(sensitivity, weights, p.qat.avg_weight_bits, keep)
    except ValueError as err:
        raise UserError(f"params: qat.avg_weight_bits: {err}") from None

    activation_bits = allocate_activation_bits(act16_gain, p.qat.act16_share)

    write_csv(args.out, ["layer", "weights", "weight_bits"], [[n, weights[n], bits[n]] for n in names])
    write_csv(
        args.activations_out,
        ["layer", "act16_kl_gain", "activation_bits"],
        [[n, f"{act16_gain[n]:.6g}", activation_bits[n]] for n in names],
    )
    four = [name for name in names if bits[name] == 4]
    metrics = {
        "avg_weight_bits": round(average_bits(bits, weights), 4),
        "budget": p.qat.avg_weight_bits,
        "layers_4bit": len(four),
        "layers": len(names),
        "weights_4bit": sum(weights[n] for n in four),
        "weights": sum(weights.values()),
        "sensitivity_4bit": round(sum(sensitivity[n] for n in four), 6),
        "layers_act16": sum(b == 16 for b in activation_bits.values()),
        "act16_share": p.qat.act16_share,
    }
    write_metrics(args.metrics, metrics)
    log.info(
        "allocate_bits: %d of %d layers at 4 bits, %.3f average weight bits (budget %.2f); %d with 16-bit outputs",
        len(four),
        len(names),
        metrics["avg_weight_bits"],
        p.qat.avg_weight_bits,
        metrics["layers_act16"],
    )


if __name__ == "__main__":
    run_stage(main)
