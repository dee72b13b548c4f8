"""Store-wide operations: verify, garbage collection, usage accounting."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError, CorruptObjectError, FormatError, MissingObjectError, StoreError
from cnpsfs.process import pid_alive
from cnpsfs.store.blocks import decompress_block
from cnpsfs.store.index import BlockRow
from cnpsfs.store.local import LocalStore
from cnpsfs.store.packs import flock, header_size, is_locked, reclaim_temporary, store_io
from cnpsfs.store.protocol import (
    T_CHUNK,
    T_DIR,
    T_EXTENTS,
    T_FILESET,
    T_IMAGE,
    T_PROVENANCE,
    T_SIGNATURE,
    TYPE_NAMES,
    HostedStore,
    Store,
)
from cnpsfs.store.writer import DEFAULT_ZSTD_LEVEL, StoreWriter

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- roots


def roots_dirs(store: HostedStore, runtime: Path | None) -> list[Path]:
    """Where live mounts of *store* register roots: ``run/`` in the store, and for a store
    opened read-only (where nothing may be written) ``<runtime>/roots/<store id>/``.

    The store id is the directory's device and inode, so a read-only bind mount of a store
    and its writable path, which share both, find the same roots: gc on the writable path
    keeps what a mount through the read-only one serves.
    """
    dirs = [store.run_dir]
    if runtime is not None:
        st = os.stat(store.path)
        dirs.append(runtime / "roots" / f"{st.st_dev:x}-{st.st_ino:x}")
    return dirs


def live_roots(store: HostedStore, runtime: Path | None = None) -> set[bytes]:
    """Digests registered by running mounts (``<pid>.roots``); files of dead processes are removed."""
    roots: set[bytes] = set()
    for directory in roots_dirs(store, runtime):
        if not directory.is_dir():
            continue
        for path in directory.glob("*.roots"):
            if not path.stem.isdigit() or not pid_alive(int(path.stem)):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            with contextlib.suppress(FileNotFoundError):
                for line in path.read_text().split():
                    with contextlib.suppress(FormatError):
                        roots.add(fmt.parse_digest(line))
    return roots


def _own_roots_dir(store: HostedStore, runtime: Path | None) -> Path:
    if store.read_only is None:
        return store.run_dir
    if runtime is None:
        store.check_writable("registering the roots of a mount")
    return roots_dirs(store, runtime)[-1]


def register_roots(store: HostedStore, digests: Iterable[bytes], runtime: Path | None = None) -> None:
    """Record what this process serves, so gc keeps it even if its tags are removed.

    In the store's ``run/`` when the store is writable, else under *runtime* (nothing is
    written into a read-only store).
    """
    directory = _own_roots_dir(store, runtime)
    with store_io(f"cannot register the roots of this mount in {directory}"):
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{os.getpid()}.roots"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(fmt.format_digest(d) + "\n" for d in digests))
        os.replace(tmp, path)


def unregister_roots(store: HostedStore, runtime: Path | None = None) -> None:
    with contextlib.suppress(OSError, CnpsfsError):
        directory = _own_roots_dir(store, runtime)
        (directory / f"{os.getpid()}.roots").unlink()
        if directory != store.run_dir:
            directory.rmdir()  # the last mount of this read-only store: no empty directory left (ENOTEMPTY else)


# --------------------------------------------------------------------------- traversal


def reachable(store: Store, roots: Iterable[bytes],
              on_missing: Callable[[bytes, bytes | None, bool], None] | None = None) -> set[bytes]:
    """Every digest reachable from *roots* (objects and chunks).

    *on_missing(digest, parent, is_chunk)* is called for a named but absent digest;
    without it a missing object raises.
    """
    seen: set[bytes] = set()
    stack: list[tuple[bytes, bytes | None, bool]] = [(r, None, False) for r in roots]
    while stack:
        digest, parent, is_chunk = stack.pop()
        if digest in seen:
            continue
        if is_chunk:
            if not store.contains(digest):
                if on_missing is None:
                    raise MissingObjectError(f"chunk {fmt.format_digest(digest)} is missing")
                on_missing(digest, parent, True)
                continue
            seen.add(digest)
            continue
        try:
            data = store.get(digest)
        except MissingObjectError:
            if on_missing is None:
                raise
            on_missing(digest, parent, False)
            continue
        except CorruptObjectError:
            if on_missing is None:
                raise
            seen.add(digest)  # reported by the rehash pass
            continue
        seen.add(digest)
        for child, child_is_chunk in fmt.referenced_digests(data):
            if child not in seen:
                stack.append((child, digest, child_is_chunk))
    return seen


def with_attachments(store: Store, seen: set[bytes],
                     on_missing: Callable[[bytes, bytes | None, bool], None] | None = None) -> set[bytes]:
    """*seen* plus the detached objects (signatures, provenance) of everything in it, and what
    those reach, to a fixed point: a signature lives exactly as long as its subject."""
    pending = store.attachments()
    while True:
        new = [digest for subject, digest in pending if subject in seen and digest not in seen]
        if not new:
            return seen
        seen |= reachable(store, new, on_missing)


def tag_roots(store: Store) -> set[bytes]:
    return {tag.digest for tag in store.tags()}


# --------------------------------------------------------------------------- verify


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    #: The index itself is damaged or disagrees with packs/: `cnpsfs store repair` helps.
    repairable: bool = False
    #: What killed writers left (packs no index row names): not damage, gc removes it.
    leftovers: list[str] = field(default_factory=list)


_PLURALS = {T_CHUNK: "chunks", T_DIR: "directories", T_EXTENTS: "extents objects", T_FILESET: "FileSets",
            T_IMAGE: "images", T_SIGNATURE: "signatures", T_PROVENANCE: "provenance objects"}


def _count_types(types: Iterable[int]) -> str:
    """``412 chunks, 2 directories``: what a pack held, for one summary line."""
    counts: dict[int, int] = {}
    for t in types:
        counts[t] = counts.get(t, 0) + 1
    return ", ".join(f"{n} {TYPE_NAMES.get(t, 'object') if n == 1 else _PLURALS.get(t, 'objects')}"
                     for t, n in sorted(counts.items()))


def _check_packs(store: LocalStore, report: VerifyReport) -> set[int]:
    """Compare the index's packs with packs/: one line per pack, never one per object.

    Returns the ids of packs whose objects cannot be read (file missing or shorter than
    recorded, or no packs row at all), so the later passes do not report each object.
    """
    index = store.index
    files = {p.stem: p for p in store.packs_dir.glob("*.pack")} if store.packs_dir.is_dir() else {}
    packs = index.packs()
    rows = index.rows_per_pack()
    types: dict[int, list[int]] = {}
    bad: set[int] = set()
    known = {pack_id for pack_id, _n, _s in packs}
    for pack_id, name, size in packs:
        path = files.get(name)
        if path is None:
            bad.add(pack_id)
        else:
            actual = path.stat().st_size
            if actual < size:
                bad.add(pack_id)
    bad |= set(rows) - known
    if bad:
        for block in index.blocks():
            if block.loc.pack in bad:
                types.setdefault(block.loc.pack, []).extend(m[1] for m in block.members)
    for pack_id, name, size in packs:
        if pack_id not in bad:
            continue
        lost = _count_types(types.get(pack_id, [])) or "no objects"
        path = files.get(name)
        if path is None:
            report.problems.append(f"pack {name}.pack is missing: {lost} lost")
        else:
            report.problems.append(f"pack {name}.pack is truncated ({path.stat().st_size} of {size} bytes):"
                                   f" {lost} unreadable")
    for pack_id in sorted(set(rows) - known):
        report.problems.append(f"{_count_types(types.get(pack_id, []))} name pack id {pack_id}, which the index"
                               " does not list")
    for name in sorted(set(files) - {n for _i, n, _s in packs}):
        if is_locked(files[name]):
            continue  # a writer between its rename and its index commit
        # A writer killed between renaming its pack and committing leaves exactly this: a
        # leftover for gc, unless the index lost rows (then the integrity check fails too).
        report.leftovers.append(f"pack {name}.pack ({files[name].stat().st_size} bytes) is in packs/ but not in"
                                " the index: nothing it holds is visible (gc removes it; `cnpsfs store repair`"
                                " indexes it)")
    if bad or report.problems:
        report.repairable = True
    return bad


def verify(store: LocalStore, roots: list[bytes] | None,
           on_progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Check the index (SQLite's integrity check, packs against packs/), then rehash every
    stored record (or those reachable from *roots*) and check references.

    A damaged index is reported, not raised: the report says what could not be checked
    and ``repairable`` tells the caller to suggest ``cnpsfs store repair``.
    """
    report = VerifyReport()
    index = store.index
    try:
        problems = index.integrity_check()
    except StoreError as exc:
        problems = [str(exc)]
    if problems:
        report.repairable = True
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        report.problems.append(f"the store index {index.path} fails SQLite's integrity check: {shown}")
    try:
        bad_packs = _check_packs(store, report)
        _verify_objects(store, roots, report, bad_packs, on_progress)
    except StoreError as exc:
        report.repairable = True
        report.problems.append(f"verify stopped: {exc}")
    return report


