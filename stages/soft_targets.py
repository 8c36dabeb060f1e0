"""Stage `soft_targets`: every teacher's logits on `kd.views` augmented views of the training set.

Computed once per set of teachers; `distill` and the QAT stages read them and combine the teachers
as kd.ensemble says, so student experiments never run a teacher (src/edgekd/train/soft_targets.py).
The metrics show both ensembles on the views, so the two can be compared before any student trains.
"""

from __future__ import annotations

import argparse
import logging
import time

from edgekd.config import ENSEMBLES, load_params
from edgekd.data.batches import load_split
from edgekd.data.prepared import load_info
from edgekd.runtime import run_stage, write_metrics
from edgekd.train.checkpoints import load_teachers
from edgekd.train.device import seed_everything, select_device
from edgekd.train.evaluation import evaluate
from edgekd.train.losses import FlipAveraged, ensemble_logits, prepare_teachers
from edgekd.train.soft_targets import (
    combine_teachers,
    compute_soft_targets,
    save_soft_targets,
    storage_rounding,
    stored,
)

log = logging.getLogger("edgekd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="prepared-data folder")
    parser.add_argument("--teachers", required=True, help="folder with <arch>.pt per teachers.archs")
    parser.add_argument("--out", required=True, help="soft-targets file to write")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    params = load_params(args.params)
    start = time.perf_counter()
    seed_everything(params.seed)
    device = select_device(params.train.device, params.train.threads)
    info, (images, labels), val = load_info(args.data), load_split(args.data, "train"), load_split(args.data, "val")
    teachers = prepare_teachers([m.to(device) for m in load_teachers(args.teachers, params.teachers.archs, info)[0]])

    targets = compute_soft_targets(teachers, images, params, info, device)
    views = len(targets["view_hashes"])
    # The plain mean on val: confidence weights need the labels, which a deployed model never has.
    # Single-view, and averaged over each image and its mirror (what kd.targets: flip_mean stores).
    ensemble = lambda x: ensemble_logits(teachers, x)  # noqa: E731
    ensemble_val, ensemble_val_flip = (
        evaluate(fn, *val, info.mean, info.std, params.train.eval_batch_size, device)["acc"]
        for fn in (ensemble, FlipAveraged(ensemble))
    )
    schemes = ENSEMBLES if len(teachers) > 1 else ("mean",)  # confidence weights compare teachers
    saved = stored(targets)["teacher_logits"].float()  # what the students read
    ensembles = {name: combine_teachers(saved, labels, name) for name in schemes}
    view_acc = {name: (logits.argmax(-1) == labels).float().mean().item() for name, (logits, _) in ensembles.items()}

    save_soft_targets(args.out, targets)
    wall_s = time.perf_counter() - start
    write_metrics(
        args.metrics,
        {
            "teacher_ensemble_val_acc": ensemble_val,
            "teacher_ensemble_val_acc_flip": ensemble_val_flip,
            "views": views,
            # each ensemble's accuracy on the augmented training views (how much the targets themselves err)
            # and each teacher's mean weight in it over every view and image
            "ensemble_view_acc": view_acc,
            **storage_rounding(targets["teacher_logits"], labels, schemes),
            "teacher_weights": {
                name: dict(zip(params.teachers.archs, weights.round(decimals=4).tolist()))
                for name, (_, weights) in ensembles.items()
                if name != "mean"
            },
            "images_per_s": round(views * len(images) / wall_s, 1),
            "wall_s": round(wall_s, 1),
        },
    )
    log.info(
        "soft targets: %d views x %d images, ensemble acc on views %s, on val %.4f (flip-averaged %.4f), %s",
        views,
        len(images),
        " ".join(f"{k} {v:.4f}" for k, v in view_acc.items()),
        ensemble_val,
        ensemble_val_flip,
        args.out,
    )


if __name__ == "__main__":
    run_stage(main)
