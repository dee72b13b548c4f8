"""The pyfuse3 protocol adapter: inode numbers and attributes in, FUSEErrors out.

Everything about what the tree contains lives in :mod:`cnpsfs.view`; this module maps
requests onto the current generation, runs blocking work (reading and decompressing
blocks, hashing chunks) on worker threads, and keeps the kernel's caches full: the
image is immutable, so entries and attributes never time out, file pages are kept, and
with the kernel-cache extensions of our pyfuse3 patch (docs/pyfuse3-upstream.md) opens,
directory listings and symlink targets are served by the kernel without asking us.

State kept per inode only, never per open file: in no-open mode the kernel sends
handle 0 and the inode, so the read path must not depend on what open returned.

Errors are translated here and nowhere else. A request that meets a store error (a
damaged index, a pack that cannot be read, a corrupt chunk: any CnpsfsError or OSError)
gets EIO and one log line naming the culprit; the mount keeps serving everything else.
pyfuse3 ends its main loop on any exception other than FUSEError, which would take the
whole mount down (every reader then gets ENOTCONN), so every handler is wrapped by
:func:`_boundary`, which also turns an unexpected exception (a bug) into EIO with its
traceback in the log.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError
from cnpsfs.fs.fetcher import ChunkFetcher
from cnpsfs.fs.options import DEFAULT_CACHE_MIB, DEFAULT_THREADS
from cnpsfs.fs.recorder import ProfileRecorder
from cnpsfs.image.reader import ChunkCache, ExtentMap, past_the_end
from cnpsfs.image.view import DIR_SIZE, Children, Generation, Node
from cnpsfs.store import NotCached

log = logging.getLogger(__name__)

#: The image never changes under a generation; a swap invalidates explicitly.
CACHE_TIMEOUT = 365 * 24 * 3600.0
READAHEAD_BYTES = 4 << 20
REPORTED_MAX = 4096  # distinct (file, failure) pairs remembered to log each once
EMAPS_MAX = 4096  # extent maps of recently read files kept (a file's node is not kept)
_S_IFREG = 0o100000
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

HAVE_EXTENSIONS = bool(getattr(pyfuse3, "KERNEL_CACHE_EXTENSIONS", 0))
# Listings without attributes (patches/pyfuse3/0003): entries the kernel lists but does not
# link, for readers that only want names (docs/architecture.md, "Lean listings").
HAVE_LEAN_LISTINGS = bool(getattr(pyfuse3, "READDIR_REPLY_NAME", 0))
ATTRIBUTE_READERS_MAX = 256  # processes remembered as wanting attributes (an LRU)
_READDIR_REPLY_NAME: Callable[[Any, bytes, int, int, int], bool] | None = getattr(pyfuse3, "readdir_reply_name", None)
# Replies from buffers (patches/pyfuse3/0004): a READ answered with its chunks' slices as
# they are, gathered by the kernel (fuse_reply_iov), not joined into a fresh buffer first.
HAVE_READ_BUFFERS = bool(getattr(pyfuse3, "READ_REPLY_BUFFERS", 0))
_ZEROS = bytes(1 << 20)  # a hole's piece of a reply is a slice of this, not a new buffer

_H = TypeVar("_H", bound=Callable[..., Awaitable[Any]])

TRIM_ENTRIES = 50_000  # entries let go of before the C heap is handed back to the system


def _trim_heap() -> None:
    """``malloc_trim(0)`` where the C library has it (glibc): return freed heap pages."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _boundary(handler: _H) -> _H:
    """EIO for whatever a handler lets escape except FUSEError (see the module docstring).

    Handlers catch the errors they can name more precisely ("reading /x at offset n"); this
    is the net under them, so no store error and no bug ever ends the mount.
    """
    name = handler.__name__

    @functools.wraps(handler)
    async def wrapped(self: Operations, *args: Any) -> Any:
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except (CnpsfsError, OSError) as exc:
            raise self._io_error(f"{name} (inode {args[0] if args else '-'})", exc) from None
        except Exception:
            log.exception("internal error in %s%r: answered EIO", name, args[:3])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapped  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Kernel:
    """The pyfuse3 calls that need a live FUSE session, in one place.

    The handlers reach the kernel only through these, so in-process tests run them
    without a mount by passing stand-ins that record what would have been sent.
    """

    readdir_reply: Callable[[Any, bytes, pyfuse3.EntryAttributes, int], bool] = pyfuse3.readdir_reply
    readdir_reply_name: Callable[[Any, bytes, int, int, int], bool] | None = _READDIR_REPLY_NAME
    invalidate_entry: Callable[[int, bytes], None] = pyfuse3.invalidate_entry
    invalidate_inode: Callable[[int], None] = pyfuse3.invalidate_inode
    notify_store: Callable[[int, int, bytes], None] = pyfuse3.notify_store
    #: ``read`` may return its pieces as a list (pyfuse3 replies them with one gathered write).
    read_buffers: bool = HAVE_READ_BUFFERS


