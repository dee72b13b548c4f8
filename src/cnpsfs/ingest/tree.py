"""Building a FileSet from entries an importer discovers, in any order.

An importer (directory walk, tar stream, .deb) feeds :class:`TreeBuilder` with paths and
metadata as it meets them; the builder checks each path is safe, then :func:`write_fileset`
stores file data, extent lists and directory objects bottom-up and commits the FileSet
with its tag in one step. Because everything is ordered canonically here, the digest does
not depend on the order the source listed its members in.
"""

from __future__ import annotations

import concurrent.futures
import fnmatch
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from cnpsfs import format as fmt
from cnpsfs.errors import FormatError, ImportRejected
from cnpsfs.format.chunker import LARGE_FILE
from cnpsfs.ingest.content import ContentWriter
from cnpsfs.ingest.layout import PYCACHE, compiled_stems, is_cold
from cnpsfs.store import T_FILESET, Store, StoreWriter

PATH_MAX = 4095

#: Paths that differ on every build of the same tree (docs/format.md, "Volatile paths").
VOLATILE_PATTERNS = (
    "etc/machine-id",
    "var/lib/dbus/machine-id",
    "var/lib/systemd/random-seed",
    "var/lib/urandom/random-seed",
    "var/cache/ldconfig/aux-cache",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/cache/apt/*.bin",
    "var/log/*.log",
    "var/log/apt/eipp.log.xz",
    "var/log/*/*.log",
    "etc/ssh/ssh_host_*_key",
    "etc/ssh/ssh_host_*_key.pub",
    "root/.bash_history",
    "root/.python_history",
    "**/__pycache__/*.pyc",
)


def is_volatile(path: bytes) -> bool:
    text = path.decode("utf-8", "surrogateescape")
    for pattern in VOLATILE_PATTERNS:
        if pattern.startswith("**/"):
            if fnmatch.fnmatchcase(text, pattern[3:]) or fnmatch.fnmatchcase(text, "*/" + pattern[3:]):
                return True
        elif fnmatch.fnmatchcase(text, pattern) and text.count("/") == pattern.count("/"):
            return True
    return False


class DataSource(Protocol):
    """Where a regular file's bytes come from."""

    def read_all(self) -> bytes: ...

    def pieces(self) -> Iterable[bytes | int]: ...


@dataclass(slots=True)
class SpoolSource:
    """Bytes of a small file buffered in a spool (tar members arrive out of order)."""

    spool: IO[bytes]
    offset: int
    size: int

    def read_all(self) -> bytes:
        self.spool.seek(self.offset)
        data = self.spool.read(self.size)
        if len(data) != self.size:
            raise ImportRejected("internal error: spool truncated")
        return data

    def pieces(self) -> Iterable[bytes | int]:
        yield self.read_all()


@dataclass(slots=True, eq=False)
class Node:
    entry: fmt.Entry
    children: dict[bytes, Node] | None = None  # directories only
    source: DataSource | None = None
    link_group: object | None = None  # identity shared by hard links
    implicit: bool = False  # a parent directory the source never described
    opaque: bool = False
    extents: tuple[fmt.Extent, ...] | None = None


@dataclass(slots=True)
class ImportOptions:
    source_date_epoch: int | None = None
    strip_volatile: bool = False
    name: str = ""
    version: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    #: False: commit the FileSet untagged (an OCI layer, tagged only through its image).
    tag: bool = True
    #: zstd level of the new blocks (None: the store's default). Blocks are not part of the
    #: format: digests do not depend on it, only bytes stored and compression time.
    compression_level: int | None = None

    def clamp(self, mtime_ns: int) -> int:
        if self.source_date_epoch is None:
            return mtime_ns
        return min(mtime_ns, self.source_date_epoch * 1_000_000_000)


def split_path(path: bytes, *, what: str) -> tuple[bytes, ...]:
    """Normalise a member path into safe components, or reject it.

    Leading ``./`` and empty or ``.`` components are dropped (tar writes ``./usr/``);
    absolute paths and ``..`` are refused outright rather than rewritten, because an
    archive that contains them was made by something we should not trust.
    """
    if b"\0" in path:
        raise ImportRejected(f"{what}: name contains a NUL byte")
    if path.startswith(b"/"):
        raise ImportRejected(f"{what}: absolute path")
    if len(path) > PATH_MAX:
        raise ImportRejected(f"{what}: path longer than {PATH_MAX} bytes")
    parts = tuple(p for p in path.split(b"/") if p not in (b"", b"."))
    for part in parts:
        if part == b"..":
            raise ImportRejected(f"{what}: path contains '..'")
        if len(part) > fmt.NAME_MAX:
            raise ImportRejected(f"{what}: a name is longer than {fmt.NAME_MAX} bytes")
    return parts


