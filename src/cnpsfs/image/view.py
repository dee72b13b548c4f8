"""The composed view: an image's layers presented as one tree (pure Python, no FUSE).

A :class:`Generation` is one immutable composition of layers. Directories are merged
lazily: a directory's children are computed the first time it is looked up or listed,
from the directory objects of the layers that contribute to it, so a mount reads only
the directories it is asked about.

Composition rules (docs/manifest.md):

* layers mode (OCI): layers stack in list order; directories merge; a whiteout hides
  the name below; an opaque directory hides everything below it; a non-directory
  replaces a directory and the reverse.
* union mode (packages): the non-override layers are merged so that their order
  cannot matter: a path provided twice must be the same object (same content, mode,
  owner, xattrs) or the composition fails naming both FileSets; directories merge,
  and their metadata comes from the source that sorts highest by (mtime, mode, uid,
  gid). Layers marked ``override`` are then stacked on top, in list order, with layers
  semantics (that is where a build puts its dpkg database and configure output).
* an unlinked layer is ignored as if absent.
* nested images (docs/manifest.md, "Images that nest images") arrive here flattened
  into FileSet layers; a nested image whose mode differs from the image that includes
  it (or that is an override in a union) is a :class:`Group`: its layers are merged by
  its own mode first, and the result takes part in the enclosing merge as one layer.

Inode numbers come from an :class:`InodeTable` shared by every generation of a mount:
the same path with the same object keeps its number across a generation swap, so the
kernel's caches for unchanged entries stay valid. Changed entries get fresh numbers.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import struct
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cnpsfs import format as fmt
from cnpsfs.errors import ConflictError, ConflictingLayer, NotFoundError
from cnpsfs.image.reader import ExtentMap
from cnpsfs.store import NotCached, Store

log = logging.getLogger(__name__)

ROOT_INODE = 1
DIR_SIZE = 4096
#: The kinds the per-entry loops compare with, as plain globals: ``_DIR`` is a
#: module and an enum class attribute lookup (~90 ns on 3.11), paid per child composed.
_DIR, _FILE, _WHITEOUT = fmt.Kind.DIR, fmt.Kind.FILE, fmt.Kind.WHITEOUT


@dataclass(frozen=True, slots=True)
class Group:
    """A nested image composed as one unit: merged by its own mode, then taking part in
    the image that includes it as one layer would. Nested images of the same mode are
    not groups: their layers are simply placed in the enclosing list."""

    key: tuple[int, ...]  # layer positions from the top image down to the layer naming it
    mode: fmt.CompositionMode
    override: bool  # in an enclosing union: stacked on top of it
    # NAME@VERSION for messages; not part of what it composes (an upgraded nested image
    # keeps the subtrees it did not change).
    name: str = field(compare=False)


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """One active FileSet layer of a generation, with what is needed to present and name it."""

    index: int  # position in the top image's layer list (what link and unlink name)
    fileset: bytes
    name: str  # NAME@VERSION for messages
    root: fmt.Entry
    at: tuple[bytes, ...]
    override: bool
    order: int = 0  # position in the flattened composition, bottom to top
    groups: tuple[Group, ...] = ()  # the groups around it, outermost first
    via: tuple[str, ...] = ()  # NAME@VERSION of every nested image on the way from the top image
    label: str = ""
    #: The init layer: its directories never give a merged directory its metadata, so
    #: adding a name to /etc leaves /etc as the image has it.
    weak: bool = False
    #: Directory objects held in memory instead of the store (the init layer's).
    directories: Mapping[bytes, fmt.Directory] | None = field(default=None, compare=False, hash=False)


@dataclass(slots=True)
class Source:
    """A directory of one layer that contributes to a composed directory."""

    layer: LayerInfo
    entry: fmt.Entry  # the directory entry (metadata, tree digest), or a synthetic one
    synthetic: dict[bytes, fmt.Entry] | None = None  # children of a synthetic parent of an `at` path

    @property
    def is_synthetic(self) -> bool:
        return self.synthetic is not None


@dataclass(slots=True)
class _Unit:
    """The sources of one :class:`Group` met while merging a directory."""

    group: Group
    depth: int  # how many groups deep its own members sit
    sources: list[Source]


_Item = Source | _Unit
#: What merging a directory yields per name: the entry, the layer providing it and, for
#: a directory, the sources it will be composed from.
_Merged = dict[bytes, tuple[fmt.Entry, LayerInfo, list[Source]]]


def _item_override(item: _Item) -> bool:
    return item.layer.override if isinstance(item, Source) else item.group.override


@dataclass(slots=True)
class Node:
    """One inode of the composed tree.

    Directories are real, lasting objects (their children are composed once and kept
    while the kernel or the tree needs them). Other nodes are made on demand from their
    directory's packed :class:`Children` and thrown away after the request: a node of a
    file is a view, equal but not identical from one request to the next.
    """

    ino: int
    entry: fmt.Entry  # presented metadata (for directories: the winning source's)
    parent: int
    path: tuple[bytes, ...]
    layer: LayerInfo | None  # layer that provides a non-directory
    sources: list[Source] = field(default_factory=list)  # directories: contributing layer dirs
    children: Children | None = None  # directories, once loaded
    subdirs: int = -1
    listed: bool = False  # listing() done: every subdirectory's children are loaded too
    emap: ExtentMap | None = None  # regular files: cached by whoever keeps the node
    attr: Any = None  # directories: cached attributes object built by the FUSE layer

    @property
    def is_dir(self) -> bool:
        return self.entry.kind is _DIR

    @property
    def listing(self) -> Children | None:
        """Sorted children for readdir (index i is the i-th name), once loaded."""
        return self.children

    @property
    def nlink(self) -> int:
        if self.is_dir:
            return 2 + max(self.subdirs, 0)
        return self.entry.link[1] if self.entry.link else 1

    @property
    def blocks(self) -> int:
        """512-byte blocks: data extents for files (holes cost nothing)."""
        if self.is_dir:
            return DIR_SIZE // 512
        entry = self.entry
        if entry.kind is not _FILE:
            return 0
        data = sum(e.length for e in entry.extents if e.digest is not None) if entry.extents is not None else entry.size
        return (data + 511) // 512

    @property
    def size(self) -> int:
        kind = self.entry.kind
        if kind is _FILE:
            return self.entry.size
        if kind is fmt.Kind.SYMLINK:
            return len(self.entry.target)
        if kind is _DIR:
            return DIR_SIZE
        return 0


#: A plain regular file packed in :class:`Children`: flags, mode, uid, gid, mtime_ns, size,
#: chunk offset, chunk length, chunk digest, content hash (99 bytes instead of ~700 as objects).
_REC = struct.Struct("<BHIIqqII32s32s")
_ONE_EXTENT = 1  # extents: one chunk range (else: none, an empty file)
_EMPTY_EXTENTS = 2  # extents: () rather than None
_NO_DIGEST = bytes(fmt.DIGEST_SIZE)
_U32 = 1 << 32
#: Byte ranges of a record: what identity() compares (mode, uid, gid, mtime_ns, size; the
#: content hash), and the chunk digest.
_ID_START, _ID_END = 1, struct.calcsize("<BHIIqq")
_DIGEST_AT = struct.calcsize("<BHIIqqII")
_HASH_AT = _DIGEST_AT + fmt.DIGEST_SIZE


def _pack_into(buf: bytearray, at: int, entry: fmt.Entry) -> bool:
    """Write the record of a plain regular file (no xattrs, links or extents object) at
    *at* in *buf*; False (nothing written) for any other entry."""
    if entry.kind is not _FILE or entry.xattrs or entry.link is not None or entry.content is not None:
        return False
    extents = entry.extents
    if extents is None or not extents:
        if entry.size or entry.hash is not None:
            return False
        _REC.pack_into(buf, at, _EMPTY_EXTENTS if extents is not None else 0, entry.mode, entry.uid, entry.gid,
                       entry.mtime_ns, 0, 0, 0, _NO_DIGEST, _NO_DIGEST)
        return True
    if len(extents) != 1 or entry.hash is None:
        return False
    digest, offset, length = extents[0]
    if digest is None or offset >= _U32 or length >= _U32:
        return False
    _REC.pack_into(buf, at, _ONE_EXTENT, entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.size, offset,
                   length, digest, entry.hash)
    return True


def _drop_whiteouts(names: list[bytes], recs: bytearray, others: list[tuple[int, fmt.Entry]]
                    ) -> tuple[list[bytes], bytearray, list[tuple[int, fmt.Entry]]]:
    """:func:`fmt.pack_directory`'s result without its whiteouts (a single layer directory
    shows none: nothing is below them), positions renumbered to close the gaps."""
    size = _REC.size
    gone = {index for index, entry in others if entry.kind is _WHITEOUT}
    kept = [i for i in range(len(names)) if i not in gone]
    out = bytearray(size * len(kept))
    for new, old in enumerate(kept):
        out[new * size : (new + 1) * size] = recs[old * size : (old + 1) * size]
    renumbered = {old: new for new, old in enumerate(kept)}
    return ([names[i] for i in kept], out,
            [(renumbered[index], entry) for index, entry in others if index not in gone])


class Children(Mapping[bytes, Node]):
    """A composed directory's children, packed: what a million entries can afford.

    Names sorted (readdir offsets are indices), one inode number and one kernel lookup
    count per child in arrays, plain regular files as fixed records in one buffer;
    directories are kept as :class:`Node` objects (few, and they own subtrees), anything
    else as its :class:`fmt.Entry` (symlinks, devices, files with xattrs or hard links).
    A file's node is made on demand (:meth:`node_at`).

    Its inode numbers come from one block the :class:`InodeTable` handed out, so the
    table finds a number's directory by bisecting block starts, with no per-entry key.
    ``held`` and ``counts`` are the kernel's lookups of the block's numbers (kept on the
    loop by the FUSE layer); a directory whose count drops to zero can be let go of.
    """

    __slots__ = ("_layer_ix", "_layers", "_recs", "base", "counts", "dirs", "extras", "held", "inos", "moved_inos",
                 "names", "parent", "path", "registered", "rekept", "retired", "subdirs")

    def __init__(self, parent: int, path: tuple[bytes, ...], base: int, names: list[bytes], inos: array,
                 recs: bytes, extras: dict[int, fmt.Entry], dirs: dict[int, Node],
                 layers: tuple[LayerInfo, ...], layer_ix: array | None) -> None:
        self.parent = parent
        self.path = path
        self.names = names
        self.inos = inos
        self.base = base
        self.counts = array("I", bytes(4 * len(names)))
        self.held = 0
        self._recs = recs
        self.extras = extras
        self.dirs = dirs
        self._layers = layers
        self._layer_ix = layer_ix
        self.subdirs = len(dirs)
        self.registered = False
        self.retired = False
        #: Files whose number was kept from an earlier composition (composed again after being
        #: let go of): findable through the table's moved numbers, as when a swap kept them.
        self.rekept: list[int] = []
        #: Numbers the table's moved map sends here (so that letting go of this directory
        #: touches those alone, not every moved number of the mount).
        self.moved_inos: list[int] = []

    # Mapping
    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.names)

    def __contains__(self, name: object) -> bool:
        return self.index(name) is not None  # type: ignore[arg-type]

    def __getitem__(self, name: bytes) -> Node:
        i = self.index(name)
        if i is None:
            raise KeyError(name)
        return self.node_at(i)

    def get(self, name: bytes, default: Any = None) -> Any:
        i = self.index(name)
        return default if i is None else self.node_at(i)

    def index(self, name: bytes) -> int | None:
        names = self.names
        i = bisect.bisect_left(names, name)
        return i if i < len(names) and names[i] == name else None

    # Listing (a sequence of (name, node) pairs, as readdir walks it)
    def pair(self, i: int) -> tuple[bytes, Node]:
        return self.names[i], self.node_at(i)

    def pairs(self) -> Iterator[tuple[bytes, Node]]:
        return (self.pair(i) for i in range(len(self.names)))

    def layer_at(self, i: int) -> LayerInfo:
        return self._layers[self._layer_ix[i] if self._layer_ix is not None else 0]

    def entry_at(self, i: int) -> fmt.Entry:
        node = self.dirs.get(i)
        if node is not None:
            return node.entry
        entry = self.extras.get(i)
        if entry is not None:
            return entry
        flags, mode, uid, gid, mtime, size, offset, length, digest, content_hash = _REC.unpack_from(
            self._recs, i * _REC.size)
        if flags & _ONE_EXTENT:
            return fmt.Entry(self.names[i], _FILE, mode, uid, gid, mtime, {}, size,
                             (fmt.Extent(digest, offset, length),), None, b"", (0, 0), None, None, content_hash)
        return fmt.Entry(self.names[i], _FILE, mode, uid, gid, mtime, {}, 0,
                         () if flags & _EMPTY_EXTENTS else None)

    def packed_at(self, i: int) -> tuple[int, int, int, int, int, int] | None:
        """(mode, uid, gid, mtime_ns, size, data bytes) of a packed plain file, else None:
        what attributes need, without making an entry."""
        if i in self.dirs or i in self.extras:
            return None
        _f, mode, uid, gid, mtime, size, _o, _l, _d, _h = _REC.unpack_from(self._recs, i * _REC.size)
        return mode, uid, gid, mtime, size, size

    def node_at(self, i: int) -> Node:
        node = self.dirs.get(i)
        if node is not None:
            return node
        return Node(self.inos[i], self.entry_at(i), self.parent, (*self.path, self.names[i]), self.layer_at(i))

    def positions(self) -> dict[bytes, int]:
        """Name -> index, for pairing a whole directory with another by name."""
        return dict(zip(self.names, range(len(self.names)), strict=True))

    def same_file(self, i: int, entry: fmt.Entry, packed: bytearray | None, at: int = 0) -> bool:
        """Whether child *i* is a file without hard links and the same inode as *entry*
        (equal :func:`identity`), whose record, when it packs, is at *at* in *packed*:
        compared on the records' bytes, without making an entry for *i*."""
        if i in self.dirs:
            return False
        extra = self.extras.get(i)
        if extra is not None:
            return extra.link is None and identity(extra) == identity(entry)
        if packed is None:
            return identity(self.entry_at(i)) == identity(entry)
        recs = self._recs
        mine = i * _REC.size
        return (recs[mine + _ID_START : mine + _ID_END] == packed[at + _ID_START : at + _ID_END]
                and recs[mine + _HASH_AT : mine + _REC.size] == packed[at + _HASH_AT : at + _REC.size])

    def packed_chunks(self) -> Iterator[tuple[int, bytes]]:
        """(index, chunk digest) of every packed file with data (one chunk each)."""
        recs = self._recs
        size = _REC.size
        for i in range(len(self.names)):
            at = i * size
            if recs[at] & _ONE_EXTENT:
                yield i, recs[at + _DIGEST_AT : at + _HASH_AT]

    def owns(self, ino: int) -> bool:
        """Whether *ino* is a number of this block (not a directory's or a hard link's)."""
        i = ino - self.base
        return 0 <= i < len(self.inos) and self.inos[i] == ino


