"""Scanning, duplicate groups, leakage-free splits, the decoded cache and the data report."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from edgekd.config import DataConfig
from edgekd.data import prepare as prepare_mod
from edgekd.data import prepared as prepared_mod
from edgekd.data.batches import load_split
from edgekd.data.decode import decode_all
from edgekd.data.dedup import group_duplicates, near_duplicate_pairs
from edgekd.data.images import load_rgb
from edgekd.data.prepare import prepare_dataset
from edgekd.data.prepared import SPLITS, channel_stats, load_info
from edgekd.data.scan import scan_tree
from edgekd.data.split import split_groups
from edgekd.errors import DataError
from tools.scale.memory import anon_bytes

REPO = Path(__file__).resolve().parents[1]


def data_values(**overrides) -> dict:
    """params.yaml's `data` section with `overrides`: every value a test does not set is the project's."""
    return {**yaml.safe_load((REPO / "params.yaml").read_text())["data"], **overrides}


def data_config(**overrides) -> DataConfig:
    return DataConfig(**data_values(**overrides))


CFG = data_config(image_size=32)
FRACTIONS = {"train": 0.65, "val": 0.15, "test": 0.2}


def _copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _tree_digest(root: Path) -> str:
    h = hashlib.md5()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file() and not path.is_symlink():
            h.update(path.read_bytes())
    return h.hexdigest()


def _manifests(prepared: Path) -> dict[str, pd.DataFrame]:
    return {s: pd.read_csv(prepared / f"{s}.csv") for s in SPLITS}


# ----------------------------------------------------------------------------- prepared contract


def test_prepared_small_follows_the_contract(prepared_small, small_rice_tree):
    info = load_info(prepared_small)
    assert info.classes == ["Arborio", "Basmati", "Ipsala", "Jasmine", "Karacadag"]
    assert info.image_size == 32
    assert all(0 < m < 1 for m in info.mean) and all(0 < s < 1 for s in info.std)
    manifests = _manifests(prepared_small)
    total = 0
    for split in SPLITS:
        images, labels = load_split(prepared_small, split)
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
        assert labels.dtype == torch.int64 and len(labels) == len(images) == len(manifests[split])
        assert list(manifests[split].columns) == ["path", "class", "group"]
        expected = [info.classes.index(c) for c in manifests[split]["class"]]
        assert labels.tolist() == expected
        total += len(labels)
        for rel in manifests[split]["path"]:
            assert (small_rice_tree / rel).is_file()
    assert total == 100
    # The cache holds exactly the resized decode of the listed file.
    row = manifests["test"].iloc[0]
    img = np.asarray(
        Image.open(small_rice_tree / row["path"]).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
    )
    assert np.array_equal(load_split(prepared_small, "test")[0][0].permute(1, 2, 0).numpy(), img)
    # mean/std come from the train split, in 0..1 units.
    train = load_split(prepared_small, "train")[0].double() / 255
    assert np.allclose(info.mean, train.mean(dim=(0, 2, 3)).tolist(), atol=1e-5)
    assert np.allclose(info.std, train.std(dim=(0, 2, 3), correction=0).tolist(), atol=1e-5)


def test_missing_prepared_data_is_a_clear_error(tmp_path):
    missing = tmp_path / "prepared"
    with pytest.raises(DataError, match=f"^{missing}: not found; run the prepare stage first$"):
        load_info(missing)
    with pytest.raises(DataError, match=f"^{missing}: not found; run the prepare stage first$"):
        load_split(missing, "train")


def test_prepared_folder_without_info_json_is_refused(prepared_small, tmp_path):
    """info.json is written last: arrays without it are an unfinished prepare, whatever their shape."""
    unfinished = shutil.copytree(prepared_small, tmp_path / "prepared")
    (unfinished / "info.json").unlink()
    message = f"^{unfinished}: no info.json, so not complete prepared data .*; run the prepare stage again$"
    with pytest.raises(DataError, match=message):
        load_info(unfinished)
    for split in SPLITS:
        with pytest.raises(DataError, match=message):
            load_split(unfinished, split)


def test_malformed_prepared_split_is_a_clear_error(prepared_small, tmp_path):
    bad = shutil.copytree(prepared_small, tmp_path / "prepared")
    np.save(bad / "val_labels.npy", np.zeros(3, np.int64))  # fewer labels than images
    with pytest.raises(
        DataError,
        match=r"val_images.npy: expected uint8 \(N, 3, 32, 32\) images \(info.json "
        r"image_size\) and N labels",
    ):
        load_split(bad, "val")
    (bad / "test_images.npy").write_bytes(b"not an array")
    with pytest.raises(DataError, match="test_images.npy: unreadable prepared split"):
        load_split(bad, "test")
    info = json.loads((bad / "info.json").read_text())
    (bad / "info.json").write_text(json.dumps({**info, "image_size": 64}))  # arrays of another size
    with pytest.raises(DataError, match=r"train_images.npy: expected uint8 \(N, 3, 64, 64\) images"):
        load_split(bad, "train")


# ----------------------------------------------------------------------------- atomic prepare


def _folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_interrupted_write_leaves_the_previous_prepared_folder_intact(
    small_rice_tree, prepared_small, tmp_path, monkeypatch
):
    """A write that fails with every split array written and info.json not yet: the previous
    prepared folder is left byte for byte, and nothing of the failed run is left beside it."""
    out = shutil.copytree(prepared_small, tmp_path / "prepared")
    before = _folder_digest(out)

    def fail(*args, **kwargs):
        raise OSError("disk full")  # after the arrays, before info.json

    monkeypatch.setattr(prepared_mod, "channel_stats", fail)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(small_rice_tree, out, CFG, seed=1)  # another split: other arrays
    assert _folder_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]
    monkeypatch.undo()
    prepare_dataset(small_rice_tree, out, CFG, seed=1)  # a run that succeeds replaces it whole
    assert _folder_digest(out) != before and load_info(out).classes == load_info(prepared_small).classes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


# Runs prepare_dataset(argv[1] -> argv[2], the data params argv[3] as JSON) and stops it for good once
# every split array is written.
KILLED_PREPARE = """
import json, sys, time
from edgekd.config import DataConfig
from edgekd.data import prepared
from edgekd.data.prepare import prepare_dataset

