"""Domain exceptions.

Everything the user can cause (bad input, unknown references, a damaged store) is a
:class:`CnpsfsError`: the CLI prints its message on one line and exits with its code,
without a traceback unless ``--debug``. The FUSE layer maps the store's errors to errno
values once, at the boundary.
"""

from __future__ import annotations

from typing import NamedTuple


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


class UnavailableError(MissingObjectError):
    """An object that lives on a remote could not be fetched in time: the remote is down, too
    slow, or answers errors. A later attempt may succeed (the mount gives EIO meanwhile)."""


class NestingError(CnpsfsError):
    """Images that nest images in a way that cannot compose: a cycle, nesting too deep,
    too many layers in all. The message names the images on the way."""


class ImportRejected(CnpsfsError):
    """An archive or tree cannot be imported safely; nothing was stored."""


class ConflictingLayer(NamedTuple):
    """One side of a union conflict: the layer's FileSet digest and its NAME@VERSION."""

    fileset: bytes
    label: str


class ConflictError(CnpsfsError):
    """Two layers of a union composition provide different content at one path.

    ``path`` (as shown, absolute), ``layers`` (both sides, ordered by label) and ``what``
    (e.g. "different content") are attributes, so a caller that resolves conflicts (a
    build marks one package an override layer) reads them instead of the message.
    """

    def __init__(self, path: str, first: ConflictingLayer, second: ConflictingLayer, what: str) -> None:
        first, second = sorted((first, second), key=lambda layer: layer.label)
        super().__init__(f"union conflict at {path}: {first.label} and {second.label} provide {what} "
                         "(mark one layer override = true to choose)")
        self.path = path
        self.layers = (first, second)
        self.what = what


class MountpointBusyError(CnpsfsError):
    """A mountpoint is busy: something is mounted there already, or (unmounting) a process
    still uses it. ``path`` names it; ``service stop`` detaches lazily on this error."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class TransportError(CnpsfsError):
    """A network transfer failed: connection, TLS, timeout, or an HTTP status we cannot use.

    The message is one line naming the host and the resource (URL path or blob digest).
    ``host`` and ``resource`` are kept as attributes so callers (mirror lists, the remote
    store) can decide what to try next without parsing the message.
    """

    #: Whether the same request may succeed later (a connection lost, a 503): retry loops
    #: and mirror lists read it.
    retryable = False

    def __init__(self, message: str, *, host: str = "", resource: str = "", status: int | None = None,
                 exit_code: int | None = None) -> None:
        super().__init__(message, exit_code=exit_code)
        self.host = host
        self.resource = resource
        self.status = status


class TransportTimeout(TransportError):
    """A call did not complete within its deadline (a stalled server, a dead network)."""


class RemoteDataError(TransportError):
    """A server sent bytes that are not what was asked for: short, too long, a wrong range or
    a digest mismatch. Never retried silently into the caller's data: the caller refetches."""


class RegistryError(TransportError):
    """An OCI registry (or a web server) answered a request with an error status."""


class RemoteNotFoundError(RegistryError, NotFoundError):
    """The server says the manifest, blob, tag or repository does not exist (404)."""


class AuthError(RegistryError):
    """Credentials are missing or wrong, or the token server refused them (401/403)."""


class StoreError(CnpsfsError):
    """The store's files cannot be read or written: an I/O error, a full disk, a lock.

    The message names the store file and the cause (``No space left on device``), so
    the user knows it is the machine, not the input; nothing half-written is left.
    """


class StoreDamagedError(StoreError):
    """The store's index or a pack does not read back as written; ``cnpsfs store repair`` rebuilds the index."""


class StoreReadOnlyError(StoreError):
    """A command that writes was given a store on read-only media (or one this user cannot write)."""