class InodeTable:
    """Stable inode numbers, shared across generations, and where each number lives.

    A directory has one number per path (key ``("d", path)``), the hard links of a
    FileSet one per link group; those keys are few and kept in a dict. Every other child
    takes its number from a block handed to its directory's :class:`Children` when it is
    composed: the table keeps the blocks sorted by start (numbers only grow), so finding
    a number's directory is a bisection and a million files cost no key each. A file
    that a live swap finds unchanged keeps its number in the new directory: the table
    then records it as moved there (:meth:`install`).

    Keys of nodes that no live generation shows and the kernel no longer holds are
    dropped by :meth:`retain` (a swap calls it when the table has grown enough since the
    last time), and a directory's block is dropped when the directory is let go of, so a
    mount keeps a table the size of what it serves. Numbers are never reused: a key or a
    directory that comes back after it was dropped gets new ones.
    """

    def __init__(self, *, growth: float = 0.5, slack: int = 4096) -> None:
        self._by_key: dict[tuple[Any, ...], int] = {}
        self._next = ROOT_INODE + 1
        self._lock = threading.RLock()
        self._kept = 0  # keys left by the last retain()
        # A sweep is due once the table grew by *growth* times what the last one kept, plus *slack*.
        self._growth = growth
        self._slack = slack
        self._starts: list[int] = []  # block starts, ascending
        self._blocks: list[Children] = []
        # Directories whose block another took over (take_over) while the kernel still held
        # some of their numbers: registered (found through the moved map) until let go of.
        self._displaced: dict[int, Children] = {}
        # Numbers served from another directory than their block's: hard links (every
        # directory listing one) and files a swap kept; the first location counts.
        self._moved: dict[int, list[tuple[Children, int]]] = {}
        # Directories let go of, by (path, composition signature): the block their files'
        # numbers came from (and the numbers, where some were kept from an earlier
        # generation), so that composing one again gives every file the number it had.
        self._let_go: dict[tuple[Any, ...], tuple[int, array | None]] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def number(self, key: tuple[Any, ...]) -> int:
        ino = self._by_key.get(key)
        if ino is None:
            with self._lock:
                ino = self._by_key.get(key)
                if ino is None:
                    ino = self._by_key[key] = self._next
                    self._next += 1
        return ino

    def block(self, n: int) -> int:
        """Reserve *n* consecutive numbers; returns the first."""
        with self._lock:
            start = self._next
            self._next += max(n, 1)
            return start

    def remember(self, key: tuple[Any, ...], base: int, inos: array | None) -> None:
        with self._lock:
            self._let_go[key] = (base, inos)

    def recall(self, key: tuple[Any, ...]) -> tuple[int, array | None]:
        """The block (and numbers) of a directory composed before, once; (0, None) if none."""
        with self._lock:
            return self._let_go.pop(key, (0, None))

    def remembers(self, key: tuple[Any, ...]) -> bool:
        return key in self._let_go

    def forget_key(self, key: tuple[Any, ...]) -> None:
        self._by_key.pop(key, None)

    # ---------------------------------------------------------------- where numbers live

    def register(self, children: Children, replacing: Children | None = None) -> None:
        """Make *children*'s numbers findable (idempotent); *replacing*: the directory
        whose block it takes over (see :meth:`Generation._block_for`)."""
        if children.registered:
            return
        with self._lock:
            if children.registered:
                return
            i = bisect.bisect_left(self._starts, children.base)
            if replacing is not None and i < len(self._blocks) and self._blocks[i] is replacing:
                self._blocks[i] = children
            else:
                self._starts.insert(i, children.base)
                self._blocks.insert(i, children)
            for index, entry in children.extras.items():
                if entry.link is not None:
                    self._moved.setdefault(children.inos[index], []).append((children, index))
                    children.moved_inos.append(children.inos[index])
            if children.rekept:
                for index in children.rekept:
                    self._moved.setdefault(children.inos[index], []).append((children, index))
                    children.moved_inos.append(children.inos[index])
            children.registered = True

    def unregister(self, children: Children) -> None:
        """Forget *children*'s numbers: nothing shows it and the kernel holds none of them."""
        with self._lock:
            if not children.registered:
                return
            i = bisect.bisect_left(self._starts, children.base)
            if i < len(self._blocks) and self._blocks[i] is children:
                del self._starts[i], self._blocks[i]
            self._displaced.pop(id(children), None)
            moved = self._moved
            for ino in set(children.moved_inos):
                locs = moved.get(ino)
                if locs is None:
                    continue
                if len(locs) == 1:
                    if locs[0][0] is children:
                        del moved[ino]
                    continue
                locs = [loc for loc in locs if loc[0] is not children]
                if locs:
                    moved[ino] = locs
                else:
                    del moved[ino]
            children.moved_inos.clear()
            children.registered = False

    def locate(self, ino: int) -> tuple[Children, int] | None:
        """The directory and index that answer for a file's number (its count lives there)."""
        moved = self._moved.get(ino)
        if moved:
            return moved[0]
        i = bisect.bisect_right(self._starts, ino) - 1
        if i >= 0:
            children = self._blocks[i]
            if children.owns(ino):
                return children, ino - children.base
        return None

    def install(self, moves: Iterable[tuple[int, Children, int]],
                takeovers: Iterable[tuple[Children, Children]] = ()) -> None:
        """A swap's new generation is current: numbers it kept are answered, and counted, by
        their new directory from now on (what the kernel held moves along), and directories
        composed anew take over their old one's block (:meth:`take_over`). On the loop."""
        moved, starts, blocks = self._moved, self._starts, self._blocks
        targets: list[Children] = []
        with self._lock:  # once for them all (a swap keeps thousands); what locate does, inline
            for ino, children, index in moves:
                if not targets or targets[-1] is not children:
                    targets.append(children)
                locs = moved.get(ino)
                source: tuple[Children, int] | None = None
                if locs:
                    source = locs[0]
                else:
                    at = bisect.bisect_right(starts, ino) - 1
                    if at >= 0 and blocks[at].owns(ino):
                        source = blocks[at], ino - blocks[at].base
                if source is not None and source[0] is not children:
                    old, i = source
                    n = old.counts[i]
                    if n:
                        old.counts[i] = 0
                        old.held -= n
                        children.counts[index] += n
                        children.held += n
                if locs:
                    moved[ino] = [(children, index), *(loc for loc in locs if loc[0] is not children)]
                else:
                    moved[ino] = [(children, index)]
                children.moved_inos.append(ino)
            # After the moves (located while the old blocks still answer), before the other
            # targets are registered (a taken-over block must not be inserted twice).
            for old, new in takeovers:
                self.take_over(old, new)
            for children in targets:
                self.register(children)

    def take_over(self, old: Children, new: Children) -> None:
        """*new* answers for *old*'s block from now on: the numbers it kept in place, with
        the kernel's counts of them; what the kernel still holds of *old*'s other numbers
        is found in *old* through the moved map, until *old* is let go of."""
        with self._lock:
            self.register(new, replacing=old)
            if not old.held:
                return
            self._displaced[id(old)] = old
            base, moved = old.base, self._moved
            old_inos, new_inos = old.inos, new.inos
            for i in range(len(old_inos)):
                n = old.counts[i]
                if not n or old_inos[i] != base + i:
                    continue  # not held, or a number moved in (its location is in the moved map)
                ino = base + i
                if i < len(new_inos) and new_inos[i] == ino:
                    old.counts[i] = 0
                    old.held -= n
                    new.counts[i] += n
                    new.held += n
                elif ino not in moved:
                    moved[ino] = [(old, i)]
                    old.moved_inos.append(ino)

    def count(self, ino: int, children: Children, index: int, n: int = 1) -> None:
        """The kernel took *n* references to file number *ino*, met at *children*[*index*]."""
        moved = self._moved.get(ino)
        if moved:
            children, index = moved[0]
        elif not children.registered:
            self.register(children)
        children.counts[index] += n
        children.held += n

    def release(self, ino: int, n: int) -> Children | None:
        """The kernel dropped *n* references to file number *ino*; returns its directory's
        packed children when their count reached zero (the caller may let them go)."""
        where = self.locate(ino)
        if where is None:
            return None
        children, index = where
        have = children.counts[index]
        n = min(n, have)
        children.counts[index] = have - n
        children.held -= n
        return children if not children.held else None

    def held_count(self, ino: int) -> int:
        where = self.locate(ino)
        return where[0].counts[where[1]] if where is not None else 0

    def held_files(self) -> Iterator[tuple[int, int, bytes]]:
        """(number, parent directory number, name) of every file the kernel holds."""
        for children in [*self._blocks, *self._displaced.values()]:
            if children.held:
                for index, n in enumerate(children.counts):
                    if n:
                        yield children.inos[index], children.parent, children.names[index]

    def stats(self) -> dict[str, int]:
        """What the table holds, for status: keys, blocks, entries in them, files the kernel
        holds (and its references to them), numbers served from another block."""
        blocks = list(self._blocks)
        held = [c for c in [*blocks, *self._displaced.values()] if c.held]
        return {"keys": len(self._by_key), "blocks": len(blocks), "entries": sum(len(c) for c in blocks),
                "held": sum(len(c.counts) - c.counts.count(0) for c in held),
                "references": sum(c.held for c in held), "moved": len(self._moved)}

    def sweep_due(self) -> bool:
        """Whether enough keys may have died since the last :meth:`retain` to pay for one."""
        return len(self._by_key) > self._kept * (1 + self._growth) + self._slack

    def retain(self, live: set[int]) -> int:
        """Keep only the keys whose number is in *live*; returns how many were dropped.

        Costs a pass over the table, so callers do it when :meth:`sweep_due` says so.
        """
        with self._lock:
            before = len(self._by_key)
            self._by_key = {key: ino for key, ino in self._by_key.items() if ino in live or ino in self._moved}
            self._let_go = {key: v for key, v in self._let_go.items() if not key[0] or ("d", key[0]) in self._by_key}
            self._kept = len(self._by_key)
            return before - self._kept


