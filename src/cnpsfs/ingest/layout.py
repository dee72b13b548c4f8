"""Which files are *cold*: unlikely to be read when a program starts (docs/format.md 2.1).

A writer keeps their chunks in blocks of their own, so that the files a start-up reads
(shared libraries, compiled Python modules, configuration) share blocks with each other
and a cold read decodes, or a lazy mount fetches, less of what nobody asked for. The rule
looks only at canonical paths and at the names in a file's directory, so every importer
of the same tree (and a second implementation) puts the same chunks in the same streams.
It is advice about layout: a wrong guess costs a block read, never a wrong byte, and no
digest depends on it.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Directories whose files a program does not read to start: documentation and message catalogues.
COLD_TREES = frozenset({(b"usr", b"share", b"doc"), (b"usr", b"share", b"man"), (b"usr", b"share", b"info"),
                        (b"usr", b"share", b"locale")})
PYCACHE = b"__pycache__"


def compiled_stems(names: Iterable[bytes], pycache: Iterable[bytes] = ()) -> frozenset[bytes]:
    """Every X for which a directory holds a compiled form of ``X.py``.

    *names* are the directory's entries, *pycache* those of its ``__pycache__``
    subdirectory: ``X.pyc`` in the directory, or any name that starts with ``X.`` and ends
    with ``.pyc`` in ``__pycache__`` (``X.cpython-311.pyc``, ``X.cpython-311.opt-1.pyc``).
    Python reads the compiled file and only stats the source.
    """
    stems = {name[:-4] for name in names if name.endswith(b".pyc") and len(name) > 4}
    for name in pycache:
        if not name.endswith(b".pyc"):
            continue
        at = name.find(b".")
        while 0 < at <= len(name) - 4:
            stems.add(name[:at])
            at = name.find(b".", at + 1)
    return frozenset(stems)


def in_cold_tree(parts: tuple[bytes, ...]) -> bool:
    """Whether the path (canonical components) is below one of :data:`COLD_TREES`."""
    return len(parts) > 3 and parts[:3] in COLD_TREES


def is_cold(parts: tuple[bytes, ...], compiled: frozenset[bytes] = frozenset()) -> bool:
    """Whether the regular file at *parts* is cold; *compiled* is its directory's :func:`compiled_stems`."""
    name = parts[-1] if parts else b""
    return in_cold_tree(parts) or (name.endswith(b".py") and name[:-3] in compiled)
