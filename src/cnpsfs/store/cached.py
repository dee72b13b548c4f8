"""A local store in front of remotes: desync's ``Cache{remote, local}`` for the Store protocol.

:class:`CachedStore` reads the local store first. What it lacks is located in the remotes,
in order (an image's remote index is opened when its reference is resolved there, or by
its digest tag when a local image needs a block it no longer has), fetched with one Range
request per block (adjacent blocks wanted together merged, see
:meth:`RemoteStore.start_fetch`), verified, and written into the local store as the very
records the remote holds, so a second mount or a remount reads locally. One fetch runs per
block however many threads want it (single flight); a block that fails on one remote is
tried on the next.

**Read-ahead.** A demand miss of a small data block (raw size at most the remote's
``read-ahead``: a hot small-file block, docs/format.md 2.1) also fetches the chunk blocks
stored around it in its blob (:meth:`RemoteStore.around`), in the same request where they
are adjacent, each under its own single flight; a reader that gets to one of them while it
is still in memory has the blocks after it fetched in turn. Python's start-up reads a few
hundred small files of a region of the hot stream in import order, not path order: at
20 ms RTT a first run waits for about a fifth fewer round trips (docs/performance.md,
"Remote read-ahead"). It is advice: a neighbour we have, have fetched or are fetching is
skipped, a bad one is dropped unrepaired (:attr:`DecodedBlock.advice`: its reader fetches
it again in earnest), it takes at most 1/:data:`AHEAD_SHARE` of a bounded cache, and the
loads of a profile replay (:meth:`planned`) bring none.

**Crash safety.** Fetched records wait in memory for at most a second (or
:data:`COMMIT_BYTES`), then go through an ordinary store writer: temporary pack, fsync,
rename, one transaction that adds the index rows and marks the new pack as a *cache pack*
of its remote. A killed daemon loses at most the last second of fetches, never
consistency (``cnpsfs verify`` passes), and a remount with the network down serves
everything that was committed.

**The bound.** With a cache size (``--cache-size``, or the store setting
``cache-size``), the least recently used cache packs are evicted when the cache grows past
it, never a pack holding anything a local tag reaches, nor the metadata (directories,
extents, FileSets, images) of an image a running mount serves, nor a pack read in the last
:data:`PIN_SECONDS` by any process (the mount's working set, so a read does not evict
what the read before it fetched). Cache packs are whole
commit batches of blocks fetched together, so they are evicted whole and the space comes
back at once; metadata blocks and data blocks are committed into separate packs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError, CorruptObjectError, MissingObjectError, NotFoundError, UnavailableError
from cnpsfs.store.index import Location
from cnpsfs.store.local import LocalStore
from cnpsfs.store.maintenance import live_roots, reachable, tag_roots
from cnpsfs.store.packs import flock
from cnpsfs.store.protocol import T_CHUNK, TYPE_NAMES, BlockReader, DecodedReads, NotCached, Tag
from cnpsfs.store.remote import DecodedBlock, RemoteLocation, RemoteStore

log = logging.getLogger(__name__)

#: Fetched records are committed to the local store when this many bytes wait, or after COMMIT_SECONDS.
COMMIT_BYTES = 8 << 20
COMMIT_SECONDS = 1.0
#: A cache pack read this recently is not evicted (flushed to the index every TOUCH_SECONDS).
PIN_SECONDS = 10.0
TOUCH_SECONDS = 5.0
#: Eviction (a walk of what tags and mounts reach) runs at most this often.
EVICT_EVERY = 5.0
#: Eviction brings the cache down to this share of its size.
EVICT_TO = 0.9
SETTING_CACHE_SIZE = "cache-size"
#: Blocks fetched ahead and not read yet, remembered (oldest forgotten first) to count the used ones.
AHEAD_MAX = 4096
#: A read-ahead takes at most this share of a bounded cache.
AHEAD_SHARE = 8


@dataclass(slots=True)
class _Pending:
    """A fetched, verified block waiting to be committed (and readable meanwhile)."""

    loc: RemoteLocation
    members: list[tuple[bytes, int, int, int]]
    data: dict[bytes, bytes | None]
    record: bytes


def parse_size(text: str) -> int:
    """``512M``, ``2G``, ``1.5GiB``, ``0`` (no cache kept), or plain bytes."""
    from cnpsfs.errors import UsageError

    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in units else ""
    number = value[: len(value) - len(unit)] if unit else value
    try:
        size = float(number) * units[unit]
    except ValueError:
        raise UsageError(f"bad size {text!r}: expected a number with an optional K, M, G or T") from None
    if size < 0:
        raise UsageError(f"bad size {text!r}: negative")
    return int(size)


class CachedStore(DecodedReads):
    """The Store protocol over *local* and *remotes* (see the module doc)."""

    def __init__(self, local: LocalStore, remotes: Sequence[RemoteStore], *, cache_size: int | None = None,
                 commit_bytes: int = COMMIT_BYTES, commit_seconds: float = COMMIT_SECONDS) -> None:
        self.local = local
        self.remotes = list(remotes)
        if cache_size is None:
            setting = local.index.setting(SETTING_CACHE_SIZE) if local.index.has_cache_schema() else None
            cache_size = parse_size(setting) if setting else None
        self.cache_size = cache_size
        self.commit_bytes = commit_bytes
        self.commit_seconds = commit_seconds
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, concurrent.futures.Future[Any]] = {}
        self._pending: dict[Hashable, _Pending] = {}
        self._pending_bytes = 0
        self._pending_since = 0.0
        self._roots: list[bytes] = []  # images resolved through us: their remote indexes serve misses
        self._opened: set[tuple[int, bytes]] = set()  # (remote number, root) whose index we tried to open
        self._touched: dict[int, int] = {}
        #: Remote block keys this process committed locally (bounded): their members are local now.
        self._committed: dict[Hashable, None] = {}
        #: Blocks fetched as a read-ahead that no reader has asked for yet (bounded).
        self._ahead: dict[Hashable, None] = {}
        self._thread = threading.local()  # .planned: see planned()
        self._committer: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = False
        self._commit_lock = threading.Lock()
        self._last_touch_flush = time.monotonic()
        self._last_evict = 0.0

    # ------------------------------------------------------------------ what the mount needs of a local store

    @property
    def path(self) -> Path:
        return self.local.path

    @property
    def run_dir(self) -> Path:
        return self.local.run_dir

    @property
    def read_only(self) -> str | None:
        """Why the local store cannot be written (where a mount registers its roots then)."""
        return self.local.read_only

    def check_writable(self, what: str = "this command") -> None:
        self.local.check_writable(what)

    def shared_lock(self) -> contextlib.AbstractContextManager[None]:
        return self.local.shared_lock()

    def close(self) -> None:
        """Commit what was fetched, stop the committer, release connections; usable again after."""
        with self._lock:
            thread, self._committer = self._committer, None
            self._stop = True
        self._wake.set()
        if thread is not None:
            thread.join()
        self._stop = False
        self._wake.clear()
        self.commit()
        self._flush_touches(force=True)
        for remote in self.remotes:
            remote.close()
        # Fetches still queued when the pools shut down never run: whoever waits for them
        # (in this process, or in a daemon forked after this close) must hear so, not hang.
        with self._lock:
            stranded, self._inflight = self._inflight, {}
        for fut in stranded.values():
            if not fut.done():
                fut.set_exception(UnavailableError(f"{self.local.path}: a remote fetch was abandoned: the store "
                                                   "was closed"))
        self.local.close()

    def scratch_dir(self) -> Path:
        return self.local.scratch_dir()

    def writer(self, *, pool: concurrent.futures.Executor | None = None,
               level: int | None = None) -> contextlib.AbstractContextManager[Any]:
        return self.local.writer(pool=pool, level=level)

    # ------------------------------------------------------------------ names

    def resolve(self, ref: str, *, want: int | None = None) -> bytes:
        """Locally first, else in the remotes in order; the image's remote index is kept open."""
        local_error: NotFoundError | None = None
        try:
            digest = self.local.resolve(ref, want=want)
        except MissingObjectError:
            pass  # a local tag whose object was evicted: the remotes have it
        except NotFoundError as exc:
            if not self.remotes:
                raise
            local_error = exc
        else:
            self._remember_root(digest)
            return digest
        # Outside the except clause: an exception being handled would become the context
        # of every network error below (and confuse what their root cause was).
        return self._resolve_remote(ref, want, local_error)

    def resolve_ahead(self, ref: str) -> None:
        """Begin looking tag *ref* up in the first remote when the local store has no such tag.

        A lazy mount calls this as soon as it has its store, so the remote's round trips
        run while it imports and prepares its daemon; its :meth:`resolve` then finds the
        answers there (:meth:`RemoteStore.resolve_ahead`). The local check runs here, on
        the caller's thread and connection: a tag this store has needs no network.
        """
        if not self.remotes or ref.startswith(fmt.DIGEST_PREFIX):
            return
        name, _, version = ref.partition("@")
        try:
            if self.local.index.tag(name, version or None) is not None:
                return
        except CnpsfsError:
            return  # resolve() reports it
        self.remotes[0].resolve_ahead(ref)

    def _resolve_remote(self, ref: str, want: int | None, local_error: NotFoundError | None) -> bytes:
        errors: list[str] = []
        unavailable: UnavailableError | None = None
        for remote in self.remotes:
            try:
                digest = remote.resolve(ref, want=want, warm=True)
            except UnavailableError as exc:
                unavailable = unavailable or exc
                errors.append(str(exc))
                continue
            except NotFoundError as exc:
                errors.append(str(exc))
                continue
            self._remember_root(digest)
            self._warm(remote, digest)
            return digest
        if unavailable is not None:
            raise unavailable
        if local_error is not None:
            raise NotFoundError(f"{local_error}; " + "; ".join(errors)) from None
        raise NotFoundError("; ".join(errors))

    def _warm(self, remote: RemoteStore, digest: bytes) -> None:
        """Fetch an image's shards and metadata blocks now, all at once (a lazy mount's first step).

        Mounting and every lookup after it need the image's directories; fetched one by one
        on lookup each is a round trip on a program's critical path, while all of an
        image's metadata is a few per cent of it and lies in a few runs of blocks that
        merged Range requests fetch in parallel (:meth:`ImageIndex.preload`). Waits for
        them (bounded by the remote's timeout); a failure here is left for the read that
        needs the block to report. The ranges the remote fetched ahead (the manifest's
        meta-ranges, :meth:`RemoteStore.open_manifest`) serve these fetches, and are then
        dropped.
        """
        try:
            self._warm_blocks(remote, digest)
        finally:
            remote.drop_early()

    def _warm_blocks(self, remote: RemoteStore, digest: bytes) -> None:
        try:
            locs = remote.open_image(digest).preload()
        except CnpsfsError as exc:
            log.debug("%s: not preloading %s: %s", remote.name, fmt.format_digest(digest), exc)
            return
        with self._lock:
            locs = [loc for loc in locs if loc.block not in self._committed and loc.block not in self._pending
                    and loc.block not in self._inflight]
        locs = [loc for loc in locs if not self.local.contains(loc.digest)]
        if not locs:
            return
        self._start(remote, locs)
        with self._lock:
            futures = [f for loc in locs if (f := self._inflight.get(loc.block)) is not None]
        concurrent.futures.wait(futures, timeout=remote.timeout)
        self.stats["preloaded_blocks"] += len(locs)

    def _remember_root(self, digest: bytes) -> None:
        with self._lock:
            if digest not in self._roots:
                self._roots.append(digest)

    def tags(self, type_code: int | None = None) -> list[Tag]:
        return self.local.tags(type_code)

    def tags_for(self, digest: bytes) -> list[Tag]:
        return self.local.tags_for(digest)

    def set_tag(self, name: str, version: str, type_code: int, digest: bytes) -> None:
        self.local.set_tag(name, version, type_code, digest)

    def remove_tag(self, name: str, version: str) -> bool:
        return self.local.remove_tag(name, version)

    def attachments(self, subject: bytes | None = None) -> list[tuple[bytes, bytes]]:
        """Local ones, and those the remote indexes of our images file (signatures pushed with them)."""
        pairs = set(self.local.attachments(subject))
        for remote in self.remotes:
            pairs.update(remote.attachments(subject))
        return sorted(pairs)

    def detach(self, subject: bytes, digest: bytes) -> bool:
        return self.local.detach(subject, digest)

    def accepted_revision(self, name: str) -> tuple[int, bytes] | None:
        return self.local.accepted_revision(name)

    def record_revision(self, name: str, revision: int, digest: bytes) -> None:
        self.local.record_revision(name, revision, digest)

    # ------------------------------------------------------------------ locating

    def _remote_locate(self, digest: bytes, *, chunk_first: bool = True, skip: Iterable[str] = ()
                       ) -> RemoteLocation | None:
        """Where a remote has *digest*: remotes in order, opening the indexes of our images on need."""
        skipped = set(skip)
        for number, remote in enumerate(self.remotes):
            if remote.name in skipped:
                continue
            loc = remote.locate(digest, chunk_first=chunk_first)
            if loc is not None:
                return loc
            with self._lock:
                todo = [r for r in self._roots if (number, r) not in self._opened]
                self._opened.update((number, r) for r in todo)
            if not todo:
                continue
            for root in todo:
                try:
                    remote.open_image(root)
                except NotFoundError:
                    log.debug("%s does not have %s", remote.name, fmt.format_digest(root))
                except CnpsfsError as exc:
                    log.warning("%s: cannot open the index of %s: %s", remote.name, fmt.format_digest(root), exc)
                    with self._lock:
                        self._opened.discard((number, root))  # try again next time
            loc = remote.locate(digest, chunk_first=chunk_first)
            if loc is not None:
                return loc
        return None

    def locate_many(self, digests: Iterable[bytes]) -> dict[bytes, Location | RemoteLocation]:
        wanted = list(digests)
        found: dict[bytes, Location | RemoteLocation] = dict(self.local.locate_many(wanted))
        for digest in wanted:
            if digest in found:
                continue
            loc = self._remote_locate(digest)
            if loc is not None:
                found[digest] = loc
        return found

    def contains(self, digest: bytes) -> bool:
        return self.local.contains(digest) or self._remote_locate(digest, chunk_first=False) is not None

    def existing(self, digests: Iterable[bytes]) -> set[bytes]:
        wanted = list(digests)
        have = self.local.existing(wanted)
        return have | {d for d in wanted if d not in have and self._remote_locate(d) is not None}

    def object_type(self, digest: bytes) -> int | None:
        found = self.local.object_type(digest)
        if found is not None:
            return found
        loc = self._remote_locate(digest, chunk_first=False)
        return loc.type if loc is not None else None

    def describe(self, loc: Any) -> str:
        if isinstance(loc, RemoteLocation):
            return self._remote_by_name(loc.remote).describe(loc)
        return self.local.describe(loc)

    pack_label = describe

    def _remote_by_name(self, name: str) -> RemoteStore:
        for remote in self.remotes:
            if remote.name == name:
                return remote
        raise AssertionError(f"no remote {name}")

    # ------------------------------------------------------------------ reading

    @contextlib.contextmanager
    def cache_only(self) -> Iterator[None]:
        with self.local.cache_only():
            yield

    def get(self, digest: bytes) -> bytes:
        """Local bytes if there are any (verified), else fetched, verified and cached."""
        try:
            data = self.local.get(digest)
        except NotCached:
            raise
        except (MissingObjectError, CorruptObjectError) as exc:
            if isinstance(exc, CorruptObjectError):
                log.warning("%s; fetching it again from a remote", exc)
            if not self.remotes:
                raise
        else:
            self.stats["hits"] += 1
            return data
        return self._fetch_member(digest)

    def _fetch_member(self, digest: bytes) -> bytes:
        tried: list[str] = []
        last: CnpsfsError | None = None
        while True:
            loc = self._remote_locate(digest, chunk_first=False, skip=tried)
            if loc is None:
                if last is not None:
                    raise last
                raise MissingObjectError(f"{fmt.format_digest(digest)} is not in the store nor on "
                                         + ", ".join(r.name for r in self.remotes))
            try:
                block = self._remote_block(loc)
            except (UnavailableError, CorruptObjectError) as exc:
                last = exc
                tried.append(loc.remote)
                if len(tried) < len(self.remotes):
                    log.warning("%s; trying the next remote", exc)
                continue
            data = block.member(digest)
            if data is not None:
                return data
            last = CorruptObjectError(f"{TYPE_NAMES.get(loc.type, 'object')} {fmt.format_digest(digest)} is "
                                      f"corrupt: its bytes do not match its digest (block at {self.describe(loc)})")
            tried.append(loc.remote)

    # ------------------------------------------------------------------ blocks (the read path)

    def open_block(self, loc: Any) -> BlockReader:
        if isinstance(loc, RemoteLocation):
            if loc.block in self._committed and loc.digest:
                local = self.local.locate(loc.digest)
                if local is not None:
                    return self.open_block(local)
            block = self._remote_block(loc)
            if not block.intact and len(self.remotes) > 1 and loc.digest:
                # A bad member: another remote may have a good copy of the one we were asked for.
                other = self._remote_locate(loc.digest, skip=[loc.remote])
                if other is not None:
                    with contextlib.suppress(UnavailableError, CorruptObjectError):
                        block = self._remote_block(other)
            return block
        try:
            reader = self.local.open_block(loc)
        except FileNotFoundError:
            # Evicted (or repacked) by another process since we located it: locate again.
            self.local.packs.forget(loc.pack)
            raise MissingObjectError(f"block at pack {loc.pack} offset {loc.offset} is gone") from None
        self.stats["hits"] += 1
        self._touch(loc.pack)
        return reader

    @contextlib.contextmanager
    def planned(self) -> Iterator[None]:
        """Blocks opened on this thread meanwhile are a plan's (a profile replay's): no read-ahead."""
        self._thread.planned = True
        try:
            yield
        finally:
            self._thread.planned = False

    def prefetch(self, locs: Iterable[Any]) -> None:
        """Start fetching the remote blocks among *locs* now (merged, in parallel); returns at once."""
        todo: dict[str, list[RemoteLocation]] = {}
        with self._lock:
            for loc in locs:
                if not isinstance(loc, RemoteLocation):
                    continue
                key = loc.block
                if key in self._pending or key in self._inflight or key in self._committed:
                    continue
                todo.setdefault(loc.remote, []).append(loc)
        for name, group in todo.items():
            self._start(self._remote_by_name(name), group)

    def _start(self, remote: RemoteStore, locs: list[RemoteLocation], *, after: RemoteLocation | None = None,
               behind: bool = True) -> None:
        """One fetch per block not already fetched or being fetched (single flight across threads).

        With *after* (a demand miss, or a block read ahead that a reader got to), the
        blocks around it that :meth:`_read_ahead` picks are fetched too, merged into the
        same request where they lie next to *locs*' (see the module doc).
        """
        extra = self._read_ahead(remote, after, behind=behind) if after is not None else []
        fresh: dict[Hashable, tuple[RemoteLocation, concurrent.futures.Future[Any]]] = {}
        ahead: set[Hashable] = set()
        with self._lock:
            for wanted, group in ((True, locs), (False, extra)):
                for loc in group:
                    key = loc.block
                    if key in self._inflight or key in self._pending or key in fresh:
                        continue
                    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
                    self._inflight[key] = fut
                    fresh[key] = (loc, fut)
                    if not wanted:
                        ahead.add(key)
                        self._ahead[key] = None
            while len(self._ahead) > AHEAD_MAX:
                del self._ahead[next(iter(self._ahead))]
        if not fresh:
            return
        for loc, fut in fresh.values():
            fut.add_done_callback(functools.partial(self._fetched, loc))
        self.stats["misses"] += len(fresh) - len(ahead)
        self.stats["read_ahead_blocks"] += len(ahead)
        remote.start_fetch([loc for loc, _f in fresh.values()], futures={k: f for k, (_l, f) in fresh.items()},
                           ahead=ahead)

    def _read_ahead(self, remote: RemoteStore, loc: RemoteLocation, *, behind: bool = True) -> list[RemoteLocation]:
        """The blocks to fetch with *loc*'s (:meth:`RemoteStore.around`), none of which we
        have, have fetched or are fetching.

        Only around a data block no larger than the remote's ``read-ahead`` (a small-file
        block: a large file's blocks come through the reader's read-ahead and the
        kernel's, many at once), and never more than 1/:data:`AHEAD_SHARE` of a bounded cache.
        """
        budget = remote.read_ahead
        if self.cache_size is not None:
            budget = min(budget, self.cache_size // AHEAD_SHARE)
        if budget <= 0 or loc.type != T_CHUNK or loc.raw > budget:
            return []
        found = remote.around(loc, budget, behind=behind)
        with self._lock:
            found = [c for c in found if c.block not in self._inflight and c.block not in self._pending
                     and c.block not in self._committed]
        return [c for c in found if not self.local.contains(c.digest)]

    def _fetched(self, loc: RemoteLocation, fut: concurrent.futures.Future[Any]) -> None:
        """A fetch finished (on a pool thread): keep a good block for the next commit."""
        key = loc.block
        block: DecodedBlock | None = None
        if fut.exception() is None:
            block = fut.result()
        with self._lock:
            if self._inflight.get(key) is fut:
                del self._inflight[key]
            if block is not None and block.intact and block.record is not None and key not in self._pending:
                self._pending[key] = _Pending(loc, block.members, dict(block.advance_all()), block.record)
                if not self._pending_bytes:
                    self._pending_since = time.monotonic()
                self._pending_bytes += len(block.record)
                self._ensure_committer()
        if self._pending_bytes >= self.commit_bytes:
            self._wake.set()

    def _remote_block(self, loc: RemoteLocation) -> DecodedBlock:
        """The verified block at *loc*: waiting for, or else starting, its one fetch."""
        key = loc.block
        while True:
            with self._lock:
                pending = self._pending.get(key)
                fut = self._inflight.get(key)
                ahead = (pending is not None or fut is not None) and key in self._ahead
                if ahead:
                    del self._ahead[key]
            if pending is not None:
                self.stats["hits"] += 1
                if ahead:
                    self._ahead_used(loc)
                return DecodedBlock(pending.members, pending.data, pending.record)
            if fut is None:
                planned = getattr(self._thread, "planned", False)
                self._start(self._remote_by_name(loc.remote), [loc], after=None if planned else loc)
                with self._lock:
                    fut = self._inflight.get(key)
                    pending = self._pending.get(key)
                if fut is None:
                    if pending is not None:
                        continue
                    # Done already (and bad, or not kept): the result is on no map; fetch again alone.
                    return self._remote_by_name(loc.remote).fetch_blocks([loc])[key]
            try:
                block: DecodedBlock = fut.result()
            except (UnavailableError, CorruptObjectError, NotFoundError) as exc:
                if isinstance(exc, UnavailableError):
                    log.debug("%s", exc)
                raise
            if block.advice:
                # Read ahead and bad: fetched again in earnest (from the next mirror if it is
                # bad again), so a reader of it meets exactly what a demand fetch would.
                return self._remote_by_name(loc.remote).fetch_blocks([loc])[key]
            if ahead:
                self._ahead_used(loc)
            # Every waiter gets a reader of its own (a reader hands its members out once).
            return DecodedBlock(block.members, block.advance_all(), block.record)

    def _ahead_used(self, loc: RemoteLocation) -> None:
        """A reader got to a block read ahead: the read is sequential, so read on from there."""
        self.stats["read_ahead_used"] += 1
        self._start(self._remote_by_name(loc.remote), [], after=loc, behind=False)

    # ------------------------------------------------------------------ committing fetched blocks

    def _ensure_committer(self) -> None:
        """Start the commit thread on first need (never before a fork: the daemon forks first)."""
        if self._committer is None and not self._stop:
            self._committer = threading.Thread(target=self._commit_loop, name="cnpsfs-cache-commit", daemon=True)
            self._committer.start()

    def _commit_loop(self) -> None:
        while not self._stop:
            self._wake.wait(self.commit_seconds / 4)
            self._wake.clear()
            with self._lock:
                due = self._pending and (self._pending_bytes >= self.commit_bytes or
                                         time.monotonic() - self._pending_since >= self.commit_seconds)
            try:
                if due:
                    self.commit()
                self._flush_touches()
                self._maybe_evict()
            except Exception:  # the thread must survive a full disk; the next round tries again
                log.exception("committing fetched blocks to %s failed", self.local.path)
                time.sleep(self.commit_seconds)

    def commit(self) -> None:
        """Write the fetched blocks waiting in memory into the local store (crash-safely), then evict."""
        with self._commit_lock:
            with self._lock:
                batch = list(self._pending.values())
            if not batch:
                return
            by_remote: dict[tuple[str, bool], list[_Pending]] = {}
            for item in batch:
                meta = any(t != T_CHUNK for _d, t, _i, _n in item.members)
                by_remote.setdefault((item.loc.remote, meta), []).append(item)
            for (remote, _meta), items in sorted(by_remote.items()):
                with self.local.writer() as writer:
                    for item in items:
                        header_size = item.loc.record_length - item.loc.stored
                        writer.add_record(item.loc.codec, item.record[header_size:], item.loc.raw,
                                          [(d, t, n) for d, t, _i, n in item.members])
                    writer.commit(cache=remote)
                self.stats["committed_blocks"] += len(items)
            with self._lock:
                if len(self._committed) > 1 << 16:
                    self._committed.clear()
                for item in batch:
                    self._pending.pop(item.loc.block, None)
                    self._committed[item.loc.block] = None
                self._pending_bytes = sum(len(p.record) for p in self._pending.values())
                self._pending_since = time.monotonic()
        self._maybe_evict()

    def _maybe_evict(self) -> None:
        """Keep the bound: after commits, and now and then while reads have stopped."""
        if self.cache_size is None or time.monotonic() - self._last_evict < EVICT_EVERY:
            return
        self._last_evict = time.monotonic()
        self.evict(self.cache_size)

    def _touch(self, pack: int) -> None:
        self._touched[pack] = time.time_ns()

    def _flush_touches(self, *, force: bool = False) -> None:
        if not self._touched or (not force and time.monotonic() - self._last_touch_flush < TOUCH_SECONDS):
            return
        touched, self._touched = self._touched, {}
        self._last_touch_flush = time.monotonic()
        with contextlib.suppress(CnpsfsError):
            self.local.index.touch_cache_packs(touched)

    # ------------------------------------------------------------------ the bound

    def evict(self, limit: int) -> int:
        """Evict least recently used cache packs until the cache holds at most *limit* (see the module doc).

        Returns the bytes freed. Skips (and tries later) when gc or another eviction holds
        the store lock.
        """
        return evict(self.local, limit, touched=self._touched)

    def cache_usage(self) -> dict[str, int | None]:
        packs = self.local.index.cache_packs()
        return {"bytes": sum(p[2] for p in packs), "packs": len(packs), "limit": self.cache_size}

    def counters(self) -> dict[str, Any]:
        """For ``cnpsfs status``: the cache's hits and misses, and each remote's counters."""
        cache: dict[str, Any] = dict(self.stats)
        cache.update(self.cache_usage())
        return {"cache": cache, "remotes": [{"name": r.name, **r.counters()} for r in self.remotes]}


def evict(local: LocalStore, limit: int, *, touched: Mapping[int, int] | None = None, to: float | None = None) -> int:
    """Bring *local*'s cache packs down to *limit* bytes (to EVICT_TO of it, or *to*): LRU, skipping pins.

    Pinned: packs with a member a local tag reaches, with metadata an image served by a
    running mount reaches, or read within PIN_SECONDS (by the index's record, or *touched*
    by this process and not flushed yet).
    """
    packs = local.index.cache_packs()
    total = sum(p[2] for p in packs)
    if total <= limit:
        return 0
    try:
        with flock(local.path / "lock", fcntl.LOCK_EX | fcntl.LOCK_NB):
            return _evict_locked(local, packs, total, int(limit * (EVICT_TO if to is None else to)), touched or {})
    except BlockingIOError:
        log.debug("%s: the store is busy (gc or an import); evicting later", local.path)
        return 0


def _evict_locked(local: LocalStore, packs: list[tuple[int, str, int, int]], total: int, target: int,
                  touched: Mapping[int, int]) -> int:
    # What must stay: everything a local tag reaches (its FileSets are not remote-backed
    # once tagged here), and the metadata of what running mounts serve.
    protected = reachable(local, tag_roots(local), on_missing=lambda *_a: None)
    protected_meta = reachable(local, live_roots(local), on_missing=lambda *_a: None)
    now = time.time_ns()
    names = {pack: name for pack, name, _size in local.index.packs()}
    freed = 0
    for pack, remote, size, last_used in packs:
        if total - freed <= target:
            break
        if now - max(last_used, touched.get(pack, 0)) < PIN_SECONDS * 1e9:
            continue
        members = local.index.pack_members(pack)
        if any(d in protected or (t != T_CHUNK and d in protected_meta) for d, t in members):
            continue
        local.index.drop_cache_pack(pack)
        local.packs.forget(pack)
        name = names.get(pack)
        if name:
            (local.packs_dir / f"{name}.pack").unlink(missing_ok=True)
        freed += size
        log.info("evicted cache pack %s (%d bytes from %s)", name, size, remote)
    return freed


def cache_summary(local: LocalStore) -> dict[str, Any]:
    """For ``cnpsfs df`` and ``cache show``: cache bytes and packs (total and per remote), and the bound."""
    packs = local.index.cache_packs()
    by_remote: Counter[str] = Counter()
    for _pack, remote, size, _used in packs:
        by_remote[remote] += size
    setting = local.index.setting(SETTING_CACHE_SIZE)
    return {"bytes": sum(by_remote.values()), "packs": len(packs), "by_remote": dict(by_remote),
            "limit": parse_size(setting) if setting else None}


def open_cached(local: LocalStore, remotes: Sequence[str], *, timeout: float | None = None,
                cache_size: int | None = None) -> CachedStore:
    """*local* in front of the remotes named (configured names or URLs), in order."""
    from cnpsfs.errors import UsageError
    from cnpsfs.store.remoteconf import load_remotes, remote_spec

    configured = load_remotes()
    specs = [remote_spec(text, configured, timeout=timeout) for text in remotes]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UsageError(f"--remote {next(n for n in names if names.count(n) > 1)} is given twice")
    state = local.path / "remote"
    return CachedStore(local, [spec.open(state) for spec in specs], cache_size=cache_size)
