"""The local store's SQLite index: digest -> block record, packs, tags (docs/format.md 2.2).

The only module of cnpsfs that speaks SQL. Everything else asks it questions by name
(``locate_many``, ``blocks``, ``tag``), so the schema can change in one place, and the
store above it can be opened read-only (``mode=ro``, and ``immutable=1`` where the
directory cannot be written) with the same calls.

Why SQLite: atomic multi-row commits (an import's rows and its tag land together or not
at all), concurrent readers during writes (WAL), and microsecond primary-key lookups,
from the standard library. S3QL keeps its metadata in SQLite for the same reasons.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from cnpsfs.errors import CnpsfsError, StoreDamagedError, StoreError, StoreReadOnlyError
from cnpsfs.store.protocol import T_CHUNK, T_FILESET, T_IMAGE, Tag

_P = ParamSpec("_P")
_R = TypeVar("_R")

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
    length INTEGER NOT NULL,
    header INTEGER
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
#: Tables added after the first layout: created by the first writer that needs them (an
#: older store lacks them until then, and readers take a missing table as empty).
TRUST_SCHEMA = """
CREATE TABLE IF NOT EXISTS attachments(
    subject BLOB NOT NULL,
    digest BLOB NOT NULL,
    PRIMARY KEY(subject, digest)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS revisions(
    name TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    digest BLOB NOT NULL,
    accepted_ns INTEGER NOT NULL
);
"""

#: Directory objects a writer of this store decoded in full and found valid, under the
#: rules numbered ``rules`` (fmt.DIRECTORY_RULES): the packed composition then skips the
#: per-entry checks (docs/format.md §2.2). Created by the first writer that records one;
#: a missing table, or a digest without its row, means "not known": check everything.
CHECKED_SCHEMA = """
CREATE TABLE IF NOT EXISTS checked(
    digest BLOB PRIMARY KEY,
    rules INTEGER NOT NULL
) WITHOUT ROWID;
"""

#: Tables a store gains when it first caches a remote's blocks or records a setting; a
#: store without them has no cache (older readers ignore them).
CACHE_SCHEMA = """
CREATE TABLE IF NOT EXISTS cache_packs(
    pack INTEGER PRIMARY KEY,
    remote TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    last_used_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS settings(
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

_BATCH = 500
_LOC_COLUMNS = "pack, offset, stored, raw, codec, type, inner, length, header"

#: What the repair command is called, for messages that suggest it.
REPAIR_HINT = "run `cnpsfs store repair` to rebuild it from the packs"


def index_error(path: Path, exc: sqlite3.Error) -> CnpsfsError:
    """The typed store error for an SQLite failure on the index at *path*.

    SQLite's primary result code says whose fault it is: a malformed page (CORRUPT,
    NOTADB, or a schema that no longer reads) is damage the user can repair; a full disk,
    an I/O error, read-only media or a lock held too long are the machine's state, to be
    fixed there. Each message names the index file, so one log line is enough.
    """
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code == sqlite3.SQLITE_FULL:
        return StoreError(f"cannot write the store index {path}: No space left on device")
    if code == sqlite3.SQLITE_IOERR:
        return StoreError(f"I/O error on the store index {path} ({exc})")
    if code == sqlite3.SQLITE_READONLY:
        return StoreReadOnlyError(f"the store index {path} is read-only ({exc})")
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreError(f"the store index {path} stayed locked by another process for 60 s ({exc})")
    if code in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH):
        return StoreError(f"cannot open the store index {path} ({exc})")
    return StoreDamagedError(f"the store index {path} is damaged ({exc}): {REPAIR_HINT}")


def _mapped(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Turn SQLite's exceptions into the store's typed errors (see :func:`index_error`).

    Every query goes through a method wrapped by this, so no ``sqlite3`` exception leaves
    the module: the CLI prints them as one line and the mount answers EIO.
    """

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return func(*args, **kwargs)
        except sqlite3.DatabaseError as exc:
            index = args[0]
            assert isinstance(index, Index)
            raise index_error(index.path, exc) from exc

    return wrapper


def _damaged(path: Path, what: str) -> StoreDamagedError:
    return StoreDamagedError(f"the store index {path} is damaged ({what}): {REPAIR_HINT}")


def _location(path: Path, row: tuple[Any, ...]) -> Location:
    """A Location from an index row, refusing values a damaged page can decode to.

    SQLite checks its pages' structure, not the values in them: a page overwritten with
    plausible bytes reads back as rows of the wrong types or out of range, and those must
    not reach ``pread`` as offsets.
    """
    for value in row[:8]:
        if type(value) is not int or value < 0:
            raise _damaged(path, f"an objects row holds {value!r}")
    header = row[8]
    if header is not None and (type(header) is not int or not 0 <= header <= row[1]):
        raise _damaged(path, f"an objects row holds {header!r}")
    return Location(*row)


def readonly_query(path: Path) -> str:
    """The URI query that opens the index at *path* without writing anything beside it.

    SQLite can read a WAL-mode database read-only when its -wal and -shm files exist
    (then ``mode=ro`` reads the WAL too: committed transactions a writer has not yet
    checkpointed are seen), or when it is opened ``immutable`` (no locks, no -shm, and the
    -wal is ignored). A store closed cleanly has neither file (the last connection
    checkpoints and removes them), so ``immutable=1`` reads all of it. A -wal without its
    -shm cannot be read without creating the -shm, which read-only media forbid; and
    ``immutable`` would silently drop its transactions.
    """
    wal = path.with_name(path.name + "-wal")
    shm = path.with_name(path.name + "-shm")
    wal_size = wal.stat().st_size if wal.exists() else 0
    if wal_size and shm.exists():
        return "mode=ro"
    if wal_size:
        raise StoreReadOnlyError(
            f"the store index {path} is read-only and its last changes are still in {wal.name} without"
            f" {shm.name}: open the store once where it is writable (any reading command) to checkpoint them")
    return "mode=ro&immutable=1"



@dataclass(frozen=True, slots=True)
class Location:
    """Where a chunk or object lives in a local store: its block record and its slice.

    ``header`` is the file offset of the block's record header (None in a store written
    before layout 2 whose migration has not run: the reader then finds it by search).
    """

    pack: int
    offset: int
    stored: int
    raw: int
    codec: int
    type: int
    inner: int
    length: int
    header: int | None = None

    @property
    def block(self) -> tuple[int, int]:
        """The block's key: opaque above the store."""
        return (self.pack, self.offset)


@dataclass(frozen=True, slots=True)
class BlockRow:
    """One block of a pack (from the index), with its members: (digest, type, inner, length)."""

    loc: Location
    members: list[tuple[bytes, int, int, int]]


class Index:
    """Per-thread connections to ``index.sqlite`` and every query the store makes."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        # Decided once: every thread's connection must see the same database.
        self._query = readonly_query(path) if readonly else ""
        self._local = threading.local()

    @staticmethod
    def create(path: Path) -> None:
        try:
            db = sqlite3.connect(path)
            with db:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(SCHEMA + TRUST_SCHEMA)
            db.close()
        except sqlite3.DatabaseError as exc:
            raise index_error(path, exc) from exc

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections are not shared across threads).

        Callers are methods wrapped by :func:`_mapped`: a failure to open is a store error.
        """
        conn = getattr(self._local, "db", None)
        if conn is None:
            if not self.path.exists():
                # sqlite3.connect would create an empty database in its place.
                raise _damaged(self.path, "the file is missing")
            if self.readonly:
                conn = sqlite3.connect(f"file:{self.path}?{self._query}", uri=True, timeout=60,
                                       isolation_level=None)
            else:
                conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
                conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=60000")
            self._local.db = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "db", None)
        if conn is not None:
            conn.close()
            self._local.db = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any error (SQLite errors mapped)."""
        if self.readonly:
            raise StoreReadOnlyError(f"the store index {self.path} is on read-only media")
        try:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (a full disk) may leave the transaction open, or SQLite
                # may have rolled it back already.
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            raise index_error(self.path, exc) from exc

    # ------------------------------------------------------------------ schema versions

    @_mapped
    def has_header_column(self) -> bool:
        return any(row[1] == "header" for row in self.db.execute("PRAGMA table_info(objects)"))

    @_mapped
    def add_header_column(self) -> None:
        self.db.execute("ALTER TABLE objects ADD COLUMN header INTEGER")

    @_mapped
    def set_block_header(self, pack: int, offset: int, header: int) -> None:
        self.db.execute("UPDATE objects SET header=? WHERE pack=? AND offset=?", (header, pack, offset))

    @_mapped
    def blocks_without_header(self) -> list[Location]:
        rows = self.db.execute(
            "SELECT pack, offset, stored, raw, codec, min(type), 0, raw, header FROM objects"
            " WHERE header IS NULL GROUP BY pack, offset").fetchall()
        return [_location(self.path, row) for row in rows]

    # ------------------------------------------------------------------ checks

    @_mapped
    def integrity_check(self, limit: int = 20, *, quick: bool = False) -> list[str]:
        """SQLite's own check of every page, index and constraint: its complaints, or none.

        *quick* runs ``quick_check``: every page and row, but not that each index matches
        its table (linear instead of N log N; what gc runs before it deletes anything).
        """
        pragma = "quick_check" if quick else "integrity_check"
        rows = [row[0] for row in self.db.execute(f"PRAGMA {pragma}({int(limit)})")]
        return [] if rows == ["ok"] else [str(r) for r in rows]

    @_mapped
    def rows_per_pack(self) -> dict[int, int]:
        """Pack id -> number of objects rows naming it (ids with no packs row included)."""
        return dict(self.db.execute("SELECT pack, count(*) FROM objects GROUP BY pack").fetchall())

    # ------------------------------------------------------------------ objects

    @_mapped
    def locate(self, digest: bytes) -> Location | None:
        row = self.db.execute(f"SELECT {_LOC_COLUMNS} FROM objects WHERE digest=?", (digest,)).fetchone()
        return _location(self.path, row) if row else None

    @_mapped
    def locate_many(self, digests: Iterable[bytes]) -> dict[bytes, Location]:
        found: dict[bytes, Location] = {}
        for part in _batches(digests):
            marks = ",".join("?" * len(part))
            for row in self.db.execute(f"SELECT digest, {_LOC_COLUMNS} FROM objects WHERE digest IN ({marks})",
                                       part):
                found[row[0]] = _location(self.path, row[1:])
        return found

    @_mapped
    def contains(self, digest: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM objects WHERE digest=?", (digest,)).fetchone() is not None

    @_mapped
    def existing(self, digests: Iterable[bytes]) -> set[bytes]:
        found: set[bytes] = set()
        for part in _batches(digests):
            marks = ",".join("?" * len(part))
            found.update(row[0] for row in self.db.execute(
                f"SELECT digest FROM objects WHERE digest IN ({marks})", part))
        return found

    @_mapped
    def object_type(self, digest: bytes) -> int | None:
        row = self.db.execute("SELECT type FROM objects WHERE digest=?", (digest,)).fetchone()
        return row[0] if row else None

    @_mapped
    def digests_from(self, low: bytes, limit: int) -> list[bytes]:
        """FileSet and image digests >= *low*, in order (for prefix references)."""
        return [r[0] for r in self.db.execute(
            "SELECT digest FROM objects WHERE digest >= ? AND type IN (?, ?) ORDER BY digest LIMIT ?",
            (low, T_FILESET, T_IMAGE, limit))]

    @_mapped
    def counts(self) -> tuple[int, int, int]:
        """(chunks, other objects, packs)."""
        db = self.db
        chunks = db.execute("SELECT count(*) FROM objects WHERE type=?", (T_CHUNK,)).fetchone()[0]
        objects = db.execute("SELECT count(*) FROM objects WHERE type<>?", (T_CHUNK,)).fetchone()[0]
        packs = db.execute("SELECT count(*) FROM packs").fetchone()[0]
        return chunks, objects, packs

    @_mapped
    def blocks(self, pack: int | None = None) -> list[BlockRow]:
        """Every block (or those of *pack*) with its members, in pack order."""
        sql = f"SELECT digest, {_LOC_COLUMNS} FROM objects"
        args: tuple[int, ...] = ()
        if pack is not None:
            sql += " WHERE pack=?"
            args = (pack,)
        blocks: dict[tuple[int, int], BlockRow] = {}
        for row in self.db.execute(sql, args):
            loc = _location(self.path, row[1:])
            key = loc.block
            block = blocks.get(key)
            if block is None:
                block = blocks[key] = BlockRow(Location(loc.pack, loc.offset, loc.stored, loc.raw, loc.codec,
                                                        T_CHUNK, 0, loc.raw, loc.header), [])
            block.members.append((row[0], loc.type, loc.inner, loc.length))
        for block in blocks.values():
            block.members.sort(key=lambda m: m[2])
        return [blocks[k] for k in sorted(blocks)]

    @_mapped
    def retire(self, digests: Iterable[bytes], packs: Iterable[int] = ()) -> None:
        """Delete objects rows and packs rows in one transaction (gc's sweep)."""
        with self.transaction() as tx:
            tx.executemany("DELETE FROM objects WHERE digest=?", ((d,) for d in digests))
            tx.executemany("DELETE FROM packs WHERE id=?", ((p,) for p in packs))

    # ------------------------------------------------------------------ packs

    @_mapped
    def pack_name(self, pack: int) -> str | None:
        row = self.db.execute("SELECT name FROM packs WHERE id=?", (pack,)).fetchone()
        return row[0] if row else None

    @_mapped
    def has_pack(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM packs WHERE name=?", (name,)).fetchone() is not None

    @_mapped
    def packs(self) -> list[tuple[int, str, int]]:
        """(id, name, size) of every pack."""
        return self.db.execute("SELECT id, name, size FROM packs").fetchall()

    @_mapped
    def publish(self, packs: list[tuple[str, int]], rows: list[tuple[Any, ...]],
                tags: Iterable[tuple[str, str, int, bytes, int]], *, replace: bool, retire_packs: Iterable[int],
                attach: Iterable[tuple[bytes, bytes]] = (), cache: str | None = None,
                adopt: Iterable[int] = (), checked: Iterable[tuple[bytes, int]] = ()) -> list[int]:
        """Make a writer's packs and rows visible, point tags at them, retire packs: one transaction.

        *rows* name packs by their position in *packs*: (digest, type, pack#, offset, stored,
        raw, codec, inner, length, header). *tags* are (name, version, type, digest,
        created_ns). *cache* marks the new packs as cache packs of that remote; *adopt*
        turns cache packs into ordinary ones. *checked* records directory objects a writer
        found valid: (digest, rules). Returns the new pack ids.
        """
        adopt = list(adopt)
        if cache is not None or adopt:
            self.ensure_cache_schema()
        with self.transaction() as db:
            ids: list[int] = []
            for name, size in packs:
                cur = db.execute("INSERT INTO packs(name, size) VALUES (?, ?)", (name, size))
                assert cur.lastrowid is not None
                ids.append(cur.lastrowid)
            db.executemany(
                f"INSERT OR {'REPLACE' if replace else 'IGNORE'} INTO objects"
                "(digest, type, pack, offset, stored, raw, codec, inner, length, header)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                ((d, t, ids[p], *rest) for d, t, p, *rest in rows),
            )
            for tag in tags:
                _insert_tag(db, *tag)
            for pack in retire_packs:
                db.execute("DELETE FROM packs WHERE id=?", (pack,))
            attach = list(attach)
            if attach:
                _trust_tables(db)
                db.executemany("INSERT OR IGNORE INTO attachments(subject, digest) VALUES (?, ?)", attach)
            if cache is not None:
                now = time.time_ns()
                db.executemany("INSERT OR REPLACE INTO cache_packs(pack, remote, bytes, last_used_ns) VALUES (?,?,?,?)",
                               ((pack_id, cache, size, now) for pack_id, (_n, size) in zip(ids, packs, strict=True)))
            if adopt:
                db.executemany("DELETE FROM cache_packs WHERE pack=?", ((p,) for p in adopt))
            checked = list(checked)
            if checked:
                db.execute(CHECKED_SCHEMA)
                db.executemany("INSERT OR REPLACE INTO checked(digest, rules) VALUES (?, ?)", checked)
        return ids

    @_mapped
    def checked_under(self, digest: bytes) -> int | None:
        """The rules under which a writer found directory object *digest* valid, or None."""
        try:
            row = self.db.execute("SELECT rules FROM checked WHERE digest=?", (digest,)).fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None  # a store no writer has recorded a checked directory in
            raise
        return row[0] if row else None

    @_mapped
    def checkpoint(self) -> None:
        """Move the WAL's transactions into the database file and empty the WAL.

        Left to itself SQLite does this when the last connection closes; a store that
        is about to be copied or exported read-only wants it now (see readonly_query).
        """
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # ------------------------------------------------------------------ attachments and revisions

    def _trust_rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []  # a store written before detached objects existed
            raise

    @_mapped
    def attachments(self, subject: bytes | None = None) -> list[tuple[bytes, bytes]]:
        if subject is None:
            return [(s, d) for s, d in self._trust_rows("SELECT subject, digest FROM attachments ORDER BY subject")]
        return [(s, d) for s, d in self._trust_rows(
            "SELECT subject, digest FROM attachments WHERE subject=? ORDER BY digest", (subject,))]

    @_mapped
    def detach(self, pairs: Iterable[tuple[bytes, bytes]]) -> int:
        with self.transaction() as db:
            _trust_tables(db)
            return sum(db.execute("DELETE FROM attachments WHERE subject=? AND digest=?", pair).rowcount
                       for pair in pairs)

    @_mapped
    def accepted_revision(self, name: str) -> tuple[int, bytes] | None:
        rows = self._trust_rows("SELECT revision, digest FROM revisions WHERE name=?", (name,))
        return (rows[0][0], rows[0][1]) if rows else None

    @_mapped
    def record_revision(self, name: str, revision: int, digest: bytes) -> None:
        with self.transaction() as db:
            _trust_tables(db)
            db.execute("INSERT INTO revisions(name, revision, digest, accepted_ns) VALUES (?,?,?,?) "
                       "ON CONFLICT(name) DO UPDATE SET revision=excluded.revision, digest=excluded.digest, "
                       "accepted_ns=excluded.accepted_ns WHERE excluded.revision > revisions.revision",
                       (name, revision, digest, time.time_ns()))

    # ------------------------------------------------------------------ the cache of remote blocks

    @_mapped
    def revisions(self) -> list[tuple[str, int, bytes, int]]:
        """(name, revision, digest, accepted_ns) of every accepted revision."""
        return list(self._trust_rows("SELECT name, revision, digest, accepted_ns FROM revisions"))  # type: ignore[arg-type]

    @_mapped
    def cache_marks(self) -> list[tuple[str, str, int]]:
        """(pack name, remote, last used ns) of every cache pack (repair moves them to a new index)."""
        if not self.has_cache_schema():
            return []
        return self.db.execute("SELECT p.name, c.remote, c.last_used_ns FROM cache_packs c JOIN packs p"
                               " ON p.id = c.pack").fetchall()

    @_mapped
    def settings(self) -> list[tuple[str, str]]:
        return self.db.execute("SELECT key, value FROM settings").fetchall() if self.has_cache_schema() else []

    @_mapped
    def restore(self, *, revisions: Iterable[tuple[str, int, bytes, int]] = (),
                cache: Iterable[tuple[str, str, int]] = (), settings: Iterable[tuple[str, str]] = ()) -> None:
        """Put back what a repair salvaged from the old index: revisions, cache marks (by pack
        name), settings; one transaction."""
        cache, settings = list(cache), list(settings)
        if cache or settings:
            self.ensure_cache_schema()
        with self.transaction() as db:
            _trust_tables(db)
            db.executemany("INSERT OR REPLACE INTO revisions(name, revision, digest, accepted_ns) VALUES (?,?,?,?)",
                           revisions)
            if cache:
                db.executemany("INSERT OR REPLACE INTO cache_packs(pack, remote, bytes, last_used_ns)"
                               " SELECT id, ?, size, ? FROM packs WHERE name=?",
                               ((remote, used, name) for name, remote, used in cache))
            if settings:
                db.executemany("INSERT OR REPLACE INTO settings(key, value) VALUES (?, ?)", settings)

    @_mapped
    def has_cache_schema(self) -> bool:
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='cache_packs'"
                               ).fetchone() is not None

    @_mapped
    def ensure_cache_schema(self) -> None:
        if not self.has_cache_schema():
            self.db.executescript(CACHE_SCHEMA)

    @_mapped
    def cache_packs(self) -> list[tuple[int, str, int, int]]:
        """(pack id, remote, bytes, last used ns) of every cache pack, least recently used first."""
        if not self.has_cache_schema():
            return []
        return self.db.execute("SELECT pack, remote, bytes, last_used_ns FROM cache_packs"
                               " ORDER BY last_used_ns, pack").fetchall()

    @_mapped
    def touch_cache_packs(self, used: dict[int, int]) -> None:
        """Record when cache packs were last read (batched by the reader: pack id -> ns)."""
        if not used or not self.has_cache_schema():
            return
        with self.transaction() as db:
            db.executemany("UPDATE cache_packs SET last_used_ns=max(last_used_ns, ?) WHERE pack=?",
                           ((ns, pack) for pack, ns in used.items()))

    @_mapped
    def pack_members(self, pack: int) -> list[tuple[bytes, int]]:
        """(digest, type) of every row that points into *pack*."""
        return self.db.execute("SELECT digest, type FROM objects WHERE pack=?", (pack,)).fetchall()

    @_mapped
    def drop_cache_pack(self, pack: int) -> None:
        """Forget a cache pack: its rows, its cache mark, its pack row (the file goes after)."""
        with self.transaction() as db:
            db.execute("DELETE FROM objects WHERE pack=?", (pack,))
            db.execute("DELETE FROM cache_packs WHERE pack=?", (pack,))
            db.execute("DELETE FROM packs WHERE id=?", (pack,))

    @_mapped
    def setting(self, key: str) -> str | None:
        if not self.has_cache_schema():
            return None
        row = self.db.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    @_mapped
    def set_setting(self, key: str, value: str | None) -> None:
        self.ensure_cache_schema()
        with self.transaction() as db:
            if value is None:
                db.execute("DELETE FROM settings WHERE key=?", (key,))
            else:
                db.execute("INSERT OR REPLACE INTO settings(key, value) VALUES (?, ?)", (key, value))

    # ------------------------------------------------------------------ tags

    @_mapped
    def set_tag(self, name: str, version: str, type_code: int, digest: bytes, created_ns: int) -> None:
        with self.transaction() as db:
            _insert_tag(db, name, version, type_code, digest, created_ns)

    @_mapped
    def remove_tag(self, name: str, version: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM tags WHERE name=? AND version=?", (name, version)).rowcount > 0

    @_mapped
    def tags(self, type_code: int | None = None) -> list[Tag]:
        sql = "SELECT name, version, type, digest, created_ns FROM tags"
        args: tuple[int, ...] = ()
        if type_code is not None:
            sql += " WHERE type=?"
            args = (type_code,)
        return [Tag(*row) for row in self.db.execute(sql + " ORDER BY name, created_ns, version", args)]

    @_mapped
    def tag_rows(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Tag]:
        """The current tags among (name, version) *keys* (what a failed change reverts to)."""
        found: dict[tuple[str, str], Tag] = {}
        for name, version in keys:
            row = self.db.execute("SELECT name, version, type, digest, created_ns FROM tags"
                                  " WHERE name=? AND version=?", (name, version)).fetchone()
            if row is not None:
                found[(name, version)] = Tag(*row)
        return found

    @_mapped
    def tags_for(self, digest: bytes) -> list[Tag]:
        rows = self.db.execute(
            "SELECT name, version, type, digest, created_ns FROM tags WHERE digest=? ORDER BY name, version",
            (digest,))
        return [Tag(*row) for row in rows]

    @_mapped
    def tag(self, name: str, version: str | None) -> bytes | None:
        """The digest NAME@VERSION names; NAME alone: its most recently tagged version."""
        if version:
            row = self.db.execute("SELECT digest FROM tags WHERE name=? AND version=?", (name, version)).fetchone()
        else:
            row = self.db.execute(
                "SELECT digest FROM tags WHERE name=? ORDER BY created_ns DESC, version DESC LIMIT 1",
                (name,)).fetchone()
        return row[0] if row else None


def _trust_tables(db: sqlite3.Connection) -> None:
    """The attachment and revision tables, inside the caller's transaction (executescript
    would commit it). Cheap: a no-op once they exist."""
    for statement in TRUST_SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)


def _insert_tag(db: sqlite3.Connection, name: str, version: str, type_code: int, digest: bytes,
                created_ns: int) -> None:
    db.execute(
        "INSERT OR REPLACE INTO tags(name, version, type, digest, created_ns) VALUES (?,?,?,?,?)",
        (name, version, type_code, digest, created_ns),
    )


def _batches(digests: Iterable[bytes]) -> Iterator[list[bytes]]:
    batch = list(digests)
    for start in range(0, len(batch), _BATCH):
        yield batch[start : start + _BATCH]
