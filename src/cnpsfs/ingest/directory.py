"""Import a directory tree as a FileSet.

The walk reads metadata first (lstat, xattrs), then file data in canonical order. It
does not cross into other mounted filesystems (a chroot's /proc would otherwise be
imported): a mount point inside the tree is kept as an empty directory.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from cnpsfs import format as fmt
from cnpsfs.errors import FormatError, ImportRejected
from cnpsfs.format.chunker import LARGE_FILE
from cnpsfs.ingest.content import ContentWriter, read_file_pieces
from cnpsfs.ingest.layout import PYCACHE, compiled_stems, in_cold_tree, is_cold
from cnpsfs.ingest.tree import (
    ImportOptions,
    ImportResult,
    TreeBuilder,
    commit_fileset,
    hash_pool,
    place_extents,
    write_fileset,
)
from cnpsfs.store import Store, StoreWriter

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
    if not options.strip_volatile:
        return stream_directory(store, root, options, on_progress)
    # Stripping volatile paths decides at the end (what the dpkg lists own): the whole tree first.
    builder = TreeBuilder(options, source_name=path)
    scan_directory(root, builder)
    return write_fileset(store, builder, on_progress=on_progress)


# ---------------------------------------------------------------- streaming import


@dataclass(slots=True, eq=False)
class _Frame:
    """A directory of a streaming import: its entries, and what it still waits for."""

    path: bytes
    parts: tuple[bytes, ...]
    entry: fmt.Entry
    parent: _Frame | None
    entries: list[fmt.Entry]
    waiting: int = 1  # files whose extents are not cut yet, subdirectories not stored yet, +1 while open
    compiled: frozenset[bytes] = frozenset()  # stems of its .py files with compiled forms (ingest.layout)


@dataclass(slots=True, eq=False)
class _LinkGroup:
    """Hard links of one source inode: the first (canonical order) carries the data."""

    members: list[tuple[tuple[bytes, ...], fmt.Entry, _Frame]]
    extents: tuple[fmt.Extent, ...] | None = None
    hash: bytes | None = None


class _Streamer:
    """``import dir`` without holding the tree: directories are listed, their files cut
    and their objects stored in canonical order, and a directory's object is written
    (and its entries dropped) as soon as the small-file stream has cut its last file.

    What stays in memory is the open path, the files of the last ~8 MiB of small-file
    stream (the chunker's lag) and directories holding hard links: those wait for the
    end of the walk, when every link group is complete (its first path and count are
    part of each entry). The FileSet is the one :func:`write_fileset` makes of the same
    tree, byte for byte: the same canonical order feeds the same stream.
    """

    def __init__(self, root: bytes, options: ImportOptions, writer: StoreWriter, content: ContentWriter) -> None:
        self.root = root
        self.options = options
        self.writer = writer
        self.content = content
        self.entries = 0
        self.groups: dict[tuple[int, int], _LinkGroup] = {}
        self.root_entry: fmt.Entry | None = None

    def run(self) -> fmt.Entry:
        try:
            root_st = os.lstat(self.root)
        except OSError as exc:
            raise ImportRejected(f"cannot import {os.fsdecode(self.root)}: {exc.strerror}") from None
        if not stat.S_ISDIR(root_st.st_mode):
            raise ImportRejected(f"{os.fsdecode(self.root)} is not a directory")
        entry = entry_from_stat(root_st, self.root, read_xattrs(self.root))
        entry.name = b""
        entry.mtime_ns = self.options.clamp(entry.mtime_ns)
        self.entries = 1
        top = _Frame(self.root, (), entry, None, [])
        # Depth first, siblings by name bytes: the canonical order of TreeBuilder.walk.
        stack: list[tuple[_Frame, Iterator[bytes]]] = [(top, iter(self._listing(top, root_st.st_dev)))]
        while stack:
            frame, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                self._done(frame)  # closed: stored once nothing else is pending
                continue
            child = self._add(frame, name, root_st.st_dev)
            if child is not None:
                stack.append((child, iter(self._listing(child, root_st.st_dev))))
        self.content.finish()  # the stream's tail: every pending span is cut now
        for group in self.groups.values():
            first = b"/".join(group.members[0][0])
            count = len(group.members)
            for _parts, member, frame in group.members:
                member.link = (first, count) if count > 1 else None
                self._done(frame)  # the hold for its links
        assert self.root_entry is not None, "the root directory was stored last"
        return self.root_entry

    def _listing(self, frame: _Frame, root_dev: int) -> list[bytes]:
        """The names in *frame*'s directory, sorted; notes which of its sources are compiled."""
        names = self._names(frame.path)
        if in_cold_tree((*frame.parts, b"")):
            return names  # cold whatever their names
        pycache: list[bytes] = []
        if PYCACHE in names:
            path = os.path.join(frame.path, PYCACHE)
            try:
                st = os.lstat(path)
            except OSError:
                st = None  # gone: the walk reports it when it gets there
            if st is not None and stat.S_ISDIR(st.st_mode) and st.st_dev == root_dev:
                # As the walk will see it; an unreadable one fails there, with its name.
                try:
                    pycache = self._names(path)
                except ImportRejected:
                    pycache = []
        frame.compiled = compiled_stems(names, pycache)
        return names

    @staticmethod
    def _names(path: bytes) -> list[bytes]:
        try:
            with os.scandir(path) as it:
                return sorted(e.name for e in it)
        except OSError as exc:
            raise ImportRejected(f"cannot list {os.fsdecode(path)}: {exc.strerror}") from None

    def _add(self, frame: _Frame, name: bytes, root_dev: int) -> _Frame | None:
        path = os.path.join(frame.path, name)
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise ImportRejected(f"cannot stat {os.fsdecode(path)}: {exc.strerror}") from None
        try:
            fmt.check_name(name)
        except FormatError as exc:
            raise ImportRejected(f"{os.fsdecode(path)}: {exc}") from None
        entry = entry_from_stat(st, path, read_xattrs(path))
        entry.name = name
        entry.mtime_ns = self.options.clamp(entry.mtime_ns)
        frame.entries.append(entry)
        self.entries += 1
        parts = (*frame.parts, name)
        if entry.kind is fmt.Kind.DIR:
            frame.waiting += 1
            child = _Frame(path, parts, entry, frame, [])
            if st.st_dev != root_dev:  # a mount point: kept as an empty directory
                self._done(child)
                return None
            return child
        if st.st_nlink > 1:
            frame.waiting += 1  # held until the walk ends and the group is complete
            group = self.groups.get((st.st_dev, st.st_ino))
            if group is not None:
                group.members.append((parts, entry, frame))
                if entry.kind is fmt.Kind.FILE:
                    frame.waiting += 1
                    if group.extents is not None:
                        entry.hash = group.hash
                        self._file_done(frame, entry, group.extents)
                return None
            group = self.groups[(st.st_dev, st.st_ino)] = _LinkGroup([(parts, entry, frame)])
        else:
            group = None
        if entry.kind is not fmt.Kind.FILE:
            return None
        frame.waiting += 1
        cold = is_cold(parts, frame.compiled)
        if entry.size >= LARGE_FILE:
            source = PathSource(path, st.st_size)
            extents, entry.hash = self.content.add_large(source.pieces(), entry.size, cold=cold)
            self._data(frame, entry, group, extents)
        elif entry.size:
            data = PathSource(path, st.st_size).read_all()
            entry.hash = self.content.add_small(data, lambda extents: self._data(frame, entry, group, extents),
                                                cold=cold)
        else:
            self._data(frame, entry, group, ())
        return None

    def _data(self, frame: _Frame, entry: fmt.Entry, group: _LinkGroup | None,
              extents: tuple[fmt.Extent, ...]) -> None:
        self._file_done(frame, entry, extents)
        if group is not None:
            group.extents, group.hash = extents, entry.hash
            for _parts, member, member_frame in group.members[1:]:
                if member.kind is fmt.Kind.FILE:
                    member.hash = entry.hash
                    self._file_done(member_frame, member, extents)

    def _file_done(self, frame: _Frame, entry: fmt.Entry, extents: tuple[fmt.Extent, ...]) -> None:
        place_extents(self.writer, entry, extents, os.fsdecode(frame.path))
        self._done(frame)

    def _done(self, frame: _Frame) -> None:
        """One thing *frame* waited for is done; store it (and so on up) when nothing is left."""
        while frame is not None:
            frame.waiting -= 1
            if frame.waiting:
                return
            try:
                frame.entry.tree = self.writer.add_object(fmt.encode_directory(fmt.Directory(frame.entries)))
            except FormatError as exc:
                shown = fmt.show_path(frame.parts, relative=True)
                raise ImportRejected(f"{os.fsdecode(self.root)}: directory {shown}: {exc}") from None
            frame.entries = []
            if frame.parent is None:
                self.root_entry = frame.entry
            frame = frame.parent  # type: ignore[assignment]


def stream_directory(store: Store, root: bytes, options: ImportOptions,
                     on_progress: Callable[[int], None] | None = None) -> ImportResult:
    """Import the tree at *root* as :func:`import_directory` does, in memory that does not
    grow with the number of files (see :class:`_Streamer`)."""
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2,
                                                     thread_name_prefix="cnpsfs-import")
    hashers = hash_pool()
    try:
        with store.writer(pool=executor) as writer:
            content = ContentWriter(store, writer, hashers)
            content.on_progress = on_progress
            streamer = _Streamer(root, options, writer, content)
            root_entry = streamer.run()
            return commit_fileset(writer, options, root_entry, os.fsdecode(root), streamer.entries,
                                  content.logical_bytes)
    finally:
        hashers.shutdown(wait=True, cancel_futures=True)
        executor.shutdown(wait=True, cancel_futures=True)


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