def stop(*args, **kwargs):
    print("arrays written", flush=True)
    time.sleep(600)

prepared.channel_stats = stop
prepare_dataset(sys.argv[1], sys.argv[2], DataConfig(**json.loads(sys.argv[3])), seed=0)
"""


def test_killed_prepare_leaves_no_half_written_folder(small_rice_tree, prepared_small, tmp_path):
    """SIGKILL part-way (no cleanup runs): where the prepared folder goes there is none, stages
    refuse the path in one line, and the next prepare clears what the killed one left."""
    out = tmp_path / "prepared"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_PREPARE, str(small_rice_tree), str(out), json.dumps(data_values(image_size=32))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "arrays written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert not out.exists()
    with pytest.raises(DataError, match=f"^{out}: not found"):
        load_split(out, "train")
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert leftovers == [f".prepared.building-{proc.pid}"]  # hidden, never taken for prepared data
    prepare_dataset(small_rice_tree, out, CFG, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]
    assert _folder_digest(out) == _folder_digest(prepared_small)


def test_prepare_refuses_to_replace_a_folder_of_other_files(small_rice_tree, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=f"{out}: holds files that are not prepared data \\(notes.txt\\)"):
        prepare_dataset(small_rice_tree, out, CFG, seed=0)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def _anon_memory_mb() -> float:
    """RssAnon of this process: private pages a copy would add; mapped file pages do not count."""
    return anon_bytes(os.getpid()) / 2**20


def test_splits_are_memory_mapped_not_read_into_ram(tmp_path):
    """A 256 MB split, read through every page, adds far less than its size to private memory."""
    images = np.lib.format.open_memmap(tmp_path / "train_images.npy", "w+", np.uint8, (4096, 3, 128, 128))
    images[::7] = 255
    images.flush()
    np.save(tmp_path / "train_labels.npy", np.arange(4096) % 5)
    (tmp_path / "info.json").write_text(
        json.dumps({"classes": list("abcde"), "image_size": 128, "mean": [0.5] * 3, "std": [0.25] * 3})
    )
    del images
    before = _anon_memory_mb()
    x, y = load_split(tmp_path, "train")
    total = sum(int(x[i : i + 256].sum(dtype=torch.int64)) for i in range(0, len(x), 256))
    assert total == 255 * 3 * 128 * 128 * len(range(0, 4096, 7)) and y.tolist()[:6] == [0, 1, 2, 3, 4, 0]
    assert _anon_memory_mb() - before < 64


def test_channel_stats_are_exact():
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 5, 3), dtype=np.uint8)
    mean, std = channel_stats(images)
    ref = images.reshape(-1, 3) / 255.0
    assert np.allclose(mean, ref.mean(0), atol=1e-6) and np.allclose(std, ref.std(0), atol=1e-6)
    rows = np.array([6, 1, 3])
    assert channel_stats(images, rows) == channel_stats(images[rows]) != (mean, std)


# ----------------------------------------------------------------------------- splits


def _labels_groups(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """5 classes x 100 images; a third of them in groups of 2-4 copies of the same class."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(5), 100)
    groups = np.empty(500, np.int64)
    g, i = 0, 0
    while i < 500:
        size = 1 if rng.random() < 0.67 else int(rng.integers(2, 5))
        size = min(size, 100 - i % 100)  # groups stay inside one class
        groups[i : i + size] = g
        g, i = g + 1, i + size
    return labels, groups


