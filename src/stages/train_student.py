"""Stages `baseline` (student, CE only) and `distill` (student, CE + KD from the teacher ensemble).

Both use the same schedule, augmentation and seed, so their difference is the distillation alone.
"""

from __future__ import annotations

import argparse
import logging
import time

from src.edgekd.ckpt import load_teachers, model_payload, save_checkpoint
from src.edgekd.config import as_dict, load_params
from src.edgekd.data import load_info, load_split
from src.edgekd.engine import evaluate, fingerprint, setup_from_params, train_model, training_summary
from src.edgekd.errors import UserError
from src.edgekd.losses import ce_loss_fn, ensemble_logits, kd_loss_fn, prepare_teachers
from src.edgekd.models import build_model
from src.edgekd.runtime import run_stage, seed_everything, select_device, write_metrics

log = logging.getLogger("edgekd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", required=True, choices=["baseline", "distill"])
    parser.add_argument("--data", required=True, help="prepared-data folder")
    parser.add_argument("--teachers", help="folder with <arch>.pt per teachers.archs (distill)")
    parser.add_argument("--out", required=True, help="student checkpoint to write")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write")
    parser.add_argument("--live", help="dvclive folder (per-epoch curves, resume file)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    params = load_params(args.params)
    if args.mode == "distill" and not args.teachers:
        raise UserError("--mode distill needs --teachers DIR")
    start = time.perf_counter()
    seed_everything(params.seed)
    device = select_device(params.train.device, params.train.threads)
    info, train, val = load_info(args.data), load_split(args.data, "train"), load_split(args.data, "val")
    cfg, metrics = params.student, {}
    if args.mode == "distill":
        models, payloads = load_teachers(args.teachers, params.teachers.archs, info)
        teachers = prepare_teachers([m.to(device) for m in models])
        teacher_states = [payload["state_dict"] for payload in payloads]
        ensemble = evaluate(lambda x: ensemble_logits(teachers, x), *val, info.mean, info.std,
                            params.train.eval_batch_size, device)
        metrics["teacher_ensemble_val_acc"] = ensemble["acc"]
        loss_fn = kd_loss_fn(teachers, params.kd.temperature, params.kd.alpha, params.train.label_smoothing)
        extra_id = [as_dict(params.kd), teacher_states]
    else:
        loss_fn, extra_id = ce_loss_fn(params.train.label_smoothing), []
    model = build_model(cfg.arch, len(info.classes), cfg.width)
    run_id = fingerprint(args.mode, params.seed, as_dict(params.train), as_dict(cfg), *extra_id, *train, *val)
    setup = setup_from_params(params, info, device, cfg.epochs, args.live, run_id)

    result = train_model(model, loss_fn, cfg.lr, params.train.weight_decay, train, val, setup)

    save_checkpoint(args.out, model_payload(model, cfg.arch, cfg.width, info, val_acc=result.best_val_acc,
                                            mode=args.mode))
    write_metrics(args.metrics, {**training_summary(result, model, time.perf_counter() - start), **metrics})
    log.info("%s: val_acc %.4f (epoch %d), %s", args.mode, result.best_val_acc, result.best_epoch + 1, args.out)


if __name__ == "__main__":
    run_stage(main)
