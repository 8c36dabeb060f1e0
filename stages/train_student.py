"""Stages `baseline` (student, CE only) and `distill` (student, CE + KD from the teacher ensemble).

Both use the same schedule and seed (student.seed). `distill` trains on the augmented views that the teachers labelled
in the soft_targets stage (view e mod V in epoch e), `baseline` on freshly augmented batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from edgekd.config import as_dict, load_params
from edgekd.data.batches import load_split
from edgekd.data.prepared import load_info
from edgekd.errors import UserError
from edgekd.runtime import run_stage, write_metrics
from edgekd.train.checkpoints import model_payload, save_checkpoint
from edgekd.train.device import seed_everything, select_device
from edgekd.train.distributed import join_process_group, leave_process_group, relaunch_under_torchrun
from edgekd.train.resume import fingerprint
from edgekd.train.soft_targets import load_soft_targets
from edgekd.train.student import train_student

log = logging.getLogger("edgekd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", required=True, choices=["baseline", "distill"])
    parser.add_argument("--data", required=True, help="prepared-data folder")
    parser.add_argument("--soft-targets", help="teacher logits of the training views (distill)")
    parser.add_argument("--out", required=True, help="student checkpoint to write")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write")
    parser.add_argument("--live", help="dvclive folder (per-epoch curves, resume file)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    params = load_params(args.params)
    if args.mode == "distill" and not args.soft_targets:
        raise UserError("--mode distill needs --soft-targets FILE")
    relaunch_under_torchrun(params.distributed)
    cfg = params.student
    seed_everything(cfg.seed)
    ranks, device = join_process_group(select_device(params.train.device, params.train.threads))
    info, train, val = load_info(args.data), load_split(args.data, "train"), load_split(args.data, "val")
    targets = load_soft_targets(args.soft_targets, train, params, len(info.classes)) if args.mode == "distill" else None
    kd_id = [] if targets is None else [params.kd.temperature, params.kd.alpha, targets["logits"]]
    run_id = fingerprint(args.mode, as_dict(params.train), as_dict(cfg), *kd_id, *train, *val)

    model, result, setup = train_student(params, info, train, val, device, targets, args.live, run_id, ranks)

    if ranks.main:
        save_checkpoint(
            args.out,
            model_payload(
                model,
                {"arch": cfg.arch, "width": cfg.width, "stem": cfg.stem},
                dataclasses.replace(info, image_size=setup.input_size),
                val_acc=result.best_val_acc,
                mode=args.mode,
            ),
        )
        write_metrics(args.metrics, {"val_acc": result.best_val_acc})  # per-epoch figures: the dvclive curves
    leave_process_group()
    log.info("%s: val_acc %.4f (epoch %d), %s", args.mode, result.best_val_acc, result.best_epoch + 1, args.out)


if __name__ == "__main__":
    run_stage(main)
