"""Rebuilding a store's index from its packs (``cnpsfs store repair``; docs/format.md 2.8).

Packs describe themselves: every block record carries the digest, type and length of
each member, so the objects and packs tables can be rebuilt by reading the packs front to
back, and the attachments too (a signature or provenance object names its subject). Tags
cannot be read from packs; they come from the tags journal (``tags.log``, see
:mod:`cnpsfs.store.journal`), or, for a store without one, from whatever of the old
index's tags table still reads. What only the index knew besides (accepted revisions,
cache marks, settings) is taken from the old index as far as it reads, and named when not.

Only what verifies is kept: a record whose header does not parse is skipped (the scan
resynchronises at the next record magic), a block that does not decode loses its
members, and each member must hash to its digest (objects must also decode as their
type). Everything dropped is named in the report, and so is every tag whose content is
now incomplete. The damaged index is kept beside the new one, renamed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError, CorruptObjectError, FormatError
from cnpsfs.store.blocks import CODEC_RAW, CODEC_ZSTD, decompress_block
from cnpsfs.store.index import Index, Location
from cnpsfs.store.local import LocalStore
from cnpsfs.store.packs import (
    BLOCK_MAGIC,
    MEMBER_HEADER,
    PACK_MAGIC,
    RECORD_HEADER,
    flock,
    fsync_dir,
    header_size,
    store_io,
)
from cnpsfs.store.protocol import T_CHUNK, T_PROVENANCE, T_SIGNATURE, TYPE_CODES, TYPE_NAMES, Tag

log = logging.getLogger(__name__)

#: A block record's raw length is at most a block target plus one member (a maximum
#: chunk, or an object up to the format's size limits); anything larger is not a record.
RAW_MAX = 64 << 20


@dataclass(slots=True)
class ScannedRecord:
    """One block record found in a pack: where it is, and its verified members."""

    loc: Location  # type and member fields unused
    members: list[tuple[bytes, int, int, int]]  # (digest, type, inner, length), verified
    lost: int = 0  # members that did not verify
    attachments: list[tuple[bytes, bytes]] = field(default_factory=list)  # (subject, digest) of detached objects


@dataclass(slots=True)
class RepairReport:
    packs: int = 0
    records: int = 0
    objects: int = 0
    duplicates: int = 0
    lost: list[str] = field(default_factory=list)  # one line per damaged place in a pack
    lost_members: int = 0
    tag_source: str = "none"
    tags_restored: list[str] = field(default_factory=list)
    tags_dropped: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    #: Tables of the old index that did not read (what only the index knew: revisions, cache marks, settings).
    unread: list[str] = field(default_factory=list)
    backup: str | None = None


def scan_pack(path: Path, on_progress: Callable[[int], None] | None = None
              ) -> Iterator[ScannedRecord | str]:
    """The records of one pack, as docs/format.md 2.8 reads them: a ScannedRecord for each
    record that frames, a message for each stretch of bytes that does not."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            yield f"{path.name}: empty file"
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            yield from _scan(path.name, data, size, on_progress)


def _scan(name: str, data: mmap.mmap, size: int, on_progress: Callable[[int], None] | None
          ) -> Iterator[ScannedRecord | str]:
    dctx = zstandard.ZstdDecompressor()
    pos = len(PACK_MAGIC)
    if data[:pos] != PACK_MAGIC:
        yield f"{name}: does not start with the pack magic {PACK_MAGIC.decode()}"
    while pos + RECORD_HEADER.size <= size:
        framed = _frame(data, pos, size)
        if framed is None:
            # Not a record: skip to the next record magic that frames.
            start = pos
            pos = data.find(BLOCK_MAGIC, pos + 1)
            while pos != -1 and _frame(data, pos, size) is None:
                pos = data.find(BLOCK_MAGIC, pos + 1)
            end = size if pos == -1 else pos
            yield f"{name}: {end - start} bytes at offset {start} are not a block record"
            if pos == -1:
                return
            continue
        codec, stored, raw, members = framed
        payload_at = pos + header_size(len(members))
        loc = Location(0, payload_at, stored, raw, codec, T_CHUNK, 0, raw, pos)
        record = ScannedRecord(loc, [])
        try:
            block = decompress_block(loc, data[payload_at : payload_at + stored], dctx, f"{name} offset {pos}")
        except CorruptObjectError as exc:
            record.lost = len(members)
            yield f"{exc}: its {len(members)} members are lost"
        else:
            inner = 0
            for digest, type_code, length in members:
                piece = block[inner : inner + length]
                if _verifies(digest, type_code, piece):
                    record.members.append((digest, type_code, inner, length))
                    subject = _subject(type_code, piece)
                    if subject is not None:
                        record.attachments.append((subject, digest))
                else:
                    record.lost += 1
                inner += length
            if record.lost:
                yield f"{name}: {record.lost} members of the block at offset {pos} do not match their digests"
        yield record
        if on_progress is not None:
            on_progress(payload_at + stored - pos)
        pos = payload_at + stored
    if pos < size:
        yield f"{name}: {size - pos} bytes at offset {pos} are a truncated record"


