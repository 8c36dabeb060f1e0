"""Stage `sensitivity`: what lowering each layer of the distilled FP32 student alone costs.

On the PTQ model (stage `ptq`'s checkpoint: the INT8 scheme, calibrated, so its observers hold the
float ranges every variant re-derives its grid from), one layer at a time: its weights
at 4 bits, or its output activations at 16 bits, everything else at 8; scored on val by the KL
divergence of the logits from the FP32 model's and by the accuracy drop (edgekd.train.mixed_precision).
Writes the per-layer figures as a bar plot (one row per layer in graph order, the first conv first;
the plot sorts them), which the `allocate_bits` stage reads, and the whole model's figures (FP32
and INT8 val accuracy, INT8 KL) as metrics.
"""

from __future__ import annotations

import argparse
import logging

from edgekd.config import load_params
from edgekd.data.batches import ModelInputs, load_split
from edgekd.data.prepared import load_info
from edgekd.plot_files import write_csv
from edgekd.runtime import run_stage, write_metrics
from edgekd.train.checkpoints import load_model
from edgekd.train.device import select_device
from edgekd.train.mixed_precision import layer_sensitivity, logits_of
from edgekd.train.quant import load_qat_model

log = logging.getLogger("edgekd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="prepared-data folder")
    parser.add_argument("--student", required=True, help="distilled FP32 student checkpoint")
    parser.add_argument("--ptq", required=True, help="its PTQ checkpoint (stage ptq)")
    parser.add_argument("--metrics", required=True, help="JSON to write: the whole model's figures")
    parser.add_argument("--plot", required=True, help="CSV to write, one row per layer in graph order")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    p = load_params(args.params)
    select_device("cpu", p.train.threads)  # fake-quant FX modules run on CPU

    info = load_info(args.data)
    val, labels = load_split(args.data, "val")
    student, payload = load_model(args.student)
    model, _ = load_qat_model(args.ptq)
    size, batch = int(payload["image_size"]), p.train.eval_batch_size
    val_batches = ModelInputs(val, size, info.mean, info.std, batch)
    result = layer_sensitivity(model, logits_of(student.eval(), val_batches), labels, val_batches)

    layers = result.pop("layers")
    write_metrics(args.metrics, result)
    write_csv(
        args.plot,
        ["layer", "weights", "weight4_kl", "weight4_acc_drop", "act16_kl_gain"],
        [
            [name, m["weights"], f"{m['weight4_kl']:.6g}", f"{m['weight4_acc_drop']:.6g}", f"{m['act16_kl_gain']:.6g}"]
            for name, m in layers.items()
        ],
    )
    ranked = sorted(layers.items(), key=lambda item: -item[1]["weight4_kl"])
    log.info(
        "sensitivity: %d layers; INT8 KL %.5f; most sensitive at 4-bit weights: %s",
        len(ranked),
        result["int8_kl"],
        ", ".join(f"{n} ({m['weight4_kl']:.4f})" for n, m in ranked[:3]),
    )


if __name__ == "__main__":
    run_stage(main)
