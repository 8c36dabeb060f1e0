"""The prepared-data format every training, export and evaluation stage reads (numpy only: the
evaluation of ONNX files never imports torch; edgekd.data.batches turns it into torch model input).

`prepared/{train,val,test}.csv` (path, class, group), `prepared/{split}_images.npy` (uint8
(N, 3, H, W) RGB), `prepared/{split}_labels.npy` (int64 (N,)), `prepared/info.json` (classes,
image_size, mean, std). Stages read it through `read_split` / `load_info`.

A prepared folder is whole or absent, never half-written: it is built in a hidden sibling folder
(`building`), `info.json` written last, and renamed into place only when complete. `info.json` is
the completion mark: `load_info` and `load_split` refuse a folder without it.

The image arrays are memory-mapped, never read whole: a stage's RAM holds the batches it touches,
and the pages it has read are file cache the OS can drop, so a split larger than RAM still trains.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from edgekd.errors import DataError

SPLITS = ("train", "val", "test")
CHUNK = 1024  # images per copy or pass over a split: bounds the RAM of whole-split work


@dataclass(frozen=True)
class DatasetInfo:
    classes: list[str]
    image_size: int
    mean: list[float]  # per RGB channel, 0..1 units, train split
    std: list[float]


def _require_complete(prepared_dir: Path) -> Path:
    """`prepared_dir/info.json`, or a one-line error: a folder without it is not (finished) prepared
    data, whatever arrays it holds."""
    path = prepared_dir / "info.json"
    if not path.is_file():
        if not prepared_dir.exists():
            raise DataError(f"{prepared_dir}: not found; run the prepare stage first")
        raise DataError(f"{prepared_dir}: no info.json, so not complete prepared data (prepare writes "
                        "it last; was a run interrupted?); run the prepare stage again")
    return path


def load_info(prepared_dir: str | Path) -> DatasetInfo:
    path = _require_complete(Path(prepared_dir))
    try:
        raw = json.loads(path.read_text())
        return DatasetInfo(list(raw["classes"]), int(raw["image_size"]),
                           [float(v) for v in raw["mean"]], [float(v) for v in raw["std"]])
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: malformed prepared-data info ({err})") from None


def read_split(prepared_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, H, W), memory-mapped; labels int64 (N,)) of one split of a complete
    prepared folder (one with info.json). Copy-on-write mapping: the array is writable as torch
    expects, and the file is never changed. No pickle is ever loaded."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    size = load_info(prepared_dir).image_size
    images_path, labels_path = (Path(prepared_dir) / f"{split}_{part}.npy" for part in ("images", "labels"))
    try:
        images = np.load(images_path, mmap_mode="c", allow_pickle=False)
        labels = np.load(labels_path, allow_pickle=False)
    except FileNotFoundError as err:
        raise DataError(f"{err.filename}: not found; run the prepare stage first") from None
    except (ValueError, OSError) as err:
        raise DataError(f"{images_path}: unreadable prepared split ({err})") from None
    if (images.dtype != np.uint8 or images.shape[1:] != (3, size, size)
            or labels.shape != images.shape[:1]):
        raise DataError(f"{images_path}: expected uint8 (N, 3, {size}, {size}) images (info.json "
                        f"image_size) and N labels, got {images.dtype} {images.shape} and "
                        f"{labels.shape[0] if labels.ndim else 0} labels")
    return images, labels.astype(np.int64)


PREPARED_FILES = frozenset({"info.json", *(f"{s}{part}" for s in SPLITS
                                          for part in (".csv", "_images.npy", "_labels.npy"))})


def check_replaceable(out_dir: Path) -> None:
    """Refuse, with a one-line error, an `out_dir` that `building` must not replace: a file, or a
    folder holding anything but prepared data (an earlier in-place writer's staging file aside)."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder; remove it or choose another output")
    legacy = {"decoded.tmp.npy"}  # the staging file of an in-place prepare killed before this one
    other = sorted(p.name for p in out_dir.iterdir() if p.name not in PREPARED_FILES | legacy)
    if other:
        raise DataError(f"{out_dir}: holds files that are not prepared data ({', '.join(other[:3])}"
                        f"{', ...' if len(other) > 3 else ''}), which writing prepared data there would "
                        "delete; remove them or choose another output folder")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(out_dir: Path) -> None:
    """Hidden siblings that a killed `building` left behind (its process is gone)."""
    for path in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*-*"):
        kind, _, pid = path.name[len(out_dir.name) + 2:].rpartition("-")
        if kind in ("building", "replaced") and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def building(out_dir: str | Path) -> Iterator[Path]:
    """A fresh hidden sibling folder of `out_dir` (`.<name>.building-<pid>`) to write prepared data
    into; on a normal exit it replaces `out_dir` by a rename, on an exception it is removed and
    `out_dir` is left as it was. Killed part-way, it leaves `out_dir` as it was (or, between the two
    renames of a replacement, absent) and never a half-written folder there; the next `building`
    of the same `out_dir` removes what a dead process left."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out_dir)
    work = out_dir.with_name(f".{out_dir.name}.building-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
        if not (work / "info.json").is_file():
            raise RuntimeError(f"{work}: no info.json written; prepared data is incomplete")
        if out_dir.exists() or out_dir.is_symlink():
            old = out_dir.with_name(f".{out_dir.name}.replaced-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out_dir, old)
            try:
                os.rename(work, out_dir)
            except BaseException:
                os.rename(old, out_dir)  # the previous folder back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def write_prepared(out_dir: Path, images: np.ndarray, rel: list[str], labels: np.ndarray,
                   groups: np.ndarray, split: np.ndarray, classes: list[str], size: int) -> None:
    """Each split's manifest and arrays, by class then path, then info.json, last: write into the
    folder `building` gives, never into the prepared folder itself. `images` (N, S, S, 3) in scan
    order is read a chunk at a time (it is the memory-mapped staging file in `prepare`)."""
    for s, name in enumerate(SPLITS):
        idx = np.flatnonzero(split == s)
        idx = idx[np.lexsort((np.array(rel)[idx], labels[idx]))]  # by class, then path
        pd.DataFrame({"path": [rel[i] for i in idx], "class": [classes[labels[i]] for i in idx],
                      "group": groups[idx]}).to_csv(out_dir / f"{name}.csv", index=False)
        chw = np.lib.format.open_memmap(out_dir / f"{name}_images.npy", "w+", np.uint8, (len(idx), 3, size, size))
        for start in range(0, len(idx), CHUNK):
            chw[start:start + CHUNK] = images[idx[start:start + CHUNK]].transpose(0, 3, 1, 2)
        chw.flush()
        del chw
        np.save(out_dir / f"{name}_labels.npy", labels[idx])
    mean, std = channel_stats(images, np.flatnonzero(split == 0))
    info = {"classes": classes, "image_size": size, "mean": mean, "std": std}
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")


def channel_stats(images: np.ndarray, rows: np.ndarray | None = None) -> tuple[list[float], list[float]]:
    """Exact per-channel mean/std in 0..1 units of (N, S, S, 3) uint8 (the `rows` given, else all),
    via 256-bin histograms accumulated a chunk at a time."""
    rows = np.arange(len(images)) if rows is None else rows
    hists = np.zeros((3, 256), dtype=np.int64)
    for start in range(0, len(rows), CHUNK):
        chunk = images[rows[start:start + CHUNK]]  # (B, S, S, 3)
        for c in range(3):
            hists[c] += np.bincount(chunk[..., c].ravel(), minlength=256)
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for hist in hists.astype(np.float64):
        m = float((hist * levels).sum() / hist.sum())
        var = float((hist * (levels - m) ** 2).sum() / hist.sum())
        mean.append(round(m, 6))
        std.append(round(max(var, 1e-12) ** 0.5, 6))
    return mean, std