def _verify_objects(store: LocalStore, roots: list[bytes] | None, report: VerifyReport, bad_packs: set[int],
                    on_progress: Callable[[int], None] | None) -> None:
    def missing(digest: bytes, parent: bytes | None, is_chunk: bool) -> None:
        loc = store.index.locate(digest)
        if loc is not None and loc.pack in bad_packs:
            return  # counted in its pack's line
        what = "chunk" if is_chunk else "object"
        named = f" (named by {fmt.format_digest(parent)})" if parent else ""
        report.problems.append(f"missing {what} {fmt.format_digest(digest)}{named}")

    wanted = reachable(store, roots if roots is not None else tag_roots(store), on_missing=missing)
    wanted = with_attachments(store, wanted, on_missing=missing)
    dctx = zstandard.ZstdDecompressor()
    for block in store.index.blocks():
        loc = block.loc
        if loc.pack in bad_packs:
            continue
        members = [m for m in block.members if roots is None or m[0] in wanted]
        if not members:
            continue
        try:
            raw = decompress_block(loc, store.read_block(loc), dctx, store.describe(loc))
        except (CorruptObjectError, MissingObjectError, OSError) as exc:
            for digest, type_code, _inner, _length in members:
                report.problems.append(f"{TYPE_NAMES.get(type_code)} {fmt.format_digest(digest)}: {exc}")
            report.checked += len(members)
            continue
        for digest, type_code, inner, length in members:
            report.checked += 1
            data = raw[inner : inner + length]
            what = f"{TYPE_NAMES.get(type_code)} {fmt.format_digest(digest)}"
            if fmt.digest_bytes(data) != digest:
                report.problems.append(f"{what} is corrupt: its bytes do not match its digest")
            elif type_code != T_CHUNK:
                try:
                    fmt.referenced_digests(data)
                except FormatError as exc:
                    report.problems.append(f"{what} does not decode: {exc}")
        if on_progress is not None:
            on_progress(loc.stored)