class TreeBuilder:
    """Accumulates a tree's entries, rejecting anything unsafe or ambiguous."""

    def __init__(self, options: ImportOptions, *, source_name: str) -> None:
        self.options = options
        self.source_name = source_name
        default_mtime = options.clamp(0)
        self.root = Node(fmt.Entry(b"", fmt.Kind.DIR, 0o755, mtime_ns=default_mtime), {}, implicit=True)
        self.volatile: list[tuple[tuple[bytes, ...], Node]] = []

    def _parent(self, parts: tuple[bytes, ...], what: str) -> Node:
        node = self.root
        for depth, part in enumerate(parts[:-1]):
            assert node.children is not None
            child = node.children.get(part)
            if child is None:
                child = Node(fmt.Entry(part, fmt.Kind.DIR, 0o755, mtime_ns=self.options.clamp(0)), {},
                             implicit=True)
                node.children[part] = child
            elif child.entry.kind is fmt.Kind.SYMLINK:
                shown = fmt.show_path(parts[: depth + 1], relative=True)
                raise ImportRejected(f"{what}: path goes through symlink {shown}")
            elif child.entry.kind is not fmt.Kind.DIR:
                shown = fmt.show_path(parts[: depth + 1], relative=True)
                raise ImportRejected(f"{what}: path goes through non-directory {shown}")
            node = child
        return node

    def set_root(self, entry: fmt.Entry) -> None:
        entry.name = b""
        entry.mtime_ns = self.options.clamp(entry.mtime_ns)
        if not self.root.implicit:
            raise ImportRejected(f"{self.source_name}: duplicate member for the root directory")
        self.root.entry = entry
        self.root.implicit = False

    def add(self, parts: tuple[bytes, ...], entry: fmt.Entry, *, source: DataSource | None = None,
            link_group: object | None = None, what: str) -> Node:
        """Add one entry and return its node (volatile ones are dropped later, :meth:`drop_volatile`)."""
        if not parts:
            if entry.kind is not fmt.Kind.DIR:
                raise ImportRejected(f"{what}: the root must be a directory")
            self.set_root(entry)
            return self.root
        volatile = self.options.strip_volatile and entry.kind is not fmt.Kind.DIR and is_volatile(b"/".join(parts))
        try:
            fmt.check_name(parts[-1])
        except FormatError as exc:
            raise ImportRejected(f"{what}: {exc}") from None
        parent = self._parent(parts, what)
        assert parent.children is not None
        entry.name = parts[-1]
        entry.mtime_ns = self.options.clamp(entry.mtime_ns)
        existing = parent.children.get(parts[-1])
        if existing is not None:
            if existing.implicit and entry.kind is fmt.Kind.DIR:
                existing.entry = entry
                existing.implicit = False
                return existing
            raise ImportRejected(f"{what}: duplicate member")
        node = Node(entry, {} if entry.kind is fmt.Kind.DIR else None, source, link_group)
        parent.children[parts[-1]] = node
        if volatile:
            self.volatile.append((parts, node))
        return node

    def drop_volatile(self) -> None:
        """Drop the volatile paths (§1.10) that no package of the tree owns.

        Deciding at the end, not as members arrive, lets a tar archive list a package's
        file list after the file: what a dpkg file list in this tree names
        (``var/lib/dpkg/info/*.list``) is the package's, and stripping it would make
        ``dpkg --verify`` report it missing in the image.
        """
        if not self.volatile:
            return
        owned = self._dpkg_owned()
        for parts, node in self.volatile:
            if owned is None or b"/".join(parts) in owned:
                continue
            parent = self.lookup(parts[:-1])
            if parent is not None and parent.children is not None and parent.children.get(parts[-1]) is node:
                del parent.children[parts[-1]]
                self._prune_implicit(parts[:-1])
        self.volatile = []

    def _prune_implicit(self, parts: tuple[bytes, ...]) -> None:
        """Remove parents the source never described that only a dropped path needed."""
        while parts:
            node = self.lookup(parts)
            parent = self.lookup(parts[:-1])
            if node is None or parent is None or parent.children is None:
                return
            if not node.implicit or node.opaque or node.children:
                return
            del parent.children[parts[-1]]
            parts = parts[:-1]

    def _dpkg_owned(self) -> set[bytes] | None:
        """Every path the tree's dpkg file lists name (relative), or None when one cannot be read."""
        info = self.lookup((b"var", b"lib", b"dpkg", b"info"))
        owned: set[bytes] = set()
        if info is None or info.children is None:
            return owned
        for name, node in info.children.items():
            if not name.endswith(b".list") or node.entry.kind is not fmt.Kind.FILE:
                continue
            if node.source is None:
                return None  # its data went to the store as it arrived: keep everything
            owned.update(line.strip().lstrip(b"/") for line in node.source.read_all().splitlines())
        return owned

    def lookup(self, parts: tuple[bytes, ...]) -> Node | None:
        node = self.root
        for part in parts:
            if node.children is None:
                return None
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def mark_opaque(self, parts: tuple[bytes, ...], what: str) -> None:
        node = self.lookup(parts)
        if node is None:
            node = self._parent((*parts, b"x"), what)
        if node.entry.kind is not fmt.Kind.DIR:
            raise ImportRejected(f"{what}: opaque marker inside a non-directory")
        node.opaque = True

    def walk(self) -> Iterator[tuple[tuple[bytes, ...], Node]]:
        """Canonical order: depth-first pre-order, siblings by name bytes."""
        stack: list[tuple[tuple[bytes, ...], Node]] = [((), self.root)]
        while stack:
            parts, node = stack.pop()
            yield parts, node
            if node.children:
                for name in sorted(node.children, reverse=True):
                    stack.append(((*parts, name), node.children[name]))


