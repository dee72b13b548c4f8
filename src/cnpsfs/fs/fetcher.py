"""The chunk fetcher: verified chunks for the read path, one load per block however many wait.

A miss decodes the chunk's block on a worker thread under the mount's shared
CapacityLimiter (pread, zstd and BLAKE3 release the GIL, so concurrent readers proceed
in parallel and the loop never blocks), front to back only as far as the wanted chunks
end, and caches every member completed on the way, verified: the neighbours of a chunk
are what the next reads want (small files are stored together in path order, large
files chunk after chunk). A later miss in the same block continues where the last one
stopped (the store's :class:`~cnpsfs.store.BlockReader`), so a random small read does
not pay for the whole block and a sequential reader still decodes it once.

Costs of a miss, and why they are what they are:

* **One thread hop.** Once a block has been opened, the fetcher knows where each of its
  members is (from the block's record), so a later miss in a known block goes straight
  to the worker that decodes it. A chunk whose block is not known yet is located and
  decoded in the same worker call; when the chunks located together lie in several
  blocks (a read-ahead), the other blocks are then decoded in parallel, one worker call
  each, every one under its own single flight, so a reader waits only for its own
  block. The store answers from the header offset its index records, so opening a
  block is one read and no search.
* **Single flight.** Concurrent misses in one known block wait on the loop for one
  load. A waiter whose chunks lie beyond where that load stopped continues the same
  block reader when it is its turn, rather than decoding the block a second time.
  (Two first-ever misses in one block, not located yet, can each open the block once:
  the price of locating and decoding in one hop; the second finds the first's reader.)

A load that fails (a corrupt block, a pack that cannot be read, a damaged index: any
:class:`~cnpsfs.errors.CnpsfsError` or OSError) fails the chunks it was for, and only
those: the read that wanted them gets EIO from the FUSE layer, the mount goes on.

Everything here runs on the trio loop except the functions handed to
``trio.to_thread.run_sync``; state is touched only on the loop, so the code between two
awaits is atomic, which the single-flight bookkeeping relies on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable

import trio

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError, CorruptObjectError, MissingObjectError
from cnpsfs.image.reader import ChunkCache
from cnpsfs.store import BlockReader, ChunkLocation, Store

log = logging.getLogger(__name__)

#: Remembered member locations (a key and an end offset each); cleared when reached.
KNOWN_MAX = 1 << 18
#: Remembered load failures (digest -> exception), for the readers waiting on them.
FAILED_MAX = 4096
#: Blocks loaded ahead whose reader has not reached them yet (a mark each).
CHAIN_MAX = 64

#: (block key, a location in it, the digests wanted, its reader or why it failed, members decoded)
_Loaded = tuple[Hashable, ChunkLocation, list[bytes], BlockReader | BaseException,
                dict[bytes, bytes | memoryview | None]]
#: (block key, a location in it, the digests wanted, how far): located, left for another worker
_Later = tuple[Hashable, ChunkLocation, list[bytes], int]


def worker_threads(store: Store, threads: int, limit: int = 64) -> int:
    """Workers for a mount of *store*: *threads*, plus one per request its remotes run at once.

    A worker that loads a remote block mostly waits for the network, not for a CPU, and
    the mount's one limiter bounds how many loads are under way: with only *threads*
    (sized for local reads: pread, zstd and BLAKE3) eight readers of a remote mount would
    keep at most four fetches in flight and wait a round trip each in turn.
    """
    remotes = getattr(store, "remotes", None) or ()
    return min(limit, threads + sum(getattr(r, "parallel", 0) for r in remotes))


class ChunkFetcher:
    """Verified chunks from *store*, cached in *cache*, blocks loaded on *limiter*'s workers."""

    #: Blocks decoded part-way, kept for their next miss (each holds up to a block).
    STREAMS_MAX = 16

    def __init__(self, store: Store, cache: ChunkCache, limiter: trio.CapacityLimiter) -> None:
        self.store = store
        self.cache = cache
        self.limiter = limiter
        self._inflight: dict[Hashable, trio.Event] = {}  # block key (or a locate token) -> loaded
        self._failed: dict[bytes, BaseException] = {}
        self._pending: dict[bytes, Hashable] = {}  # digest -> key of the load that will bring it
        self._streams: OrderedDict[Hashable, BlockReader] = OrderedDict()
        self._known: dict[bytes, tuple[Hashable, int]] = {}  # digest -> (block key, end in block)
        self._block_locs: dict[Hashable, ChunkLocation] = {}  # a location in each known block
        #: Where background loads run (the mount's read-ahead nursery); None: no next-block read-ahead.
        self.nursery: trio.Nursery | None = None
        #: The first member of each block loaded ahead of a front-to-back reader -> that block's
        #: location: when the reader gets there, the block after it is loaded in turn.
        self._chain: dict[bytes, ChunkLocation] = {}
        self.ahead_loads = 0
        #: Worker calls made, for tests and `cnpsfs status`: hops and block opens.
        self.hops = 0
        self.opens = 0
        self._count_lock = threading.Lock()

    def cached(self, digest: bytes) -> bool:
        return self.cache.contains(digest)

    async def fetch(self, digests: Iterable[bytes], *, limiter: trio.CapacityLimiter | None = None) -> int:
        """Load the blocks holding *digests* into the cache; failures are kept per digest.

        Returns the bytes this call's own loads added to the cache (what a prefetch
        budget counts; loads it only joined count for whoever started them). *limiter*
        runs those loads on other workers than the mount's: a prefetch passes its own,
        smaller one so that demand reads always find a worker.
        """
        limiter = limiter or self.limiter
        waits: set[bytes] = set()
        groups: dict[Hashable, tuple[ChunkLocation, list[bytes], int]] = {}
        unknown: list[bytes] = []
        for digest in dict.fromkeys(digests):
            if self.cache.contains(digest):
                continue
            pending = self._pending.get(digest)
            if pending is not None:
                waits.add(digest)  # its block is being loaded: no need to look it up
                continue
            known = self._known.get(digest)
            loc = self._block_locs.get(known[0]) if known is not None else None
            if known is None or loc is None:
                unknown.append(digest)
                continue
            key, end = known
            first, wanted, upto = groups.get(key, (loc, [], 0))
            wanted.append(digest)
            groups[key] = (first, wanted, max(upto, end))
        await self._wait_for(waits)
        jobs = len(groups) + (1 if unknown else 0)
        if len(groups) > 1:
            # A remote-backed store starts these blocks together now (merged, in parallel);
            # a local store does nothing. It only queues work: safe on the loop.
            self.store.prefetch(loc for loc, _w, _u in groups.values())
        added = [0]
        if jobs == 1 and not unknown:
            ((key, (loc, wanted, upto)),) = groups.items()
            await self._load_block(key, loc, wanted, upto, limiter, added)
        elif jobs == 1:
            await self._locate_and_load(unknown, limiter, added)
        elif jobs:
            async with trio.open_nursery() as nursery:
                for key, (loc, wanted, upto) in groups.items():
                    nursery.start_soon(self._load_block, key, loc, wanted, upto, limiter, added)
                if unknown:
                    nursery.start_soon(self._locate_and_load, unknown, limiter, added)
        return added[0]

    async def _wait_for(self, digests: Iterable[bytes]) -> None:
        """Wait until no load is bringing *digests* any more (a load may hand one on to another)."""
        todo = [d for d in digests if d in self._pending]
        while todo:
            events = [self._inflight.get(key) for key in {self._pending[d] for d in todo if d in self._pending}]
            if all(event is None for event in events):
                return  # nothing in flight to wait for (never spin on the loop)
            for event in events:
                if event is not None:
                    await event.wait()
            todo = [d for d in todo if d in self._pending]

    def _claim(self, key: Hashable, wanted: list[bytes]) -> trio.Event:
        """Mark *key* as being loaded for *wanted* (on the loop, no await: atomic)."""
        event = self._inflight[key] = trio.Event()
        for digest in wanted:
            self._pending[digest] = key
            self._failed.pop(digest, None)
        return event

    async def _load_block(self, key: Hashable, loc: ChunkLocation, wanted: list[bytes], upto: int,
                          limiter: trio.CapacityLimiter, added: list[int], claimed: trio.Event | None = None) -> None:
        """Decode the known block *key* through *upto*, continuing its reader if it has one.

        *claimed* is the event of a claim already made for it (:meth:`_claim`)."""
        if claimed is None:
            while (event := self._inflight.get(key)) is not None:
                await event.wait()
                # The load we joined may have stopped short of our chunks: go on from there.
                wanted = [d for d in wanted if not self.cache.contains(d) and d not in self._failed]
                if not wanted:
                    return
            event = self._claim(key, wanted)
        else:
            event = claimed
        stream = self._streams.pop(key, None)
        relocate = False
        try:
            self.hops += 1
            continued = stream is not None
            members, opened = await trio.to_thread.run_sync(self._advance, stream, loc, upto,
                                                            limiter is not self.limiter, limiter=limiter)
            stream = opened
            added[0] += self._settle(key, loc, wanted, opened, members)
            if continued and opened.done:
                # A second miss took the block to its end: a front-to-back reader. Load the
                # block stored after it before the reader gets there.
                self._load_next_soon(loc)
        except MissingObjectError as exc:
            # The block went away since we learnt where it is (a cache pack was evicted):
            # forget the location and look the chunks up afresh, once.
            relocate = stream is None and key in self._block_locs
            for digest in wanted:
                self._failed[digest] = exc
        except (CnpsfsError, OSError) as exc:
            for digest in wanted:
                self._fail(digest, exc)
        finally:
            del self._inflight[key]
            self._release(wanted, key)
            event.set()
        if relocate:
            self._block_locs.pop(key, None)
            await self._locate_and_load(wanted, limiter, added)

    async def _locate_and_load(self, digests: list[bytes], limiter: trio.CapacityLimiter, added: list[int]) -> None:
        """Locate *digests* and decode the first one's block in one worker call, then the
        other blocks they are in, in parallel on other workers (a 4 MiB read-ahead is four
        blocks: decoded one after the other on one worker, the read wanting the last of them
        would wait for all four, with the other core idle).
        """
        token = object()
        event = self._inflight[token] = trio.Event()
        for digest in digests:
            self._pending[digest] = token
            self._failed.pop(digest, None)
        rest: list[tuple[Hashable, ChunkLocation, list[bytes], int, trio.Event | None]] = []  # _Later + claim
        try:
            self.hops += 1
            located, loaded, later = await trio.to_thread.run_sync(self._locate_and_advance, digests,
                                                                   limiter is not self.limiter, limiter=limiter)
            for digest in digests:
                if digest not in located:
                    self._fail(digest, MissingObjectError(f"{fmt.format_digest(digest)} is not in the store"))
            for key, loc, wanted, stream, members in loaded:
                if isinstance(stream, BaseException):
                    for digest in wanted:
                        self._fail(digest, stream)
                    continue
                added[0] += self._settle(key, loc, wanted, stream, members)
            for key, loc, wanted, upto in later:
                # Claimed now, before this call's waiters wake: they then wait for that load.
                rest.append((key, loc, wanted, upto, None if key in self._inflight else self._claim(key, wanted)))
        except (CnpsfsError, OSError) as exc:
            for digest in digests:
                self._fail(digest, exc)
        finally:
            del self._inflight[token]
            self._release(digests, token)
            event.set()
        if rest:
            async with trio.open_nursery() as nursery:
                for key, loc, wanted, upto, claim in rest:
                    nursery.start_soon(self._load_block, key, loc, wanted, upto, limiter, added, claim)

    def _release(self, digests: Iterable[bytes], key: Hashable) -> None:
        """Forget that the load *key* brings *digests* (those another load has taken over stay)."""
        pending = self._pending
        for digest in digests:
            if pending.get(digest) is key:
                del pending[digest]

    def _settle(self, key: Hashable, loc: ChunkLocation, wanted: list[bytes], stream: BlockReader,
                members: dict[bytes, bytes | memoryview | None]) -> int:
        """On the loop: cache what a load decoded, record failures, keep the reader for next time.

        Returns the bytes added to the cache."""
        added = 0
        for member, data in members.items():
            if data is not None and not self.cache.contains(member):
                self.cache.put(member, data)
                added += len(data)
        for digest in wanted:
            if members.get(digest) is not None:
                self._failed.pop(digest, None)
            elif digest in members:
                self._fail(digest, CorruptObjectError(
                    f"chunk {fmt.format_digest(digest)} is corrupt: its bytes do not match its digest"
                    f" (block at {self.store.describe(loc)})"))
        if key not in self._block_locs:
            if len(self._known) > KNOWN_MAX:
                self._known.clear()
                self._block_locs.clear()
            self._block_locs[key] = loc
            for digest, _type, inner, length in stream.members:
                self._known[digest] = (key, inner + length)
        if not stream.done:
            old = self._streams.get(key)
            if old is None or old.decoded <= stream.decoded:
                self._streams[key] = stream
                self._streams.move_to_end(key)
            while len(self._streams) > self.STREAMS_MAX:
                self._streams.popitem(last=False)
        elif self._streams.get(key) is stream:
            del self._streams[key]
        return added

    def _load_next_soon(self, loc: ChunkLocation) -> None:
        if self.nursery is not None and getattr(self.store, "open_next_block", None) is not None:
            self.nursery.start_soon(self._load_next, loc)

    async def _load_next(self, loc: ChunkLocation) -> None:
        """Load the block stored after *loc*'s: its record read on a worker, then claimed on
        the loop (a reader that gets there meanwhile waits for this load, no second decode),
        then decoded whole. A hint: failures to read it are left for demand to meet."""
        try:
            opened = await trio.to_thread.run_sync(self._open_next, loc, limiter=self.limiter)
        except (CnpsfsError, OSError) as exc:
            log.debug("next-block read-ahead after %s: %s", self.store.describe(loc), exc)
            return
        if opened is None:
            return
        after, stream = opened
        key = after.block
        wanted = [d for d, _t, _i, _n in stream.members if not self.cache.contains(d) and d not in self._pending]
        if key in self._inflight or not wanted:
            return
        event = self._claim(key, wanted)
        try:
            members = await trio.to_thread.run_sync(stream.advance, 1 << 62, limiter=self.limiter)  # to its end
            self.ahead_loads += 1
            self._settle(key, after, wanted, stream, members)
        except (CnpsfsError, OSError) as exc:
            log.debug("next-block read-ahead of %s: %s", self.store.describe(after), exc)
        finally:
            del self._inflight[key]
            self._release(wanted, key)
            event.set()
        if len(self._chain) >= CHAIN_MAX:
            self._chain.clear()
        self._chain[stream.members[0][0]] = after

    def _open_next(self, loc: ChunkLocation) -> tuple[ChunkLocation, BlockReader] | None:
        """On a worker: the block after *loc*'s, opened (not decoded); None if there is none
        or all of it is cached already (a large file's blocks come through its own read-ahead)."""
        opened: tuple[ChunkLocation, BlockReader] | None = self.store.open_next_block(loc)  # type: ignore[attr-defined]
        if opened is None or all(self.cache.contains(d) for d, _t, _i, _n in opened[1].members):
            return None
        return opened

    def _fail(self, digest: bytes, exc: BaseException) -> None:
        """Remember why *digest* could not be loaded, for its waiters; bounded (oldest forgotten first).

        A forgotten failure costs only a retry: the next reader of that chunk loads it again.
        """
        self._failed.pop(digest, None)
        self._failed[digest] = exc
        while len(self._failed) > FAILED_MAX:
            del self._failed[next(iter(self._failed))]

    def _advance(self, stream: BlockReader | None, loc: ChunkLocation, upto: int, planned: bool = False
                 ) -> tuple[dict[bytes, bytes | memoryview | None], BlockReader]:
        """On a worker: decode the block through *upto* (opening it first if need be).

        *planned*: a load of a prefetch (on its own limiter), whose plan names the blocks it
        wants: a remote-backed store then reads nothing ahead (``CachedStore.planned``)."""
        if stream is None:
            with self._count_lock:
                self.opens += 1
            plan = getattr(self.store, "planned", None) if planned else None
            with plan() if plan is not None else contextlib.nullcontext():
                stream = self.store.open_block(loc)
        return stream.advance(upto), stream

    def _locate_and_advance(self, digests: list[bytes], planned: bool = False
                            ) -> tuple[set[bytes], list[_Loaded], list[_Later]]:
        """On a worker: where *digests* are, the first one's block decoded as far as they end
        in it, and the other blocks they are in, to be decoded by other workers.

        A failure to open or decode the block is returned in place of its reader.
        """
        locs = self.store.locate_many(digests)
        groups: dict[Hashable, tuple[ChunkLocation, list[bytes], int]] = {}
        for digest in digests:  # in the caller's order: the first block is the one wanted first
            loc = locs.get(digest)
            if loc is None:
                continue
            first, wanted, upto = groups.get(loc.block, (loc, [], 0))
            wanted.append(digest)
            groups[loc.block] = (first, wanted, max(upto, loc.inner + loc.length))
        if len(groups) > 1:
            self.store.prefetch(loc for loc, _w, _u in groups.values())  # remote blocks: all at once
        loaded: list[_Loaded] = []
        later = [(key, loc, wanted, upto) for key, (loc, wanted, upto) in groups.items()]
        if later:
            key, loc, wanted, upto = later.pop(0)
            try:
                members, stream = self._advance(None, loc, upto, planned)
            except (CnpsfsError, OSError) as exc:
                loaded.append((key, loc, wanted, exc, {}))
            else:
                loaded.append((key, loc, wanted, stream, members))
        return set(locs), loaded, later

    async def get(self, digest: bytes) -> bytes | memoryview:
        """The verified chunk *digest*: from the cache, else loaded (raises its load's failure).

        It may be a read-only view of its decoded block (see :class:`ChunkCache`)."""
        data = self.cache.get(digest)
        if data is not None:
            if self._chain:
                loc = self._chain.pop(digest, None)
                if loc is not None:  # the reader reached a block loaded ahead: load the next
                    self._load_next_soon(loc)
            return data
        await self.fetch((digest,))
        data = self.cache.get(digest)
        if data is not None:
            return data
        failure = self._failed.get(digest)
        if failure is not None:
            raise failure
        # Loaded, then dropped from the cache already by other readers: read it alone.
        data = await trio.to_thread.run_sync(self.store.get, digest, limiter=self.limiter)
        self.cache.put(digest, data)
        return data
