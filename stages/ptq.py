"""Stage `ptq`: post-training static quantization of the distilled FP32 student, the control for QAT.

The same INT8 scheme as `qat` (edgekd.train.quant), ranges calibrated (min/max over every image) on
`ptq.calibration_images` unaugmented train images drawn at random within each class in proportion
to its size (seeded by `student.seed`), no training. The checkpoint has the format of a
QAT checkpoint, so `export` and `evaluate` treat both alike and the two INT8 files compare what
quantization-aware training adds.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import torch

from edgekd.config import as_dict, load_params
from edgekd.data.batches import ModelInputs, load_split, resize_batch
from edgekd.data.prepared import load_info
from edgekd.data.split import stratified_sample
from edgekd.runtime import run_stage, write_metrics
from edgekd.train.checkpoints import load_model, model_payload, save_checkpoint
from edgekd.train.device import select_device
from edgekd.train.evaluation import evaluate
from edgekd.train.quant import calibrate, convert, prepare_qat

log = logging.getLogger("edgekd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="prepared-data folder")
    parser.add_argument("--student", required=True, help="distilled FP32 student checkpoint")
    parser.add_argument("--out", required=True, help="PTQ checkpoint to write (QAT checkpoint format)")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    p = load_params(args.params)
    select_device("cpu", p.train.threads)  # quantized FX modules run on CPU only

    info = load_info(args.data)
    (train, labels), val = load_split(args.data, "train"), load_split(args.data, "val")
    student, payload = load_model(args.student)
    size, batch = int(payload["image_size"]), p.train.eval_batch_size
    rows = torch.from_numpy(stratified_sample(labels.numpy(), p.ptq.calibration_images, p.student.seed))
    calibration = train[rows]  # (N, 3, H, W) uint8, the chosen rows only (the split may be memory-mapped)
    model = calibrate(prepare_qat(student, size), ModelInputs(calibration, size, info.mean, info.std, batch))
    per_class = torch.bincount(labels[rows], minlength=len(info.classes)).tolist()

    save_checkpoint(
        args.out, model_payload(model, payload["model"], dataclasses.replace(info, image_size=size), ptq=as_dict(p.ptq))
    )
    val = (resize_batch(val[0], size), val[1])
    metrics = {
        "calibration_images": len(calibration),
        "calibration_per_class": dict(zip(info.classes, per_class)),
        "val_acc_fp32": evaluate(student, *val, info.mean, info.std, batch)["acc"],
        "val_acc_fake_quant": evaluate(model, *val, info.mean, info.std, batch)["acc"],
        "val_acc_int8_torch": evaluate(convert(model), *val, info.mean, info.std, batch)["acc"],
    }
    write_metrics(args.metrics, metrics)
    log.info(
        "ptq: %d calibration images; val acc fp32 %.4f -> fake-quant %.4f, int8 torch %.4f",
        len(calibration),
        metrics["val_acc_fp32"],
        metrics["val_acc_fake_quant"],
        metrics["val_acc_int8_torch"],
    )


if __name__ == "__main__":
    run_stage(main)