@dataclass(slots=True)
class ImportResult:
    digest: bytes
    fileset: fmt.FileSet
    entries: int
    logical_bytes: int
    new_bytes: int


def place_extents(writer: StoreWriter, entry: fmt.Entry, extents: tuple[fmt.Extent, ...], where: str) -> None:
    """Give a file entry its extents: inline up to the format's limit, else as an extents
    object written now (an entry the format refuses is an ImportRejected naming *where*)."""
    if len(extents) > fmt.INLINE_EXTENTS_MAX:
        try:
            entry.content = writer.add_object(fmt.encode_extents_object(extents))
        except FormatError as exc:
            raise ImportRejected(f"{where}: {entry.name!r}: {exc}") from None
        entry.extents = None
    else:
        entry.extents = extents
        entry.content = None


def write_fileset(store: Store, builder: TreeBuilder, *, pool: concurrent.futures.Executor | None = None,
                  on_progress: Callable[[int], None] | None = None,
                  prepare: Callable[[StoreWriter, ContentWriter], None] | None = None) -> ImportResult:
    """Store every file, directory and the FileSet itself; commit with the tag last.

    *prepare* runs inside the open writer before small files are streamed, which is
    where a streaming importer (tar) stores its large members as it reads them.
    """
    opts = builder.options
    own_pool = pool is None
    executor = pool or concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2,
                                                             thread_name_prefix="cnpsfs-import")
    hashers = hash_pool()
    try:
        with store.writer(pool=executor, level=opts.compression_level) as writer:
            content = ContentWriter(store, writer, hashers)
            content.on_progress = on_progress
            if prepare is not None:
                prepare(writer, content)
            builder.drop_volatile()
            _store_file_data(builder, content)
            content.finish()
            entries = sum(1 for _ in builder.walk())
            root = _store_directories(builder, writer)
            return commit_fileset(writer, opts, root, builder.source_name, entries, content.logical_bytes)
    finally:
        hashers.shutdown(wait=True, cancel_futures=True)
        if own_pool:
            executor.shutdown(wait=True, cancel_futures=True)


def hash_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for chunk digests and store lookups, apart from the writer's compression pool:
    a digest queued behind whole blocks being compressed would stall the cutting thread,
    which waits for its chunks' digests to resolve a file's extents."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="cnpsfs-hash")