class Operations(pyfuse3.Operations):
    """Read-only FUSE operations over the current :class:`Generation`."""

    supports_dot_lookup = True

    def __init__(self, generation: Generation, *, use_extensions: bool = True,
                 cache_bytes: int = DEFAULT_CACHE_MIB << 20, threads: int = DEFAULT_THREADS,
                 kernel: Kernel | None = None) -> None:
        super().__init__()
        self.kernel = kernel or Kernel()
        self.generation = generation
        self.store = generation.store
        # A swap waits for directory loads in flight and holds new ones back, so it sees
        # a stable old generation; reads and cached lookups go on meanwhile.
        self._loads_in_flight = 0
        self._loads_done = trio.Event()
        self._swap_done: trio.Event | None = None
        # Lookup counts (pyfuse3's rules: counted in lookup and readdirplus, released in
        # forget). Directories: here, with the node of every directory the kernel holds, so
        # one it got from an earlier generation stays answerable until FORGET. Files: in
        # their directory's packed Children (the inode table finds it by number), which
        # stay answerable while any count is held.
        self.lookups: Counter[int] = Counter()
        self.held: dict[int, Node] = {}
        self._emaps: OrderedDict[int, ExtentMap] = OrderedDict()
        self._unload_later: set[int] = set()  # forgotten directories to let go of once no load runs
        self._released = 0  # entries let go of since the heap was last trimmed
        self._attr = pyfuse3.EntryAttributes()  # readdir fills one and replies a copy per entry
        self.requests: Counter[str] = Counter()
        self.limiter = trio.CapacityLimiter(threads)
        self.fetcher = ChunkFetcher(self.store, ChunkCache(cache_bytes), self.limiter)
        self.extensions = use_extensions and HAVE_EXTENSIONS
        self.no_open = False
        self.no_opendir = False
        # Lean listings: a reader that has not asked for the attributes of entries it was
        # listed gets its listings as names only (READDIRPLUS entries with node id 0), which
        # the kernel lists without instantiating a dentry and an inode each: what a name
        # walk (find, ls, a glob) costs the kernel most. A LOOKUP from that reader in a
        # directory listed lean marks it as one that stats what it lists (find -printf,
        # tar, ls -l), and from then on its listings carry attributes: the kernel's own
        # READDIRPLUS_AUTO heuristic, decided per process. Subdirectories always carry
        # theirs (a walk descends into them).
        self.lean_listings = self.extensions and HAVE_LEAN_LISTINGS and self.kernel.readdir_reply_name is not None
        # Replies from buffers: a READ returns the slices of its chunks (views, no copy) and
        # pyfuse3 hands them to the kernel as one gathered write; without the patch (or in
        # stock mode) they are joined into one reply, as pyfuse3 wants.
        self.read_buffers = self.extensions and self.kernel.read_buffers
        self.attribute_readers: OrderedDict[int, None] = OrderedDict()
        self.lean_listed: set[int] = set()  # directories whose kernel listing left entries unlinked
        #: Thread ids of this daemon's own readers of the mount (the prefetch): they want
        #: what they touch linked for the program, so they always get attributes.
        self.own_tids: set[int] = set()
        self._readahead_nursery: trio.Nursery | None = None
        self._read_end: dict[int, int] = {}
        # Directories whose listing the kernel has read since it last forgot them: a replay
        # racing the program does not list them again (fs/prefetch.py).
        self.listed_by_kernel: set[int] = set()
        self._reported: OrderedDict[tuple[Any, str], None] = OrderedDict()  # failures logged once
        # Prefetch (fs/prefetch.py) yields to demand: it waits while a FUSE request is
        # loading chunks or directories on a worker. Code between awaits is atomic, so a
        # counter and an event set when it drops to zero are enough.
        self.demand = 0
        self._demand_quiet = trio.Event()
        self._demand_quiet.set()
        # Chunks a prefetch put in the cache and no demand read has used yet; a read that
        # uses one counts a hit (and removes it, so each counts once).
        self.prefetched: set[bytes] = set()
        self.prefetch_hits = 0
        self.demand_misses = 0  # chunks demand reads had to load themselves
        self.recorder: ProfileRecorder | None = None
        self.own_pid = os.getpid()  # the prefetch's own lookups through the mount are not the program's
        if self.extensions:
            self.enable_cache_symlinks = True
            self.pass_inode_to_fh_handlers = True

    # ------------------------------------------------------------------ helpers

    @property
    def mode(self) -> str:
        """How the kernel caches: reported by status and logged at start."""
        if not self.extensions:
            return "stock"
        parts = ["kernel-cache"]
        if self.no_open:
            parts.append("no-open")
        if self.no_opendir:
            parts.append("no-opendir")
        if self.lean_listings:
            parts.append("lean-listings")
        if self.read_buffers:
            parts.append("read-buffers")
        return "+".join(parts)

    def node(self, ino: int) -> Node:
        # The current generation first: a directory keeps its number across a swap, and
        # the kernel must see its new listing. Otherwise a directory the kernel got earlier
        # (a working directory that vanished), or a file of any generation the inode table
        # still knows (its content never changes under its number).
        node = self.generation.nodes.get(ino)
        if node is None:
            node = self.held.get(ino)
            if node is None:
                node = self.generation.node(ino)
                if node is None:
                    raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def lookup_count(self, ino: int) -> int:
        """How many references the kernel holds to *ino* (for tests and status)."""
        return self.lookups.get(ino, 0) or self.generation.inodes.held_count(ino)

    def _count(self, node: Node, children: Children | None = None, index: int = -1) -> None:
        """The kernel took one more reference to *node* (a lookup or readdirplus entry),
        met as *children*[*index*] (files; None for ``.`` and ``..``, always directories)."""
        if node.is_dir:
            self.lookups[node.ino] += 1
            self.held[node.ino] = node
            return
        if children is None:
            raise AssertionError("a file counted without its directory")
        self.generation.inodes.count(node.ino, children, index)

    def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        """The node's attributes, built once per node and kept on it (the image never changes).

        Built field by field without the Node properties: a cold walk builds one per
        entry, and this is most of a READDIR's own work.
        """
        attr = node.attr
        if attr is None:
            entry = node.entry
            kind = entry.kind
            attr = pyfuse3.EntryAttributes()
            attr.st_ino = node.ino
            attr.entry_timeout = CACHE_TIMEOUT
            attr.attr_timeout = CACHE_TIMEOUT
            attr.st_mode = fmt.KIND_IFMT[kind] | entry.mode
            attr.st_uid = entry.uid
            attr.st_gid = entry.gid  # st_blksize 4096, st_rdev 0 and generation 0: EntryAttributes' own
            if kind is fmt.Kind.FILE:
                attr.st_nlink = entry.link[1] if entry.link else 1
                attr.st_size = size = entry.size
                extents = entry.extents
                if extents is not None and len(extents) == 1 and extents[0].digest is not None:
                    attr.st_blocks = (size + 511) >> 9
                else:
                    attr.st_blocks = node.blocks
            elif kind is fmt.Kind.DIR:
                attr.st_nlink = node.nlink
                attr.st_size = DIR_SIZE
                attr.st_blocks = DIR_SIZE // 512
            else:
                attr.st_nlink = entry.link[1] if entry.link else 1
                attr.st_size = node.size
                if kind is fmt.Kind.CHARDEV or kind is fmt.Kind.BLOCKDEV:
                    attr.st_rdev = os.makedev(*entry.rdev)
            attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = entry.mtime_ns
            if node.is_dir:
                node.attr = attr  # a file's node is made per request: caching it would cost the memory saved
        return attr

    def _packed_attributes(self, children: Children, index: int) -> pyfuse3.EntryAttributes:
        """Attributes of *children*[*index*] in the shared readdir object, without making a node."""
        packed = children.packed_at(index)
        if packed is None:
            return self.attributes(children.node_at(index))
        mode, uid, gid, mtime, size, data = packed
        attr = self._attr
        attr.st_ino = children.inos[index]
        attr.entry_timeout = CACHE_TIMEOUT
        attr.attr_timeout = CACHE_TIMEOUT
        attr.st_mode = _S_IFREG | mode
        attr.st_nlink = 1
        attr.st_uid = uid
        attr.st_gid = gid
        attr.st_rdev = 0
        attr.st_size = size
        attr.st_blksize = 4096
        attr.st_blocks = (data + 511) // 512
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime
        return attr

    def _io_error(self, what: str, exc: BaseException, *, node: Node | None = None) -> pyfuse3.FUSEError:
        """EIO for the kernel, and the reason in the log: once per file and failure.

        The kernel retries a failed read page by page and programs retry too, so one
        damaged chunk would otherwise fill the log with the same line at other offsets.
        """
        key = (node.ino if node is not None else what, str(exc))
        if key in self._reported:
            log.debug("%s: %s (again)", what, exc)
        else:
            self._reported[key] = None
            if len(self._reported) > REPORTED_MAX:
                self._reported.popitem(last=False)
            log.error("%s: %s", what, exc)
        return pyfuse3.FUSEError(errno.EIO)

    async def _children_loaded(self, node: Node, *, listing: bool = False) -> Node:
        """Load directory objects off the loop (they may need a block read and decode).

        Returns the node to use: after waiting out a swap, the new generation's.
        """
        try:
            return await self.load_directory(node, listing=listing)
        except (CnpsfsError, OSError) as exc:  # a damaged object or store, a union conflict found lazily
            raise self._io_error(f"directory {fmt.show_path(node.path)}", exc) from None

    @property
    def swapping(self) -> bool:
        """A swap is preparing the next generation (directory loads wait until it is done)."""
        return self._swap_done is not None

    async def load_directory(self, node: Node, *, listing: bool = False,
                             limiter: trio.CapacityLimiter | None = None) -> Node:
        """Compose *node*'s children (with *listing*, its subdirectories' too), waiting out swaps.

        For the handlers and for prefetch (which passes its own *limiter*); raises the
        store's errors as they are. Returns the node to use: after a swap, the new
        generation's.
        """
        while self._swap_done is not None:
            await self._swap_done.wait()
            node = self.node(node.ino)
        gen = self.generation
        self._loads_in_flight += 1
        try:
            # Inline when every directory object needed is in memory (the usual case once
            # a directory block has been read): a thread hop costs more than the work.
            if listing:
                if not node.listed and not gen.from_cache(gen.listing, node):  # checked on every READDIR: O(1)
                    await self._worker(gen.listing, node, limiter=limiter)
            elif node.children is None and not gen.from_cache(gen.load_children, node):
                await self._worker(gen.load_children, node, limiter=limiter)
        finally:
            self._loads_in_flight -= 1
            if not self._loads_in_flight:
                self._loads_done.set()
                if self._unload_later:
                    self._unload_forgotten()
        return node

    async def _worker(self, func: Any, *args: Any, limiter: trio.CapacityLimiter | None) -> Any:
        """*func* on a worker thread: a demand load (counted, prefetch waits) or a prefetch's."""
        if limiter is not None:
            return await trio.to_thread.run_sync(func, *args, limiter=limiter)
        self._demand_begin()
        try:
            return await trio.to_thread.run_sync(func, *args, limiter=self.limiter)
        finally:
            self._demand_end()

    def _demand_begin(self) -> None:
        if not self.demand:
            self._demand_quiet = trio.Event()
        self.demand += 1

    def _demand_end(self) -> None:
        self.demand -= 1
        if not self.demand:
            self._demand_quiet.set()

    async def demand_quiet(self) -> None:
        """Return once no FUSE request is waiting for a worker (prefetch calls it between steps)."""
        while self.demand:
            await self._demand_quiet.wait()

    # ------------------------------------------------------------------ lifecycle

    def init(self) -> None:
        if self.extensions:
            caps = pyfuse3.kernel_capabilities()
            self.no_open = bool(caps & pyfuse3.FUSE_CAP_NO_OPEN_SUPPORT)
            self.no_opendir = bool(caps & pyfuse3.FUSE_CAP_NO_OPENDIR_SUPPORT)
        # The ready line (fs/mounting.py) says it with the generation; this one is for --debug.
        log.debug("serving %s in %s mode", self.generation.label or "image", self.mode)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        inodes = self.generation.inodes
        for ino, count in inode_list:
            self._read_end.pop(ino, None)
            if ino not in self.lookups:
                children = inodes.release(ino, count)
                if children is not None and children.retired:
                    inodes.unregister(children)  # an old generation's directory nobody holds any more
                continue
            left = self.lookups[ino] - count
            if left > 0:
                self.lookups[ino] = left
                continue
            self.lookups.pop(ino, None)
            self.held.pop(ino, None)
            self.listed_by_kernel.discard(ino)
            if ino != 1:
                self._unload_later.add(ino)
        if self._unload_later:
            self._unload_forgotten()

    def _unload_forgotten(self) -> None:
        """Let go of the composed children of directories the kernel forgot (what makes the
        daemon's memory fall when the kernel drops its caches). Not while a load or a swap
        runs: they read the tree on a worker. Code between awaits is atomic, so checking
        here is enough."""
        gen = self.generation
        if self._loads_in_flight or self._swap_done is not None:
            return
        pending, self._unload_later = self._unload_later, set()
        before = gen.entries
        for ino in pending:
            node = gen.nodes.get(ino)
            if node is None or ino in self.lookups:
                continue
            if not gen.unload(node, lambda i: i in self.lookups):
                log.debug("directory %s forgotten but still holding entries", fmt.show_path(node.path))
        self._released += before - gen.entries
        if self._released >= TRIM_ENTRIES:
            # What was freed sits in the C heap between live blocks; glibc gives it back to
            # the system only when asked (about a millisecond per 100 MB of heap).
            self._released = 0
            _trim_heap()

    # ------------------------------------------------------------------ metadata

    @_boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        self.requests["lookup"] += 1
        parent = self.node(parent_inode)
        if not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if len(name) > fmt.NAME_MAX:
            # The kernel passes names up to 1024 bytes to FUSE; statfs promises f_namemax 255.
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        if name == b".":
            child: Node | None = parent
        elif name == b"..":
            child = self.node(parent.parent)
        else:
            children = parent.children
            index = children.index(name) if children is not None else None
            child = children.node_at(index) if children is not None and index is not None else None
            if child is None or (child.is_dir and child.children is None):
                parent = await self._children_loaded(parent)
                children = parent.children
                assert children is not None
                index = children.index(name)
                child = children.node_at(index) if index is not None else None
                if child is not None and child.is_dir and child.children is None:
                    child = await self._children_loaded(child)  # its st_nlink counts its subdirectories
        if parent.ino in self.lean_listed:  # filled only with lean listings on
            pid = getattr(ctx, "pid", 0)
            if pid not in self.attribute_readers and pid not in self.own_tids:
                self._attribute_reader(pid)
        recorder = self.recorder
        if recorder is not None and getattr(ctx, "pid", 0) != self.own_pid:
            recorder.directory(parent.path)
            if name not in (b".", b".."):
                if child is not None and child.is_dir:
                    recorder.directory(child.path)
                else:  # a file or symlink (read later, it becomes a file entry), or a name that is not there
                    recorder.lookup((*parent.path, name))
        if child is None:
            # A negative entry the kernel may cache: programs probe many missing paths
            # (the dynamic loader, Python's import system). A swap that adds the name
            # invalidates it.
            missing = pyfuse3.EntryAttributes()
            missing.st_ino = 0
            missing.entry_timeout = CACHE_TIMEOUT
            return missing
        if name == b"." or name == b"..":
            self._count(child)
        else:
            # Reloaded children can only be the parent's own (a directory is never let go
            # of while a load runs), so *index* is still the child's.
            self._count(child, parent.children, index if index is not None else -1)
        return self.attributes(child)

    @_boundary
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        self.requests["getattr"] += 1
        node = self.node(inode)
        if node.is_dir and node.children is None:
            # Only the root gets here unloaded (lookup loads every directory it returns);
            # its st_nlink counts its subdirectories, and the attributes are cached for good.
            node = await self._children_loaded(node)
            if self.recorder is not None:
                self.recorder.directory(node.path)
        return self.attributes(node)

    @_boundary
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        self.requests["readlink"] += 1
        node = self.node(inode)
        if node.entry.kind is not fmt.Kind.SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.entry.target

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        # Every exec asks for security.capability, so this runs without the boundary's
        # extra coroutine: nothing here can raise but FUSEError (node() raises ENOENT).
        self.requests["getxattr"] += 1
        node = self.generation.nodes.get(inode) or self.node(inode)
        value = node.entry.xattrs.get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_boundary
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        self.requests["listxattr"] += 1
        return sorted(self.node(inode).entry.xattrs)

    @_boundary
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        # default_permissions makes the kernel check modes; only writes remain to refuse.
        self.requests["access"] += 1
        self.node(inode)
        return not mode & os.W_OK

    @_boundary
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        self.requests["statfs"] += 1
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks = max(1, self.generation.entries + 1)
        st.f_bfree = st.f_bavail = 0
        st.f_files = self.generation.entries + 1
        st.f_ffree = st.f_favail = 0
        st.f_namemax = fmt.NAME_MAX
        return st

    # ------------------------------------------------------------------ directories

    @_boundary
    async def opendir(self, inode: int, ctx: Any) -> Any:
        self.requests["opendir"] += 1
        if self.no_opendir:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel opens directories itself from now on
        node = self.node(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if self.extensions:
            return pyfuse3.FileInfo(fh=inode, cache_readdir=True, keep_cache=True)
        return inode

    @_boundary
    async def readdir(self, fh: int, start_id: int, token: Any, inode: int = 0) -> None:
        self.requests["readdir"] += 1
        node = self.node(fh or inode)
        if not node.listed or self._swap_done is not None:
            node = await self._children_loaded(node, listing=True)
        listing = node.children
        assert listing is not None
        self.listed_by_kernel.add(node.ino)
        if self.recorder is not None:
            self.recorder.directory(node.path, listed=True)
        # Offsets: 0 and 1 are "." and "..", then listing[i] is offset i + 2; stable
        # because a generation's listing never changes. The kernel asks once more past
        # the end before it caches a listing (docs/performance.md): that request ends here.
        end = len(listing) + 2
        if start_id >= end:
            return
        reply = self.kernel.readdir_reply
        lean = False
        if self.lean_listings:
            pid = getattr(token, "pid", 0)
            if pid not in self.attribute_readers and pid not in self.own_tids:
                lean = True
                self.lean_listed.add(node.ino)
        if start_id == 0:
            if not reply(token, b".", node.attr or self.attributes(node), 1):
                return
            start_id = 1
        if start_id == 1:
            parent = self.node(node.parent)
            if not reply(token, b"..", parent.attr or self.attributes(parent), 2):
                return
            start_id = 2
        # Directories' attributes are kept on their nodes; a plain file's are filled from
        # its packed record into one shared object (readdir_reply copies it), other
        # entries' made per call. What is left per entry is the reply and the count.
        # A lean listing (see lean_listings) replies files, symlinks and devices by name
        # only, counting nothing: the kernel takes no reference to an entry with node id 0.
        names, dirs, extras, inodes = listing.names, listing.dirs, listing.extras, self.generation.inodes
        lookups, held, attributes, packed = self.lookups, self.held, self.attributes, self._packed_attributes
        reply_name = self.kernel.readdir_reply_name
        if lean and reply_name is not None and not dirs and not extras:
            # Only packed plain files (the leaves of a large tree): nothing to look up
            # per entry but its name and number (about 70 ns an entry less on a walk).
            inos = listing.inos
            for index in range(start_id - 2, end - 2):
                if not reply_name(token, names[index], inos[index], _S_IFREG, index + 3):
                    return
            return
        for index in range(start_id - 2, end - 2):
            child = dirs.get(index)
            if child is not None:
                if not reply(token, names[index], child.attr or attributes(child), index + 3):
                    return
                lookups[child.ino] += 1
                held[child.ino] = child
                continue
            if lean and reply_name is not None:  # lean listings are on only with it
                extra = extras.get(index)
                mode = _S_IFREG if extra is None else fmt.KIND_IFMT[extra.kind]
                if not reply_name(token, names[index], listing.inos[index], mode, index + 3):
                    return
                continue
            if not reply(token, names[index], packed(listing, index), index + 3):
                return
            inodes.count(listing.inos[index], listing, index)

    def _attribute_reader(self, pid: int) -> None:
        """*pid* looked up a name that a lean listing gave it: it reads attributes.

        Its listings carry them from now on. The listings the kernel keeps from lean
        replies are dropped, so that this reader, walking a tree a name walk has listed,
        gets them again with attributes instead of one LOOKUP per entry.
        """
        readers = self.attribute_readers
        readers[pid] = None
        if len(readers) > ATTRIBUTE_READERS_MAX:
            readers.popitem(last=False)
        dirs, self.lean_listed = self.lean_listed, set()
        self.listed_by_kernel.difference_update(dirs)
        # Before the reply, so the reader's next listing is already one with attributes.
        # Inline: an inode invalidation takes no lock a waiting request holds (unlike an
        # entry's, which takes the directory's), and costs a few µs each.
        self._invalidate_listings(dirs)

    def _invalidate_listings(self, dirs: set[int]) -> None:
        for ino in dirs:
            try:
                self.kernel.invalidate_inode(ino)
            except OSError as exc:
                log.debug("invalidate_inode(%d): %s", ino, exc)

    @_boundary
    async def releasedir(self, fh: int, inode: int = 0) -> None:
        self.requests["releasedir"] += 1

    # ------------------------------------------------------------------ files

    @_boundary
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        self.requests["open"] += 1
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        if self.no_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel opens files itself from now on
        node = self.node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @_boundary
    async def read(self, fh: int, off: int, size: int,  # type: ignore[override]  # stock pyfuse3: -> bytes
                   inode: int = 0) -> bytes | Sequence[bytes | memoryview]:
        self.requests["read"] += 1
        ino = fh or inode
        node = self.node(ino)
        if node.entry.kind is not fmt.Kind.FILE:
            raise pyfuse3.FUSEError(errno.EISDIR if node.is_dir else errno.EINVAL)
        emap = self._emaps.get(ino)
        if emap is not None:
            self._emaps.move_to_end(ino)
        else:
            try:
                try:
                    # Inline extents, or an extents object in memory: a thread hop costs more.
                    with self.store.cache_only():
                        emap = self.generation.extent_map(node)
                except NotCached:
                    emap = await self._worker(self.generation.extent_map, node, limiter=None)
            except (CnpsfsError, OSError) as exc:
                raise self._io_error(f"file {fmt.show_path(node.path)}", exc) from None
            self._emaps[ino] = emap  # numbers are never reused, so a map stays right across swaps
            if len(self._emaps) > EMAPS_MAX:
                self._emaps.popitem(last=False)
        if self.recorder is not None:
            self.recorder.read(node.path, off, size, emap.size)
        pieces = list(emap.pieces(off, size))
        missing = [e.digest for e, _i, _n in pieces if e.digest is not None and not self.fetcher.cached(e.digest)]
        if self.prefetched:
            for ext, _i, _n in pieces:
                if ext.digest in self.prefetched:
                    self.prefetched.discard(ext.digest)
                    self.prefetch_hits += 1
        out: list[bytes | memoryview] = []
        if missing:
            self.demand_misses += len(missing)
            self._demand_begin()
        try:
            if len(missing) > 1:
                await self.fetcher.fetch(missing)  # their blocks in parallel, each once
            for ext, inner, n in pieces:
                if ext.digest is None:
                    out.append(memoryview(_ZEROS)[:n] if n <= len(_ZEROS) else bytes(n))
                    continue
                chunk = await self.fetcher.get(ext.digest)
                start = ext.offset + inner
                # A view, not a copy: the reply is copied once, by the kernel (or the join).
                piece = chunk if start == 0 and n == len(chunk) else memoryview(chunk)[start : start + n]
                if len(piece) != n:
                    raise past_the_end(ext, len(chunk))
                out.append(piece)
        except (CnpsfsError, OSError) as exc:
            raise self._io_error(f"reading {fmt.show_path(node.path)} at offset {off}", exc, node=node) from None
        finally:
            if missing:
                self._demand_end()
        end = off + size
        sequential = off == 0 or self._read_end.get(ino) == off
        if sequential and end < emap.size and self.readahead_nursery is not None:
            ahead = [d for d in emap.chunks_for(end, READAHEAD_BYTES) if not self.fetcher.cached(d)]
            if ahead:
                self.readahead_nursery.start_soon(self._prefetch, ahead)
        self._read_end[ino] = end
        if self.read_buffers:
            return out
        return out[0] if len(out) == 1 and isinstance(out[0], bytes) else b"".join(out)

    @property
    def readahead_nursery(self) -> trio.Nursery | None:
        """Where read-ahead runs (the mount's nursery); the fetcher's loads ahead run there too."""
        return self._readahead_nursery

    @readahead_nursery.setter
    def readahead_nursery(self, nursery: trio.Nursery | None) -> None:
        self._readahead_nursery = self.fetcher.nursery = nursery

    async def _prefetch(self, digests: list[bytes]) -> None:
        """Warm the chunk cache; errors are left for the read that needs the chunk to report."""
        try:
            await self.fetcher.fetch(digests)
        except (CnpsfsError, OSError):
            pass
        except Exception:  # a bug: it must not end the nursery, and with it the mount
            log.exception("internal error in read-ahead")

    @_boundary
    async def release(self, fh: int, inode: int = 0) -> None:
        self.requests["release"] += 1

    async def flush(self, fh: int, inode: int = 0) -> None:
        # ENOSYS tells the kernel never to send FLUSH again: nothing to flush here.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    # ------------------------------------------------------------------ generations

    async def swap(self, build: Any) -> tuple[Generation, Any]:
        """Build a new generation with *build(old)* and make it current atomically.

        *build* runs on a worker thread and returns ``(generation, plan)``; directory
        loads are held back meanwhile so the old generation it diffs against is stable.
        If it raises, the current generation stays untouched. The switch itself is one
        assignment on the loop; the kernel is then told to forget what changed.
        """
        if self._swap_done is not None:
            raise CnpsfsError("another swap is in progress")
        self._swap_done = trio.Event()
        try:
            while self._loads_in_flight:
                self._loads_done = trio.Event()
                await self._loads_done.wait()
            old = self.generation
            generation, plan = await trio.to_thread.run_sync(build, old)
            self.generation = generation  # the swap: one assignment, no await before it
            generation.install(old)  # files it kept are counted there from now on
            # Directories that changed keep their numbers: hold the new nodes, not the old
            # ones with their old subtrees (plan.dirs lists every changed one the kernel saw).
            for ino in plan.dirs:
                if ino in self.held:
                    node = generation.nodes.get(ino)
                    if node is not None:
                        self.held[ino] = node
        finally:
            done, self._swap_done = self._swap_done, None
            done.set()
        self.listed_by_kernel.difference_update(plan.dirs)  # the kernel is told to drop these listings
        if self._unload_later:
            self._unload_forgotten()
        await trio.to_thread.run_sync(self._invalidate, plan)
        return generation, plan

    async def drop_kernel_caches(self) -> int:
        """Make the kernel forget this mount's cached names, attributes, pages and listings.

        Every name and inode the kernel holds is invalidated (the root's listing too), so
        from now on what a program touches reaches the handlers: what a profile recording
        needs to see. Negative entries the kernel cached cannot be listed; a lookup of a
        missing name only composes its directory, which is invalidated and so seen again.
        Returns how many inodes were invalidated.
        """
        held = [(node.ino, node.parent, node.path[-1] if node.path else b"") for node in self.held.values()]
        held += self.generation.inodes.held_files()
        self.listed_by_kernel.clear()
        self._read_end.clear()

        def invalidate() -> None:
            for _ino, parent, name in held:
                if name:
                    with contextlib.suppress(OSError):
                        self.kernel.invalidate_entry(parent, name)
            for ino, _parent, _name in [*held, (1, 1, b"")]:
                with contextlib.suppress(OSError):
                    self.kernel.invalidate_inode(ino)

        await trio.to_thread.run_sync(invalidate)
        return len(held)

    def kernel_has(self, ino: int, what: str) -> bool:
        """Whether the kernel already has *what* of *ino*: ``"entry"`` (it looked it up),
        ``"listing"`` (it read the directory's listing) or ``"pages"`` (it started reading
        the file: the rest follows by itself). What a replay racing the program need not
        warm again. Membership tests only: safe from a worker thread."""
        if what == "listing":
            return ino in self.listed_by_kernel
        if what == "pages":
            return ino in self._read_end
        return ino in self.lookups or self.generation.inodes.held_count(ino) > 0

    def _invalidate(self, plan: Any) -> None:
        for parent, name in plan.entries:
            try:
                self.kernel.invalidate_entry(parent, name)
            except OSError as exc:  # ENOENT: the kernel had already dropped it
                log.debug("invalidate_entry(%d, %r): %s", parent, name, exc)
        for ino in plan.dirs:
            try:
                self.kernel.invalidate_inode(ino)
            except OSError as exc:
                log.debug("invalidate_inode(%d): %s", ino, exc)
