"""Stage `qat`: fine-tune the distilled student with INT8 fake-quant (CE + KD on the stored teacher
logits of the training views, as in distill), save it for export.

The last epoch is kept, not the best on val: BN statistics and ranges freeze late in the schedule,
and the exported model must be the one that went through it. Validation never moves a range
(engine.evaluation_mode), and the saved model has its observers off and BN frozen.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from edgekd.config import as_dict, load_params
from edgekd.data.prepared import load_info, load_split, resize_batch
from edgekd.runtime import run_stage, seed_everything, select_device, write_metrics
from edgekd.train import engine
from edgekd.train.checkpoints import load_model, model_payload, save_checkpoint
from edgekd.train.losses import kd_loss_fn
from edgekd.train.quant import convert, freeze_qat, prepare_qat, set_qat_phase
from edgekd.train.soft_targets import load_soft_targets, view_batches

log = logging.getLogger("edgekd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="prepared-data folder")
    parser.add_argument("--student", required=True, help="distilled FP32 student checkpoint")
    parser.add_argument("--soft-targets", required=True, help="teacher logits of the training views")
    parser.add_argument("--out", required=True, help="QAT checkpoint to write")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--live", default=None, help="dvclive folder")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    p = load_params(args.params)
    seed_everything(p.seed)
    device = select_device("cpu", p.train.threads)  # quantized FX modules run on CPU only

    info = load_info(args.data)
    train, val = load_split(args.data, "train"), load_split(args.data, "val")
    student, payload = load_model(args.student)
    targets = load_soft_targets(args.soft_targets, train[0], p.seed, len(info.classes))
    size = int(payload["image_size"])  # the student's own input side (student.image_size)
    val = (resize_batch(val[0], size), val[1])  # once, for fit and the evaluations after it
    model = prepare_qat(student, size)  # fake-quant; QAT always runs on CPU (FX kernels)

    loss_fn = kd_loss_fn(p.kd.temperature, p.kd.alpha, p.train.label_smoothing)

    def on_epoch_start(epoch: int) -> None:
        set_qat_phase(model, epoch, p.qat.freeze_bn_epoch, p.qat.freeze_observer_epoch)

    t = p.train
    run_id = engine.fingerprint(as_dict(p.qat), p.kd.temperature, p.kd.alpha, t.threads, t.batch_size,
                                t.eval_batch_size, t.weight_decay, t.label_smoothing, p.seed, size,
                                targets["logits"], *payload["state_dict"].values(), train[1], val[1])
    # BN statistics are frozen on schedule in QAT: no re-estimation before validation.
    setup = engine.setup_from_params(p, info, device, p.qat.epochs, p.seed, args.live, run_id,
                                     bn_recalibration=False, input_size=size, select_best=False)
    result = engine.train_model(model, loss_fn, p.qat.lr, t.weight_decay, train, val, setup, on_epoch_start,
                                batches=view_batches(*train, targets, setup))
    freeze_qat(model)
    fake_quant_acc = engine.evaluate(model, *val, info.mean, info.std, t.eval_batch_size)["acc"]
    int8_acc = engine.evaluate(convert(model), *val, info.mean, info.std, t.eval_batch_size)["acc"]

    spec = payload["model"]
    save_checkpoint(args.out, model_payload(model, spec["arch"], spec["width"],
                                            dataclasses.replace(info, image_size=size), qat=as_dict(p.qat)))
    metrics = {"val_acc_fake_quant": fake_quant_acc, "val_acc_int8_torch": int8_acc,
               "val_acc_fp32_start": engine.evaluate(student, *val, info.mean, info.std)["acc"],
               "epochs_run": result.epochs_run, "train_seconds": result.train_seconds}
    write_metrics(args.metrics, metrics)
    log.info("qat: val acc fp32 %.4f -> fake-quant %.4f, int8 torch %.4f", metrics["val_acc_fp32_start"],
             fake_quant_acc, int8_acc)


if __name__ == "__main__":
    run_stage(main)
