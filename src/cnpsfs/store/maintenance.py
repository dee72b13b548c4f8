"""Store-wide operations: verify, garbage collection, usage accounting."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import zstandard

from cnpsfs import format as fmt
from cnpsfs.errors import CorruptObjectError, FormatError, MissingObjectError
from cnpsfs.store.blocks import decompress_block
from cnpsfs.store.local import LocalStore
from cnpsfs.store.packs import flock, is_locked
from cnpsfs.store.protocol import T_CHUNK, TYPE_NAMES, Store
from cnpsfs.store.writer import DEFAULT_ZSTD_LEVEL, StoreWriter

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- roots


def live_roots(store: LocalStore) -> set[bytes]:
    """Digests registered by running mounts (``run/<pid>.roots``); stale files are removed."""
    roots: set[bytes] = set()
    if not store.run_dir.is_dir():
        return roots
    for path in store.run_dir.glob("*.roots"):
        try:
            pid = int(path.stem)
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        except PermissionError:
            pass  # alive, owned by someone else
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text().split():
                with contextlib.suppress(FormatError):
                    roots.add(fmt.parse_digest(line))
    return roots


def register_roots(store: LocalStore, digests: Iterable[bytes]) -> None:
    """Record what this process serves, so gc keeps it even if its tags are removed."""
    store.run_dir.mkdir(exist_ok=True)
    path = store.run_dir / f"{os.getpid()}.roots"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(fmt.format_digest(d) + "\n" for d in digests))
    os.replace(tmp, path)


def unregister_roots(store: LocalStore) -> None:
    with contextlib.suppress(FileNotFoundError):
        (store.run_dir / f"{os.getpid()}.roots").unlink()


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


def verify(store: LocalStore, roots: list[bytes] | None,
           on_progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Rehash every stored record (or those reachable from *roots*) and check references."""
    report = VerifyReport()

    def missing(digest: bytes, parent: bytes | None, is_chunk: bool) -> None:
        what = "chunk" if is_chunk else "object"
        named = f" (named by {fmt.format_digest(parent)})" if parent else ""
        report.problems.append(f"missing {what} {fmt.format_digest(digest)}{named}")

    wanted = reachable(store, roots if roots is not None else tag_roots(store), on_missing=missing)
    wanted = with_attachments(store, wanted, on_missing=missing)
    dctx = zstandard.ZstdDecompressor()
    for block in store.index.blocks():
        loc = block.loc
        members = [m for m in block.members if roots is None or m[0] in wanted]
        if not members:
            continue
        try:
            raw = decompress_block(loc, store.read_block(loc), dctx, store.describe(loc))
        except (CorruptObjectError, OSError) as exc:
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
    return report


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


def gc(store: LocalStore, *, repack_below: float = 0.5, dry_run: bool = False) -> GcReport:
    """Delete everything no tag, image or live mount reaches; repack sparse packs.

    Holds the store lock exclusively, so no import is half-way while it runs. Cache packs
    (blocks fetched from remotes, docs/format.md 2.6) are not garbage: gc keeps them and
    their members whole and leaves them to the cache's bound (``cnpsfs cache evict``);
    what running mounts serve from a remote may be partly absent locally, which is fine.
    """
    report = GcReport(bytes_before=store.disk_usage())
    with flock(store.path / "lock", fcntl.LOCK_EX):
        for tmp in store.tmp_dir.glob("*"):
            if not is_locked(tmp):
                report.removed_tmp += 1
                if not dry_run:
                    tmp.unlink(missing_ok=True)
        index = store.index
        # A writer killed between renaming its pack into packs/ and committing the index
        # leaves a pack no row names. No writer is mid-commit while we hold the lock.
        indexed = {name for _id, name, _size in index.packs()}
        for orphan in store.packs_dir.glob("*.pack"):
            if orphan.stem not in indexed:
                report.removed_tmp += 1
                if not dry_run:
                    orphan.unlink(missing_ok=True)
        keep = reachable(store, tag_roots(store))
        keep |= reachable(store, live_roots(store), on_missing=lambda *_a: None)  # lazy remote mounts
        keep = with_attachments(store, keep)
        cache = {pack: size for pack, _remote, size, _used in index.cache_packs()}
        report.cache_packs, report.cache_bytes = len(cache), sum(cache.values())
        for pack in cache:
            keep.update(d for d, _t in index.pack_members(pack))
        rows = index.all_objects()
        dead = [d for d, _p, _r, _l in rows if d not in keep]
        report.removed_objects = len(dead)
        live_share: dict[int, float] = {}  # estimated live bytes per pack (share of each block)
        for digest, pack, raw, length in rows:
            if digest in keep and raw:
                live_share[pack] = live_share.get(pack, 0.0) + length / raw
        # Count blocks before the dead rows go: a block holding only garbage still occupies its pack.
        block_counts = index.blocks_per_pack()
        if dry_run:
            return report
        index.delete_objects(dead)
        dead_attachments = [(s, d) for s, d in index.attachments() if s not in keep or d not in keep]
        if dead_attachments:
            index.detach(dead_attachments)
        for pack_id, name, _size in index.packs():
            if pack_id in cache:
                continue
            live = live_share.get(pack_id, 0.0)
            if live == 0:
                index.delete_pack(pack_id)
                store.packs.forget(pack_id)
                (store.packs_dir / f"{name}.pack").unlink(missing_ok=True)
                report.removed_packs += 1
            elif live < block_counts.get(pack_id, 1) * repack_below:
                _repack(store, pack_id, name)
                report.repacked += 1
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
