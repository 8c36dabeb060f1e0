"""Write the synthetic demo dataset: `python -m tools.make_demo_data --out data/rice-demo`.

With the default seed and size the bytes match `data.dvc`; a test checks that.
"""

from __future__ import annotations

import argparse
import logging

from edgekd.data.demo import DEFAULT_PER_CLASS, DEFAULT_SEED, generate
from edgekd.runtime import run_stage

log = logging.getLogger("edgekd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="folder to create, e.g. data/rice-demo")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS)
    parser.add_argument("--workers", type=int, default=1, help="processes (large trees)")
    args = parser.parse_args()
    files = generate(args.out, seed=args.seed, per_class=args.per_class, workers=args.workers)
    log.info("demo data: wrote %d synthetic images to %s", len(files), args.out)


if __name__ == "__main__":
    run_stage(main)
