"""A writable mount's overlayfs upper directory turned into a FileSet (``cnpsfs commit``).

The upper directory is a plain tree plus overlayfs whiteouts and opaque markers (the
mount makes it so: see :mod:`cnpsfs.fs.overlay`); this translates them into the format's
whiteouts and opaque directories.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cnpsfs import format as fmt
from cnpsfs.errors import ImportRejected
from cnpsfs.ingest.directory import read_xattrs, scan_directory
from cnpsfs.ingest.tree import ImportOptions, ImportResult, TreeBuilder, write_fileset
from cnpsfs.store import Store

OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque")


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def commit_upper(store: Store, upper: Path, options: ImportOptions) -> ImportResult:
    """Import the overlayfs upper directory *upper* as a FileSet.

    Whiteouts (0:0 character devices) become format whiteouts and opaque markers
    (the ``trusted.overlay.opaque`` xattr) opaque directories.
    """
    if not upper.is_dir():
        raise ImportRejected(f"{upper.parent} has no {upper.name}/ directory: not a cnpsfs writable upper dir")
    builder = TreeBuilder(options, source_name=str(upper))
    opaque: list[tuple[bytes, ...]] = []

    def classify(path: bytes, st: os.stat_result, parts: tuple[bytes, ...]) -> bool:
        if _is_whiteout(st):
            builder.add(parts, fmt.Entry(b"", fmt.Kind.WHITEOUT, 0), what=os.fsdecode(path))
            return True
        if stat.S_ISDIR(st.st_mode) and _has_opaque_marker(path):
            opaque.append(parts)
        return False

    scan_directory(os.fsencode(upper), builder, classify)
    if _has_opaque_marker(os.fsencode(upper)):
        opaque.append(())
    for parts in opaque:
        builder.mark_opaque(parts, f"{upper}/{b'/'.join(parts).decode(errors='replace')}")
    return write_fileset(store, builder)


def _has_opaque_marker(path: bytes) -> bool:
    xattrs = read_xattrs(path, keep_overlay=True)
    return any(xattrs.get(name) == b"y" for name in OPAQUE_XATTRS)