def _frame(data: mmap.mmap, pos: int, size: int) -> tuple[int, int, int, list[tuple[bytes, int, int]]] | None:
    """(codec, stored, raw, members) of the record header at *pos*, if it is a plausible one."""
    magic, codec, stored, raw, count = RECORD_HEADER.unpack_from(data, pos)
    if magic != BLOCK_MAGIC or codec not in (CODEC_RAW, CODEC_ZSTD) or raw > RAW_MAX:
        return None
    if count == 0 or count > raw or pos + header_size(count) + stored > size:
        return None
    if codec == CODEC_RAW and stored != raw:
        return None
    members = list(MEMBER_HEADER.iter_unpack(data[pos + RECORD_HEADER.size : pos + header_size(count)]))
    if sum(length for _d, _t, length in members) != raw or any(t not in TYPE_NAMES for _d, t, _l in members):
        return None
    return codec, stored, raw, members


def _verifies(digest: bytes, type_code: int, data: bytes) -> bool:
    if fmt.digest_bytes(data) != digest:
        return False
    if type_code == T_CHUNK:
        return True
    try:
        fmt.referenced_digests(data)  # decodes it: an object must be one, of its type
        return TYPE_CODES.get(fmt.object_type(data)) == type_code
    except (FormatError, CnpsfsError):
        return False


def _subject(type_code: int, data: bytes) -> bytes | None:
    """The subject a detached object is filed under (docs/trust.md: key 2 of a provenance
    object; key 2 of a signature's payload), or None for other objects."""
    try:
        if type_code == T_PROVENANCE:
            subject = fmt.decode_object(data).get(2)
        elif type_code == T_SIGNATURE:
            payload = fmt.decode_object(data).get(2)
            subject = fmt.decode_cbor(payload).get(2) if isinstance(payload, bytes) else None
        else:
            return None
    except (FormatError, AttributeError):
        return None
    return subject if isinstance(subject, bytes) and len(subject) == 32 else None


def _old_tags(store: LocalStore) -> list[Tag] | None:
    """What of the old index's tags table still reads (None: nothing does)."""
    try:
        return store.index.tags()
    except CnpsfsError:
        return None


def repair(store: LocalStore, *, dry_run: bool = False,
           on_progress: Callable[[int], None] | None = None) -> RepairReport:
    """Rebuild ``index.sqlite`` from the packs and the tags journal (under the exclusive lock)."""
    store.check_writable("repair")
    report = RepairReport()
    with flock(store.path / "lock", fcntl.LOCK_EX):
        packs: list[tuple[str, int]] = []
        rows: list[tuple[object, ...]] = []
        seen: dict[bytes, int] = {}  # digest -> type
        attachments: set[tuple[bytes, bytes]] = set()
        for path in sorted(store.packs_dir.glob("*.pack")):
            number = len(packs)
            try:
                size = path.stat().st_size
                records = list(scan_pack(path, on_progress))
            except OSError as exc:
                report.lost.append(f"{path.name}: cannot be read ({exc.strerror}): everything in it is lost")
                continue
            packs.append((path.stem, size))
            report.packs += 1
            for item in records:
                if isinstance(item, str):
                    report.lost.append(item)
                    continue
                report.records += 1
                report.lost_members += item.lost
                attachments.update(item.attachments)
                loc = item.loc
                for digest, type_code, inner, length in item.members:
                    if digest in seen:
                        report.duplicates += 1
                        continue
                    seen[digest] = type_code
                    rows.append((digest, type_code, number, loc.offset, loc.stored, loc.raw, loc.codec, inner,
                                 length, loc.header))
        report.objects = len(rows)
        tags = _restore_tags(store, seen, report)
        extras = _salvage(store, attachments, report)
        if dry_run:
            return report
        report.backup = _replace_index(store, packs, rows, tags, extras)
        if report.tag_source != store.journal.path.name:
            # Start the journal from what was restored. An existing journal stays as it is:
            # it still names the tags dropped now, for a repair after their packs come back.
            store.journal.rewrite(tags)
    _check_tags(store, report)
    return report