def test_split_is_stratified_and_never_splits_a_group():
    labels, groups = _labels_groups()
    split = split_groups(labels, groups, FRACTIONS, seed=1)
    for g in np.unique(groups):
        assert len(set(split[groups == g])) == 1
    for c in range(5):
        counts = np.bincount(split[labels == c], minlength=3)
        assert abs(counts[1] - 15) <= 3 and abs(counts[2] - 20) <= 3, counts  # groups of <= 4


def test_singleton_split_is_exactly_stratified():
    labels = np.repeat(np.arange(3), [40, 60, 100])
    split = split_groups(labels, np.arange(200), FRACTIONS, seed=3)
    for c, n in enumerate([40, 60, 100]):
        counts = np.bincount(split[labels == c], minlength=3)
        assert np.allclose(counts, [0.65 * n, 0.15 * n, 0.2 * n], atol=1)


def test_split_is_deterministic_and_depends_on_the_seed():
    labels, groups = _labels_groups()
    a = split_groups(labels, groups, FRACTIONS, seed=7)
    assert np.array_equal(a, split_groups(labels, groups, FRACTIONS, seed=7))
    assert not np.array_equal(a, split_groups(labels, groups, FRACTIONS, seed=8))


def test_prepare_is_deterministic(small_rice_tree, prepared_small, tmp_path):
    again = tmp_path / "again"
    prepare_dataset(small_rice_tree, again, CFG, seed=0)
    for name in ("train.csv", "val.csv", "test.csv", "info.json", "train_images.npy", "test_labels.npy"):
        assert (again / name).read_bytes() == (prepared_small / name).read_bytes(), name
    other = tmp_path / "other"
    prepare_dataset(small_rice_tree, other, CFG, seed=1)
    assert (other / "test.csv").read_bytes() != (prepared_small / "test.csv").read_bytes()


# ----------------------------------------------------------------------------- duplicates


@pytest.fixture(scope="module")
def ipsala_duplicate_pairs(rice_sample_dir) -> list[tuple[Path, Path]]:
    """The exact-duplicate pairs of the real sample, found here by hashing decoded pixels."""
    by_digest: dict[bytes, list[Path]] = {}
    for path in sorted((rice_sample_dir / "Ipsala").iterdir()):
        digest = hashlib.sha256(load_rgb(path, 10**6).tobytes()).digest()
        by_digest.setdefault(digest, []).append(path)
    return [tuple(paths) for paths in by_digest.values() if len(paths) > 1]


def test_real_exact_duplicates_share_a_split(rice_sample_dir, ipsala_duplicate_pairs, tmp_path):
    assert len(ipsala_duplicate_pairs) == 10 and all(len(p) == 2 for p in ipsala_duplicate_pairs)
    # A tree of symlinks: the 20 duplicate files plus 30 other images per class.
    root = tmp_path / "dups"
    dup_files = {p for pair in ipsala_duplicate_pairs for p in pair}
    for cls in ("Arborio", "Basmati", "Ipsala", "Jasmine", "Karacadag"):
        (root / cls).mkdir(parents=True)
        others = [p for p in sorted((rice_sample_dir / cls).iterdir()) if p not in dup_files][:30]
        for src in others + (sorted(dup_files) if cls == "Ipsala" else []):
            os.symlink(src, root / cls / src.name)
    for seed in (0, 1, 2):
        out = tmp_path / f"prepared{seed}"
        report = prepare_dataset(root, out, CFG, seed=seed).metrics
        assert report["duplicates"]["exact_groups"] == 10
        assert report["duplicates"]["exact_extra_images"] == 10
        assert report["duplicates"]["near_pairs"] == 0  # distinct real grains are not merged
        where = {row.path: (split, row.group) for split, df in _manifests(out).items() for row in df.itertuples()}
        for a, b in ipsala_duplicate_pairs:
            assert where[f"Ipsala/{a.name}"] == where[f"Ipsala/{b.name}"]
        assert len({where[f"Ipsala/{a.name}"][0] for a, _ in ipsala_duplicate_pairs}) > 1


