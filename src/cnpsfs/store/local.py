"""The local content store: packs of compressed blocks, an SQLite index, and tags.

Layout of a store directory (docs/format.md, "Store layout")::

    cnpsfs-store        marker with the layout version
    index.sqlite        digest -> block record (pack, offsets, lengths, codec); tags; WAL mode
    tags.log            every tag change, appended before it is committed (repair restores tags)
    packs/<id>.pack     immutable files of block records, written once, never modified
    tmp/                packs and spools being written; removed by gc when abandoned
    run/                roots registered by live mounts (gc keeps what they reach)
    lock                flock: writers share it, gc takes it exclusively

Why packs and not one file per object: a root filesystem has tens of thousands of small
objects, and one file each would cost a filesystem block apiece plus an inode. Why
blocks: compressing 64 KiB chunks one by one loses the context between neighbouring
files; 1 MiB blocks store 12 % less at a third of the CPU of a higher zstd level
(docs/performance.md), and objects go in 128 KiB blocks of their own so a cold lookup
decodes metadata only. Deduplication stays per chunk, and blocks are a property of one
store, not of the format: digests never depend on them.

The store is split by concern: :mod:`~cnpsfs.store.index` (all SQL),
:mod:`~cnpsfs.store.packs` (record format, pack files), :mod:`~cnpsfs.store.blocks`
(codecs, partial decoding, the block cache), :mod:`~cnpsfs.store.writer` and
:mod:`~cnpsfs.store.maintenance`; this module composes them into the
:class:`~cnpsfs.store.protocol.Store` the rest of cnpsfs uses.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import zstandard

from cnpsfs import format as fmt
from cnpsfs.errors import (
    CnpsfsError,
    CorruptObjectError,
    MissingObjectError,
    NotFoundError,
    StoreReadOnlyError,
    UsageError,
)
from cnpsfs.store.blocks import BlockCache, BlockStream, decompress_block
from cnpsfs.store.index import Index, Location
from cnpsfs.store.journal import JOURNAL_NAME, TagJournal
from cnpsfs.store.packs import BLOCK_MAGIC, RECORD_HEADER, Member, PackFiles, atomic_write, flock, header_size
from cnpsfs.store.protocol import T_CHUNK, TYPE_NAMES, ChunkLocation, DecodedReads, NotCached, Tag
from cnpsfs.store.writer import DEFAULT_ZSTD_LEVEL, StoreWriter

log = logging.getLogger(__name__)

STORE_MARKER = "cnpsfs-store"
#: Layout 2 records each block's record-header offset in the index (a miss is one pread,
#: no search); layout 1 stores are migrated when first opened writable.
STORE_LAYOUT = "cnpsfs store layout 2\n"
OLD_LAYOUTS = ("cnpsfs store layout 1\n",)

#: Bound on remembered member locations (about 200 bytes each); cleared when reached.
LOCATIONS_MAX = 1 << 18


def _read_only_reason(path: Path) -> str | None:
    """Why this process cannot write the store at *path* (read-only media, permissions), or None."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "on a read-only file system"
    except OSError:
        pass
    for target in (path, path / "index.sqlite"):
        if target.exists() and not os.access(target, os.W_OK):
            return f"{target} is not writable by this user"
    return None


