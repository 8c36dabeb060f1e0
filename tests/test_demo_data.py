"""The synthetic demo set: deterministic bytes pinned by data.dvc, grains shaped like their variety."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from edgekd.data.demo import VARIETIES, generate, render_grain

REPO = Path(__file__).resolve().parents[1]


def dvc_dir_md5(folder: Path) -> tuple[str, int, int]:
    """(md5, nfiles, size) of a folder exactly as `dvc add` records it in a .dvc file (DVC 3):
    md5 of the JSON list of {"md5", "relpath"} entries sorted by relpath, plus ".dir"."""
    entries, size = [], 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        size += len(data)
        entries.append({"md5": hashlib.md5(data).hexdigest(), "relpath": path.relative_to(folder).as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    manifest = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(manifest).hexdigest() + ".dir", len(entries), size


def test_regenerated_demo_data_matches_data_dvc(tmp_path):
    """data.dvc pins `data/`, which holds only rice-demo: regenerate it with the defaults."""
    (out,) = yaml.safe_load((REPO / "data.dvc").read_text())["outs"]
    assert out["path"] == "data" and out["hash"] == "md5"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.make_demo_data",
            "--out",  # in 2 processes: same bytes
            str(tmp_path / "data" / "rice-demo"),
            "--workers",
            "2",
        ],
        cwd=REPO,
        check=True,
    )
    assert dvc_dir_md5(tmp_path / "data") == (out["md5"], out["nfiles"], out["size"])


def test_dvc_dir_md5_matches_dvc_itself(tmp_path):
    """Guards the hashing scheme above against DVC's own implementation."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import LocalFileSystem

    generate(tmp_path / "d" / "rice-demo", seed=3, per_class=2)
    fs = LocalFileSystem()
    odb = HashFileDB(fs, str(tmp_path / "odb"))
    _, _, obj = build(odb, str(tmp_path / "d"), fs, "md5")
    assert obj.hash_info.value == dvc_dir_md5(tmp_path / "d")[0]


def test_generation_is_deterministic_per_image():
    a = render_grain(VARIETIES[1], np.random.default_rng([0, 1, 5]))
    b = render_grain(VARIETIES[1], np.random.default_rng([0, 1, 5]))
    c = render_grain(VARIETIES[1], np.random.default_rng([1, 1, 5]))
    assert a.dtype == np.uint8 and a.shape == (250, 250, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_layout_and_names(tmp_path):
    files = generate(tmp_path, seed=0, per_class=3)
    assert len(files) == 15
    assert sorted(p.name for p in tmp_path.iterdir()) == [v.name for v in VARIETIES]
    assert (tmp_path / "Arborio" / "Arborio (1).png").is_file()  # spaces, like the real set
    assert Image.open(files[0]).size == (250, 250)


def _grain_shape(img: np.ndarray) -> tuple[float, float, float]:
    """(length, width, area) of the pixels brighter than grey 60, as in the datasets README."""
    ys, xs = np.nonzero(img.mean(axis=2) > 60)
    ev = np.sqrt(np.linalg.eigvalsh(np.cov(np.stack([xs, ys])))) * 4  # ~full axis lengths
    return float(ev[1]), float(ev[0]), float(len(xs))


def test_varieties_follow_the_real_morphology():
    shapes = {}
    for v_idx, variety in enumerate(VARIETIES):
        grains = [_grain_shape(render_grain(variety, np.random.default_rng([0, v_idx, i]))) for i in range(12)]
        shapes[variety.name] = np.median(grains, axis=0)
        length, width, _ = shapes[variety.name]
        assert abs(length - variety.length[0]) < 0.2 * variety.length[0], (variety.name, length)
        assert abs(width - variety.width[0]) < 0.25 * variety.width[0], (variety.name, width)
    assert shapes["Ipsala"][2] > 1.5 * shapes["Karacadag"][2]  # Ipsala: the big, wide grain
    assert shapes["Basmati"][0] / shapes["Basmati"][1] > 3 > shapes["Arborio"][0] / shapes["Arborio"][1]
