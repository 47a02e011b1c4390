"""Errors a user's input causes. The command line prints any UserError as one line ("Error: ...") and exits
with code 1; any other exception is a bug and keeps its traceback."""
from __future__ import annotations


class UserError(Exception):
    """A bad input the user can fix: a path, a store, a checkpoint, a config value, an option. The message names it."""


class StorageError(UserError, OSError):
    """A storage operation on a URI failed (permissions, credentials, endpoint, a missing object); names the URI."""