# --------------------------------------------------------------------------- gc


@dataclass(slots=True)
class GcReport:
    removed_objects: int = 0
    removed_packs: int = 0
    repacked: int = 0
    removed_tmp: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    #: Cache packs (blocks fetched from remotes): kept, since they can be refetched but need not be.
    cache_packs: int = 0
    cache_bytes: int = 0


def _record_size(block: BlockRow) -> int:
    """Bytes a block's record occupies in its pack: headers and payload."""
    loc = block.loc
    if loc.header is not None:
        return loc.offset + loc.stored - loc.header
    return header_size(len(block.members)) + loc.stored


def live_bytes(blocks: Iterable[BlockRow], keep: set[bytes]) -> dict[int, float]:
    """Pack id -> bytes of its records that hold live members (a block counted by its live share).

    Measured against the pack's real size (``packs.size``), this sees every dead byte: a
    block whose rows were all deleted counts nothing, whether the rows went in this gc or
    in an earlier one that was killed before it could repack.
    """
    live: dict[int, float] = {}
    for block in blocks:
        raw = block.loc.raw
        alive = sum(length for digest, _t, _i, length in block.members if digest in keep)
        if alive and raw:
            live[block.loc.pack] = live.get(block.loc.pack, 0.0) + _record_size(block) * alive / raw
    return live


