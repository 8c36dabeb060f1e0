"""Stage `qat`: fine-tune the distilled student with INT8 fake-quant (CE + KD on the stored teacher
logits of the training views, as in distill), save it for export."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from src.edgekd import engine
from src.edgekd.augment import resize_batch
from src.edgekd.ckpt import load_model, model_payload, save_checkpoint
from src.edgekd.config import as_dict, load_params
from src.edgekd.data import load_info, load_split
from src.edgekd.losses import kd_loss_fn
from src.edgekd.quant import convert, prepare_qat, set_qat_phase
from src.edgekd.runtime import run_stage, seed_everything, select_device, write_metrics
from src.edgekd.soft_targets import load_soft_targets, view_batches

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

    run_id = engine.fingerprint(as_dict(p.qat), as_dict(p.kd), as_dict(p.train), p.seed, size, targets["logits"],
                                *payload["state_dict"].values(), train[1], val[1])
    # BN statistics are frozen on schedule in QAT: no re-estimation before validation.
    setup = engine.setup_from_params(p, info, device, p.qat.epochs, args.live, run_id, bn_recalibration=False,
                                     input_size=size)
    result = engine.train_model(model, loss_fn, p.qat.lr, p.train.weight_decay, train, val, setup, on_epoch_start,
                                batches=view_batches(*train, targets, setup))
    int8_acc = engine.evaluate(convert(model), *val, info.mean, info.std, p.train.eval_batch_size)["acc"]

    spec = payload["model"]
    save_checkpoint(args.out, model_payload(model, spec["arch"], spec["width"],
                                            dataclasses.replace(info, image_size=size), qat=as_dict(p.qat)))
    metrics = {"val_acc_fake_quant": result.best_val_acc, "val_acc_int8_torch": int8_acc,
               "val_acc_fp32_start": engine.evaluate(student, *val, info.mean, info.std)["acc"],
               "best_epoch": result.best_epoch, "train_seconds": result.train_seconds}
    write_metrics(args.metrics, metrics)
    log.info("qat: val acc fp32 %.4f -> fake-quant %.4f, int8 torch %.4f", metrics["val_acc_fp32_start"],
             result.best_val_acc, int8_acc)


if __name__ == "__main__":
    run_stage(main)