def test_flipped_and_rotated_copies_are_grouped(small_rice_tree, tmp_path):
    root = _copy_tree(small_rice_tree, tmp_path / "tree")
    sources = sorted((root / "Basmati").iterdir())[:6]
    transforms = [
        Image.Transpose.FLIP_LEFT_RIGHT,
        Image.Transpose.ROTATE_90,
        Image.Transpose.ROTATE_180,
        Image.Transpose.TRANSPOSE,
        Image.Transpose.FLIP_TOP_BOTTOM,
        Image.Transpose.ROTATE_270,
    ]
    copies = []
    for k, (src, t) in enumerate(zip(sources, transforms)):
        copies.append(src.with_name(f"aug {src.stem}.{'png' if k < 3 else 'jpg'}"))  # lossless/lossy
        Image.open(src).transpose(t).save(copies[-1], quality=90)
    scan = scan_tree(root)
    dec = decode_all(scan.files, 32, CFG.max_image_pixels)
    groups, stats = group_duplicates(dec.exact, dec.phash, CFG.near_duplicate_bits)
    names = [p.name for p in dec.paths]
    for src, copy in zip(sources, copies):
        assert groups[names.index(src.name)] == groups[names.index(copy.name)]
    assert stats["near_pairs"] == 6 and stats["exact_groups"] == 0
    assert stats["groups_with_copies"] == 6 and stats["images_in_groups"] == 12
    _, strict = group_duplicates(dec.exact, dec.phash, 0)
    assert strict["near_pairs"] >= 3  # lossless flips/rotations have the very same dihedral pHash


def exhaustive_near_pairs(phash: np.ndarray, max_bits: int) -> set[tuple[int, int]]:
    """The definition, checked pair by pair: min over i's 8 transforms of the distance to j's hash."""
    pairs = set()
    for start in range(0, len(phash), 64):
        rows = phash[start : start + 64, :, None, :] ^ phash[None, None, :, 0, :]  # (64, 8, N, 4)
        dist = np.bitwise_count(rows).sum(3).min(1)  # (64, N)
        pairs |= {(start + int(i), int(j)) for i, j in zip(*np.nonzero(dist <= max_bits)) if start + i < j}
    return pairs


def test_near_duplicate_search_matches_the_exhaustive_one_on_planted_pairs():
    rng = np.random.default_rng(0)
    phash = rng.integers(0, 2**63, size=(400, 8, 4), dtype=np.int64).astype(np.uint64)
    for k in range(0, 200, 2):  # image k+1: a copy of a transform of image k with d flipped bits
        bits = np.unpackbits(phash[k, k % 8].astype(">u8").view(np.uint8))
        bits[rng.choice(256, size=k % 9, replace=False)] ^= 1
        phash[k + 1, 0] = np.packbits(bits).view(">u8").astype(np.uint64)
    for max_bits in (0, 2, 4, 8):
        found = near_duplicate_pairs(phash, max_bits)
        assert len(found) == len(set(found))
        assert set(found) == exhaustive_near_pairs(phash, max_bits)
        assert len(found) == sum(1 for k in range(0, 200, 2) if k % 9 <= max_bits)