def identity(entry: fmt.Entry) -> tuple[Any, ...]:
    """What must be equal for two entries to be the same inode (name and path aside)."""
    xattrs = entry.xattrs
    return (entry.kind, entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.size, entry.hash,
            entry.target, entry.rdev, tuple(sorted(xattrs.items())) if xattrs else ())


def _synthetic_dir(name: bytes) -> fmt.Entry:
    return fmt.Entry(name, _DIR, 0o755)


def split_at(at: str) -> tuple[bytes, ...]:
    return tuple(p for p in at.encode("utf-8", "surrogateescape").split(b"/") if p)


class DirectoryCache:
    """Small directory objects read for merging several sources, kept decoded (LRU).

    A directory many FileSets provide (``/usr``, ``/usr/share/doc``, ``/usr/bin`` in a
    union of packages) is composed again by every swap that changes any of them, from
    the same objects but one: decoding them again dominated a one-package swap. Objects
    are named by content, so a kept one is never stale; only objects of at most
    *max_object* entries are kept, *max_entries* in all (a few MiB), so a mount's memory
    stays the size of what it serves.
    """

    def __init__(self, *, max_entries: int = 8192, max_object: int = 64) -> None:
        self.max_entries = max_entries
        self.max_object = max_object
        self._lock = threading.Lock()
        self._items: OrderedDict[bytes, fmt.Directory] = OrderedDict()
        self.entries = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, store: Store, digest: bytes) -> fmt.Directory:
        with self._lock:
            directory = self._items.get(digest)
            if directory is not None:
                self._items.move_to_end(digest)
                return directory
        directory = store.get_directory(digest)
        if len(directory.entries) <= self.max_object:
            with self._lock:
                if digest not in self._items:
                    self._items[digest] = directory
                    self.entries += len(directory.entries)
                    while self.entries > self.max_entries:
                        _digest, dropped = self._items.popitem(last=False)
                        self.entries -= len(dropped.entries)
        return directory


