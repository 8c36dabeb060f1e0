"""Errors that reach the user as one line (bad params, bad data, missing models), not a traceback."""


class UserError(Exception):
    """Something the user can fix: the message names the file or parameter and what is wrong."""


class DataError(UserError):
    """The data tree cannot be used (missing root, < 2 classes, empty class, cache too large)."""
