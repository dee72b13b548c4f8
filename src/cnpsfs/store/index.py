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
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnpsfs.store.protocol import T_CHUNK, T_FILESET, T_IMAGE, Tag

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

    def __init__(self, path: Path, *, readonly: bool = False, immutable: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._immutable = immutable
        self._local = threading.local()

    @staticmethod
    def create(path: Path) -> None:
        db = sqlite3.connect(path)
        with db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA + TRUST_SCHEMA)
        db.close()

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections are not shared across threads)."""
        conn = getattr(self._local, "db", None)
        if conn is None:
            if self.readonly:
                query = "mode=ro&immutable=1" if self._immutable else "mode=ro"
                conn = sqlite3.connect(f"file:{self.path}?{query}", uri=True, timeout=60, isolation_level=None,
                                       check_same_thread=True)
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
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # ------------------------------------------------------------------ schema versions

    def has_header_column(self) -> bool:
        return any(row[1] == "header" for row in self.db.execute("PRAGMA table_info(objects)"))

    def add_header_column(self) -> None:
        self.db.execute("ALTER TABLE objects ADD COLUMN header INTEGER")

    def set_block_header(self, pack: int, offset: int, header: int) -> None:
        self.db.execute("UPDATE objects SET header=? WHERE pack=? AND offset=?", (header, pack, offset))

    def blocks_without_header(self) -> list[Location]:
        rows = self.db.execute(
            "SELECT pack, offset, stored, raw, codec, min(type), 0, raw, header FROM objects"
            " WHERE header IS NULL GROUP BY pack, offset").fetchall()
        return [Location(*row) for row in rows]

    # ------------------------------------------------------------------ objects

    def locate(self, digest: bytes) -> Location | None:
        row = self.db.execute(f"SELECT {_LOC_COLUMNS} FROM objects WHERE digest=?", (digest,)).fetchone()
        return Location(*row) if row else None

    def locate_many(self, digests: Iterable[bytes]) -> dict[bytes, Location]:
        found: dict[bytes, Location] = {}
        for part in _batches(digests):
            marks = ",".join("?" * len(part))
            for row in self.db.execute(f"SELECT digest, {_LOC_COLUMNS} FROM objects WHERE digest IN ({marks})",
                                       part):
                found[row[0]] = Location(*row[1:])
        return found

    def contains(self, digest: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM objects WHERE digest=?", (digest,)).fetchone() is not None

    def existing(self, digests: Iterable[bytes]) -> set[bytes]:
        found: set[bytes] = set()
        for part in _batches(digests):
            marks = ",".join("?" * len(part))
            found.update(row[0] for row in self.db.execute(
                f"SELECT digest FROM objects WHERE digest IN ({marks})", part))
        return found

    def object_type(self, digest: bytes) -> int | None:
        row = self.db.execute("SELECT type FROM objects WHERE digest=?", (digest,)).fetchone()
        return row[0] if row else None

    def digests_from(self, low: bytes, limit: int) -> list[bytes]:
        """FileSet and image digests >= *low*, in order (for prefix references)."""
        return [r[0] for r in self.db.execute(
            "SELECT digest FROM objects WHERE digest >= ? AND type IN (?, ?) ORDER BY digest LIMIT ?",
            (low, T_FILESET, T_IMAGE, limit))]

    def counts(self) -> tuple[int, int, int]:
        """(chunks, other objects, packs)."""
        db = self.db
        chunks = db.execute("SELECT count(*) FROM objects WHERE type=?", (T_CHUNK,)).fetchone()[0]
        objects = db.execute("SELECT count(*) FROM objects WHERE type<>?", (T_CHUNK,)).fetchone()[0]
        packs = db.execute("SELECT count(*) FROM packs").fetchone()[0]
        return chunks, objects, packs

    def blocks(self, pack: int | None = None) -> list[BlockRow]:
        """Every block (or those of *pack*) with its members, in pack order."""
        sql = f"SELECT digest, {_LOC_COLUMNS} FROM objects"
        args: tuple[int, ...] = ()
        if pack is not None:
            sql += " WHERE pack=?"
            args = (pack,)
        blocks: dict[tuple[int, int], BlockRow] = {}
        for digest, pack_id, offset, stored, raw, codec, type_code, inner, length, header in self.db.execute(
                sql, args):
            key = (pack_id, offset)
            row = blocks.get(key)
            if row is None:
                row = blocks[key] = BlockRow(Location(pack_id, offset, stored, raw, codec, T_CHUNK, 0, raw, header),
                                             [])
            row.members.append((digest, type_code, inner, length))
        for row in blocks.values():
            row.members.sort(key=lambda m: m[2])
        return [blocks[k] for k in sorted(blocks)]

    def all_objects(self) -> list[tuple[bytes, int, int, int]]:
        """(digest, pack, raw, length) of every row (gc's accounting)."""
        return self.db.execute("SELECT digest, pack, raw, length FROM objects").fetchall()

    def blocks_per_pack(self) -> dict[int, int]:
        return dict(self.db.execute("SELECT pack, count(DISTINCT offset) FROM objects GROUP BY pack").fetchall())

    def delete_objects(self, digests: Iterable[bytes]) -> None:
        with self.transaction() as tx:
            tx.executemany("DELETE FROM objects WHERE digest=?", ((d,) for d in digests))

    # ------------------------------------------------------------------ packs

    def pack_name(self, pack: int) -> str | None:
        row = self.db.execute("SELECT name FROM packs WHERE id=?", (pack,)).fetchone()
        return row[0] if row else None

    def packs(self) -> list[tuple[int, str, int]]:
        """(id, name, size) of every pack."""
        return self.db.execute("SELECT id, name, size FROM packs").fetchall()

    def delete_pack(self, pack: int) -> None:
        with self.transaction() as tx:
            tx.execute("DELETE FROM packs WHERE id=?", (pack,))

    def publish(self, packs: list[tuple[str, int]], rows: list[tuple[Any, ...]],
                tags: Iterable[tuple[str, str, int, bytes]], *, replace: bool, retire_packs: Iterable[int],
                attach: Iterable[tuple[bytes, bytes]] = (), cache: str | None = None,
                adopt: Iterable[int] = ()) -> list[int]:
        """Make a writer's packs and rows visible, point tags at them, retire packs: one transaction.

        *rows* name packs by their position in *packs*: (digest, type, pack#, offset, stored,
        raw, codec, inner, length, header). *cache* marks the new packs as cache packs of
        that remote; *adopt* turns cache packs into ordinary ones. Returns the new pack ids.
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
            for name, version, type_code, digest in tags:
                _insert_tag(db, name, version, type_code, digest)
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
        return ids

    # ------------------------------------------------------------------ attachments and revisions

    def _trust_rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []  # a store written before detached objects existed
            raise

    def attachments(self, subject: bytes | None = None) -> list[tuple[bytes, bytes]]:
        if subject is None:
            return [(s, d) for s, d in self._trust_rows("SELECT subject, digest FROM attachments ORDER BY subject")]
        return [(s, d) for s, d in self._trust_rows(
            "SELECT subject, digest FROM attachments WHERE subject=? ORDER BY digest", (subject,))]

    def detach(self, pairs: Iterable[tuple[bytes, bytes]]) -> int:
        with self.transaction() as db:
            _trust_tables(db)
            return sum(db.execute("DELETE FROM attachments WHERE subject=? AND digest=?", pair).rowcount
                       for pair in pairs)

    def accepted_revision(self, name: str) -> tuple[int, bytes] | None:
        rows = self._trust_rows("SELECT revision, digest FROM revisions WHERE name=?", (name,))
        return (rows[0][0], rows[0][1]) if rows else None

    def record_revision(self, name: str, revision: int, digest: bytes) -> None:
        with self.transaction() as db:
            _trust_tables(db)
            db.execute("INSERT INTO revisions(name, revision, digest, accepted_ns) VALUES (?,?,?,?) "
                       "ON CONFLICT(name) DO UPDATE SET revision=excluded.revision, digest=excluded.digest, "
                       "accepted_ns=excluded.accepted_ns WHERE excluded.revision > revisions.revision",
                       (name, revision, digest, time.time_ns()))

    # ------------------------------------------------------------------ the cache of remote blocks

    def has_cache_schema(self) -> bool:
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='cache_packs'"
                               ).fetchone() is not None

    def ensure_cache_schema(self) -> None:
        if not self.has_cache_schema():
            self.db.executescript(CACHE_SCHEMA)

    def cache_packs(self) -> list[tuple[int, str, int, int]]:
        """(pack id, remote, bytes, last used ns) of every cache pack, least recently used first."""
        if not self.has_cache_schema():
            return []
        return self.db.execute("SELECT pack, remote, bytes, last_used_ns FROM cache_packs"
                               " ORDER BY last_used_ns, pack").fetchall()

    def touch_cache_packs(self, used: dict[int, int]) -> None:
        """Record when cache packs were last read (batched by the reader: pack id -> ns)."""
        if not used or not self.has_cache_schema():
            return
        with self.transaction() as db:
            db.executemany("UPDATE cache_packs SET last_used_ns=max(last_used_ns, ?) WHERE pack=?",
                           ((ns, pack) for pack, ns in used.items()))

    def pack_members(self, pack: int) -> list[tuple[bytes, int]]:
        """(digest, type) of every row that points into *pack*."""
        return self.db.execute("SELECT digest, type FROM objects WHERE pack=?", (pack,)).fetchall()

    def drop_cache_pack(self, pack: int) -> None:
        """Forget a cache pack: its rows, its cache mark, its pack row (the file goes after)."""
        with self.transaction() as db:
            db.execute("DELETE FROM objects WHERE pack=?", (pack,))
            db.execute("DELETE FROM cache_packs WHERE pack=?", (pack,))
            db.execute("DELETE FROM packs WHERE id=?", (pack,))

    def setting(self, key: str) -> str | None:
        if not self.has_cache_schema():
            return None
        row = self.db.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_setting(self, key: str, value: str | None) -> None:
        self.ensure_cache_schema()
        with self.transaction() as db:
            if value is None:
                db.execute("DELETE FROM settings WHERE key=?", (key,))
            else:
                db.execute("INSERT OR REPLACE INTO settings(key, value) VALUES (?, ?)", (key, value))

    # ------------------------------------------------------------------ tags

    def set_tag(self, name: str, version: str, type_code: int, digest: bytes) -> None:
        with self.transaction() as db:
            _insert_tag(db, name, version, type_code, digest)

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


def _insert_tag(db: sqlite3.Connection, name: str, version: str, type_code: int, digest: bytes) -> None:
    db.execute(
        "INSERT OR REPLACE INTO tags(name, version, type, digest, created_ns) VALUES (?,?,?,?,?)",
        (name, version, type_code, digest, time.time_ns()),
    )


def _batches(digests: Iterable[bytes]) -> Iterator[list[bytes]]:
    batch = list(digests)
    for start in range(0, len(batch), _BATCH):
        yield batch[start : start + _BATCH]
