"""The dataset side of the pipeline: scan an ImageFolder tree, decode it once, group duplicates,
split without leakage, cache the decoded pixels and describe the data.

Why groups: the Rice Image set holds exact duplicate pairs and the Rice Disease set is built from
flipped/rotated copies; if two copies land in train and test, test accuracy measures memory.
Every image therefore belongs to a group (exact pixel match or a perceptual-hash match under any
of the 8 flips/90-degree rotations, joined transitively) and whole groups are assigned to splits.

Prepared-data contract (read by every training stage through `load_split` / `load_info`):
`prepared/{train,val,test}.csv` (path, class, group), `prepared/{split}.npz` (`images` uint8
(N, 3, H, W) RGB, `labels` int64 (N,)), `prepared/info.json` (classes, image_size, mean, std).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from .config import DataConfig
from .errors import UserError
from .images import IMAGE_EXTENSIONS, UnreadableImage, load_rgb, resize_square

log = logging.getLogger("edgekd")

SPLITS = ("train", "val", "test")
# Wrapper folders of the public datasets, descended into when the root holds several folders.
KNOWN_WRAPPERS = ("Rice_Image_Dataset", "Rice_Leaf_AUG")
PHASH_SIZE = 16  # pHash side: 16x16 = 256 bits (see dihedral_phashes)
FOREGROUND_GREY = 60  # grain pixels: grey level above this (the rice background is black)
OUTLIER_Z = 4.0  # robust z-score (median/MAD) beyond which an image is listed as an outlier
MAX_LISTED = 50  # cap on the file lists written to metrics/data.json


class DataError(UserError):
    """The data tree cannot be used (missing root, < 2 classes, empty class, cache too large)."""


# ----------------------------------------------------------------------------- prepared data API


@dataclass(frozen=True)
class DatasetInfo:
    classes: list[str]
    image_size: int
    mean: list[float]  # per RGB channel, 0..1 units, train split
    std: list[float]


def load_info(prepared_dir: str | Path) -> DatasetInfo:
    path = Path(prepared_dir) / "info.json"
    try:
        raw = json.loads(path.read_text())
        return DatasetInfo(list(raw["classes"]), int(raw["image_size"]),
                           [float(v) for v in raw["mean"]], [float(v) for v in raw["std"]])
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run the prepare stage first") from None
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: malformed prepared-data info ({err})") from None


def load_split(prepared_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, H, W), labels int64 (N,)) of one split; no pickle is ever loaded."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(prepared_dir) / f"{split}.npz"
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run the prepare stage first") from None
    except (KeyError, ValueError, OSError) as err:
        raise DataError(f"{path}: unreadable prepared split ({err})") from None
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


# ----------------------------------------------------------------------------- scanning


@dataclass
class Scan:
    root: Path  # as given (data.root); manifest paths are relative to it
    class_root: Path  # the folder whose sub-folders are the classes
    classes: list[str]  # sorted
    files: list[tuple[Path, str]]  # (path, class), sorted
    ignored: int = 0  # non-image files and hidden entries skipped
    broken: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason)


def _visible(entries: list[os.DirEntry]) -> list[os.DirEntry]:
    return [e for e in entries if not e.name.startswith(".") and e.name != "__MACOSX"]


def _subdirs(folder: Path) -> list[Path]:
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in _visible(list(it)) if e.is_dir())


def _holds_images(folder: Path) -> bool:
    with os.scandir(folder) as it:
        return any(Path(e.name).suffix.lower() in IMAGE_EXTENSIONS for e in _visible(list(it)))


def find_class_root(root: Path) -> Path:
    """Accept `<root>/<class>/*` and wrappers such as `<root>/Rice_Image_Dataset/<class>/*`."""
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a folder (data.root)")
    current = root
    for _ in range(4):
        subdirs = _subdirs(current)
        if any(_holds_images(d) for d in subdirs):
            return current
        wrappers = [d for d in subdirs if d.name in KNOWN_WRAPPERS]
        if len(subdirs) == 1 or len(wrappers) == 1:
            current = subdirs[0] if len(subdirs) == 1 else wrappers[0]
            continue
        break
    raise DataError(f"data root {root}: no class folders with images found; expected "
                    "<root>/<class>/<image> (or a Rice_Image_Dataset/ or Rice_Leaf_AUG/ wrapper)")


def _walk_class(folder: Path, scan: Scan, label: str) -> None:
    """All image files under one class folder, following symlinks but never looping."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        scan.ignored += sum(n.startswith(".") for n in dirnames + filenames)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                scan.ignored += 1
            elif not path.is_file():  # a dangling symlink or a special file
                scan.broken.append((path, "not a regular file (dangling symlink?)"))
            else:
                scan.files.append((path, label))