def test_near_duplicate_search_matches_the_exhaustive_one_on_the_rice_sample(rice_sample_dir):
    """The real hashes (5,020 images): distinct grains >= 6 bits apart, so pairs appear only above
    the default 4 bits; both searches must agree at every threshold."""
    dec = decode_all(scan_tree(rice_sample_dir).files, 8, CFG.max_image_pixels)
    counts = []
    for max_bits in (CFG.near_duplicate_bits, 8):
        found = near_duplicate_pairs(dec.phash, max_bits)
        assert set(found) == exhaustive_near_pairs(dec.phash, max_bits)
        counts.append(len(found))
    assert counts[-1] > counts[0]  # the larger thresholds really find pairs to compare


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("wrapper", ["", "Rice_Image_Dataset", "Rice_Leaf_AUG"])
def test_dataset_layouts_are_found(small_rice_tree, tmp_path, wrapper):
    root = tmp_path / "root"
    _copy_tree(small_rice_tree, root / wrapper if wrapper else root)
    if wrapper == "Rice_Leaf_AUG":  # the Rice Disease download also ships the originals beside it
        _copy_tree(small_rice_tree, root / "Rice_Leaf_Diease")
        (root / "README.txt").write_text("about\n")
    scan = scan_tree(root)
    assert scan.class_root == (root / wrapper if wrapper else root)
    assert scan.classes == ["Arborio", "Basmati", "Ipsala", "Jasmine", "Karacadag"]
    assert len(scan.files) == 100


def test_hidden_symlinks_and_odd_names(small_rice_tree, tmp_path):
    root = _copy_tree(small_rice_tree, tmp_path / "tree")
    some = sorted((root / "Jasmine").iterdir())[0]
    (root / "Jasmine" / ".DS_Store").write_bytes(b"\0junk")
    (root / "Jasmine" / ".hidden copy.jpg").write_bytes(some.read_bytes())
    (root / ".cache" / "Arborio").mkdir(parents=True)  # a hidden folder is not a class
    (root / "Jasmine" / "notes.txt").write_text("not an image\n")
    shutil.copyfile(some, root / "Jasmine" / "grain é ü 日本 (1).jpg")
    os.symlink(some, root / "Jasmine" / "linked.jpg")
    os.symlink(root / "missing.jpg", root / "Jasmine" / "dangling.jpg")
    (root / "Jasmine" / "sub").mkdir()
    os.symlink(root / "Jasmine", root / "Jasmine" / "sub" / "loop")  # must not recurse forever
    report = prepare_dataset(root, tmp_path / "prepared", CFG, seed=0).metrics
    assert report["classes"]["Jasmine"]["images"] == 22  # 20 + odd name + symlink
    assert report["unreadable"]["files"] == [
        {"path": "Jasmine/dangling.jpg", "reason": "not a regular file (dangling symlink?)"}
    ]
    assert report["ignored_files"] == 3  # .DS_Store, .hidden copy.jpg, notes.txt
    paths = set(pd.concat(_manifests(tmp_path / "prepared").values())["path"])
    assert "Jasmine/grain é ü 日本 (1).jpg" in paths and "Jasmine/linked.jpg" in paths
    assert not any(".hidden" in p for p in paths)


# ----------------------------------------------------------------------------- bad input


def test_bad_files_are_skipped_and_listed_and_odd_modes_kept(small_rice_tree, tmp_path, make_png):
    root = _copy_tree(small_rice_tree, tmp_path / "tree")
    jpeg = sorted((root / "Ipsala").iterdir())[0]
    grain = Image.open(jpeg)
    bad = root / "Ipsala"
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("hello\n")
    (bad / "truncated.jpg").write_bytes(jpeg.read_bytes()[:3000])
    png = tmp_path / "full.png"
    grain.save(png)
    (bad / "truncated.png").write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    (bad / "huge.png").write_bytes(make_png(10_000, 10_000))
    good = root / "Karacadag"
    grain.convert("L").save(good / "grey.png")
    grain.convert("RGBA").save(good / "rgba.png")
    grain.convert("P").save(good / "palette.png")
    grain.convert("CMYK").save(good / "cmyk.jpg")
    Image.fromarray(np.asarray(grain.convert("L"), np.uint16) * 257).save(good / "sixteen.png")
    before = _tree_digest(root)

    report = prepare_dataset(root, tmp_path / "prepared", CFG, seed=0).metrics

    listed = {f["path"]: f["reason"] for f in report["unreadable"]["files"]}
    assert set(listed) == {
        f"Ipsala/{n}" for n in ("zero.jpg", "text.jpg", "truncated.jpg", "truncated.png", "huge.png")
    }
    assert "10000x10000 = 100000000 pixels exceeds the limit" in listed["Ipsala/huge.png"]
    assert report["classes"]["Ipsala"]["images"] == 20
    assert report["classes"]["Karacadag"]["images"] == 25  # all five odd modes decoded
    assert _tree_digest(root) == before  # the input tree is never modified