def commit_fileset(writer: StoreWriter, opts: ImportOptions, root: fmt.Entry, source_name: str, entries: int,
                   logical_bytes: int) -> ImportResult:
    """Store the FileSet object over *root* (whose tree is stored) and commit, with its tag."""
    fileset = fmt.FileSet(opts.name, opts.version, root, opts.metadata)
    try:
        encoded = fmt.encode_fileset(fileset)
    except FormatError as exc:
        raise ImportRejected(f"{source_name}: the root directory: {exc}") from None
    digest = writer.add_object(encoded)
    tags = [(opts.name, opts.version, T_FILESET, digest)] if opts.name and opts.version and opts.tag else []
    writer.commit(tags)
    return ImportResult(digest, fileset, entries, logical_bytes, writer.bytes_written)


def _store_file_data(builder: TreeBuilder, content: ContentWriter) -> None:
    """Cut every regular file's data, in canonical order; hard links share one copy."""
    groups: dict[object, list[tuple[tuple[bytes, ...], Node]]] = {}
    for parts, node in builder.walk():
        if node.link_group is not None:
            groups.setdefault(node.link_group, []).append((parts, node))
    for members in groups.values():
        first = members[0][0]
        for _parts, node in members:
            node.entry.link = (b"/".join(first), len(members)) if len(members) > 1 else None
    done: set[object] = set()
    compiled: dict[tuple[bytes, ...], frozenset[bytes]] = {}  # by directory path (ingest.layout)
    for parts, node in builder.walk():
        entry = node.entry
        if node.children is not None:
            compiled[parts] = _compiled(node)
            continue
        if entry.kind is not fmt.Kind.FILE or node.extents is not None:
            continue
        if node.link_group is not None:
            if node.link_group in done:
                continue
            done.add(node.link_group)
        assert node.source is not None
        cold = is_cold(parts, compiled.get(parts[:-1], frozenset()))
        if entry.size >= LARGE_FILE:
            node.extents, entry.hash = content.add_large(node.source.pieces(), entry.size, cold=cold)
        elif entry.size:
            data = node.source.read_all()
            if len(data) != entry.size:
                raise ImportRejected(f"{builder.source_name}: {entry.name!r} changed size while importing")
            entry.hash = content.add_small(data, _setter(node), cold=cold)
        else:
            node.extents = ()


def _compiled(directory: Node) -> frozenset[bytes]:
    """:func:`~cnpsfs.ingest.layout.compiled_stems` of a directory node of the tree."""
    children = directory.children or {}
    pycache = children.get(PYCACHE)
    inner = pycache.children if pycache is not None and pycache.children is not None else {}
    return compiled_stems(children, inner)


def _setter(node: Node) -> Callable[[tuple[fmt.Extent, ...]], None]:
    def set_extents(extents: tuple[fmt.Extent, ...]) -> None:
        node.extents = extents
    return set_extents


def _store_directories(builder: TreeBuilder, writer: StoreWriter) -> fmt.Entry:
    """Write directory objects bottom-up and return the root entry."""
    extents_by_group: dict[object, tuple[tuple[fmt.Extent, ...], bytes | None]] = {}
    for _parts, node in builder.walk():
        if node.link_group is not None and node.extents is not None:
            extents_by_group.setdefault(node.link_group, (node.extents, node.entry.hash))

    def finish_file(node: Node) -> None:
        entry = node.entry
        extents = node.extents
        if extents is None and node.link_group is not None and node.link_group in extents_by_group:
            extents, entry.hash = extents_by_group[node.link_group]
        if extents is None:
            raise ImportRejected(f"{builder.source_name}: no data recorded for {entry.name!r}")
        place_extents(writer, entry, extents, builder.source_name)

    # Reversed pre-order visits every child before its parent, without recursion.
    for parts, node in reversed(list(builder.walk())):
        if node.entry.kind is fmt.Kind.FILE:
            finish_file(node)
        elif node.children is not None:
            directory = fmt.Directory([c.entry for c in node.children.values()], node.opaque)
            try:
                node.entry.tree = writer.add_object(fmt.encode_directory(directory))
            except FormatError as exc:  # a limit, or an entry the format cannot hold (uid ≥ 2³²)
                shown = fmt.show_path(parts, relative=True)
                raise ImportRejected(f"{builder.source_name}: directory {shown}: {exc}") from None
    return builder.root.entry