def scan_tree(root: str | Path) -> Scan:
    root = Path(root)
    class_root = find_class_root(root)
    classes = [d.name for d in _subdirs(class_root)]
    if len(classes) < 2:
        raise DataError(f"data root {root}: found {len(classes)} class folder(s) {classes}; "
                        "at least 2 are needed")
    scan = Scan(root, class_root, classes, [])
    for name in classes:
        _walk_class(class_root / name, scan, name)
    return scan


# ----------------------------------------------------------------------------- decoding


@dataclass
class Decoded:
    """Per readable image, in scan order."""

    paths: list[Path]
    classes: list[str]
    images: np.ndarray  # (N, S, S, 3) uint8, resized
    exact: list[bytes]  # digest of the full-resolution decoded pixels
    phash: np.ndarray  # (N, 8, 4) uint64: 256-bit pHash of the 8 dihedral transforms
    sizes: np.ndarray  # (N, 2) int: original (width, height)
    area: np.ndarray  # (N,) foreground fraction
    brightness: np.ndarray  # (N,) mean grey of the foreground
    unreadable: list[tuple[Path, str]]


_DIHEDRAL = (None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM,
             Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270,
             Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE)


def dihedral_phashes(rgb: np.ndarray) -> np.ndarray:
    """(8, 4) uint64: 256-bit pHashes of the image under every flip / 90-degree rotation.

    256 bits, not imagehash's default 64: single grains on black are so alike that 64-bit hashes
    of distinct real grains often collide (~7,000 pairs at distance 0 in the 5,020-image sample),
    while at 256 bits distinct grains are >= 6 bits apart and true copies 0.
    imagehash.phash first shrinks to 64x64 grey; doing that once and transposing the small image
    costs 1/8 of hashing 8 full-size copies (the filter is symmetric, so the results match).
    """
    side = PHASH_SIZE * 4  # imagehash's highfreq_factor
    small = Image.fromarray(rgb).convert("L").resize((side, side), Image.Resampling.LANCZOS)
    bits = [imagehash.phash(small if t is None else small.transpose(t), hash_size=PHASH_SIZE).hash
            for t in _DIHEDRAL]
    packed = np.packbits(np.stack(bits).reshape(8, -1), axis=1)  # (8, 32) bytes, big-endian
    return packed.view(">u8").astype(np.uint64)  # (8, 4)


def _decode_one(path: Path, size: int, max_pixels: int) -> tuple | str:
    try:
        rgb = load_rgb(path, max_pixels)  # (H, W, 3)
    except UnreadableImage as err:
        return str(err)
    grey = rgb.mean(axis=2)  # (H, W)
    fg = grey > FOREGROUND_GREY
    digest = hashlib.blake2b(np.asarray(rgb.shape).tobytes() + rgb.tobytes(), digest_size=16).digest()
    return (resize_square(rgb, size), digest, dihedral_phashes(rgb), (rgb.shape[1], rgb.shape[0]),
            float(fg.mean()), float(grey[fg].mean()) if fg.any() else 0.0)


def decode_all(files: list[tuple[Path, str]], size: int, max_pixels: int) -> Decoded:
    """Decode every file once (threads: PIL releases the GIL while decoding)."""
    workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(lambda f: _decode_one(f[0], size, max_pixels), files),
                            total=len(files), desc="decode", disable=not sys.stderr.isatty()))
    ok = [(f, r) for f, r in zip(files, results) if not isinstance(r, str)]
    bad = [(f[0], r) for f, r in zip(files, results) if isinstance(r, str)]
    images = np.empty((len(ok), size, size, 3), dtype=np.uint8)
    for i, (_, r) in enumerate(ok):
        images[i] = r[0]
    return Decoded(
        paths=[f[0] for f, _ in ok], classes=[f[1] for f, _ in ok], images=images,
        exact=[r[1] for _, r in ok],
        phash=np.stack([r[2] for _, r in ok]) if ok else np.zeros((0, 8, 4), np.uint64),
        sizes=np.array([r[3] for _, r in ok], dtype=np.int64).reshape(-1, 2),
        area=np.array([r[4] for _, r in ok]), brightness=np.array([r[5] for _, r in ok]),
        unreadable=bad,
    )


# ----------------------------------------------------------------------------- duplicates


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def near_duplicate_pairs(phash: np.ndarray, max_bits: int, block: int = 32) -> list[tuple[int, int]]:
    """Pairs (i < j) whose pHash distance, minimised over the 8 transforms of i, is <= max_bits."""
    n = len(phash)
    pairs: list[tuple[int, int]] = []
    for start in range(0, n, block):
        rows = phash[start : start + block]  # (B, 8, 4)
        xor = rows[:, :, None, :] ^ phash[None, None, :, 0, :]  # (B, 8, N, 4)
        dist = np.bitwise_count(xor).sum(axis=3, dtype=np.int64).min(axis=1)  # (B, N)
        for bi, j in zip(*np.nonzero(dist <= max_bits)):
            i = start + int(bi)
            if i < j:
                pairs.append((i, int(j)))
    return pairs


