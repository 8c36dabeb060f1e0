"""Stages `qat` (dvc.yaml) and the studies' `qat_kd@<recipe>`, `qat_scratch` (studies/dvc.yaml):
fine-tune a student with fake-quant, save it for export.

`qat`: the distilled student, CE + KD on the stored teacher logits of the training views (as in
distill), INT8. `qat_kd@a16`: the same with every layer's output at 16 bits (`--activation-bits`
studies/a16_bits.csv, one row `*`); `qat_kd@mixed` with `--bits`, the layers the allocation names at
4-bit weights; `qat_kd@mixed_a16` with `--activation-bits` of the allocation, the layers it names with
16-bit outputs. `qat_scratch`: the baseline student without soft targets, CE on fresh augmentations
(no teacher anywhere), the control for what distillation adds to QAT.

The last epoch is kept, not the best on val: BN statistics and ranges freeze late in the schedule,
and the exported model must be the one that went through it. Validation never moves a range
(edgekd.train.evaluation.evaluation_mode), and the saved model has its observers off and BN frozen.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from edgekd.config import load_params
from edgekd.data.batches import load_split
from edgekd.data.prepared import load_info
from edgekd.runtime import run_stage, write_metrics
from edgekd.train import engine
from edgekd.train.checkpoints import load_model, model_payload, save_checkpoint
from edgekd.train.device import seed_everything, select_device
from edgekd.train.evaluation import evaluate
from edgekd.train.mixed_precision import per_layer, read_bits
from edgekd.train.quant import (
    apply_bits,
    convert,
    freeze_qat,
    prepare_qat,
    set_qat_phase,
    wide_outputs,
)
from edgekd.train.resume import fingerprint
from edgekd.train.soft_targets import load_soft_targets, student_objective

log = logging.getLogger("edgekd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="prepared-data folder")
    parser.add_argument("--student", required=True, help="FP32 student checkpoint (distilled, or baseline)")
    parser.add_argument(
        "--soft-targets", default=None, help="teacher logits of the training views; none = QAT from scratch, CE only"
    )
    parser.add_argument("--bits", default=None, help="weight bits per layer (a bits CSV); none = all 8")
    parser.add_argument("--activation-bits", default=None, help="output bits per layer (a bits CSV); none = all 8")
    parser.add_argument("--out", required=True, help="QAT checkpoint to write")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--live", default=None, help="dvclive folder")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    p = load_params(args.params)
    seed_everything(p.student.seed)
    device = select_device("cpu", p.train.threads)  # quantized FX modules run on CPU only

    info = load_info(args.data)
    train, val = load_split(args.data, "train"), load_split(args.data, "val")
    student, payload = load_model(args.student)
    targets = load_soft_targets(args.soft_targets, train, p, len(info.classes)) if args.soft_targets else None
    size = int(payload["image_size"])  # the student's own input side (student.image_size)
    model = prepare_qat(student, size)  # fake-quant; QAT always runs on CPU (FX kernels)
    bits = per_layer(read_bits(args.bits), model) if args.bits else {}
    activation_bits = (
        per_layer(read_bits(args.activation_bits, "activation_bits"), model) if args.activation_bits else {}
    )
    model = apply_bits(model, bits, activation_bits)

    def on_epoch_start(epoch: int) -> None:
        set_qat_phase(model, epoch, p.qat.freeze_bn_epoch, p.qat.freeze_observer_epoch)

    t = p.train
    kd = (p.kd.temperature, p.kd.alpha, targets["logits"]) if targets else ()
    run_id = fingerprint(
        p.qat.recipe(),
        *kd[:2],
        t.threads,
        t.batch_size,
        t.eval_batch_size,
        t.weight_decay,
        t.label_smoothing,
        t.max_steps_per_epoch,
        t.optimizer,
        t.momentum,
        t.bn_bias_lr_scale,
        p.student.seed,
        size,
        *kd[2:],
        *payload["state_dict"].values(),
        train[1],
        val[1],
        *([sorted(bits.items())] if bits else []),
        *([sorted(activation_bits.items())] if activation_bits else []),
    )
    # BN statistics are frozen on schedule in QAT: no re-estimation before validation.
    setup = engine.setup_from_params(
        p,
        info,
        device,
        p.qat.epochs,
        p.student.seed,
        args.live,
        run_id,
        bn_recalibration=False,
        input_size=size,
        select_best=False,
        fake_quant=True,
    )
    # CE + KD on the stored views, or (no soft targets: QAT from scratch) CE on fresh augmentations
    loss_fn, batches = student_objective(p, train, setup, targets)
    engine.train_model(model, loss_fn, p.qat.lr, t.weight_decay, train, val, setup, on_epoch_start, batches=batches)
    freeze_qat(model)
    fake_quant_acc = evaluate(model, *val, info.mean, info.std, t.eval_batch_size, size=size)["acc"]
    # 16-bit activations have no integer torch kernels: such a model is measured as fake-quant only
    int8_acc = (
        None
        if wide_outputs(model)
        else evaluate(convert(model), *val, info.mean, info.std, t.eval_batch_size, size=size)["acc"]
    )

    save_checkpoint(
        args.out,
        model_payload(
            model,
            payload["model"],
            dataclasses.replace(info, image_size=size),
            qat=p.qat.recipe(),
            **({"weight_bits": bits} if bits else {}),
            **({"activation_bits": activation_bits} if activation_bits else {}),
        ),
    )
    metrics = {"val_acc_fake_quant": fake_quant_acc, **({} if int8_acc is None else {"val_acc_int8_torch": int8_acc})}
    write_metrics(args.metrics, metrics)
    log.info(
        "qat: val acc fp32 %.4f -> fake-quant %.4f, int8 torch %s",
        evaluate(student, *val, info.mean, info.std, size=size)["acc"],
        fake_quant_acc,
        "-" if int8_acc is None else f"{int8_acc:.4f}",
    )


if __name__ == "__main__":
    run_stage(main)
