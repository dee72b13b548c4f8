"""The local content store: packs of compressed blobs, an SQLite index, and tags.

Layout of a store directory (docs/format.md, "Store layout")::

    cnpsfs-store        marker with the layout version
    index.sqlite        digest -> (pack, offset, lengths, codec); tags; WAL mode
    packs/<id>.pack     immutable files of records, written once, never modified
    tmp/                packs and spools being written; removed by gc when abandoned
    run/                roots registered by live mounts (gc keeps what they reach)
    lock                flock: writers share it, gc takes it exclusively

Why packs and not one file per object: a root filesystem has tens of thousands of small
objects, and one file each would cost a filesystem block apiece (du would count 4 KiB for
a 300-byte chunk) plus an inode. A pack record is written once and found through the
index, so a read touches only the record that holds the chunk it needs.

Why blocks: new chunks are grouped into *blocks* of about BLOCK_TARGET bytes, each
compressed as one zstd frame. Compressing 64 KiB chunks one by one loses the context
between neighbouring files; measured on a Debian root filesystem (docs/performance.md)
1 MiB blocks store 12% less than per-chunk compression at a third of the CPU cost of a
higher zstd level. A read decompresses one block (about 1 ms), and the block cache
makes neighbouring chunks free. Objects (directories, extent lists, FileSets, images)
go in separate blocks of about META_BLOCK_TARGET bytes, so a cold directory lookup
decodes a small block of metadata, not a megabyte of file data that happens to sit
beside it. Deduplication stays per chunk: only new chunks enter blocks. Blocks are a
property of one store, not of the format: digests never depend on them.

Write protocol (crash safety): records are appended to ``tmp/<id>.pack``; commit fsyncs
it, renames it into ``packs/``, fsyncs the directory, and only then inserts the index rows
and tags in one SQLite transaction. A process killed at any point leaves either nothing
visible or everything; an orphaned temporary pack is invisible and gc deletes it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import sqlite3
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError, CorruptObjectError, MissingObjectError, NotFoundError, UsageError

log = logging.getLogger(__name__)

STORE_MARKER = "cnpsfs-store"
STORE_LAYOUT = "cnpsfs store layout 1\n"
PACK_MAGIC = b"CNPSPK01"
RECORD_HEADER = struct.Struct("<4sBII I")  # b"BLK1", codec, stored length, raw length, member count
MEMBER_HEADER = struct.Struct("<32sBI")  # digest, type code, length (members follow in payload order)
BLOCK_MAGIC = b"BLK1"
BLOCK_TARGET = 1 << 20
#: Directory, extents, FileSet and image objects go in blocks of their own, smaller ones:
#: a cold lookup then decodes metadata only, and little of it.
META_BLOCK_TARGET = 128 << 10
PACK_ROLLOVER = 1 << 30

CODEC_RAW = 0
CODEC_ZSTD = 1

# Type codes in the index and in pack record headers.
T_CHUNK = 0
T_DIR = 1
T_EXTENTS = 2
T_FILESET = 3
T_IMAGE = 4
TYPE_CODES = {fmt.TYPE_DIR: T_DIR, fmt.TYPE_EXTENTS: T_EXTENTS, fmt.TYPE_FILESET: T_FILESET,
              fmt.TYPE_IMAGE: T_IMAGE}
TYPE_NAMES = {T_CHUNK: "chunk", T_DIR: "directory", T_EXTENTS: "extents", T_FILESET: "fileset",
              T_IMAGE: "image"}

DEFAULT_ZSTD_LEVEL = 9

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(/[A-Za-z0-9._+-]+)+$")
VERSION_RE = re.compile(r"^[A-Za-z0-9._+~:-]+$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS packs(
    id INTEGER PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS objects(
    digest BLOB PRIMARY KEY,
    type INTEGER NOT NULL,
    pack INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    stored INTEGER NOT NULL,
    raw INTEGER NOT NULL,
    codec INTEGER NOT NULL,
    inner INTEGER NOT NULL,
    length INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS objects_by_pack ON objects(pack);
CREATE TABLE IF NOT EXISTS tags(
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    type INTEGER NOT NULL,
    digest BLOB NOT NULL,
    created_ns INTEGER NOT NULL,
    PRIMARY KEY(name, version)
);
"""