def test_class_folder_empty_after_skipping_fails(small_rice_tree, tmp_path):
    root = _copy_tree(small_rice_tree, tmp_path / "tree")
    for path in (root / "Basmati").iterdir():
        path.write_bytes(b"broken")
    with pytest.raises(DataError, match=r"class folder .*Basmati has no readable images"):
        prepare_dataset(root, tmp_path / "prepared", CFG, seed=0)
    assert not (tmp_path / "prepared").exists()


def test_less_than_two_classes_fails(small_rice_tree, tmp_path):
    root = tmp_path / "one"
    _copy_tree(small_rice_tree / "Arborio", root / "Arborio")
    with pytest.raises(DataError, match=r"found 1 class folder\(s\) \['Arborio'\]; at least 2"):
        scan_tree(root)


def test_missing_root_fails_naming_it(tmp_path):
    with pytest.raises(DataError, match=f"data root {tmp_path / 'nope'} does not exist"):
        prepare_dataset(tmp_path / "nope", tmp_path / "prepared", CFG, seed=0)


def test_tree_without_class_folders_fails(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="no class folders with images found"):
        scan_tree(tmp_path)


def test_cache_limit_fails_before_decoding(small_rice_tree, tmp_path, monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although the cache cannot fit")

    monkeypatch.setattr(prepare_mod, "decode_all", no_decode)
    cfg = data_config(image_size=512, cache_limit_mb=50)  # 100 x 3 x 512 x 512 B = 75 MB
    with pytest.raises(DataError, match="cache needs 75 MB for 100 images .* data.cache_limit_mb=50"):
        prepare_dataset(small_rice_tree, tmp_path / "prepared", cfg, seed=0)


def test_full_disk_fails_before_decoding(small_rice_tree, tmp_path, monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although the disk cannot hold the cache")

    monkeypatch.setattr(prepare_mod, "decode_all", no_decode)
    monkeypatch.setattr(
        prepare_mod.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20)
    )
    cfg = data_config(image_size=128)  # 100 x 3 x 128 x 128 B = 4.7 MB, twice while it runs
    with pytest.raises(DataError, match=r"prepared: 1 MB free, but preparing 100 images .* needs 9 MB"):
        prepare_dataset(small_rice_tree, tmp_path / "prepared", cfg, seed=0)
    assert not (tmp_path / "prepared").exists()


def test_failed_prepare_leaves_no_staging_file(small_rice_tree, tmp_path):
    root = _copy_tree(small_rice_tree, tmp_path / "tree")
    (root / "Zeta").mkdir()
    (root / "Zeta" / "broken.jpg").write_bytes(b"not a jpeg")  # found only after decoding
    out = tmp_path / "prepared"
    with pytest.raises(DataError, match="Zeta has no readable images"):
        prepare_dataset(root, out, CFG, seed=0)
    assert not out.exists()  # neither the staging file nor the folder this run created


# ----------------------------------------------------------------------------- report


def test_report_counts_sizes_and_outliers(small_rice_tree, tmp_path):
    root = _copy_tree(small_rice_tree, tmp_path / "tree")
    # A dark, small grain among the Arborio images: far from its class on both features.
    arr = np.asarray(Image.open(sorted((root / "Arborio").iterdir())[0]).convert("RGB"))
    dim = (arr[::2, ::2] * 0.45).astype(np.uint8)
    Image.fromarray(np.pad(dim, ((0, 300), (0, 175), (0, 0)))).save(root / "Arborio" / "odd.png")
    result = prepare_dataset(root, tmp_path / "prepared", CFG, seed=0)
    m = result.metrics
    assert m["images"]["total"] == 101
    assert sum(m["images"][s] for s in SPLITS) == 101
    assert m["image_size"]["width"] == {"min": 250, "max": 300, "mean": round((100 * 250 + 300) / 101, 2)}
    flagged = {(o["path"], o["feature"]) for o in m["outliers"]["files"]}
    assert ("Arborio/odd.png", "foreground_area") in flagged
    assert ("Arborio/odd.png", "brightness") in flagged
    assert m["outliers"]["by_class"]["Arborio"] == {"foreground_area": 1, "brightness": 1}
    assert result.class_counts.columns.tolist() == ["class", "images", "train", "val", "test"]
    assert result.class_counts["images"].tolist() == [21, 20, 20, 20, 20]
    assert result.image_sizes.to_dict("records") == [
        {"size": "250x250", "images": 100},
        {"size": "300x425", "images": 1},
    ]
