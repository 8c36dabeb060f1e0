"""Errors that reach the user as one line (bad params, bad data, missing models), not a traceback."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Something the user can fix: the message names the file or parameter and what is wrong."""


class DataError(UserError):
    """The data tree cannot be used (missing root, < 2 classes, empty class, cache too large)."""


def require(ok: bool, path: str | Path, problem: str) -> None:
    """A one-line error naming the file when `ok` is false: an export that fails a check stops there,
    and a model that does not match torch never reaches `evaluate`."""
    if not ok:
        raise UserError(f"{path}: {problem}")
