"""Shared fixtures: the real rice sample and small real trees copied from it.

- `rice_sample_dir`: the read-only 5,020-image sample (`$EDGEKD_SHARED/datasets/rice-image`, by
  default ../shared beside the checkout: tests/shared_data.py); fails the test in one line if it is
  missing (CI has it; a silent skip would hide a broken set-up).
- `rice_tree_factory(per_class, name)`: copies the first `per_class` images (sorted names) of each
  variety into a fresh tmp tree `<tmp>/<name>/<Variety>/` and returns its path (cached per args).
- `small_rice_tree`: that tree with 20 real images per variety (100 JPEGs, real file names such as
  `Arborio (10005).jpg`).
- `prepared_small`: `prepare_dataset` run on `small_rice_tree` at image_size 32 into a tmp
  `prepared/` folder (train/val/test image and label npy + csv + info.json): real prepared data for training and
  export tests. Treat both trees and the prepared folder as read-only; copy before modifying.
- `prepared_cifar`: the first 30 images of each CIFAR-10 class (`$EDGEKD_SHARED/datasets/cifar10`),
  prepared at 32 px: 300 real photos for the convnet recipe's tests.
- `make_png(width, height, bit_depth, colour_type, rows)`: hand-written PNG bytes (any header,
  e.g. a 100,000 x 100,000 decompression bomb of a few bytes, or 16-bit RGB).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from shared_data import CIFAR10, RICE_SAMPLE, require
from tiny_pipeline import repo_params

from edgekd.data.prepare import prepare_dataset

REPO = Path(__file__).resolve().parents[1]
RICE_CLASSES = ("Arborio", "Basmati", "Ipsala", "Jasmine", "Karacadag")
SMALL_PER_CLASS = 20
SMALL_IMAGE_SIZE = 32
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_PER_CLASS = 30


@pytest.fixture(scope="session")
def rice_sample_dir() -> Path:
    for cls in RICE_CLASSES:
        require(RICE_SAMPLE / cls, f"datasets/rice-image/{{{','.join(RICE_CLASSES)}}}/")
    return RICE_SAMPLE


@pytest.fixture(scope="session")
def rice_tree_factory(rice_sample_dir: Path, tmp_path_factory) -> Callable[..., Path]:
    made: dict[tuple[int, str], Path] = {}

    def make(per_class: int, name: str = "rice") -> Path:
        key = (per_class, name)
        if key not in made:
            root = tmp_path_factory.mktemp("trees") / name
            for cls in RICE_CLASSES:
                (root / cls).mkdir(parents=True)
                for src in sorted((rice_sample_dir / cls).iterdir())[:per_class]:
                    shutil.copyfile(src, root / cls / src.name)
            made[key] = root
        return made[key]

    return make


@pytest.fixture(scope="session")
def small_rice_tree(rice_tree_factory) -> Path:
    return rice_tree_factory(SMALL_PER_CLASS, "small")


@pytest.fixture(scope="session")
def prepared_small(small_rice_tree: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared_small") / "prepared"
    data = repo_params({"data": {"image_size": SMALL_IMAGE_SIZE}}).data
    prepare_dataset(small_rice_tree, out, data, seed=0)
    return out


@pytest.fixture(scope="session")
def prepared_cifar(tmp_path_factory) -> Path:
    """The first CIFAR_PER_CLASS images of each class, prepared at 32 px."""
    tmp = tmp_path_factory.mktemp("cifar10")
    for cls in CIFAR_CLASSES:
        files = sorted(require(CIFAR10 / cls, "datasets/cifar10/<class>/").iterdir())[:CIFAR_PER_CLASS]
        (tmp / "tree" / cls).mkdir(parents=True)
        for src in files:
            shutil.copyfile(src, tmp / "tree" / cls / src.name)
    prepare_dataset(tmp / "tree", tmp / "prepared", repo_params({"data": {"image_size": 32}}).data, seed=0)
    return tmp / "prepared"


@pytest.fixture(scope="session")
def tiny_repo_template(rice_tree_factory, tmp_path_factory) -> Path:
    """This project, copied and fully reproduced once with tiny params on 12 real images per class."""
    from tiny_pipeline import make_tiny_repo

    return make_tiny_repo(tmp_path_factory.mktemp("tiny") / "repo", rice_tree_factory(12, "tiny"))


@pytest.fixture
def tiny_project(rice_tree_factory, tmp_path: Path) -> Path:
    """This project, copied with tiny params and committed, never reproduced: for a test whose first
    step runs the whole pipeline anyway (the benchmark), so it need not wait for the template."""
    from tiny_pipeline import make_tiny_project

    return make_tiny_project(tmp_path / "repo", rice_tree_factory(12, "tiny"))


@pytest.fixture
def tiny_repo(tiny_repo_template: Path, tmp_path: Path) -> Path:
    """A private copy of the reproduced tiny project (git history and DVC cache included)."""
    from tiny_pipeline import clone_tiny_repo

    return clone_tiny_repo(tiny_repo_template, tmp_path / "repo")


@pytest.fixture(scope="session")
def changed_student_template(tiny_repo_template: Path, tmp_path_factory) -> Path:
    """The tiny project after `dvc repro` with tiny_pipeline.CHANGED_STUDENT (wider, smaller input)."""
    from tiny_pipeline import make_changed_student_repo

    return make_changed_student_repo(tiny_repo_template, tmp_path_factory.mktemp("changed") / "repo")


@pytest.fixture
def changed_student_repo(changed_student_template: Path, tmp_path: Path) -> Path:
    """A private copy of `changed_student_template`, its `dvc repro` output beside it (REPRO_LOG)."""
    from tiny_pipeline import REPRO_LOG, clone_tiny_repo

    shutil.copyfile(changed_student_template.parent / REPRO_LOG, tmp_path / REPRO_LOG)
    return clone_tiny_repo(changed_student_template, tmp_path / "repo")


def png_bytes(width: int, height: int, bit_depth: int = 8, colour_type: int = 2, rows: bytes | None = None) -> bytes:
    """A PNG written by hand: lets tests declare any header (a 100,000 x 100,000 'bomb' whose
    pixel data is absent) or a bit depth PIL cannot write (48-bit RGB). `rows` is the raw scanline
    data without filter bytes; None writes a single empty IDAT."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    if rows is None:
        idat = zlib.compress(b"")
    else:
        stride = len(rows) // height
        idat = zlib.compress(b"".join(b"\0" + rows[i * stride : (i + 1) * stride] for i in range(height)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def make_png() -> Callable[..., bytes]:
    """`png_bytes` as a fixture, so test modules need not import conftest."""
    return png_bytes