def group_duplicates(exact: list[bytes], phash: np.ndarray, max_bits: int) -> tuple[np.ndarray, dict]:
    """Group id per image (0..G-1, numbered by first member) and duplicate counts."""
    uf = _UnionFind(len(exact))
    first: dict[bytes, int] = {}
    exact_extra = 0
    for i, key in enumerate(exact):
        if key in first:
            uf.union(first[key], i)
            exact_extra += 1
        else:
            first[key] = i
    near = [(i, j) for i, j in near_duplicate_pairs(phash, max_bits) if exact[i] != exact[j]]
    for i, j in near:
        uf.union(i, j)
    roots = [uf.find(i) for i in range(len(exact))]
    ids: dict[int, int] = {}
    groups = np.array([ids.setdefault(r, len(ids)) for r in roots], dtype=np.int64)
    sizes = np.bincount(groups) if len(groups) else np.zeros(0, np.int64)
    n_exact_groups = len({exact[i] for i in range(len(exact)) if first[exact[i]] != i})
    stats = {"exact_groups": n_exact_groups, "exact_extra_images": exact_extra,
             "near_pairs": len(near), "groups_with_copies": int((sizes > 1).sum()),
             "images_in_groups": int(sizes[sizes > 1].sum())}
    return groups, stats


# ----------------------------------------------------------------------------- splitting


def split_groups(labels: np.ndarray, groups: np.ndarray, fractions: dict[str, float],
                 seed: int) -> np.ndarray:
    """Split index per image (order of SPLITS), stratified by class, whole groups at a time.

    Groups are visited in a seeded random order, biggest first, and each goes to the split whose
    quota for the group's majority class is relatively least filled, so big groups spread over
    all splits; with singleton groups this is an exact per-class stratified split.
    """
    n_classes = int(labels.max()) + 1
    per_class = np.bincount(labels, minlength=n_classes)
    target = np.array([[fractions[s] * c for c in per_class] for s in SPLITS])  # (3, C)
    have = np.zeros_like(target)
    members = [np.flatnonzero(groups == g) for g in range(int(groups.max()) + 1)]
    order = np.random.default_rng(seed).permutation(len(members))
    order = sorted(order, key=lambda g: -len(members[g]))  # stable: keeps the random order
    split = np.empty(len(labels), dtype=np.int64)
    for g in order:
        counts = np.bincount(labels[members[g]], minlength=n_classes)
        major = int(counts.argmax())
        # Unfilled share of each quota; ties go to test, then val, so small classes reach them.
        room = [(target[k, major] - have[k, major]) / max(target[k, major], 1e-9) for k in (2, 1, 0)]
        s = (2, 1, 0)[int(np.argmax(room))]
        split[members[g]] = s
        have[s] += counts
    return split


# ----------------------------------------------------------------------------- statistics


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 * MAD); 0 where the spread is 0."""
    med = np.median(values)
    mad = 1.4826 * np.median(np.abs(values - med))
    return np.zeros_like(values) if mad == 0 else (values - med) / mad


def find_outliers(dec: Decoded, rel: list[str]) -> list[dict]:
    """Images whose foreground area or brightness is far from their own class's distribution."""
    out = []
    classes = np.array(dec.classes)
    for name in sorted(set(dec.classes)):
        idx = np.flatnonzero(classes == name)
        for feature, values in (("foreground_area", dec.area), ("brightness", dec.brightness)):
            z = robust_z(values[idx])
            for k in np.flatnonzero(np.abs(z) > OUTLIER_Z):
                i = idx[k]
                out.append({"path": rel[i], "class": name, "feature": feature,
                            "value": round(float(values[i]), 4), "z": round(float(z[k]), 1)})
    return sorted(out, key=lambda o: -abs(o["z"]))


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean/std in 0..1 units of (N, S, S, 3) uint8, via 256-bin histograms."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(3):
        hist = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
        m = float((hist * levels).sum() / hist.sum())
        var = float((hist * (levels - m) ** 2).sum() / hist.sum())
        mean.append(round(m, 6))
        std.append(round(max(var, 1e-12) ** 0.5, 6))
    return mean, std


# ----------------------------------------------------------------------------- the whole step


def check_cache_size(n_images: int, cfg: DataConfig) -> None:
    need_mb = n_images * 3 * cfg.image_size**2 / 2**20
    if need_mb > cfg.cache_limit_mb:
        raise DataError(f"data: the decoded cache needs {need_mb:.0f} MB for {n_images} images at "
                        f"data.image_size={cfg.image_size}, above data.cache_limit_mb="
                        f"{cfg.cache_limit_mb}; lower the image size or raise the limit")


