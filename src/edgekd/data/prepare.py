"""The prepare stage's work: scan an ImageFolder tree, decode it once, group duplicates, split
without leakage, write the prepared data and describe it (see the modules it calls).

The decoded pixels never sit in RAM as a whole: they are decoded into a memory-mapped staging file
in scan order, copied chunk by chunk into each split's memory-mappable array, and the staging file
is removed. Disk, not memory, bounds the dataset: twice the decoded cache while it runs.

All of it happens in a hidden sibling of the output folder (`.prepared.building-<pid>`), renamed into
place once complete: a failed or killed run leaves the previous prepared folder (or none), never
a half-written one, and a failed run removes everything it wrote.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from edgekd.config import DataConfig
from edgekd.data.decode import Decoded, decode_all
from edgekd.data.dedup import group_duplicates
from edgekd.data.prepared import SPLITS, building, load_info, write_prepared
from edgekd.data.scan import Scan, scan_tree
from edgekd.data.split import split_groups
from edgekd.data.stats import DataReport, data_report
from edgekd.errors import DataError

log = logging.getLogger("edgekd")

STAGING_FILE = "decoded.tmp.npy"  # every decoded image in scan order; removed before the stage ends


def check_cache_size(n_images: int, cfg: DataConfig, out_dir: Path) -> None:
    """Refuse, before decoding anything, a decoded cache above data.cache_limit_mb or one that the
    disk under `out_dir` (its folder: it is built beside it) cannot hold twice (the staging file
    and the splits)."""
    need_mb = n_images * 3 * cfg.image_size**2 / 2**20
    if need_mb > cfg.cache_limit_mb:
        raise DataError(f"data: the decoded cache needs {need_mb:.0f} MB for {n_images} images at "
                        f"data.image_size={cfg.image_size}, above data.cache_limit_mb="
                        f"{cfg.cache_limit_mb}; lower the image size or raise the limit")
    free_mb = shutil.disk_usage(out_dir.parent).free / 2**20
    if 2 * need_mb > free_mb:
        raise DataError(f"{out_dir}: {free_mb:.0f} MB free, but preparing {n_images} images at "
                        f"data.image_size={cfg.image_size} needs {2 * need_mb:.0f} MB while it runs "
                        "(the decoded cache twice); free disk space or lower the image size")


def _check_classes(scan: Scan, dec: Decoded) -> None:
    present = set(dec.classes)
    for name in scan.classes:
        if name not in present:
            raise DataError(f"class folder {scan.class_root / name} has no readable images "
                            "(after skipping unreadable files)")


def prepare_dataset(root: str | Path, out_dir: str | Path, cfg: DataConfig, seed: int) -> DataReport:
    """Scan, decode, group, split and cache `root` into `out_dir`; returns the data report."""
    root, out_dir = Path(root), Path(out_dir)
    scan = scan_tree(root)
    with building(out_dir) as work:  # out_dir itself changes only by the final rename
        check_cache_size(len(scan.files), cfg, out_dir)
        log.info("prepare: %d files in %d classes under %s", len(scan.files), len(scan.classes),
                 scan.class_root)
        staging = work / STAGING_FILE
        pixels = np.lib.format.open_memmap(staging, "w+", np.uint8,
                                           (len(scan.files), cfg.image_size, cfg.image_size, 3))
        dec = decode_all(scan.files, cfg.image_size, cfg.max_image_pixels, pixels)
        dec.unreadable = scan.broken + dec.unreadable
        _check_classes(scan, dec)
        labels = np.array([scan.classes.index(c) for c in dec.classes], dtype=np.int64)
        groups, dup_stats = group_duplicates(dec.exact, dec.phash, cfg.near_duplicate_bits)
        fractions = {"train": 1 - cfg.val_fraction - cfg.test_fraction, "val": cfg.val_fraction,
                     "test": cfg.test_fraction}
        split = split_groups(labels, groups, fractions, seed)
        rel = [p.relative_to(root).as_posix() for p in dec.paths]
        for s, name in enumerate(SPLITS):
            if not (split == s).any():
                raise DataError(f"data root {root}: too few images ({len(labels)}) to fill the "
                                f"'{name}' split; add images or change data.{name}_fraction")
        write_prepared(work, dec.images, rel, labels, groups, split, scan.classes, cfg.image_size)
        staging.unlink()  # the mapping stays valid; the space is freed once it is dropped
    return data_report(scan, dec, rel, labels, split, dup_stats, groups, load_info(out_dir))
