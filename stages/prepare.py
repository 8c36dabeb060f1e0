"""Stage `prepare`: data tree -> prepared/ (split manifests, decoded cache, info.json), data report."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from edgekd.config import load_params
from edgekd.data.prepare import prepare_dataset
from edgekd.parallel import claim_slot
from edgekd.runtime import run_stage, write_metrics
from edgekd.train.device import seed_everything

log = logging.getLogger("edgekd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, help="ImageFolder tree (data.root)")
    parser.add_argument("--out", required=True, help="prepared-data folder to write")
    parser.add_argument("--metrics", required=True, help="data report JSON")
    parser.add_argument("--plots", required=True, help="folder for class_counts.csv, image_sizes.csv")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    params = load_params(args.params)
    seed_everything(params.data.split_seed)
    # Beside other experiments (edgekd.parallel): one slot, and one decoding process per core of it.
    claim_slot()

    result = prepare_dataset(args.root, args.out, params.data, params.data.split_seed)

    write_metrics(args.metrics, result.metrics)
    plots = Path(args.plots)
    plots.mkdir(parents=True, exist_ok=True)
    result.class_counts.to_csv(plots / "class_counts.csv", index=False)
    result.image_sizes.to_csv(plots / "image_sizes.csv", index=False)
    m = result.metrics
    log.info(
        "prepare: %d images (train %d, val %d, test %d); %d unreadable skipped; "
        "%d exact + %d near duplicate links; %d outliers",
        m["images"]["total"],
        m["images"]["train"],
        m["images"]["val"],
        m["images"]["test"],
        m["unreadable"]["count"],
        m["duplicates"]["exact_extra_images"],
        m["duplicates"]["near_pairs"],
        m["outliers"]["count"],
    )


if __name__ == "__main__":
    run_stage(main)
