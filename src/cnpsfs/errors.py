"""Domain exceptions.

Everything the user can cause (bad input, unknown references, a damaged store) is a
:class:`CnpsfsError`: the CLI prints its message on one line and exits with its code,
without a traceback unless ``--debug``. The FUSE layer maps the store's errors to errno
values once, at the boundary.
"""

from __future__ import annotations


class CnpsfsError(Exception):
    """An error the user should see as one line, with a non-zero exit code."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(CnpsfsError):
    """The command line or an input file is wrong (exit 2, like click)."""

    exit_code = 2


class FormatError(CnpsfsError):
    """An object does not decode as the canonical format describes."""


class NotFoundError(CnpsfsError):
    """A reference, path or object does not exist."""


class CorruptObjectError(CnpsfsError):
    """Stored bytes do not hash to the digest they are filed under."""


class MissingObjectError(NotFoundError):
    """An object named by another object is absent from the store."""


class ImportRejected(CnpsfsError):
    """An archive or tree cannot be imported safely; nothing was stored."""


class ConflictError(CnpsfsError):
    """Two layers of a union composition provide different content at one path."""
