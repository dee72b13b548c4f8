"""Prefetch: replaying a profile so that a starting program finds its data ready.

A mount replays its image's profile (docs/format.md §1.13) in the background, in the
mount's nursery, for one generation: it walks the profile's paths in their recorded
order, composing directories (a listing where the program listed) and, for each file
range, loading the chunks through the mount's :class:`~cnpsfs.fs.fetcher.ChunkFetcher`,
so a demand read of a chunk the prefetch is loading waits for that one load, and every
chunk is verified on the way like any other. Optionally (``push``) it then stores the
file's pages in the kernel's page cache with ``notify_store``, after a stat through the
mount has made the kernel look the file up: the program's own lookups and reads are then
answered by the kernel without a request.

Demand goes first. Prefetch runs on its own, smaller CapacityLimiter, so a FUSE request
always finds a worker of its own, and it waits before each step while a FUSE request is
loading something (:meth:`Operations.demand_quiet`), except the walk that plans a
remote-backed mount's fetches (see :meth:`Prefetcher._walk`). It stops when the profile is done,
when what it loaded reaches its share of the chunk cache (more would evict what it loaded
first, before the program gets there), when it has composed its share of nodes, or when
the mount swaps generations or unmounts (its cancel scope).

A profile is advice: a path the image does not have, or that is now another kind of
entry, is skipped; a damaged object is left for the demand read that needs it to report
(EIO and one log line there); nothing the prefetch does changes what any request
answers, only how soon. Inode numbers name content (a swap gives changed content new
numbers), so pages pushed for an inode are right for every generation that shows it.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError
from cnpsfs.image.reader import ExtentMap, read_range
from cnpsfs.image.view import Generation, Node
from cnpsfs.store import NotCached

if TYPE_CHECKING:
    from cnpsfs.fs.operations import Operations

log = logging.getLogger(__name__)

#: Worker threads of a prefetch (its own limiter; the mount's demand workers stay free).
PREFETCH_THREADS = 2
#: Tasks loading chunk batches at once (in profile order); a remote-backed mount waits on
#: the network more than on a CPU, so there they are as many as its requests in flight.
FETCHERS = 2
#: Batches the walk may plan ahead of the loads (each up to BATCH_BYTES of ranges).
AHEAD = 16
#: A batch is sent to the fetchers once it names this many chunks or bytes of ranges, or
#: holds this many paths: large enough that a batch's blocks load in parallel and its
#: lookups take one worker call, small enough to stop near the budget.
BATCH_CHUNKS = 64
BATCH_BYTES = 2 << 20
BATCH_JOBS = 64
#: What a prefetch may load, as a share of the chunk cache: beyond it, it would evict its
#: own first chunks before the program reads them.
CACHE_SHARE = 0.5
#: What a prefetch that stores pages in the kernel may store, as a share of the memory
#: available when it starts: the chunks only pass through the cache then, and the pages
#: are the kernel's to reclaim, but a profile should not push out everything else.
MEMORY_SHARE = 0.25
#: Nodes a prefetch may compose (each costs the daemon memory until the generation goes).
NODES_MAX = 500_000
PAGE = 4096
#: Chunks remembered for counting hits (a demand read of one the replay loaded).
PREFETCHED_MAX = 1 << 16


class _Stop(Exception):
    """The walk ends early; the message says why."""


@dataclass(slots=True)
class _FileJob:
    """A file's ranges: chunks to load, then (push) pages to store."""

    node: Node
    emap: ExtentMap
    spans: list[tuple[int, int]]
    digests: list[bytes]


@dataclass(slots=True)
class _Lookup:
    """(push) A path to look up through the mount, so the kernel caches the answer: a
    directory's entry (and with *listing* its listing), a symlink's target, or that a name
    does not exist."""

    path: tuple[bytes, ...]
    ino: int | None = None  # the node's, when the path exists
    listing: bool = False
    symlink: bool = False


_Job = _FileJob | _Lookup


