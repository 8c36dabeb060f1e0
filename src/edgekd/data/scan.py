"""Find the class folders of an ImageFolder tree and list its image files, skipping what is not one."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from edgekd.data.images import IMAGE_EXTENSIONS
from edgekd.errors import DataError

# Wrapper folders of the public datasets, descended into when the root holds several folders.
KNOWN_WRAPPERS = ("Rice_Image_Dataset", "Rice_Leaf_AUG")


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