def gc(store: LocalStore, *, repack_below: float = 0.5, dry_run: bool = False,
       runtime: Path | None = None) -> GcReport:
    """Delete everything no tag, image or live mount reaches; repack sparse packs.

    Holds the store lock exclusively, so no import is half-way while it runs. Cache packs
    (blocks fetched from remotes, docs/format.md 2.6) are not garbage: gc keeps them and
    their members whole and leaves them to the cache's bound (``cnpsfs cache evict``);
    what running mounts serve from a remote may be partly absent locally, which is fine.

    Crash-safe: every step leaves a store the next gc finishes. Dead rows and emptied
    packs go in one transaction (their files after it: a file without a row is an orphan
    the next gc removes); a pack whose live bytes are below *repack_below* of its size is
    repacked in one transaction of its own, and since liveness is measured against the
    pack's size, not against rows that a killed gc may already have deleted, an
    interrupted repack is simply done again.
    """
    store.check_writable("gc")
    report = GcReport(bytes_before=store.disk_usage())
    with flock(store.path / "lock", fcntl.LOCK_EX):
        index = store.index
        problems = index.integrity_check(limit=1, quick=True)
        if problems:
            raise StoreError(f"gc refuses to run on a damaged index ({index.path}: {problems[0]}):"
                             " run `cnpsfs store repair` first")
        for tmp in store.tmp_dir.glob("*"):
            if not is_locked(tmp):
                report.removed_tmp += 1
                if not dry_run:
                    tmp.unlink(missing_ok=True)
        # What reading remotes keeps (store/remote: tag answers, image indexes) is written
        # through temporary names that say whose they are; a dead process's are garbage.
        state = store.path / "remote"
        if state.is_dir():
            dirs = [state, *(p for p in state.rglob("*") if p.is_dir() and not p.is_symlink())]
            report.removed_tmp += len(reclaim_temporary(dirs, dry_run=dry_run))
        # A writer killed between renaming its pack into packs/ and committing the index
        # leaves a pack no row names. No writer is mid-commit while we hold the lock.
        packs = index.packs()
        indexed = {name for _id, name, _size in packs}
        for orphan in store.packs_dir.glob("*.pack"):
            if orphan.stem not in indexed:
                report.removed_tmp += 1
                if not dry_run:
                    orphan.unlink(missing_ok=True)
        keep = reachable(store, tag_roots(store))
        keep |= reachable(store, live_roots(store, runtime), on_missing=lambda *_a: None)  # lazy remote mounts
        keep = with_attachments(store, keep)
        cache = {pack: size for pack, _remote, size, _used in index.cache_packs()}
        report.cache_packs, report.cache_bytes = len(cache), sum(cache.values())
        for pack in cache:
            keep.update(d for d, _t in index.pack_members(pack))
        packs = [(pack_id, name, size) for pack_id, name, size in packs if pack_id not in cache]
        blocks = index.blocks()
        dead = [d for block in blocks for d, _t, _i, _l in block.members if d not in keep]
        report.removed_objects = len(dead)
        live = live_bytes(blocks, keep)
        empty = [(pack_id, name) for pack_id, name, _size in packs if not live.get(pack_id)]
        sparse = [(pack_id, name) for pack_id, name, size in packs
                  if live.get(pack_id) and live[pack_id] < size * repack_below]
        report.removed_packs = len(empty)
        report.repacked = len(sparse)
        if dry_run:
            return report
        dead_attachments = [(s, d) for s, d in index.attachments() if s not in keep or d not in keep]
        index.retire(dead, [pack_id for pack_id, _name in empty])
        if dead_attachments:
            index.detach(dead_attachments)
        for pack_id, name in empty:
            store.packs.forget(pack_id)
            (store.packs_dir / f"{name}.pack").unlink(missing_ok=True)
        for pack_id, name in sparse:
            _repack(store, pack_id, name)
        tags = index.tags()
        if store.journal.lines() > 2 * len(tags) + 64:
            store.journal.rewrite(tags)
    report.bytes_after = store.disk_usage()
    return report


def _repack(store: LocalStore, pack_id: int, name: str) -> None:
    """Rewrite a pack's live members into new blocks, then drop the old pack."""
    writer = StoreWriter(store, DEFAULT_ZSTD_LEVEL)
    dctx = zstandard.ZstdDecompressor()
    try:
        for block in store.index.blocks(pack_id):
            loc = block.loc
            raw = decompress_block(loc, store.read_block(loc), dctx, store.describe(loc))
            for digest, type_code, inner, length in block.members:
                writer.add_chunk(digest, raw[inner : inner + length], type_code)
        writer.commit(replace=True, retire_packs=[pack_id])
    finally:
        writer.discard()
    store.packs.forget(pack_id)
    (store.packs_dir / f"{name}.pack").unlink(missing_ok=True)
