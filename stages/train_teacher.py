"""Stage `train_teacher@<arch>`: one teacher trained from scratch with label-smoothed CE."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from edgekd.config import TEACHER_ARCHS, as_dict, convnet_shape, load_params
from edgekd.data.batches import load_split
from edgekd.data.prepared import load_info
from edgekd.errors import UserError
from edgekd.runtime import run_stage, stream_seed, write_metrics
from edgekd.train.checkpoints import model_payload, save_checkpoint
from edgekd.train.device import seed_everything, select_device
from edgekd.train.distributed import join_process_group, leave_process_group, relaunch_under_torchrun
from edgekd.train.engine import setup_from_params, train_model
from edgekd.train.evaluation import evaluate
from edgekd.train.losses import FlipAveraged, ce_loss_fn
from edgekd.train.models import build_model, fit_whitening, local_weights
from edgekd.train.resume import fingerprint

log = logging.getLogger("edgekd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", required=True, help=f"one of teachers.archs: {list(TEACHER_ARCHS)} or a convnet")
    parser.add_argument("--data", required=True, help="prepared-data folder")
    parser.add_argument("--init", help="folder with an optional local weights file (*.pt, *.pth) for the backbone")
    parser.add_argument("--out", required=True, help="teacher checkpoint to write")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write")
    parser.add_argument("--live", help="dvclive folder (per-epoch curves, resume file)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    params = load_params(args.params)
    if args.arch not in TEACHER_ARCHS and convnet_shape(args.arch) is None:
        raise UserError(
            f"--arch {args.arch!r} is not a teacher architecture; one of {list(TEACHER_ARCHS)} or a convnet"
        )
    relaunch_under_torchrun(params.distributed)
    seed = stream_seed(params.seed, f"teacher/{args.arch}")  # own batch order and augmentations
    seed_everything(seed)
    ranks, device = join_process_group(select_device(params.train.device, params.train.threads))
    info, train, val = load_info(args.data), load_split(args.data, "train"), load_split(args.data, "val")
    cfg = params.teachers
    if args.init:  # DVC hashes the folder as a dependency: a teacher of a new name starts with an empty one
        Path(args.init).mkdir(parents=True, exist_ok=True)
    weights = local_weights(args.init)
    stem = cfg.stem(args.arch)
    model = build_model(
        args.arch, len(info.classes), weights=weights, stem=stem, norm_after_pool=params.train.norm_after_pool
    )
    fit_whitening(model, train[0], info.mean, info.std)  # a convnet's first conv, from this train split
    init = [] if weights is None else [model.state_dict()]  # the loaded backbone is part of the run
    run_id = fingerprint(args.arch, stem, seed, as_dict(params.train), cfg.epochs, cfg.lr, *init, *train, *val)
    setup = setup_from_params(params, info, device, cfg.epochs, seed, args.live, run_id, ranks=ranks)

    result = train_model(
        model, ce_loss_fn(params.train.label_smoothing), cfg.lr, params.train.weight_decay, train, val, setup
    )

    if ranks.main:
        save_checkpoint(
            args.out,
            model_payload(
                model,
                {"arch": args.arch, "width": 1.0, "stem": stem},
                info,
                val_acc=result.best_val_acc,
            ),
        )
        # single-view, and averaged over each image and its mirror (the soft targets of kd.targets: flip_mean)
        flip_acc = evaluate(
            FlipAveraged(model.eval()), *val, info.mean, info.std, params.train.eval_batch_size, device
        )["acc"]
        write_metrics(args.metrics, {"val_acc": result.best_val_acc, "val_acc_flip": flip_acc})
    leave_process_group()
    log.info("teacher %s: val_acc %.4f (epoch %d), %s", args.arch, result.best_val_acc, result.best_epoch + 1, args.out)


if __name__ == "__main__":
    run_stage(main)