def _restore_tags(store: LocalStore, present: dict[bytes, int], report: RepairReport) -> list[Tag]:
    replay = store.journal.replay()
    if replay is not None:
        report.tag_source = store.journal.path.name
        if replay.bad_lines:
            report.tags_dropped.append(f"{replay.bad_lines} unreadable lines of {store.journal.path.name} skipped")
        candidates = list(replay.tags.values())
    else:
        old = _old_tags(store)
        if old is None:
            report.tags_dropped.append(f"no tags restored: there is no {store.journal.path.name} and the old index's"
                                       " tags table does not read")
            return []
        report.tag_source = "the old index"
        candidates = old
    kept: list[Tag] = []
    for tag in sorted(candidates, key=lambda t: (t.name, t.version)):
        actual = present.get(tag.digest)
        if actual is None:
            report.tags_dropped.append(f"{tag.ref}: its {TYPE_NAMES.get(tag.type, 'object')}"
                                       f" {fmt.format_digest(tag.digest)} is in no pack")
        elif actual != tag.type:
            report.tags_dropped.append(f"{tag.ref}: {fmt.format_digest(tag.digest)} is a"
                                       f" {TYPE_NAMES.get(actual, '?')}, not a {TYPE_NAMES.get(tag.type, '?')}")
        else:
            kept.append(tag)
            report.tags_restored.append(tag.ref)
    return kept


@dataclass(slots=True)
class _Extras:
    """What the new index gets besides packs, objects and tags."""

    attachments: list[tuple[bytes, bytes]]
    revisions: list[tuple[str, int, bytes, int]]
    cache: list[tuple[str, str, int]]
    settings: list[tuple[str, str]]


def _salvage(store: LocalStore, attachments: set[tuple[bytes, bytes]], report: RepairReport) -> _Extras:
    """Attachments from the packs (and the old index); revisions, cache marks and settings
    from the old index, each as far as it reads. Every table that does not is named."""
    extras = _Extras(sorted(attachments), [], [], [])
    old = store.index
    with contextlib.suppress(CnpsfsError):  # every detached object names its subject: nothing is lost
        extras.attachments = sorted(attachments | set(old.attachments()))
    for what, read, consequence in (
            ("revisions", old.revisions, "if it had any, rollback protection restarts from the next revision a"
             " policy accepts"),
            ("cache_packs", old.cache_marks, "if the store cached remote blocks, they are ordinary packs now"),
            ("settings", old.settings, "if the cache size was set, it is back to its default")):
        try:
            rows: Any = read()
        except CnpsfsError:
            report.unread.append(f"the old index's {what} table does not read: {consequence}")
            continue
        if what == "revisions":
            extras.revisions = rows
        elif what == "cache_packs":
            extras.cache = rows
        else:
            extras.settings = rows
    return extras


def _replace_index(store: LocalStore, packs: list[tuple[str, int]], rows: list[tuple[object, ...]],
                   tags: list[Tag], extras: _Extras) -> str:
    """Write the new index beside the old, then swap it in; returns where the old one went.

    The old file is hard-linked to its backup name first and the new one renamed over it,
    so there is always an ``index.sqlite``. The old -wal goes with the backup and the old
    -shm is removed before the rename: SQLite would otherwise apply the old WAL to the new
    database. Mounts running meanwhile keep their connections to the old file.
    """
    index_path = store.index.path
    new_path = index_path.with_name(index_path.name + ".new")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    backup = index_path.with_name(f"{index_path.name}.damaged-{stamp}")
    number = 1
    while backup.exists():  # a second repair within the same second
        number += 1
        backup = index_path.with_name(f"{index_path.name}.damaged-{stamp}.{number}")
    with store_io(f"cannot write the new index {new_path}"):
        for leftover in (new_path, *_sidecars(new_path)):
            leftover.unlink(missing_ok=True)
        Index.create(new_path)
        fresh = Index(new_path)
        try:
            fresh.publish(packs, rows, [(t.name, t.version, t.type, t.digest, t.created_ns) for t in tags],
                          replace=False, retire_packs=(), attach=extras.attachments)
            fresh.restore(revisions=extras.revisions, cache=extras.cache, settings=extras.settings)
            fresh.checkpoint()
        finally:
            fresh.close()
        fd = os.open(new_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    store.index.close()
    store.packs.close()
    with store_io(f"cannot replace the index {index_path}"):
        if index_path.exists():
            os.link(index_path, backup)
        wal, shm = _sidecars(index_path)
        if wal.exists():
            os.rename(wal, backup.with_name(backup.name + "-wal"))
        shm.unlink(missing_ok=True)
        os.rename(new_path, index_path)
        fsync_dir(store.path)
    return str(backup) if backup.exists() else ""


def _sidecars(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")


def _check_tags(store: LocalStore, report: RepairReport) -> None:
    """Name each restored tag whose content is now incomplete (verify names the objects)."""
    from cnpsfs.store.maintenance import reachable

    reopened = LocalStore(store.path)
    try:
        for tag in reopened.tags():
            lost: list[int] = []

            def missing(_digest: bytes, _parent: bytes | None, is_chunk: bool, lost: list[int] = lost) -> None:
                lost.append(int(is_chunk))

            with contextlib.suppress(CnpsfsError):
                reachable(reopened, [tag.digest], on_missing=missing)
            if lost:
                chunks = sum(lost)
                report.incomplete.append(f"{tag.ref}: {chunks} chunks and {len(lost) - chunks} objects are lost"
                                         f" (`cnpsfs verify {tag.ref}` names them)")
    finally:
        reopened.close()