class Generation:
    """One immutable composition of an image's layers.

    Nodes are created lazily and are never mutated after they are published to the
    FUSE layer, except for loading a directory's children, which happens under a lock
    and publishes complete dicts in one assignment.
    """

    def __init__(self, store: Store, image: fmt.Image, layers: Sequence[LayerInfo], inodes: InodeTable,
                 *, number: int = 1, label: str = "", previous: Generation | None = None) -> None:
        self.store = store
        self.image = image
        self.mode = image.mode
        self.layers = list(layers)
        self.inodes = inodes
        self.number = number
        self.label = label
        # The generation this one replaces, while a swap prepares it: directories that
        # compose identically are shared from it. swap.prepare clears it when done, so a
        # mount never keeps more than the generation it serves.
        self.previous = previous
        #: Shared by a mount's generations: what a swap's merges read again of the last one's.
        self.directories: DirectoryCache = previous.directories if previous is not None else DirectoryCache()
        self._lock = threading.RLock()
        # The nodes this generation created or took over from the previous one, by inode.
        # Only this generation's: nodes of earlier ones that the kernel still holds are
        # kept by the FUSE layer until the kernel forgets them, not copied forward here.
        self.nodes: dict[int, Node] = {}  # directories only: files are packed in their Children
        #: Files this generation's directories took over from the previous one, by number:
        #: the inode table learns they moved once the generation is current (install).
        self.moves: list[tuple[int, Children, int]] = []
        #: (old, new): directories composed anew that take over the old one's block on install.
        self.takeovers: list[tuple[Children, Children]] = []
        self.entries = 0  # children composed (the size of the loaded tree, root aside)
        self._nested = any(layer.groups for layer in self.layers)
        root_sources = [self._layer_root_source(layer, ()) for layer in self.layers]
        root_entry = self._dir_metadata([s for s in root_sources if s is not None], b"")
        self.root = Node(ROOT_INODE, root_entry, ROOT_INODE, (), None,
                         [s for s in root_sources if s is not None])
        self.nodes[ROOT_INODE] = self.root

    # ------------------------------------------------------------------ sources

    def _layer_root_source(self, layer: LayerInfo, path: tuple[bytes, ...]) -> Source | None:
        """The source a layer contributes at *path* when the layer sits at or below it."""
        if layer.at[: len(path)] != path:
            return None
        if len(path) == len(layer.at):
            return Source(layer, layer.root)
        # A synthetic parent of the layer's `at` path.
        child = layer.at[len(path)]
        inner = _synthetic_dir(child) if len(path) + 1 < len(layer.at) else dataclasses.replace(layer.root, name=child)
        return Source(layer, _synthetic_dir(path[-1] if path else b""), {child: inner})

    def _source_children(self, source: Source, merged: bool = False) -> tuple[list[fmt.Entry], bool]:
        """A source's entries; *merged*: one of several sources of a directory, whose
        small directory objects are kept decoded for the next generation (see
        :class:`DirectoryCache`)."""
        if source.synthetic is not None:
            return list(source.synthetic.values()), False
        tree = source.entry.tree
        assert tree is not None
        held = source.layer.directories
        if held is not None:
            directory = held[tree]
        elif merged:
            directory = self.directories.get(self.store, tree)
        else:
            directory = self.store.get_directory(tree)
        return directory.entries, directory.opaque

    def _child_source(self, parent: Source, entry: fmt.Entry, path: tuple[bytes, ...]) -> Source:
        if parent.synthetic is not None:
            # Above or at the layer's `at` directory: the layer decides what is there.
            source = self._layer_root_source(parent.layer, path)
            assert source is not None
            return source
        return Source(parent.layer, entry)

    # ------------------------------------------------------------------ composition

    def _items(self, sources: Sequence[Source], depth: int) -> list[_Item]:
        """*sources* as the members of one merge: FileSet layers, and the groups *depth*
        levels down gathered into one item each (a group's layers are contiguous)."""
        if not self._nested:
            return list(sources)
        items: list[_Item] = []
        for source in sorted(sources, key=lambda s: s.layer.order):
            groups = source.layer.groups
            if len(groups) > depth:
                last = items[-1] if items else None
                if isinstance(last, _Unit) and last.group == groups[depth]:
                    last.sources.append(source)
                else:
                    items.append(_Unit(groups[depth], depth + 1, [source]))
            else:
                items.append(source)
        return items

    def _merge(self, node: Node) -> _Merged:
        """Children of a composed directory: name -> (entry, providing layer, dir sources)."""
        return self._merge_items(node.path, self.mode, self._items(node.sources, 0))

    def _merge_unit(self, path: tuple[bytes, ...], unit: _Unit) -> _Merged:
        return self._merge_items(path, unit.group.mode, self._items(unit.sources, unit.depth))

    def _merge_items(self, path: tuple[bytes, ...], mode: fmt.CompositionMode, items: list[_Item]) -> _Merged:
        in_union = mode is fmt.CompositionMode.UNION
        union = [it for it in items if in_union and not _item_override(it)]
        stacked = [it for it in items if not (in_union and not _item_override(it))]
        result: _Merged = {}
        if union:
            result = self._merge_union(path, union)
        for item in stacked:
            if isinstance(item, _Unit):
                # A group's merged result: no whiteouts or opaque markers are left in it.
                for name, (entry, layer, sources) in self._merge_unit(path, item).items():
                    if entry.kind is _DIR:
                        current = result.get(name)
                        below = current[2] if current is not None and current[0].kind is _DIR else []
                        result[name] = (entry, layer, [*below, *sources])
                    else:
                        result[name] = (entry, layer, [])
                continue
            source = item
            layer = source.layer
            entries, opaque = self._source_children(source, len(items) > 1)
            if opaque:
                result = {}
            for entry in entries:
                name = entry.name
                kind = entry.kind
                if kind is _WHITEOUT:
                    result.pop(name, None)
                    continue
                if kind is _DIR:
                    current = result.get(name)
                    sources = current[2] if current is not None and current[0].kind is _DIR else []
                    sources = [*sources, self._child_source(source, entry, (*path, name))]
                    result[name] = (entry, layer, sources)
                else:
                    result[name] = (entry, layer, [])
        return result

    def _merge_union(self, path: tuple[bytes, ...], items: list[_Item]) -> _Merged:
        if len(items) == 1 and isinstance(items[0], Source):
            # One directory object (most of a package's own tree): its entries as they are.
            only = items[0]
            result: _Merged = {}
            for entry in self._source_children(only)[0]:
                kind = entry.kind
                if kind is _DIR:
                    result[entry.name] = (entry, only.layer, [self._child_source(only, entry, (*path, entry.name))])
                elif kind is not _WHITEOUT:  # whiteouts only have meaning between stacked layers
                    result[entry.name] = (entry, only.layer, [])
            return result
        # name -> [(entry, layer, the leaf source it came from, or a group's sources for it)]
        by_name: dict[bytes, list[tuple[fmt.Entry, LayerInfo, Source | list[Source]]]] = {}
        for item in items:
            if isinstance(item, _Unit):
                for name, (entry, layer, sources) in self._merge_unit(path, item).items():
                    by_name.setdefault(name, []).append((entry, layer, sources))
                continue
            entries, _opaque = self._source_children(item, len(items) > 1)
            for entry in entries:
                if entry.kind is _WHITEOUT:
                    continue  # whiteouts only have meaning between stacked layers
                by_name.setdefault(entry.name, []).append((entry, item.layer, item))
        result = {}
        for name, provided in by_name.items():
            if len(provided) == 1:
                # One provider (most names): nothing to merge, check or pick.
                entry, layer, origin = provided[0]
                if entry.kind is not _DIR:
                    result[name] = (entry, layer, [])
                elif isinstance(origin, Source):
                    result[name] = (entry, layer, [self._child_source(origin, entry, (*path, name))])
                else:
                    result[name] = (entry, layer, sorted(origin, key=lambda src: src.layer.fileset))
                continue
            child_path = (*path, name)
            dirs = [p for p in provided if p[0].kind is _DIR]
            others = [p for p in provided if p[0].kind is not _DIR]
            if dirs and others:
                raise self._conflict(child_path, dirs[0][1], others[0][1], "a directory and a file")
            if dirs:
                child_sources: list[Source] = []
                for entry, _layer, origin in dirs:
                    if isinstance(origin, Source):
                        child_sources.append(self._child_source(origin, entry, child_path))
                    else:
                        child_sources.extend(origin)
                child_sources.sort(key=lambda src: src.layer.fileset)
                winner = max(dirs, key=lambda p: _dir_rank(p[0]))
                result[name] = (winner[0], winner[1], child_sources)
                continue
            first, first_layer, _origin = others[0]
            for entry, layer, _origin in others[1:]:
                if not entry.same_content(first):
                    raise self._conflict(child_path, first_layer, layer, "different content")
            winner_entry, winner_layer, _origin = max(others, key=lambda p: (p[0].mtime_ns, p[1].fileset))
            result[name] = (winner_entry, winner_layer, [])
        return result

    @staticmethod
    def _conflict(path: tuple[bytes, ...], a: LayerInfo, b: LayerInfo, what: str) -> ConflictError:
        return ConflictError(fmt.show_path(path), ConflictingLayer(a.fileset, a.name),
                             ConflictingLayer(b.fileset, b.name), what)

    def _dir_metadata(self, sources: list[Source], name: bytes) -> fmt.Entry:
        if len(sources) == 1 and sources[0].synthetic is None and not self._nested:
            only = sources[0].entry
            if only.name == name and not only.link and only.kind is _DIR:
                return only  # what the general path would copy field by field
        entry = self._pick_metadata(self.mode, self._items(sources, 0))
        if entry is None:
            return _synthetic_dir(name)
        return fmt.Entry(name, _DIR, entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.xattrs,
                         tree=entry.tree)

    def _pick_metadata(self, mode: fmt.CompositionMode, items: list[_Item]) -> fmt.Entry | None:
        """The directory entry whose metadata a merged directory shows (None: all synthetic).

        layers: the topmost real source; union: the topmost override, else the greatest
        by (mtime, mode, uid, gid, xattrs); a group counts as the entry it picks itself.
        Weak (init layer) sources count only where nothing else is real.
        """
        candidates: list[tuple[fmt.Entry, bool, bool]] = []  # (entry, override, weak)
        for item in items:
            if isinstance(item, _Unit):
                picked = self._pick_metadata(item.group.mode, self._items(item.sources, item.depth))
                if picked is not None:
                    candidates.append((picked, item.group.override, False))
            elif not item.is_synthetic:
                candidates.append((item.entry, item.layer.override, item.layer.weak))
        strong = [c for c in candidates if not c[2]] or candidates
        if not strong:
            return None
        if mode is fmt.CompositionMode.UNION:
            stacked = [c for c in strong if c[1]]
            return stacked[-1][0] if stacked else max(strong, key=lambda c: _dir_rank(c[0]))[0]
        return strong[-1][0]

    # ------------------------------------------------------------------ nodes

    def load_children(self, node: Node) -> Children:
        """Compute a directory's children once (reads its layers' directory objects)."""
        children = node.children
        if children is not None:
            return children
        with self._lock:
            if node.children is not None:
                return node.children
            old = self._counterpart(node.path)
            old_mode = self.previous.mode if self.previous is not None else self.mode
            if old is not None and old is not node and old.children is not None \
                    and signature(old, old_mode) == signature(node, self.mode):
                # Composes as in the previous generation: take its children, loaded parts included.
                node.subdirs = old.subdirs
                self._adopt(old.children)
                node.children = old.children
                return node.children
            old_children = old.children if old is not None and old.is_dir else None
            # Composed before and let go of: the same numbers again (the same composition).
            base, kept = self.inodes.recall((node.path, signature(node, self.mode)))
            if old_children is None and kept is None:
                single = self._single_source(node)
                if single is not None:
                    return self._compose_single(node, single, base)
            merged = self._merge(node)
            names = sorted(merged)
            # The old directory's names, by index: the same list (the common case) needs no map.
            aligned = old_children is not None and old_children.names == names
            old_pos = old_children.positions() if old_children is not None and not aligned else None
            inos = array("Q", bytes(8 * len(names))) if kept is None else kept
            recs = bytearray(_REC.size * len(names))
            extras: dict[int, fmt.Entry] = {}
            dirs: dict[int, Node] = {}
            layers: list[LayerInfo] = []
            layer_pos: dict[int, int] = {}  # id(layer) -> position in layers
            layer_ix: list[int] = []
            moves: list[tuple[int, int]] = []
            files: list[int] = []  # indices of the children numbered from the block
            same: dict[int, int] = {}  # index -> number of the same file in the old directory
            size = _REC.size
            last: LayerInfo | None = None  # most children come from the layer the previous one came from
            pos = 0
            for index, name in enumerate(names):
                entry, layer, sources = merged[name]
                if layer is not last:
                    last = layer
                    found = layer_pos.get(id(layer))
                    if found is None:
                        found = layer_pos[id(layer)] = len(layers)
                        layers.append(layer)
                    pos = found
                layer_ix.append(pos)
                at = index if aligned else old_pos.get(name) if old_pos is not None else None
                if entry.kind is _DIR:
                    path = (*node.path, name)
                    meta = self._dir_metadata(sources, name)
                    ino = self.inodes.number(("d", path))
                    child = Node(ino, meta, node.ino, path, None, sources)
                    previous = old_children.dirs.get(at) if old_children is not None and at is not None else None
                    if previous is not None and previous.ino == ino \
                            and signature(previous, old_mode) == signature(child, self.mode):
                        child = previous  # an unchanged subtree: share it, loaded parts included
                        if child.children is not None:
                            self._adopt(child.children)
                    inos[index] = child.ino
                    dirs[index] = child
                    self.nodes[child.ino] = child
                    continue
                if entry.link is not None:
                    inos[index] = self._link_number(layer, entry)
                    extras[index] = entry
                    continue
                packed = _pack_into(recs, index * size, entry)
                if not packed:
                    extras[index] = entry
                files.append(index)
                if kept is None and at is not None and old_children is not None \
                        and old_children.same_file(at, entry, recs if packed else None, index * size):
                    # The same file as before: it keeps its number (and the kernel its pages).
                    same[index] = old_children.inos[at]
            inherits: Children | None = None
            fresh: list[int] = []
            if kept is None:
                if not base:  # else the block it had when it was composed before
                    base, inherits = self._block_for(len(names), files, same, old_children)
                for index in files:
                    was = same.get(index)
                    if was is None:
                        if inherits is None:
                            inos[index] = base + index
                        else:
                            fresh.append(index)
                        continue
                    inos[index] = was
                    if was != base + index:
                        moves.append((was, index))
                if fresh:
                    start = self.inodes.block(len(fresh))
                    for offset, index in enumerate(fresh):
                        inos[index] = start + offset
            ix = array("H", layer_ix) if len(layers) > 1 else None
            children = Children(node.ino, node.path, base, names, inos, bytes(recs), extras, dirs, tuple(layers), ix)
            if kept is not None:
                children.rekept = [i for i in files if inos[i] != base + i]
            else:
                children.rekept = fresh
            if inherits is None:
                self.inodes.register(children)
            else:
                self.takeovers.append((inherits, children))  # on install: until then, the old one answers
            self.moves.extend((ino, children, index) for ino, index in moves)
            self.entries += len(names)
            node.subdirs = len(dirs)
            node.children = children  # published last: readers see all or nothing
            return children

    def _link_number(self, layer: LayerInfo, entry: fmt.Entry) -> int:
        """The number of a FileSet's hard link group: the same in every directory that
        lists one of its links (by the group's first path and the file's identity)."""
        assert entry.link is not None
        return self.inodes.number(("l", layer.fileset, layer.at, entry.link[0], identity(entry)))

    def _single_source(self, node: Node) -> Source | None:
        """The one layer directory that makes *node*, read from the store, if that is all
        there is to it (no merge, no group, nothing synthetic or held in memory)."""
        if self._nested or len(node.sources) != 1:
            return None
        source = node.sources[0]
        if source.synthetic is not None or source.layer.directories is not None or source.entry.tree is None:
            return None
        return source

    def _compose_single(self, node: Node, source: Source, base: int) -> Children:
        """:meth:`load_children` for a directory of one layer directory composed afresh
        (most of a cold mount): its entries packed straight from the object's CBOR maps.

        A file of one chunk range (most entries) goes from its map to its record without
        an :class:`fmt.Entry` (:func:`fmt.pack_directory` makes every check
        :func:`fmt.decode_directory` would); anything else is decoded and placed as the
        general path places it. The same children, numbers and checks as a merge of one
        source: whiteouts dropped (nothing is below them), the opaque flag moot.
        """
        tree = source.entry.tree
        assert tree is not None
        raw_entries, _opaque = self.store.get_directory_items(tree)
        checked = self.store.directory_checked(tree)  # the object passed every check once: no need again
        names, recs, others = fmt.pack_directory(raw_entries, _REC, _ONE_EXTENT, checked=checked)
        del raw_entries  # the maps: about 700 bytes an entry until the records are built
        size = _REC.size
        if any(entry.kind is _WHITEOUT for _index, entry in others):
            names, recs, others = _drop_whiteouts(names, recs, others)
        extras: dict[int, fmt.Entry] = {}
        dirs: dict[int, Node] = {}
        links: dict[int, int] = {}
        layer = source.layer
        for index, entry in others:
            kind = entry.kind
            if kind is _DIR:
                name = entry.name
                path = (*node.path, name)
                sources = [self._child_source(source, entry, path)]
                child = Node(self.inodes.number(("d", path)), self._dir_metadata(sources, name), node.ino, path,
                             None, sources)
                dirs[index] = child
                self.nodes[child.ino] = child
            elif entry.link is not None:
                links[index] = self._link_number(layer, entry)
                extras[index] = entry
            elif not _pack_into(recs, index * size, entry):
                extras[index] = entry
        if not base:
            base = self.inodes.block(len(names))
        inos = array("Q", range(base, base + len(names)))
        for index, child in dirs.items():
            inos[index] = child.ino
        for index, ino in links.items():
            inos[index] = ino
        children = Children(node.ino, node.path, base, names, inos, bytes(recs), extras, dirs, (layer,), None)
        self.inodes.register(children)
        self.entries += len(names)
        node.subdirs = len(dirs)
        node.children = children  # published last: readers see all or nothing
        return children

    def _block_for(self, n: int, files: list[int], same: dict[int, int],
                   old: Children | None) -> tuple[int, Children | None]:
        """The first number of a new directory's block, and the old directory it takes the
        block over from, if it does.

        A directory composed anew in a swap whose files are mostly the old directory's,
        at the same places (a package upgrade changing a few files), takes over the old
        block: its unchanged files then keep their numbers where they are, without a
        moved number each to record and install, and only the changed ones get numbers
        of a fresh block, findable as moved. Otherwise a block of its own.
        """
        if old is not None and old.registered and not old.retired and same:
            start = old.base
            inherited = sum(1 for index, ino in same.items() if ino == start + index)
            if inherited and 2 * inherited >= len(files):
                return start, old
        return self.inodes.block(n), None

    def _adopt(self, children: Children) -> None:
        """Take over *children* (loaded in the previous generation) with its loaded subtree."""
        stack = [children]
        while stack:
            current = stack.pop()
            self.inodes.register(current)
            current.retired = False
            self.entries += len(current)
            for child in current.dirs.values():
                self.nodes[child.ino] = child
                if child.children is not None:
                    stack.append(child.children)

    def unload(self, node: Node, held: Callable[[int], bool]) -> bool:
        """Let go of a directory's composed children and everything loaded below it, if
        neither the kernel (*held*: a directory number it holds) nor anything else holds
        them; they are composed again, with new numbers, when next needed. Returns
        whether it did. Callers make sure no load or swap is running."""
        if node.children is None:
            return True
        todo: list[Node] = []
        stack = [node]
        while stack:
            current = stack.pop()
            children = current.children
            if children is None:
                continue
            if children.held or (current is not node and held(current.ino)):
                return False
            todo.append(current)
            stack.extend(children.dirs.values())
        for current in todo:
            children = current.children
            assert children is not None
            for child in children.dirs.values():
                if self.nodes.get(child.ino) is child:
                    del self.nodes[child.ino]
            self.entries -= len(children)
            self.inodes.unregister(children)
            inos = children.inos
            moved = any(inos[i] != children.base + i for i in range(len(inos))
                        if i not in children.dirs and i not in children.extras)
            # Some files kept numbers from an earlier generation: remember them all.
            self.inodes.remember((current.path, signature(current, self.mode)), children.base,
                                 inos if moved else None)
            current.children = None
            current.listed = False
        return True

    def install(self, old: Generation) -> None:
        """This generation replaced *old* (after :func:`swap.prepare`): the files it kept
        answer, and are counted, here from now on, and *old*'s own directories are let go
        of once the kernel holds none of their entries (the FUSE layer calls it on the
        loop, right after the switch; code that swaps without a mount calls it too)."""
        inodes = self.inodes
        inodes.install(self.moves, self.takeovers)
        self.moves = []
        self.takeovers = []
        live = {id(c) for c in self.loaded_children()}
        for children in old.loaded_children():
            if id(children) not in live:
                children.retired = True
                if not children.held:
                    inodes.unregister(children)

    def loaded_children(self) -> list[Children]:
        """Every packed directory of this generation's loaded tree."""
        out: list[Children] = []
        stack = [self.root]
        while stack:
            children = stack.pop().children
            if children is not None:
                out.append(children)
                stack.extend(children.dirs.values())
        return out

    def _counterpart(self, path: tuple[bytes, ...]) -> Node | None:
        """The previous generation's directory at *path*, through what it has loaded (reads nothing)."""
        if self.previous is None:
            return None
        node = self.previous.root
        for part in path:
            children = node.children
            if children is None:
                return None
            i = children.index(part)
            child = children.dirs.get(i) if i is not None else None
            if child is None:
                return None
            node = child
        return node

    def loaded_inodes(self) -> set[int]:
        """The numbers of this generation's loaded directories and of the hard links in them
        (the keys an inode table sweep must keep; files have no key)."""
        seen = {ROOT_INODE}
        for children in self.loaded_children():
            seen.update(child.ino for child in children.dirs.values())
            seen.update(children.inos[i] for i, e in children.extras.items() if e.link is not None)
        return seen

    def node(self, ino: int) -> Node | None:
        """The node of a number this generation shows or a file number any generation gave
        out that is still known (their content never changes)."""
        node = self.nodes.get(ino)
        if node is not None:
            return node
        where = self.inodes.locate(ino)
        if where is None:
            return None
        return where[0].node_at(where[1])

    def lookup(self, parent: Node, name: bytes) -> Node | None:
        child = self.load_children(parent).get(name)
        if child is not None and child.is_dir and child.children is None:
            self.load_children(child)  # its st_nlink needs its subdirectory count
        return child

    def listing(self, node: Node) -> Children:
        children = self.load_children(node)
        for child in children.dirs.values():
            if child.children is None:
                self.load_children(child)
        node.listed = True
        return children

    def from_cache(self, func: Callable[[Node], Any], node: Node) -> bool:
        """Run *func(node)* (load_children or listing) only if it needs no disk or index read.

        For the FUSE loop, which then answers without a thread hop; False means nothing
        was published and *func* must run on a worker. Never waits for the lock either.
        A directory's children are published in one assignment after its objects are
        read, so stopping at the first uncached object leaves no half-loaded node.
        """
        if not self._lock.acquire(blocking=False):
            return False
        try:
            with self.store.cache_only():
                func(node)
            return True
        except NotCached:
            return False
        finally:
            self._lock.release()

    def resolve(self, path: str | bytes) -> Node:
        """The node at an absolute *path* (no symlink following)."""
        raw = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
        node = self.root
        for part in (p for p in raw.split(b"/") if p and p != b"."):
            if not node.is_dir:
                raise NotFoundError(f"{raw.decode('utf-8', 'backslashreplace')}: not a directory on the way")
            child = self.lookup(node, part)
            if child is None:
                raise NotFoundError(f"no such path in the image: {raw.decode('utf-8', 'backslashreplace')}")
            node = child
        if node.is_dir:
            self.load_children(node)
        return node

    def extent_map(self, node: Node) -> ExtentMap:
        emap = node.emap
        if emap is None:
            emap = node.emap = ExtentMap(self.store.file_extents(node.entry))
        return emap

    def walk(self, node: Node | None = None) -> Iterable[tuple[tuple[bytes, ...], Node]]:
        """Every node below *node* in canonical order (loads the whole tree)."""
        stack = [node or self.root]
        while stack:
            current = stack.pop()
            yield current.path, current
            if current.is_dir:
                children = self.load_children(current)
                stack.extend(children.node_at(i) for i in reversed(range(len(children))))

    def check(self) -> None:
        """Compose every directory now, so conflicts surface before anything is served."""
        for _path, _node in self.walk():
            pass

    def layer_for(self, path: str) -> tuple[Node, LayerInfo | None]:
        node = self.resolve(path)
        if node.is_dir:
            real = [s for s in node.sources if not s.is_synthetic]
            strong = [s for s in real if not s.layer.weak] or real
            return node, strong[-1].layer if strong else None
        return node, node.layer


def signature(node: Node, mode: str) -> tuple[Any, ...]:
    """Everything a directory's composition depends on: equal signatures, equal subtrees.

    Directory objects are named by content, so equal tree digests in the same layers
    under the same rules compose to the same subtree: a swap skips it without reading.
    Sources of groups are taken in composition order: a union keeps its sources sorted
    by FileSet, but inside a layers-mode group their order decides.
    """
    sources = node.sources
    if any(s.layer.groups for s in sources):
        sources = sorted(sources, key=lambda s: s.layer.order)
    return (mode, tuple((s.layer.fileset, s.layer.at, s.layer.override, s.layer.groups, s.layer.weak, s.entry.tree,
                         tuple(sorted(s.synthetic)) if s.synthetic is not None else None,
                         s.entry.mode, s.entry.uid, s.entry.gid, s.entry.mtime_ns)
                        for s in sources))


def _dir_rank(entry: fmt.Entry) -> tuple[Any, ...]:
    return (entry.mtime_ns, entry.mode, entry.uid, entry.gid, tuple(sorted(entry.xattrs.items())))

