"""Import a directory tree as a FileSet.

The walk reads metadata first (lstat, xattrs), then file data in canonical order. It
does not cross into other mounted filesystems (a chroot's /proc would otherwise be
imported): a mount point inside the tree is kept as an empty directory.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cnpsfs import format as fmt
from cnpsfs.errors import ImportRejected
from cnpsfs.ingest.content import read_file_pieces
from cnpsfs.ingest.tree import ImportOptions, ImportResult, TreeBuilder, write_fileset
from cnpsfs.store import Store

#: Extended attributes that describe the host rather than the tree, never imported.
HOST_XATTR_PREFIXES = (b"security.selinux", b"trusted.overlay.", b"system.nfs4_acl")


@dataclass(slots=True)
class PathSource:
    path: bytes
    size: int

    def read_all(self) -> bytes:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise ImportRejected(f"cannot read {os.fsdecode(self.path)}: {exc.strerror}") from None
        try:
            data = os.read(fd, self.size + 1)
        finally:
            os.close(fd)
        if len(data) != self.size:
            raise ImportRejected(f"{os.fsdecode(self.path)} changed size while importing")
        return data

    def pieces(self) -> Iterable[bytes | int]:
        try:
            yield from read_file_pieces(self.path, self.size)
        except OSError as exc:
            raise ImportRejected(f"cannot read {os.fsdecode(self.path)}: {exc.strerror or exc}") from None


def read_xattrs(path: bytes, *, keep_overlay: bool = False) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise ImportRejected(f"cannot list xattrs of {os.fsdecode(path)}: {exc.strerror}") from None
    out: dict[bytes, bytes] = {}
    for name in names:
        key = os.fsencode(name)
        if key.startswith(HOST_XATTR_PREFIXES) and not (keep_overlay and key.startswith(b"trusted.overlay.")):
            continue
        try:
            out[key] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                continue
            raise ImportRejected(f"cannot read xattr {name} of {os.fsdecode(path)}: {exc.strerror}") from None
    return out


def entry_from_stat(st: os.stat_result, path: bytes, xattrs: dict[bytes, bytes]) -> fmt.Entry:
    kind = fmt.IFMT_KIND.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        raise ImportRejected(f"{os.fsdecode(path)}: unsupported file type {stat.S_IFMT(st.st_mode):o}")
    entry = fmt.Entry(b"", kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, xattrs)
    if kind is fmt.Kind.FILE:
        entry.size = st.st_size
    elif kind is fmt.Kind.SYMLINK:
        try:
            entry.target = os.readlink(path)
        except OSError as exc:
            raise ImportRejected(f"cannot read symlink {os.fsdecode(path)}: {exc.strerror}") from None
    elif kind in (fmt.Kind.CHARDEV, fmt.Kind.BLOCKDEV):
        entry.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return entry


def scan_directory(root: bytes, builder: TreeBuilder,
                   classify: Callable[[bytes, os.stat_result, tuple[bytes, ...]], bool] | None = None) -> None:
    """Add everything under *root* to *builder*.

    *classify* may consume an entry (return True) before it is added normally; the
    overlay commit uses it to turn whiteout devices into format whiteouts.
    """
    try:
        root_st = os.lstat(root)
    except OSError as exc:
        raise ImportRejected(f"cannot import {os.fsdecode(root)}: {exc.strerror}") from None
    if not stat.S_ISDIR(root_st.st_mode):
        raise ImportRejected(f"{os.fsdecode(root)} is not a directory")
    builder.set_root(entry_from_stat(root_st, root, read_xattrs(root)))
    stack: list[tuple[bytes, tuple[bytes, ...]]] = [(root, ())]
    while stack:
        dir_path, dir_parts = stack.pop()
        try:
            with os.scandir(dir_path) as it:
                names = sorted(e.name for e in it)
        except OSError as exc:
            raise ImportRejected(f"cannot list {os.fsdecode(dir_path)}: {exc.strerror}") from None
        for name in names:
            path = os.path.join(dir_path, name)
            parts = (*dir_parts, name)
            try:
                st = os.lstat(path)
            except OSError as exc:
                raise ImportRejected(f"cannot stat {os.fsdecode(path)}: {exc.strerror}") from None
            if classify is not None and classify(path, st, parts):
                continue
            entry = entry_from_stat(st, path, read_xattrs(path))
            what = os.fsdecode(path)
            group = (st.st_dev, st.st_ino) if entry.kind is not fmt.Kind.DIR and st.st_nlink > 1 else None
            source = PathSource(path, st.st_size) if entry.kind is fmt.Kind.FILE else None
            builder.add(parts, entry, source=source, link_group=group, what=what)
            if entry.kind is fmt.Kind.DIR and st.st_dev == root_st.st_dev:
                stack.append((path, parts))


def import_directory(store: Store, path: str, options: ImportOptions,
                     on_progress: Callable[[int], None] | None = None) -> ImportResult:
    # The tree's own path may be a symlink to it (the CLI accepts that as a directory);
    # symlinks inside the tree are never followed.
    root = os.fsencode(os.path.realpath(path) if os.path.islink(path) else path)
    builder = TreeBuilder(options, source_name=path)
    scan_directory(root, builder)
    return write_fileset(store, builder, on_progress=on_progress)


def tree_size(path: str) -> int:
    """Bytes of regular-file data under *path* (for a progress bar's total)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total
