"""Export a stored tree to a directory or a tar stream, exactly as it was imported.

Directory export writes whiteouts the way overlayfs does (a 0:0 character device, and
``trusted.overlay.opaque=y`` on opaque directories) so an exported layer can serve as an
overlay lower directory; tar export writes OCI names (``.wh.NAME``, ``.wh..wh..opq``).
Directory modes and times are applied after their contents, so read-only directories
can still be filled.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
import tarfile
from collections.abc import Callable
from typing import IO, Any

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError
from cnpsfs.image.reader import FileReader
from cnpsfs.image.walk import walk
from cnpsfs.store import Store

log = logging.getLogger(__name__)
_WRITE = 4 << 20


def _path(root: bytes, parts: tuple[bytes, ...]) -> bytes:
    return os.path.join(root, *parts) if parts else root


def export_dir(store: Store, root: fmt.Entry, dest: str,
               on_progress: Callable[[int], None] | None = None) -> None:
    out = os.fsencode(dest)
    if os.path.lexists(out):
        if not os.path.isdir(out) or os.listdir(out):
            raise CnpsfsError(f"{dest} exists and is not an empty directory")
    else:
        os.mkdir(out, 0o700)
    reader = FileReader(store)
    is_root = os.geteuid() == 0
    links: dict[bytes, bytes] = {}
    dirs: list[tuple[bytes, fmt.Entry]] = []
    for parts, entry, opaque in walk(store, root):
        path = _path(out, parts)
        kind = entry.kind
        try:
            if kind is fmt.Kind.DIR:
                if parts:
                    os.mkdir(path, 0o700)
                if opaque:
                    os.setxattr(path, b"trusted.overlay.opaque", b"y", follow_symlinks=False)
                dirs.append((path, entry))
                continue
            if entry.link is not None:
                first = links.get(entry.link[0])
                if first is not None:
                    os.link(first, path)
                    continue
                links[entry.link[0]] = path
            if kind is fmt.Kind.FILE:
                _write_file(reader, entry, path, on_progress)
            elif kind is fmt.Kind.SYMLINK:
                os.symlink(entry.target, path)
            elif kind in (fmt.Kind.CHARDEV, fmt.Kind.BLOCKDEV, fmt.Kind.WHITEOUT):
                ifmt = stat.S_IFBLK if kind is fmt.Kind.BLOCKDEV else stat.S_IFCHR
                os.mknod(path, ifmt | 0o600, os.makedev(*entry.rdev))
            elif kind is fmt.Kind.FIFO:
                os.mkfifo(path, 0o600)
            elif kind is fmt.Kind.SOCKET:
                log.warning("skipping socket %s (sockets cannot be created by export)", os.fsdecode(path))
                continue
            _apply_metadata(path, entry, is_root)
        except OSError as exc:
            raise CnpsfsError(f"cannot create {os.fsdecode(path)}: {exc.strerror}") from None
    for path, entry in reversed(dirs):
        _apply_metadata(path, entry, is_root)


def _write_file(reader: FileReader, entry: fmt.Entry, path: bytes,
                on_progress: Callable[[int], None] | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        emap = reader.extent_map(entry)
        for piece in reader.pieces(emap):
            if isinstance(piece, int):
                os.lseek(fd, piece, os.SEEK_CUR)  # leave a hole
                n = piece
            else:
                n = len(piece)
                while piece:
                    piece = piece[os.write(fd, piece):]
            if on_progress is not None:
                on_progress(n)
        os.ftruncate(fd, emap.size)
    finally:
        os.close(fd)


def _apply_metadata(path: bytes, entry: fmt.Entry, is_root: bool) -> None:
    symlink = entry.kind is fmt.Kind.SYMLINK
    # chown first: the kernel drops security.capability (and setuid/setgid) on chown.
    if is_root:
        os.chown(path, entry.uid, entry.gid, follow_symlinks=False)
    for name, value in entry.xattrs.items():
        try:
            os.setxattr(path, name, value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP) or is_root:
                raise
    if not symlink:
        # chmod after chown: chown clears setuid/setgid bits.
        os.chmod(path, entry.mode)
    os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)


def _tar_name(parts: tuple[bytes, ...]) -> str:
    return "/".join(p.decode("utf-8", "surrogateescape") for p in parts)


def _tarinfo(name: str, entry: fmt.Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = entry.mode
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""
    seconds, nanos = divmod(entry.mtime_ns, 1_000_000_000)
    info.mtime = seconds
    pax: dict[str, str] = {}
    if nanos:
        # PAX times are signed decimals: -1.5 s is "-1.5", not floor and fraction ("-2.5").
        whole, frac = divmod(abs(entry.mtime_ns), 1_000_000_000)
        pax["mtime"] = f"{'-' if entry.mtime_ns < 0 else ''}{whole}.{frac:09d}".rstrip("0")
    for key in sorted(entry.xattrs):
        pax["SCHILY.xattr." + key.decode("utf-8", "surrogateescape")] = \
            entry.xattrs[key].decode("utf-8", "surrogateescape")
    info.pax_headers = pax
    return info


def _marker(name: str) -> tarfile.TarInfo:
    """A whiteout or opaque marker: an empty regular file, every field zero."""
    info = tarfile.TarInfo(name)
    info.mode = 0
    info.uname = info.gname = ""
    return info


def export_tar(store: Store, root: fmt.Entry, dest: str,
               on_progress: Callable[[int], None] | None = None) -> None:
    stream: IO[bytes]
    if dest == "-":
        stream = sys.stdout.buffer
    else:
        try:
            stream = open(dest, "wb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise CnpsfsError(f"cannot write {dest}: {exc.strerror}") from None
    try:
        write_tar(store, root, stream, on_progress=on_progress)
    finally:
        if dest != "-":
            stream.close()
        else:
            stream.flush()


def write_tar(store: Store, root: fmt.Entry, out: Any, *, at: tuple[bytes, ...] = (), whiteouts: bool = True,
              reader: FileReader | None = None, on_progress: Callable[[int], None] | None = None) -> None:
    """The tree at *root* as a PAX tar stream written to *out*, for ``export tar`` and OCI layers.

    One member per entry in canonical order, placed under *at*; nanosecond mtimes and
    xattrs (sorted) in PAX headers, no user or group names; hard links name the first
    path; whiteouts and opaque directories become OCI markers (``.wh.NAME``,
    ``.wh..wh..opq``: empty, every field zero), or are left out without *whiteouts*. The
    bytes depend on the tree alone, so the same FileSet always gives the same tar.
    """
    reader = reader or FileReader(store)
    prefix = _tar_name(at)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for parts, entry, opaque in walk(store, root):
            name = "/".join(p for p in (prefix, _tar_name(parts)) if p) or "."
            kind = entry.kind
            if kind is fmt.Kind.WHITEOUT:
                if whiteouts:
                    parent, _, base = name.rpartition("/")
                    tf.addfile(_marker(f"{parent}/.wh.{base}" if parent else f".wh.{base}"))
                continue
            info = _tarinfo(name, entry)
            data: Any = None
            if kind is fmt.Kind.DIR:
                info.type = tarfile.DIRTYPE
            elif entry.link is not None and entry.link[0] != b"/".join(parts):
                info.type = tarfile.LNKTYPE
                info.linkname = "/".join(p for p in (prefix, entry.link[0].decode("utf-8", "surrogateescape")) if p)
            elif kind is fmt.Kind.FILE:
                info.size = entry.size
                data = reader.open(entry)
            elif kind is fmt.Kind.SYMLINK:
                info.type = tarfile.SYMTYPE
                info.linkname = entry.target.decode("utf-8", "surrogateescape")
            elif kind in (fmt.Kind.CHARDEV, fmt.Kind.BLOCKDEV):
                info.type = tarfile.CHRTYPE if kind is fmt.Kind.CHARDEV else tarfile.BLKTYPE
                info.devmajor, info.devminor = entry.rdev
            elif kind is fmt.Kind.FIFO:
                info.type = tarfile.FIFOTYPE
            else:
                log.warning("skipping socket /%s (tar cannot hold sockets)", name)
                continue
            tf.addfile(info, data)
            if on_progress is not None and data is not None:
                on_progress(entry.size)
            if opaque and whiteouts:
                tf.addfile(_marker(f"{name}/.wh..wh..opq" if name != "." else ".wh..wh..opq"))
