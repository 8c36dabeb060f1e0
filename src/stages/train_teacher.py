"""Stage `train_teacher@<arch>`: one teacher trained from scratch with label-smoothed CE."""

from __future__ import annotations

import argparse
import logging
import time

import torch

from src.edgekd.ckpt import model_payload, save_checkpoint
from src.edgekd.config import as_dict, load_params
from src.edgekd.data import load_info, load_split
from src.edgekd.engine import fingerprint, setup_from_params, train_model, training_summary
from src.edgekd.errors import UserError
from src.edgekd.losses import ce_loss_fn
from src.edgekd.models import build_model
from src.edgekd.runtime import run_stage, seed_everything, select_device, write_metrics

log = logging.getLogger("edgekd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", required=True, help="one of teachers.archs")
    parser.add_argument("--data", required=True, help="prepared-data folder")
    parser.add_argument("--out", required=True, help="teacher checkpoint to write")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write")
    parser.add_argument("--live", help="dvclive folder (per-epoch curves, resume file)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    params = load_params(args.params)
    if args.arch not in params.teachers.archs:
        raise UserError(f"--arch {args.arch!r} is not in params teachers.archs {list(params.teachers.archs)}")
    start = time.perf_counter()
    seed_everything(params.seed)
    device = select_device(params.train.device, params.train.threads)
    info, train, val = load_info(args.data), load_split(args.data, "train"), load_split(args.data, "val")
    cfg = params.teachers
    model = build_model(args.arch, len(info.classes), weights=cfg.weights.get(args.arch))
    model.to(memory_format=torch.channels_last)  # oneDNN's faster layout: 7-20 % less time per step on CPU
    run_id = fingerprint(args.arch, params.seed, as_dict(params.train), as_dict(cfg), *train, *val)
    setup = setup_from_params(params, info, device, cfg.epochs, args.live, run_id)

    result = train_model(model, ce_loss_fn(params.train.label_smoothing), cfg.lr,
                         params.train.weight_decay, train, val, setup)

    save_checkpoint(args.out, model_payload(model, args.arch, 1.0, info, val_acc=result.best_val_acc))
    write_metrics(args.metrics, training_summary(result, model, time.perf_counter() - start))
    log.info("teacher %s: val_acc %.4f (epoch %d), %s", args.arch, result.best_val_acc,
             result.best_epoch + 1, args.out)


if __name__ == "__main__":
    run_stage(main)