class LocalStore(DecodedReads):
    """A content store in a directory. Thread-safe for readers; writers use :meth:`writer`.

    A store this process cannot write (read-only media such as a read-only NFS export or
    bind mount, or another user's store) opens read-only: the index with SQLite's
    ``mode=ro`` (``immutable=1`` when no WAL is pending), nothing is created or locked
    inside it, and every writing operation raises :class:`StoreReadOnlyError`.
    """

    def __init__(self, path: Path | str, *, create: bool = False, block_cache_bytes: int = 32 << 20) -> None:
        self.path = Path(path)
        marker = self.path / STORE_MARKER
        if not marker.exists():
            if not create:
                raise NotFoundError(f"no cnpsfs store at {self.path} (import something first, or pass --store)")
            self._initialise()
        try:
            layout = marker.read_text()
        except OSError as exc:
            raise CnpsfsError(f"cannot read the store marker {marker}: {exc.strerror}") from None
        if layout != STORE_LAYOUT and layout not in OLD_LAYOUTS:
            raise CnpsfsError(f"{self.path}: unsupported store layout {layout.strip()!r}")
        self.packs_dir = self.path / "packs"
        self.tmp_dir = self.path / "tmp"
        self.run_dir = self.path / "run"
        #: Why the store cannot be written (None: it can); see :meth:`check_writable`.
        self.read_only = _read_only_reason(self.path)
        self.index = Index(self.path / "index.sqlite", readonly=self.read_only is not None)
        self.journal = TagJournal(self.path / JOURNAL_NAME)
        self.packs = PackFiles(self.packs_dir, self.index.pack_name)
        self._local = threading.local()
        self.blocks = BlockCache(block_cache_bytes)
        # Where the members of blocks read through block() live, from their record
        # headers: a directory's neighbours then need no index lookup.
        self._locations: dict[bytes, Location] = {}
        #: Let :meth:`get` use those locations before asking the index (see there).
        self.serve_remembered = False
        if layout != STORE_LAYOUT and self.read_only is None:
            self._migrate(marker)  # a read-only layout 1 store is read as it is (headers found by search)

    def check_writable(self, what: str = "this command") -> None:
        """Raise StoreReadOnlyError naming why, when the store cannot be written."""
        if self.read_only is not None:
            raise StoreReadOnlyError(f"the store {self.path} is read-only ({self.read_only}): {what} needs a"
                                     " writable store")

    def _initialise(self) -> None:
        try:
            for sub in ("", "packs", "tmp", "run"):
                (self.path / sub).mkdir(mode=0o755, parents=True, exist_ok=True)
            Index.create(self.path / "index.sqlite")
            (self.path / "lock").touch()
            atomic_write(self.path / STORE_MARKER, STORE_LAYOUT.encode())
        except OSError as exc:
            raise CnpsfsError(f"cannot create store at {self.path}: {exc.strerror}") from None

    def _migrate(self, marker: Path) -> None:
        """Layout 1 -> 2: record each block's header offset (found once by search), then the marker."""
        with flock(self.path / "lock", fcntl.LOCK_EX):
            if marker.read_text() == STORE_LAYOUT:
                return
            if not self.index.has_header_column():
                self.index.add_header_column()
            blocks = self.index.blocks_without_header()
            with self.index.transaction():
                for loc in blocks:
                    header, _members = self.packs.find_header(loc)
                    self.index.set_block_header(loc.pack, loc.offset, header)
            atomic_write(marker, STORE_LAYOUT.encode())
        log.info("%s: migrated to store layout 2 (%d blocks)", self.path, len(blocks))

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        self.index.close()
        self.packs.close()

    def scratch_dir(self) -> Path:
        self.check_writable("writing")
        self.tmp_dir.mkdir(exist_ok=True)
        return self.tmp_dir

    def describe(self, loc: ChunkLocation) -> str:
        assert isinstance(loc, Location), "a location from another store"
        return self.packs.label(loc)

    pack_label = describe

    def pack_files(self) -> dict[int, str]:
        """Pack id -> pack file name (without ``.pack``)."""
        return {pack: name for pack, name, _size in self.index.packs()}

    def counts(self) -> tuple[int, int, int]:
        """(chunks, other objects, packs) in the index."""
        return self.index.counts()

    def disk_usage(self) -> int:
        """Bytes allocated on disk by the store (what ``du`` reports)."""
        total = 0
        for root, _dirs, files in os.walk(self.path):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(root, name)).st_blocks * 512
        return total

    # ------------------------------------------------------------------ by digest

    def locate(self, digest: bytes) -> Location | None:
        return self.index.locate(digest)

    def locate_many(self, digests: Iterable[bytes]) -> dict[bytes, Location]:
        return self.index.locate_many(digests)

    def contains(self, digest: bytes) -> bool:
        return self.index.contains(digest)

    def existing(self, digests: Iterable[bytes]) -> set[bytes]:
        return self.index.existing(digests)

    def object_type(self, digest: bytes) -> int | None:
        return self.index.object_type(digest)

    def read_block(self, loc: Location) -> bytes:
        """The stored payload of the block at *loc*, as on disk (maybe compressed)."""
        return self.packs.read_payload(loc)

    def block(self, loc: Location) -> bytes:
        """The decompressed block at *loc*, from the cache when possible."""
        key = loc.block
        raw = self.blocks.get(key)
        if raw is None:
            if getattr(self._local, "cache_only", False):
                raise NotCached
            payload, members = self.packs.read_record(loc)
            raw = decompress_block(loc, payload, self._decompressor(), self.describe(loc))
            self.blocks.put(key, raw)
            self._remember(loc, members)
        return raw

    def _remember(self, loc: Location, members: list[Member]) -> None:
        locations = self._locations
        if len(locations) + len(members) > LOCATIONS_MAX:
            locations.clear()
        header = loc.header
        for digest, type_code, inner, length in members:
            locations[digest] = Location(loc.pack, loc.offset, loc.stored, loc.raw, loc.codec, type_code,
                                         inner, length, header)

    @contextlib.contextmanager
    def cache_only(self) -> Iterator[None]:
        """On this thread, let :meth:`get` raise NotCached rather than touch the index or disk.

        For the FUSE loop: what is already in memory it may serve inline, without a
        thread hop; anything else it hands to a worker.
        """
        self._local.cache_only = True
        try:
            yield
        finally:
            self._local.cache_only = False

    def directory_checked(self, digest: bytes) -> bool:
        """Whether a writer of this store found directory object *digest* valid under the
        current rules (the index's ``checked`` table). On a cache-only thread the index is
        not asked and the answer is False: the caller then checks the entries itself."""
        if getattr(self._local, "cache_only", False):
            return False
        return self.index.checked_under(digest) == fmt.DIRECTORY_RULES

    def get(self, digest: bytes) -> bytes:
        """The verified raw bytes of a chunk or object.

        Raises CorruptObjectError when the bytes do not hash to *digest*: a damaged
        store must never hand out wrong bytes.

        With :attr:`serve_remembered` (a mount's daemon sets it), a location remembered
        from a block already read (its record lists every member) is tried before the
        index: a cold directory walk then queries the index once per directory block
        instead of once per directory object, and reads none of its pages from disk for
        the others. The bytes are verified either way, and a remembered location that no
        longer holds them (gc repacked the pack away) falls back to the index. Off by
        default, so verify, gc and repair see exactly what the index says.
        """
        cache_only = getattr(self._local, "cache_only", False)
        loc = self._locations.get(digest) if cache_only or self.serve_remembered else None
        if loc is not None:
            try:
                return self._read_verified(digest, loc)
            except (CnpsfsError, FileNotFoundError):
                self._locations.pop(digest, None)
                if cache_only:
                    raise
        elif cache_only:
            # The index stays the authority everywhere else (verify, gc); this mode
            # serves only what a block already read says it holds, verified.
            raise NotCached
        for attempt in (0, 1):
            loc = self.index.locate(digest)
            if loc is None:
                raise MissingObjectError(f"{fmt.format_digest(digest)} is not in the store")
            try:
                return self._read_verified(digest, loc)
            except FileNotFoundError:
                # gc may have repacked between our index lookup and open: look again once.
                if attempt:
                    raise MissingObjectError(f"{fmt.format_digest(digest)}: its pack is gone") from None
                self.packs.forget(loc.pack)
        raise AssertionError("unreachable")

    def _read_verified(self, digest: bytes, loc: Location) -> bytes:
        raw = self.block(loc)
        data = raw[loc.inner : loc.inner + loc.length]
        if len(data) != loc.length or fmt.digest_bytes(data) != digest:
            self.blocks.drop(loc.block)
            self._locations.pop(digest, None)
            raise CorruptObjectError(f"{TYPE_NAMES.get(loc.type, 'object')} {fmt.format_digest(digest)}"
                                     " is corrupt: its bytes do not match its digest"
                                     f" (block at {self.describe(loc)})")
        return data

    def open_block(self, loc: ChunkLocation) -> BlockStream:
        """The block at *loc*, to be decoded front to back as far as readers need (see BlockStream).

        Locations are opaque above the store, so the protocol takes any; only this store's
        own (:class:`Location`) are valid here.
        """
        assert isinstance(loc, Location), "a location from another store"
        payload, members = self.packs.read_record_view(loc)
        # A whole-block decode uses the calling thread's context; a stream that has to keep
        # state between calls (possibly on other threads) makes its own.
        return BlockStream(loc, payload, members, self._decompressor, self.describe(loc))

    def open_next_block(self, loc: ChunkLocation) -> tuple[Location, BlockStream] | None:
        """The data block stored right after *loc*'s in its pack (its location, and ready to
        decode); None at the pack's end or when the next record holds objects, not chunks.

        A read hint for front-to-back readers (tar, an export): small files are stored
        together in path order, so the block after the one being finished holds the next
        files. The record is checked like any other and every member verified on decode;
        blocking I/O: call on a worker.
        """
        assert isinstance(loc, Location), "a location from another store"
        start = loc.offset + loc.stored
        head = self.packs.pread(loc.pack, RECORD_HEADER.size, start)
        if len(head) < RECORD_HEADER.size:
            return None
        magic, codec, stored, raw, count = RECORD_HEADER.unpack(head)
        if magic != BLOCK_MAGIC or not count:
            return None
        after = Location(loc.pack, start + header_size(count), stored, raw, codec, T_CHUNK, 0, 0, start)
        stream = self.open_block(after)
        return (after, stream) if all(m[1] == T_CHUNK for m in stream.members) else None

    def prefetch(self, locs: Iterable[ChunkLocation]) -> None:
        """Ask the kernel to start reading these blocks' records (``POSIX_FADV_WILLNEED``).

        The fetcher calls this with the blocks of a read-ahead, which it then decodes on
        several workers: without it each worker's pread waits for the disk in turn, and
        eight readers' preads interleaved on one pack descriptor defeat the kernel's own
        sequential read-ahead. Only starts I/O (never waits for data) and only on packs
        already open, so it is safe on the trio loop.
        """
        self.packs.advise(loc for loc in locs if isinstance(loc, Location))

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "dctx", None)
        if d is None:
            d = self._local.dctx = zstandard.ZstdDecompressor()
        return d

    # ------------------------------------------------------------------ tags & refs

    def set_tag(self, name: str, version: str, type_code: int, digest: bytes) -> None:
        """Point NAME@VERSION at *digest*: journalled first (tags.log), then committed."""
        self.check_writable("setting a tag")
        tag = Tag(name, version, type_code, digest, time.time_ns())
        with self.shared_lock():
            previous = self.index.tag_rows([(name, version)])
            self.journal.record_set([tag], seed=self._journal_seed())
            try:
                self.index.set_tag(name, version, type_code, digest, tag.created_ns)
            except BaseException:
                self.journal.revert([(name, version)], previous)
                raise

    def remove_tag(self, name: str, version: str) -> bool:
        self.check_writable("removing a tag")
        with self.shared_lock():
            previous = self.index.tag_rows([(name, version)])
            if not previous:
                return False
            self.journal.record_remove(name, version, time.time_ns(), seed=self._journal_seed())
            try:
                return self.index.remove_tag(name, version)
            except BaseException:
                self.journal.revert([(name, version)], previous)
                raise

    def _journal_seed(self) -> list[Tag]:
        """The index's tags, to start a missing journal from (read only when it is missing)."""
        return [] if self.journal.path.exists() else self.index.tags()

    def tags(self, type_code: int | None = None) -> list[Tag]:
        return self.index.tags(type_code)

    def tags_for(self, digest: bytes) -> list[Tag]:
        return self.index.tags_for(digest)

    # ------------------------------------------------------------------ detached objects and revisions

    def attachments(self, subject: bytes | None = None) -> list[tuple[bytes, bytes]]:
        """Detached objects (signatures, provenance records) as (subject, object digest):
        those of *subject*, or all. They name an image or FileSet without being part of its
        digest (docs/format.md 2.2); gc keeps them exactly as long as their subject."""
        return self.index.attachments(subject)

    def detach(self, subject: bytes, digest: bytes) -> bool:
        """Stop filing *digest* under *subject* (the object goes at the next gc)."""
        return self.index.detach([(subject, digest)]) > 0

    def accepted_revision(self, name: str) -> tuple[int, bytes] | None:
        return self.index.accepted_revision(name)

    def record_revision(self, name: str, revision: int, digest: bytes) -> None:
        self.index.record_revision(name, revision, digest)

    def resolve(self, ref: str, *, want: int | None = None) -> bytes:
        """Turn a reference into a digest.

        A reference is ``blake3:<hex>`` (a unique prefix of at least 4 hex digits is
        enough), ``NAME@VERSION``, or ``NAME`` for the most recently tagged version.
        *want* restricts the object type (T_FILESET or T_IMAGE).
        """
        what = TYPE_NAMES.get(want, "object") if want is not None else "object"
        if ref.startswith(fmt.DIGEST_PREFIX):
            digest = self._resolve_prefix(ref[len(fmt.DIGEST_PREFIX):].lower(), ref)
        else:
            name, _, version = ref.partition("@")
            found = self.index.tag(name, version or None)
            if found is None:
                raise NotFoundError(f"unknown reference {ref!r}: no such tag in {self.path}")
            digest = found
        if want is not None:
            actual = self.object_type(digest)
            if actual is None:
                raise MissingObjectError(f"{ref}: {fmt.format_digest(digest)} is not in the store")
            if actual != want:
                raise UsageError(f"{ref} is a {TYPE_NAMES.get(actual, '?')}, not a {what}")
        return digest

    def _resolve_prefix(self, hexpart: str, ref: str) -> bytes:
        if not re.fullmatch(r"[0-9a-f]{4,64}", hexpart):
            raise UsageError(f"bad digest reference {ref!r}: need 4 to 64 hex digits after 'blake3:'")
        if len(hexpart) == 64:
            digest = bytes.fromhex(hexpart)
            if not self.contains(digest):
                raise NotFoundError(f"unknown reference {ref!r}: not in {self.path}")
            return digest
        low = bytes.fromhex(hexpart[: len(hexpart) & ~1].ljust(2, "0")) if len(hexpart) > 1 else b""
        matches = [d for d in self.index.digests_from(low, 4096) if d.hex().startswith(hexpart)]
        if not matches:
            raise NotFoundError(f"unknown reference {ref!r}: no FileSet or image has that digest prefix")
        if len(matches) > 1:
            raise UsageError(f"ambiguous reference {ref!r}: {len(matches)} objects share that prefix")
        return matches[0]

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def shared_lock(self) -> Iterator[None]:
        """Held by writers so gc (which takes it exclusively) never sweeps under them."""
        self.check_writable()
        with flock(self.path / "lock", fcntl.LOCK_SH):
            yield

    @contextlib.contextmanager
    def writer(self, *, level: int | None = None,
               pool: concurrent.futures.Executor | None = None) -> Iterator[StoreWriter]:
        """A writer whose objects become visible only when :meth:`StoreWriter.commit` runs."""
        self.check_writable("writing")
        with self.shared_lock():
            w = StoreWriter(self, DEFAULT_ZSTD_LEVEL if level is None else level, pool)
            try:
                yield w
            finally:
                w.discard()

