"""The code each dvc.yaml stage runs: its entry point's import closure inside the project.

DVC reruns a stage only when a declared dependency changes, so every stage declares exactly the
project modules its `python -m stages.<name>` loads (tests/test_dvc_contract.py checks it). After
adding or moving an import, `python -m tools.dvc_deps` rewrites the `.py` deps of every stage in
dvc.yaml from the source; `--check` only says which stages differ.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"edgekd": REPO / "src", "stages": REPO, "tools": REPO}  # top-level package -> its folder


def project_files() -> list[Path]:
    return [p for top, folder in PACKAGES.items() for p in sorted((folder / top).rglob("*.py"))]


def module_path(name: str) -> Path | None:
    """`edgekd.train.engine` -> src/edgekd/train/engine.py; None for modules outside the project and
    for packages."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    path = PACKAGES[parts[0]] / Path(*parts).with_suffix(".py")
    return path if path.is_file() else None


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` in `path` names (`import a.b`, `from a.b import c`, where c may be a
    module). The project imports absolutely only (tested), so relative imports are not followed."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_closure(entry: str) -> set[str]:
    """Repo-relative paths of the project modules `python -m entry` loads (package __init__s aside:
    they hold docstrings only, tested)."""
    todo, seen = [module_path(entry)], set()
    while todo:
        path = todo.pop()
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(module_path(name) for name in imported_modules(path))
    return {p.relative_to(REPO).as_posix() for p in seen if p.name != "__init__.py"}


def code_deps(entry: str) -> list[str]:
    """The entry point first, then the rest of its closure, sorted: the order dvc.yaml lists them."""
    first = entry.replace(".", "/") + ".py"
    return [first, *sorted(import_closure(entry) - {first})]


def sync(text: str) -> str:
    """dvc.yaml text with each stage's `.py` deps replaced by its closure; other lines untouched."""
    lines, out, entry, i = text.split("\n"), [], None, 0
    while i < len(lines):
        line = lines[i]
        if match := re.search(r"python -m (\S+)", line):
            entry = match.group(1)
        out.append(line)
        i += 1
        if line.strip() == "deps:" and entry:
            indent = re.match(r"\s*", lines[i]).group(0)
            while i < len(lines) and lines[i].strip().startswith("- ") and lines[i].strip().endswith(".py"):
                i += 1
            out.extend(f"{indent}- {path}" for path in code_deps(entry))
            entry = None
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--dvc-yaml",
        type=Path,
        nargs="+",
        default=[REPO / "dvc.yaml", REPO / "studies/dvc.yaml"],
        help="pipeline files (default: the deployed model's and the studies')",
    )
    parser.add_argument("--check", action="store_true", help="only report; exit 1 when a file differs")
    args = parser.parse_args()
    differ = []
    for path in args.dvc_yaml:
        text = path.read_text()
        synced = sync(text)
        if synced == text:
            print(f"{path}: code deps match the import closures")
        elif args.check:
            differ.append(str(path))
        else:
            path.write_text(synced)
            print(f"{path}: code deps rewritten from the import closures")
    if differ:
        sys.exit(f"{', '.join(differ)}: code deps differ from the import closures; run python -m tools.dvc_deps")


if __name__ == "__main__":
    main()