@dataclass(slots=True, eq=False)
class _Batch:
    """Jobs of consecutive profile entries, and the chunks they need that were not cached."""

    jobs: list[_Job]
    digests: list[bytes]
    loaded: trio.Event = field(default_factory=trio.Event)


class Prefetcher:
    """One replay of one profile for one generation of a mount."""

    def __init__(self, ops: Operations, generation: Generation, profile: fmt.Profile, digest: bytes, *,
                 threads: int = PREFETCH_THREADS, budget_bytes: int | None = None, nodes_max: int = NODES_MAX,
                 push_to: str | None = None, serving: trio.Event | None = None) -> None:
        self.ops = ops
        self.generation = generation
        self.profile = profile
        self.digest = digest
        remotes = getattr(ops.store, "remotes", None) or ()
        self.fetchers = max(FETCHERS, min(threads * 4, sum(getattr(r, "parallel", 0) for r in remotes)))
        # A worker loading a remote block mostly waits for it: one per fetcher there.
        self.limiter = trio.CapacityLimiter(max(threads, self.fetchers) if remotes else threads)
        self._push_limiter = trio.CapacityLimiter(1)  # pushes in order, beside the loads
        if budget_bytes is None:
            budget_bytes = int(available_memory() * MEMORY_SHARE) if push_to is not None \
                else int(ops.fetcher.cache.capacity * CACHE_SHARE)
        self.budget = budget_bytes
        self.nodes_max = nodes_max
        self.push_to = push_to  # the mountpoint, to push pages into the kernel's cache; None: chunk cache only
        # Set once the mount answers: the replay may start before (its store work does not
        # need the kernel), its pushes go through the mount and wait for it.
        self.serving = serving
        # Chunks planned and not yet hinted to the store; None: no hinter. Hints pay where a
        # block's load waits for something other than this process, a remote's round trips;
        # a local store's reads are the page cache or disk, which the fetcher's own hint per
        # batch already covers.
        self._hints: list[bytes] | None = [] if remotes else None
        self._hint_more = trio.Event()
        self._walk_done = False
        self.hinted = 0  # chunks whose blocks were hinted to the store ahead of their loads
        self.planned = 0  # bytes of file ranges the walk planned
        self.first_push: float | None = None  # seconds from the start to the first batch in the kernel
        self.scope = trio.CancelScope()
        self.state = "running"
        self.reason = ""
        self.walked = 0  # profile entries processed
        self.missing = 0  # paths the image does not have (or not as that kind of entry)
        self.errors = 0
        self.chunks = 0  # chunks loaded into the cache
        self.bytes = 0  # bytes those loads added to the cache (neighbours decoded on the way included)
        self.pushed_files = 0
        self.pushed_bytes = 0
        self.looked_up = 0  # paths looked up (and listed) through the mount for the kernel's caches
        self.nodes = 0
        self.started = time.monotonic()
        self.ended: float | None = None
        # Lookups through the mount on worker threads, still running: each holds the mount
        # busy for a moment, so an unmount waits for them (fs/mount.py, "quiesce"). A worker
        # the run abandoned stops at its next path once *_abandoned* is set.
        self._in_mount = 0
        self._in_mount_lock = threading.Lock()
        self._abandoned = threading.Event()

    @property
    def in_mount(self) -> int:
        return self._in_mount

    async def out_of_mount(self) -> None:
        """Return once no lookup of this replay is running through the mount on a worker.

        Polled: a lookup the replay abandoned (cancelled) ends on its thread, where no
        trio event can be set; it ends within a request's round trip while the mount serves.
        """
        while self._in_mount:  # noqa: ASYNC110 - a thread the run abandoned cannot set an event
            await trio.sleep(0.005)

    # ------------------------------------------------------------------ running

    def cancel(self, reason: str) -> None:
        if self.state == "running":
            self.state, self.reason = "cancelled", reason
        self._abandoned.set()
        self.scope.cancel()

    async def run(self) -> None:
        """Walk the profile; returns when done, stopped or cancelled (never raises a store error)."""
        with self.scope:
            try:
                await self._run()
            except Exception as exc:  # a bug here must not take the mount down: prefetch is advice
                log.exception("prefetch of profile %s failed; the mount goes on without it", self.profile.name)
                self.state, self.reason = "failed", f"internal error: {type(exc).__name__}: {exc}"
            over = self._over_budget()  # the fetchers may cross it after the walk has ended
            if self.state == "running" and over:
                self.state, self.reason = "stopped", over
            if self.state == "running":
                self.state = "done"
        if self.state == "running":  # cancelled from outside without cancel(): the mount is going away
            self.state, self.reason = "cancelled", "unmounted"
        self._abandoned.set()
        self.ended = time.monotonic()
        self._report()

    async def _run(self) -> None:
        # Stages that do not wait for each other's round trips: the walk plans batches in
        # profile order, running ahead of the loads (up to AHEAD batches); on a remote-backed
        # mount the hinter tells the store at once where every planned batch's blocks are,
        # and the remote starts fetching them all, merged and in parallel as its pool
        # allows; the fetchers load batches in order on the replay's workers; the pusher,
        # once the mount serves, warms the kernel with each batch in order as soon as its
        # chunks are loaded.
        fetch_send, fetch_receive = trio.open_memory_channel[_Batch](AHEAD)
        push_send, push_receive = trio.open_memory_channel[_Batch](math.inf)
        async with trio.open_nursery() as nursery:
            for _ in range(self.fetchers):
                nursery.start_soon(self._fetcher, fetch_receive.clone())
            await fetch_receive.aclose()
            if self.push_to is not None:
                nursery.start_soon(self._pusher, push_receive)
            else:
                await push_receive.aclose()
                push_send = None  # type: ignore[assignment]
            if self._hints is not None:
                nursery.start_soon(self._hinter)
            try:
                async with fetch_send:
                    await self._walk(fetch_send, push_send)
            except _Stop as stop:  # caught here: out of the nursery it would be a group
                self.state, self.reason = "stopped", str(stop)
            finally:
                if push_send is not None:
                    await push_send.aclose()
                self._hint_more.set()  # the hinter ends once it has seen the end
                self._walk_done = True

    def _report(self) -> None:
        why = f" ({self.reason})" if self.reason else ""
        # Stopping at the budget is the one outcome an operator may want to act on (a
        # profile larger than the cache can hold, or a cache too small for it).
        level = logging.WARNING if self.state == "stopped" and self._over_budget() else logging.INFO
        kernel = (f", {self.pushed_bytes / (1 << 20):.1f} MiB in {self.pushed_files} files and {self.looked_up} "
                  "lookups pushed to the kernel") if self.push_to else ""
        log.log(level, "prefetch of profile %s (%s) for generation %d %s%s: %d of %d entries, %d not in the image, "
                 "%d chunks (%.1f MiB)%s, %d hits so far, in %.2f s", self.profile.name,
                 fmt.format_digest(self.digest)[:19], self.generation.number, self.state, why, self.walked,
                 len(self.profile.entries), self.missing, self.chunks, self.bytes / (1 << 20), kernel,
                 self.ops.prefetch_hits, (self.ended or time.monotonic()) - self.started)

    def _over_budget(self) -> str | None:
        if self.push_to is not None:
            if self.pushed_bytes >= self.budget:
                return f"reached its budget of pages, {self.budget / (1 << 20):.1f} MiB"
        elif self.bytes >= self.budget:
            return f"reached its share of the chunk cache, {self.budget / (1 << 20):.1f} MiB"
        return None

    def _left_behind(self) -> bool:
        """Whether what is still queued should be dropped: the budget is reached, or the
        generation it was planned for is no longer the mount's."""
        return bool(self._over_budget()) or self.ops.generation is not self.generation

    def _check_budget(self) -> None:
        over = self._over_budget()
        if over:
            raise _Stop(over)
        if self.nodes >= self.nodes_max:
            raise _Stop(f"composed {self.nodes} nodes, its limit")
        if self.ops.generation is not self.generation:
            raise _Stop("the mount swapped generations")

    async def _walk(self, send: trio.MemorySendChannel[_Batch], push: trio.MemorySendChannel[_Batch] | None) -> None:
        jobs: list[_Job] = []
        digests: list[bytes] = []
        size = 0

        async def emit() -> None:
            batch = _Batch(jobs, list(dict.fromkeys(digests)))
            if push is not None:
                push.send_nowait(batch)  # unbounded: the fetch channel bounds how far the walk runs ahead
            if batch.digests and self._hints is not None:
                self._hints.extend(batch.digests)
                self._hint_more.set()
            await send.send(batch)

        for entry in self.profile.entries:
            if self._hints is None:
                # On a remote-backed mount the walk does not wait for demand: a demand read
                # there holds its worker for a round trip (demand is not quiet while the program
                # waits on the network), and each entry planned sends its blocks' fetches off at
                # once, which the program's later reads find in flight or done. The walk's CPU
                # (a python start's 250 paths: tens of ms) is small beside the rounds it saves.
                await self.ops.demand_quiet()
            await trio.lowlevel.checkpoint()  # inline steps must not hold the loop across entries
            self._check_budget()
            try:
                node = await self._resolve(entry)
                job = await self._job(node, entry)
            except (CnpsfsError, OSError) as exc:  # a damaged object or store: the demand read that needs it reports
                self.errors += 1
                log.debug("prefetch: %r: %s", entry.path, exc)
                continue
            self.walked += 1
            if node is None and entry.touch is not fmt.Touch.LOOKUP:  # an absent name is what a LOOKUP may record
                self.missing += 1
            if job is not None:
                jobs.append(job)
                if isinstance(job, _FileJob):
                    digests.extend(job.digests)
                    size += sum(n for _o, n in job.spans)
                    self.planned += sum(n for _o, n in job.spans)
                if len(digests) >= BATCH_CHUNKS or size >= BATCH_BYTES or len(jobs) >= BATCH_JOBS:
                    await emit()
                    jobs, digests, size = [], [], 0
        if jobs:
            await emit()

    async def _job(self, node: Node | None, entry: fmt.ProfileEntry) -> _Job | None:
        """What the fetchers do for *entry*: load a file's chunks (and store its pages), or
        (when pages go to the kernel) look the path up through the mount."""
        if entry.touch is fmt.Touch.FILE:
            return await self._file_job(node, entry) if node is not None else None
        if self.push_to is None:
            return None
        if entry.touch is fmt.Touch.LOOKUP:
            path = tuple(entry.path.split(b"/"))
            return _Lookup(path, node.ino if node is not None else None,
                           symlink=node is not None and node.entry.kind is fmt.Kind.SYMLINK)
        if node is None or not node.path:
            return None
        return _Lookup(node.path, node.ino, listing=entry.touch is fmt.Touch.LISTED)

    async def _load(self, node: Node, *, listing: bool = False) -> Node:
        if self.ops.swapping or self.ops.generation is not self.generation:
            # A load would wait for the swap and then compose the next generation's tree,
            # whose own replay is about to start.
            raise _Stop("the mount swapped generations")
        before = self.generation.entries
        node = await self.ops.load_directory(node, listing=listing, limiter=self.limiter)
        if self.ops.generation is not self.generation:
            raise _Stop("the mount swapped generations")
        self.nodes += self.generation.entries - before
        return node

    async def _resolve(self, entry: fmt.ProfileEntry) -> Node | None:
        """The node at the entry's path in this generation, composed as the entry says; None if absent."""
        node = self.generation.root
        for part in entry.path.split(b"/") if entry.path else ():
            if not node.is_dir:
                return None
            if node.children is None:
                node = await self._load(node)
            assert node.children is not None
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        if entry.touch is fmt.Touch.FILE:
            return node if node.entry.kind is fmt.Kind.FILE else None
        if entry.touch is fmt.Touch.LOOKUP:
            return node
        if not node.is_dir:
            return None
        if entry.touch is fmt.Touch.LISTED:
            if not node.listed:
                node = await self._load(node, listing=True)
        elif node.children is None:
            node = await self._load(node)
        return node

    async def _file_job(self, node: Node, entry: fmt.ProfileEntry) -> _Job | None:
        emap = node.emap
        if emap is None:
            gen = self.generation
            try:
                with gen.store.cache_only():
                    emap = gen.extent_map(node)
            except NotCached:
                emap = await trio.to_thread.run_sync(gen.extent_map, node, limiter=self.limiter)
        spans = [(o, min(n, emap.size - o)) for o, n in entry.spans() if o < emap.size]
        if not spans:
            return None
        cache = self.ops.fetcher.cache
        digests = list(dict.fromkeys(d for o, n in spans for d in emap.chunks_for(o, n) if not cache.contains(d)))
        if not digests and not self.push_to:
            return None
        return _FileJob(node, emap, spans, digests)

    async def _hinter(self) -> None:
        """Tell the store where the planned chunks are as soon as the walk plans them, all
        of them in one call per wake-up, on a thread of its own (locating may read the index)."""
        assert self._hints is not None
        store = self.ops.store
        limiter = trio.CapacityLimiter(1)

        def hint(digests: list[bytes]) -> None:
            store.prefetch(store.locate_many(digests).values())

        while True:
            await self._hint_more.wait()
            self._hint_more = trio.Event()
            todo, self._hints[:] = list(self._hints), []
            cache = self.ops.fetcher.cache
            todo = [d for d in todo if not cache.contains(d)]
            if todo:
                self.hinted += len(todo)
                try:
                    await trio.to_thread.run_sync(hint, todo, limiter=limiter)
                except (CnpsfsError, OSError) as exc:  # the loads meet it again and report it
                    log.debug("prefetch: blocks not hinted: %s", exc)
            if self._walk_done and not self._hints:
                return

    async def _fetcher(self, receive: trio.MemoryReceiveChannel[_Batch]) -> None:
        async with receive:
            async for batch in receive:
                try:
                    if self._left_behind():
                        continue  # the walk stops at its next entry; what is queued is dropped
                    await self.ops.demand_quiet()
                    cache = self.ops.fetcher.cache
                    todo = [d for d in batch.digests if not cache.contains(d)]
                    if todo:
                        self.bytes += await self.ops.fetcher.fetch(todo, limiter=self.limiter)
                        prefetched = self.ops.prefetched
                        for digest in todo:
                            if cache.contains(digest):
                                if len(prefetched) < PREFETCHED_MAX:
                                    prefetched.add(digest)
                                self.chunks += 1
                finally:
                    batch.loaded.set()

    async def _pusher(self, receive: trio.MemoryReceiveChannel[_Batch]) -> None:
        """Warm the kernel with each batch, in profile order, once its chunks are loaded and
        the mount serves (the lookups go through it)."""
        async with receive:
            async for batch in receive:
                await batch.loaded.wait()
                if self.serving is not None:
                    await self.serving.wait()
                if self._left_behind():
                    continue
                await self._push(batch.jobs)
                if self.first_push is None:
                    self.first_push = time.monotonic() - self.started

    # ------------------------------------------------------------------ the kernel's caches

    async def _push(self, batch: list[_Job]) -> None:
        """Warm the kernel for a batch, in profile order, in one worker call: look each path
        up through the mount (the kernel caches the entry, or that the name is absent; a
        listing, a symlink's target) and store each file's profiled pages in its page cache.

        The kernel stores pages only for an inode it knows, hence the lookup first; the
        lookups are served by this very loop. The call is abandoned on cancel (an unmount
        may leave a lookup waiting for a reply that will never come) and then stops at its
        next path.
        """
        with self._in_mount_lock:
            self._in_mount += 1
        try:
            looked, files, pushed = await trio.to_thread.run_sync(self._warm_kernel, batch, limiter=self._push_limiter,
                                                                  abandon_on_cancel=True)
        except OSError as exc:
            log.debug("prefetch: the kernel's caches not warmed: %s", exc)
            return
        self.looked_up += looked
        self.pushed_files += files
        self.pushed_bytes += pushed

    def _warm_kernel(self, batch: list[_Job]) -> tuple[int, int, int]:
        """On a worker: the lookups and page stores of *batch*; (paths looked up, files and bytes stored)."""
        assert self.push_to is not None
        # Listings for this thread carry attributes (the program will stat what it lists).
        self.ops.own_tids.add(threading.get_native_id())
        root = os.fsencode(self.push_to)
        looked = files = pushed = 0
        kernel_has = self.ops.kernel_has
        try:
            for job in batch:
                if self._abandoned.is_set():
                    break
                # Racing the program: what it has already touched the kernel holds; warming
                # it again would only double the requests.
                if isinstance(job, _FileJob):
                    if kernel_has(job.node.ino, "pages"):
                        continue
                elif job.ino is not None and kernel_has(job.ino, "listing" if job.listing else "entry"):
                    continue
                path = os.path.join(root, *(job.node.path if isinstance(job, _FileJob) else job.path))
                try:
                    st = os.lstat(path)
                except OSError:
                    looked += 1  # absent (the kernel now caches that), or gone since
                    continue
                looked += 1
                if isinstance(job, _Lookup):
                    if job.listing:
                        os.listdir(path)
                    elif job.symlink:
                        os.readlink(path)
                    continue
                if st.st_ino != job.node.ino:
                    continue  # the path shows another file now (a swap): its pages would be another file's
                done = self._store_pages(job)
                if done:
                    files += 1
                    pushed += done
        finally:
            with self._in_mount_lock:
                self._in_mount -= 1
        return looked, files, pushed

    def _store_pages(self, job: _FileJob) -> int:
        """On a worker: notify_store every profiled range, page-aligned; stops at a chunk not cached."""
        cache = self.ops.fetcher.cache
        notify = self.ops.kernel.notify_store

        def chunk(digest: bytes) -> bytes | memoryview:
            data = cache.get(digest)
            if data is None:
                raise KeyError(digest)
            return data

        size = job.emap.size
        pushed = 0
        for offset, length in job.spans:
            start = offset - offset % PAGE
            end = min(size, -(-(offset + length) // PAGE) * PAGE)
            try:
                data = read_range(job.emap, start, end - start, chunk)
                notify(job.node.ino, start, data)
            except (KeyError, CnpsfsError, OSError) as exc:  # evicted, damaged, or the kernel forgot the inode
                log.debug("prefetch: pages of %r at %d not stored: %r", job.node.path, start, exc)
                return pushed
            pushed += len(data)
        return pushed

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        return {"profile": self.profile.name, "digest": fmt.format_digest(self.digest),
                "recorded_on": fmt.format_digest(self.profile.image),
                "generation": self.generation.number, "state": self.state, "reason": self.reason,
                "entries": len(self.profile.entries), "walked": self.walked, "missing": self.missing,
                "errors": self.errors, "chunks": self.chunks, "bytes": self.bytes, "budget_bytes": self.budget,
                "pushed_files": self.pushed_files, "pushed_bytes": self.pushed_bytes, "looked_up": self.looked_up,
                "nodes": self.nodes, "planned_bytes": self.planned, "hinted": self.hinted,
                "first_push_seconds": round(self.first_push, 3) if self.first_push is not None else None,
                "seconds": round((self.ended or time.monotonic()) - self.started, 3)}


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes (1 GiB when it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 30