def _check_classes(scan: Scan, dec: Decoded) -> None:
    present = set(dec.classes)
    for name in scan.classes:
        if name not in present:
            raise DataError(f"class folder {scan.class_root / name} has no readable images "
                            "(after skipping unreadable files)")


@dataclass
class Prepared:
    metrics: dict
    class_counts: pd.DataFrame  # class, images, train, val, test
    image_sizes: pd.DataFrame  # size, images


def prepare_dataset(root: str | Path, out_dir: str | Path, cfg: DataConfig, seed: int) -> Prepared:
    """Scan, decode, group, split and cache `root` into `out_dir`; returns the data report."""
    root, out_dir = Path(root), Path(out_dir)
    scan = scan_tree(root)
    check_cache_size(len(scan.files), cfg)
    log.info("prepare: %d files in %d classes under %s", len(scan.files), len(scan.classes),
             scan.class_root)
    dec = decode_all(scan.files, cfg.image_size, cfg.max_image_pixels)
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
    write_prepared(out_dir, dec, rel, labels, groups, split, scan.classes, cfg.image_size)
    return _report(scan, dec, rel, labels, split, dup_stats, groups, load_info(out_dir))


def write_prepared(out_dir: Path, dec: Decoded, rel: list[str], labels: np.ndarray,
                   groups: np.ndarray, split: np.ndarray, classes: list[str], size: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for s, name in enumerate(SPLITS):
        idx = np.flatnonzero(split == s)
        idx = idx[np.lexsort((np.array(rel)[idx], labels[idx]))]  # by class, then path
        pd.DataFrame({"path": [rel[i] for i in idx], "class": [classes[labels[i]] for i in idx],
                      "group": groups[idx]}).to_csv(out_dir / f"{name}.csv", index=False)
        images = np.ascontiguousarray(dec.images[idx].transpose(0, 3, 1, 2))  # (N, 3, S, S)
        np.savez(out_dir / f"{name}.npz", images=images, labels=labels[idx])
    mean, std = channel_stats(dec.images[split == 0])
    info = {"classes": classes, "image_size": size, "mean": mean, "std": std}
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")


def _report(scan: Scan, dec: Decoded, rel: list[str], labels: np.ndarray, split: np.ndarray,
            dup_stats: dict, groups: np.ndarray, info: DatasetInfo) -> Prepared:
    counts = pd.DataFrame({"class": scan.classes})
    for s, name in enumerate(SPLITS):
        counts[name] = np.bincount(labels[split == s], minlength=len(scan.classes))
    counts.insert(1, "images", counts[list(SPLITS)].sum(axis=1))
    size_names = [f"{w}x{h}" for w, h in dec.sizes]
    sizes = (pd.Series(size_names, dtype=str).value_counts().rename_axis("size")
             .reset_index(name="images").sort_values(["images", "size"], ascending=[False, True]))
    outliers = find_outliers(dec, rel)
    dup_groups = [[rel[i] for i in np.flatnonzero(groups == g)]
                  for g in np.flatnonzero(np.bincount(groups) > 1)] if len(groups) else []
    w, h = dec.sizes[:, 0], dec.sizes[:, 1]
    metrics = {
        "images": {"total": int(len(labels)), **{n: int((split == s).sum()) for s, n in enumerate(SPLITS)}},
        "classes": {r["class"]: {k: int(r[k]) for k in ("images", *SPLITS)} for _, r in counts.iterrows()},
        "duplicates": {**dup_stats, "groups": dup_groups[:MAX_LISTED]},
        "unreadable": {"count": len(dec.unreadable),
                       "files": [_unreadable_entry(scan, p, r) for p, r in dec.unreadable[:MAX_LISTED]]},
        "ignored_files": scan.ignored,
        "image_size": {"width": _summary(w), "height": _summary(h)},
        "pixels": {"mean": dict(zip("rgb", info.mean)), "std": dict(zip("rgb", info.std))},
        "outliers": {"count": len(outliers), "by_class": _count_by_class(outliers),
                     "files": outliers[:MAX_LISTED]},
    }
    return Prepared(metrics, counts, sizes)


def _count_by_class(outliers: list[dict]) -> dict:
    """{class: {feature: n}}: the file list is capped, these counts are not."""
    counts: dict = {}
    for o in outliers:
        per_class = counts.setdefault(o["class"], {})
        per_class[o["feature"]] = per_class.get(o["feature"], 0) + 1
    return dict(sorted(counts.items()))


def _summary(values: np.ndarray) -> dict:
    return {"min": int(values.min()), "max": int(values.max()), "mean": round(float(values.mean()), 2)}


def _unreadable_entry(scan: Scan, path: Path, reason: str) -> dict:
    """Paths relative to data.root keep metrics identical across machines."""
    return {"path": path.relative_to(scan.root).as_posix(),
            "reason": reason.removeprefix(f"{path}: ")}