def default_store_path() -> Path:
    """``$CNPSFS_STORE``, else /var/lib/cnpsfs for root, else ``$XDG_DATA_HOME/cnpsfs``."""
    env = os.environ.get("CNPSFS_STORE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/cnpsfs")
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data_home) / "cnpsfs"


def check_tag_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise UsageError(
            f"invalid name {name!r}: expected a DNS-rooted name such as debian.org/bash "
            "(lower-case domain, then one or more /path components)"
        )


def check_tag_version(version: str) -> None:
    if not VERSION_RE.match(version):
        raise UsageError(f"invalid version {version!r}: use letters, digits and . _ + ~ : -")


class NotCached(Exception):
    """Raised in :meth:`Store.cache_only` mode when a read would need the index or the disk."""


#: Bound on remembered member locations (about 200 bytes each); cleared when reached.
LOCATIONS_MAX = 1 << 18


@dataclass(frozen=True, slots=True)
class Location:
    """Where a chunk or object lives: a block (pack, offset, sizes, codec) and its slice."""

    pack: int
    offset: int
    stored: int
    raw: int
    codec: int
    type: int
    inner: int
    length: int


@dataclass(frozen=True, slots=True)
class Tag:
    name: str
    version: str
    type: int
    digest: bytes
    created_ns: int

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class Store:
    """A content store on disk. Thread-safe for readers; writers use :meth:`writer`."""

    def __init__(self, path: Path | str, *, create: bool = False, block_cache_bytes: int = 32 << 20) -> None:
        self.path = Path(path)
        marker = self.path / STORE_MARKER
        if not marker.exists():
            if not create:
                raise NotFoundError(f"no cnpsfs store at {self.path} (import something first, or pass --store)")
            self._initialise()
        elif marker.read_text() != STORE_LAYOUT:
            raise CnpsfsError(f"{self.path}: unsupported store layout {marker.read_text().strip()!r}")
        self.packs_dir = self.path / "packs"
        self.tmp_dir = self.path / "tmp"
        self.run_dir = self.path / "run"
        self._local = threading.local()
        self._pack_fds: dict[int, int] = {}
        self._pack_names: dict[int, str] = {}
        self._pack_lock = threading.Lock()
        self.blocks = BlockCache(block_cache_bytes)
        # Where the members of blocks read through block() live, from their record
        # headers: a directory's neighbours then need no index lookup.
        self._locations: dict[bytes, Location] = {}

    def _initialise(self) -> None:
        try:
            for sub in ("", "packs", "tmp", "run"):
                (self.path / sub).mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise CnpsfsError(f"cannot create store at {self.path}: {exc.strerror}") from None
        db = sqlite3.connect(self.path / "index.sqlite")
        with db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
        db.close()
        (self.path / "lock").touch()
        _atomic_write(self.path / STORE_MARKER, STORE_LAYOUT.encode())

    # ------------------------------------------------------------------ index access

    @property
    def db(self) -> sqlite3.Connection:
        """One SQLite connection per thread (connections are not shareable across threads)."""
        conn = getattr(self._local, "db", None)
        if conn is None:
            conn = sqlite3.connect(self.path / "index.sqlite", timeout=60, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=60000")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.db = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "db", None)
        if conn is not None:
            conn.close()
            self._local.db = None
        with self._pack_lock:
            for fd in self._pack_fds.values():
                os.close(fd)
            self._pack_fds.clear()

    def locate(self, digest: bytes) -> Location | None:
        row = self.db.execute(
            "SELECT pack, offset, stored, raw, codec, type, inner, length FROM objects WHERE digest=?", (digest,)
        ).fetchone()
        return Location(*row) if row else None

    def contains(self, digest: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM objects WHERE digest=?", (digest,)).fetchone() is not None

    def existing(self, digests: Iterable[bytes]) -> set[bytes]:
        """The subset of *digests* already stored (batched for import dedup)."""
        found: set[bytes] = set()
        batch = list(digests)
        for start in range(0, len(batch), 500):
            part = batch[start : start + 500]
            marks = ",".join("?" * len(part))
            found.update(row[0] for row in self.db.execute(
                f"SELECT digest FROM objects WHERE digest IN ({marks})", part))
        return found

    # ------------------------------------------------------------------ reading

    def _pack_fd(self, pack: int) -> int:
        fd = self._pack_fds.get(pack)
        if fd is not None:
            return fd
        with self._pack_lock:
            fd = self._pack_fds.get(pack)
            if fd is None:
                name = self._pack_name(pack)
                fd = os.open(self.packs_dir / f"{name}.pack", os.O_RDONLY | os.O_CLOEXEC)
                self._pack_fds[pack] = fd
            return fd

    def pack_label(self, loc: Location) -> str:
        """Where a block is, for messages: ``<pack name>.pack offset <n>``."""
        return f"{self._pack_name(loc.pack)}.pack offset {loc.offset}"

    def _pack_name(self, pack: int) -> str:
        name = self._pack_names.get(pack)
        if name is None:
            row = self.db.execute("SELECT name FROM packs WHERE id=?", (pack,)).fetchone()
            if row is None:
                raise MissingObjectError(f"pack {pack} is missing from the index")
            name = self._pack_names[pack] = row[0]
        return name

    def read_block(self, loc: Location) -> bytes:
        """The stored payload of the block at *loc*, as on disk (maybe compressed)."""
        payload = os.pread(self._pack_fd(loc.pack), loc.stored, loc.offset)
        if len(payload) != loc.stored:
            raise CorruptObjectError(f"pack {self._pack_name(loc.pack)} is truncated at offset {loc.offset}")
        return payload

    def block(self, loc: Location) -> bytes:
        """The decompressed block at *loc*, from the cache when possible."""
        key = (loc.pack, loc.offset)
        raw = self.blocks.get(key)
        if raw is None:
            if getattr(self._local, "cache_only", False):
                raise NotCached
            raw, members = self.block_members(loc)
            self.blocks.put(key, raw)
            locations = self._locations
            if len(locations) + len(members) > LOCATIONS_MAX:
                locations.clear()
            for digest, type_code, inner, length in members:
                locations[digest] = Location(loc.pack, loc.offset, loc.stored, loc.raw, loc.codec, type_code,
                                             inner, length)
        return raw

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

    def get(self, digest: bytes) -> bytes:
        """The verified raw bytes of a chunk or object.

        Raises CorruptObjectError when the bytes do not hash to *digest*: a damaged
        store must never hand out wrong bytes.
        """
        for attempt in (0, 1):
            if getattr(self._local, "cache_only", False):
                # The index stays the authority everywhere else (verify, gc); this mode
                # serves only what a block already read says it holds, verified below.
                loc = self._locations.get(digest)
                if loc is None:
                    raise NotCached
            else:
                loc = self.locate(digest)
            if loc is None:
                raise MissingObjectError(f"{fmt.format_digest(digest)} is not in the store")
            try:
                raw = self.block(loc)
            except FileNotFoundError:
                # gc may have repacked between our index lookup and open: look again once.
                if attempt:
                    raise MissingObjectError(f"{fmt.format_digest(digest)}: its pack is gone") from None
                self._pack_names.pop(loc.pack, None)
                continue
            data = raw[loc.inner : loc.inner + loc.length]
            if len(data) != loc.length or fmt.digest_bytes(data) != digest:
                self.blocks.drop((loc.pack, loc.offset))
                self._locations.pop(digest, None)
                raise CorruptObjectError(f"{TYPE_NAMES.get(loc.type, 'object')} {fmt.format_digest(digest)}"
                                         " is corrupt: its bytes do not match its digest"
                                         f" (block at {self.pack_label(loc)})")
            return data
        raise AssertionError("unreachable")

    def block_members(self, loc: Location) -> tuple[bytes, list[tuple[bytes, int, int, int]]]:
        """The decoded block at *loc* (not cached) and its members: (digest, type, inner, length)."""
        payload, members = self.block_record(loc)
        return decompress_block(loc, payload, self._decompressor(), self.pack_label(loc)), members

    def block_stream(self, loc: Location) -> BlockStream:
        """The block at *loc*, to be decoded front to back as far as readers need (see BlockStream)."""
        payload, members = self.block_record(loc)
        # A stream keeps its decompression context between calls, possibly on other
        # threads: it gets its own, never the per-thread one.
        return BlockStream(loc, payload, members, zstandard.ZstdDecompressor(), self.pack_label(loc))

    def block_record(self, loc: Location) -> tuple[bytes, list[tuple[bytes, int, int, int]]]:
        """The stored payload of the block at *loc* and its members: (digest, type, inner, length).

        The members come from the record header in front of the payload (docs/format.md
        2.1), read by the same pread: one index lookup then names every chunk of a block.
        The header is found by trying each member count from the payload backwards; a
        match must agree with the index on codec and both lengths and its member lengths
        must add up, and every member is verified against its digest before use anyway.
        """
        window = min(loc.offset, 8192)
        while True:
            data = os.pread(self._pack_fd(loc.pack), loc.stored + window, loc.offset - window)
            if len(data) != loc.stored + window:
                raise CorruptObjectError(f"pack {self._pack_name(loc.pack)} is truncated at offset {loc.offset}")
            members = _parse_members(data, window, loc)
            if members is not None:
                break
            if window == loc.offset:
                raise CorruptObjectError(f"block at {self.pack_label(loc)}:"
                                         " no record header in front of it")
            window = min(loc.offset, window * 8)
        return data[window:], members

    def locate_many(self, digests: Iterable[bytes]) -> dict[bytes, Location]:
        """Locations of the stored *digests* (absent ones are left out), in batched queries."""
        found: dict[bytes, Location] = {}
        batch = list(digests)
        for start in range(0, len(batch), 500):
            part = batch[start : start + 500]
            marks = ",".join("?" * len(part))
            for row in self.db.execute("SELECT digest, pack, offset, stored, raw, codec, type, inner, length"
                                       f" FROM objects WHERE digest IN ({marks})", part):
                found[row[0]] = Location(*row[1:])
        return found

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "dctx", None)
        if d is None:
            d = self._local.dctx = zstandard.ZstdDecompressor()
        return d

    def get_directory(self, digest: bytes) -> fmt.Directory:
        return fmt.decode_directory(self.get(digest))

    def get_fileset(self, digest: bytes) -> fmt.FileSet:
        return fmt.decode_fileset(self.get(digest))

    def get_image(self, digest: bytes) -> fmt.Image:
        return fmt.decode_image(self.get(digest))

    def file_extents(self, entry: fmt.Entry) -> tuple[fmt.Extent, ...]:
        if entry.content is not None:
            return fmt.decode_extents_object(self.get(entry.content))
        return entry.extents or ()

    def counts(self) -> tuple[int, int, int]:
        """(chunks, other objects, packs) in the index."""
        db = self.db
        chunks = db.execute("SELECT count(*) FROM objects WHERE type=?", (T_CHUNK,)).fetchone()[0]
        objects = db.execute("SELECT count(*) FROM objects WHERE type<>?", (T_CHUNK,)).fetchone()[0]
        packs = db.execute("SELECT count(*) FROM packs").fetchone()[0]
        return chunks, objects, packs

    def object_type(self, digest: bytes) -> int | None:
        row = self.db.execute("SELECT type FROM objects WHERE digest=?", (digest,)).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------------ tags & refs

    def set_tag(self, name: str, version: str, type_code: int, digest: bytes) -> None:
        with self.transaction() as db:
            self._insert_tag(db, name, version, type_code, digest)

    @staticmethod
    def _insert_tag(db: sqlite3.Connection, name: str, version: str, type_code: int, digest: bytes) -> None:
        db.execute(
            "INSERT OR REPLACE INTO tags(name, version, type, digest, created_ns) VALUES (?,?,?,?,?)",
            (name, version, type_code, digest, time.time_ns()),
        )

    def remove_tag(self, name: str, version: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM tags WHERE name=? AND version=?", (name, version)).rowcount > 0

    def tags(self, type_code: int | None = None) -> list[Tag]:
        sql = "SELECT name, version, type, digest, created_ns FROM tags"
        args: tuple[int, ...] = ()
        if type_code is not None:
            sql += " WHERE type=?"
            args = (type_code,)
        return [Tag(*row) for row in self.db.execute(sql + " ORDER BY name, created_ns, version", args)]

    def tags_for(self, digest: bytes) -> list[Tag]:
        rows = self.db.execute(
            "SELECT name, version, type, digest, created_ns FROM tags WHERE digest=? ORDER BY name, version",
            (digest,))
        return [Tag(*row) for row in rows]

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
            if version:
                row = self.db.execute("SELECT digest FROM tags WHERE name=? AND version=?",
                                      (name, version)).fetchone()
            else:
                row = self.db.execute(
                    "SELECT digest FROM tags WHERE name=? ORDER BY created_ns DESC, version DESC LIMIT 1",
                    (name,)).fetchone()
            if row is None:
                raise NotFoundError(f"unknown reference {ref!r}: no such tag in {self.path}")
            digest = row[0]
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
        rows = self.db.execute(
            "SELECT digest FROM objects WHERE digest >= ? AND type IN (?, ?) ORDER BY digest LIMIT 4096",
            (low, T_FILESET, T_IMAGE)).fetchall()
        matches = [r[0] for r in rows if r[0].hex().startswith(hexpart)]
        if not matches:
            raise NotFoundError(f"unknown reference {ref!r}: no FileSet or image has that digest prefix")
        if len(matches) > 1:
            raise UsageError(f"ambiguous reference {ref!r}: {len(matches)} objects share that prefix")
        return matches[0]

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @contextlib.contextmanager
    def shared_lock(self) -> Iterator[None]:
        """Held by writers so gc (which takes it exclusively) never sweeps under them."""
        with _flock(self.path / "lock", fcntl.LOCK_SH):
            yield

    @contextlib.contextmanager
    def writer(self, *, level: int = DEFAULT_ZSTD_LEVEL,
               pool: concurrent.futures.Executor | None = None) -> Iterator[StoreWriter]:
        """A writer whose objects become visible only when :meth:`StoreWriter.commit` runs."""
        with self.shared_lock():
            w = StoreWriter(self, level, pool)
            try:
                yield w
            finally:
                w.discard()

    def pack_files(self) -> dict[int, str]:
        return {row[0]: row[1] for row in self.db.execute("SELECT id, name FROM packs")}

    def disk_usage(self) -> int:
        """Bytes allocated on disk by the store (what ``du`` reports)."""
        total = 0
        for root, _dirs, files in os.walk(self.path):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(root, name)).st_blocks * 512
        return total


def decompress_block(loc: Location, payload: bytes, dctx: zstandard.ZstdDecompressor, where: str) -> bytes:
    """The decoded block; *where* names it in errors (:meth:`Store.pack_label`)."""
    if loc.codec == CODEC_ZSTD:
        try:
            raw = dctx.decompress(payload, max_output_size=loc.raw)
        except zstandard.ZstdError:
            raise CorruptObjectError(f"block at {where} does not decompress") from None
    elif loc.codec == CODEC_RAW:
        raw = payload
    else:
        raise CorruptObjectError(f"block at {where}: unknown codec {loc.codec}")
    if len(raw) != loc.raw:
        raise CorruptObjectError(f"block at {where} has the wrong size")
    return raw


class BlockStream:
    """A block decoded front to back, only as far as its readers have needed so far.

    A mount's small reads land anywhere in a 1 MiB block; decoding the whole block for
    a 4 KiB file at its start costs most of a cold random read (python start-up reads
    about 70 blocks). A stream decodes up to the end of the members wanted, hands out
    the members completed on the way, verified, and continues from there on the next
    miss, so a block read front to back (a sequential reader) is still decoded once.
    Not thread-safe: one load of a block runs at a time (the FUSE layer's single flight).
    """

    #: Decode at least this far past the wanted members: their neighbours come cheap.
    SLACK = 128 << 10

    def __init__(self, loc: Location, payload: bytes, members: list[tuple[bytes, int, int, int]],
                 dctx: zstandard.ZstdDecompressor, where: str) -> None:
        self.loc = loc
        self.members = members  # in block order: inner offsets ascend
        self._where = where
        self._next = 0  # first member not handed out yet
        if loc.codec == CODEC_ZSTD:
            self._reader: Any = dctx.stream_reader(payload)
            self.data = bytearray()
        elif loc.codec == CODEC_RAW:
            self._reader = None
            self.data = bytearray(payload)
        else:
            raise CorruptObjectError(f"block at {where}: unknown codec {loc.codec}")

    @property
    def done(self) -> bool:
        return self._next >= len(self.members)

    @property
    def decoded(self) -> int:
        """How far the block is decoded (members ending there or before are complete)."""
        return len(self.data)

    def advance(self, upto: int) -> dict[bytes, bytes | None]:
        """Decode through byte *upto* (plus slack); the members completed by it, in order.

        Values are the verified bytes, or None for a member that does not match its
        digest. Raises CorruptObjectError when the payload does not decode.
        """
        want = min(self.loc.raw, max(upto + self.SLACK, self.decoded))
        while self.decoded < want and self._reader is not None:
            try:
                piece = self._reader.read(want - self.decoded)
            except zstandard.ZstdError:
                piece = b""
            if not piece:
                raise CorruptObjectError(f"block at {self._where} does not decompress")
            self.data += piece
        out: dict[bytes, bytes | None] = {}
        view = memoryview(self.data)
        members = self.members
        while self._next < len(members):
            digest, _type, inner, length = members[self._next]
            if inner + length > self.decoded:
                break
            data = bytes(view[inner : inner + length])
            out[digest] = data if fmt.digest_bytes(data) == digest else None
            self._next += 1
        view.release()
        if self.done:
            self.data = bytearray()  # handed out: the chunk cache holds what is wanted now
        return out


def _parse_members(data: bytes, window: int, loc: Location) -> list[tuple[bytes, int, int, int]] | None:
    """Members of the record whose payload starts at data[window:], or None if not found there."""
    for count in range((window - RECORD_HEADER.size) // MEMBER_HEADER.size + 1):
        start = window - RECORD_HEADER.size - count * MEMBER_HEADER.size
        magic, codec, stored, raw, n = RECORD_HEADER.unpack_from(data, start)
        if magic != BLOCK_MAGIC or n != count or codec != loc.codec or stored != loc.stored or raw != loc.raw:
            continue
        members = []
        inner = 0
        for digest, type_code, length in MEMBER_HEADER.iter_unpack(data[start + RECORD_HEADER.size : window]):
            members.append((digest, type_code, inner, length))
            inner += length
        if inner == raw:
            return members
    return None


class BlockCache:
    """A thread-safe LRU of decompressed blocks, bounded in bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> bytes | None:
        with self._lock:
            data = self._data.get(key)
            if data is not None:
                self._data.move_to_end(key)
            return data

    def put(self, key: tuple[int, int], data: bytes) -> None:
        if len(data) > self.capacity:
            return
        with self._lock:
            if key in self._data:
                return
            self._data[key] = data
            self._size += len(data)
            while self._size > self.capacity:
                _k, old = self._data.popitem(last=False)
                self._size -= len(old)

    def drop(self, key: tuple[int, int]) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._size -= len(old)


@dataclass(slots=True)
class _OpenBlock:
    members: list[tuple[bytes, int, bytes]] = field(default_factory=list)  # (digest, type, data)
    size: int = 0


def compress_block(members: list[tuple[bytes, int, bytes]], cctx: zstandard.ZstdCompressor) -> tuple[int, bytes, int]:
    """(codec, payload, raw length) for a block; stored raw when compression does not help."""
    raw = b"".join(data for _d, _t, data in members)
    compressed = cctx.compress(raw)
    if len(compressed) < len(raw):
        return CODEC_ZSTD, compressed, len(raw)
    return CODEC_RAW, raw, len(raw)


_BlockFuture = concurrent.futures.Future[tuple[int, bytes, int]]  # (codec, payload, raw length)


class StoreWriter:
    """Groups new chunks into blocks in private temporary packs; :meth:`commit` publishes them.

    Chunks are added from one thread, in order; blocks are compressed on *pool* when one
    is given (several at once), and written to the pack in the order they were sealed.
    """

    def __init__(self, store: Store, level: int, pool: concurrent.futures.Executor | None = None) -> None:
        self.store = store
        self.level = level
        self.pool = pool
        self._local = threading.local()
        # digest -> (writer pack#, offset, stored, raw, codec, type, inner, length); None while in an open block
        self._new: dict[bytes, tuple[int, int, int, int, int, int, int, int] | None] = {}
        self._open = _OpenBlock()  # file chunks
        self._open_meta = _OpenBlock()  # objects: kept apart from file data
        self._sealed: deque[tuple[list[tuple[bytes, int, bytes]], _BlockFuture]] = deque()
        self._packs: list[tuple[Path, int]] = []  # (tmp path, fd)
        self._current_size = 0
        self._committed = False
        self.bytes_written = 0

    def compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(level=self.level)
        return c

    def has(self, digest: bytes) -> bool:
        return digest in self._new or self.store.contains(digest)

    def _open_pack(self) -> int:
        self.store.tmp_dir.mkdir(exist_ok=True)
        path = self.store.tmp_dir / f"{secrets.token_hex(16)}.pack"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        # The lock tells gc this temporary pack belongs to a live writer.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, PACK_MAGIC)
        self._packs.append((path, fd))
        self._current_size = len(PACK_MAGIC)
        return fd

    def add_chunk(self, digest: bytes, data: bytes, type_code: int = T_CHUNK) -> None:
        """Queue a blob for the current block unless the store or this writer has it."""
        if digest in self._new:
            return
        self._new[digest] = None
        meta = type_code != T_CHUNK
        block = self._open_meta if meta else self._open
        block.members.append((digest, type_code, data))
        block.size += len(data)
        if block.size >= (META_BLOCK_TARGET if meta else BLOCK_TARGET):
            self.seal(meta=meta)

    def seal(self, *, meta: bool = False) -> None:
        """Close the open data block (or metadata block): compress it on the pool and queue it."""
        if meta:
            members, self._open_meta = self._open_meta.members, _OpenBlock()
        else:
            members, self._open = self._open.members, _OpenBlock()
        if not members:
            return
        if self.pool is not None:
            future = self.pool.submit(self._compress, members)
        else:
            future = concurrent.futures.Future()
            future.set_result(self._compress(members))
        self._sealed.append((members, future))
        while len(self._sealed) > 4 or (self._sealed and self._sealed[0][1].done()):
            self._write_sealed()

    def _compress(self, members: list[tuple[bytes, int, bytes]]) -> tuple[int, bytes, int]:
        return compress_block(members, self.compressor())

    def _write_sealed(self) -> None:
        members, future = self._sealed.popleft()
        codec, payload, raw_len = future.result()
        if not self._packs or self._current_size >= PACK_ROLLOVER:
            self._open_pack()
        fd = self._packs[-1][1]
        header = bytearray(RECORD_HEADER.pack(BLOCK_MAGIC, codec, len(payload), raw_len, len(members)))
        for digest, type_code, data in members:
            header += MEMBER_HEADER.pack(digest, type_code, len(data))
        _write_all(fd, header)
        offset = self._current_size + len(header)
        _write_all(fd, payload)
        self._current_size = offset + len(payload)
        self.bytes_written += len(header) + len(payload)
        pack = len(self._packs) - 1
        inner = 0
        for digest, type_code, data in members:
            self._new[digest] = (pack, offset, len(payload), raw_len, codec, type_code, inner, len(data))
            inner += len(data)

    def flush(self) -> None:
        self.seal()
        self.seal(meta=True)
        while self._sealed:
            self._write_sealed()

    def add(self, data: bytes, type_code: int) -> bytes:
        """Hash and queue *data*; returns its digest."""
        digest = fmt.digest_bytes(data)
        if not self.has(digest):
            self.add_chunk(digest, data, type_code)
        return digest

    def add_object(self, encoded: bytes) -> bytes:
        return self.add(encoded, TYPE_CODES[fmt.object_type(encoded)])

    def commit(self, tags: Iterable[tuple[str, str, int, bytes]] = (), *, replace: bool = False,
               retire_packs: Iterable[int] = ()) -> None:
        """Make everything written visible, then point *tags* at it, atomically.

        *replace* re-points existing index rows at the new copies and *retire_packs* drops
        packs from the index in the same transaction (both for gc's repack).
        """
        self.flush()
        store = self.store
        published: list[tuple[int, str, int]] = []  # (writer pack#, name, size)
        for index, (path, fd) in enumerate(self._packs):
            os.fsync(fd)
            size = os.fstat(fd).st_size
            name = path.stem
            os.rename(path, store.packs_dir / f"{name}.pack")
            published.append((index, name, size))
        if published:
            _fsync_dir(store.packs_dir)
        with store.transaction() as db:
            pack_ids: dict[int, int] = {}
            for index, name, size in published:
                cur = db.execute("INSERT INTO packs(name, size) VALUES (?, ?)", (name, size))
                assert cur.lastrowid is not None
                pack_ids[index] = cur.lastrowid
            rows = []
            for digest, where in self._new.items():
                assert where is not None, "flush() wrote every block"
                pack, offset, stored, raw, codec, type_code, inner, length = where
                rows.append((digest, type_code, pack_ids[pack], offset, stored, raw, codec, inner, length))
            db.executemany(
                f"INSERT OR {'REPLACE' if replace else 'IGNORE'} INTO objects"
                "(digest, type, pack, offset, stored, raw, codec, inner, length) VALUES (?,?,?,?,?,?,?,?,?)",
                rows,
            )
            for name, version, type_code, digest in tags:
                store._insert_tag(db, name, version, type_code, digest)
            for pack in retire_packs:
                db.execute("DELETE FROM packs WHERE id=?", (pack,))
        self._committed = True
        for _path, fd in self._packs:
            with contextlib.suppress(OSError):
                os.close(fd)

    def discard(self) -> None:
        """Remove uncommitted temporary packs (called on every exit path)."""
        if self._committed:
            return
        for _members, future in self._sealed:
            future.cancel()
        self._sealed.clear()
        for path, fd in self._packs:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._packs.clear()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _flock(path: Path, how: int) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)


def is_locked(path: Path) -> bool:
    """True when another process holds a flock on *path* (a live writer's temp pack)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)
    return False
