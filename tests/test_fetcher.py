"""The chunk fetcher in-process (trio, a real local store, no FUSE): hops, single flight, joins."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio

from cnpsfs.errors import CorruptObjectError, MissingObjectError
from cnpsfs.fs.fetcher import ChunkFetcher
from cnpsfs.image.reader import ChunkCache
from cnpsfs.store import T_CHUNK, LocalStore

CHUNK = 64 * 1024


class CountingStore:
    """A store that counts the calls the read path makes (everything else passes through)."""

    def __init__(self, inner: LocalStore) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name in ("get", "locate_many", "open_block"):
            def counted(*args: Any, **kwargs: Any) -> Any:
                self.calls[name] += 1
                return attr(*args, **kwargs)
            return counted
        return attr


def text_chunk(seed: int) -> bytes:
    """64 KiB that zstd compresses (words from a small vocabulary) but never repeats exactly."""
    rnd = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon", b"zeta", b"eta", b"theta"]
    out = bytearray()
    while len(out) < CHUNK:
        out += rnd.choice(words) + b" %d\n" % rnd.randrange(1 << 30)
    return bytes(out[:CHUNK])


@pytest.fixture
def one_block(tmp_path: Path) -> tuple[LocalStore, list[bytes], dict[bytes, bytes]]:
    """A store holding 14 compressible 64 KiB chunks in one zstd block (under the 1 MiB target)."""
    store = LocalStore(tmp_path / "store", create=True)
    data = [text_chunk(i) for i in range(14)]
    with store.writer() as w:
        digests = [w.add(d, T_CHUNK) for d in data]
        w.commit()
    locs = store.locate_many(digests)
    assert len({loc.block for loc in locs.values()}) == 1 and locs[digests[0]].codec == 1
    return store, digests, dict(zip(digests, data, strict=True))


def run(fn: Any) -> Any:
    return trio.run(fn)


def new_fetcher(store: Any) -> ChunkFetcher:
    return ChunkFetcher(store, ChunkCache(64 << 20), trio.CapacityLimiter(4))


def test_a_cold_miss_is_one_thread_hop(one_block: tuple[LocalStore, list[bytes], dict[bytes, bytes]]) -> None:
    store, digests, data = one_block
    counting = CountingStore(store)
    fetcher = new_fetcher(counting)

    async def main() -> None:
        assert await fetcher.get(digests[0]) == data[digests[0]]
        assert fetcher.hops == 1 and counting.calls["locate_many"] == 1 and counting.calls["open_block"] == 1
        # A later miss in the same block: its location came with the block, so no index query.
        assert await fetcher.get(digests[9]) == data[digests[9]]
        assert fetcher.hops == 2 and counting.calls["locate_many"] == 1
        assert counting.calls["open_block"] == 1, "the block reader is continued, not reopened"

    run(main)
    assert counting.calls["get"] == 0


def test_a_join_that_needs_more_continues_the_block(
        one_block: tuple[LocalStore, list[bytes], dict[bytes, bytes]]) -> None:
    """A reader joining a load that stops short of its chunk continues that load's block reader.

    Before the fix the joiner returned after the first load without its chunk and fell back
    to a second, whole-block decode through ``store.get``.
    """
    store, digests, data = one_block
    counting = CountingStore(store)
    fetcher = new_fetcher(counting)
    got: dict[bytes, bytes] = {}

    async def read(digest: bytes) -> None:
        got[digest] = await fetcher.get(digest)

    async def main() -> None:
        await fetcher.fetch([digests[0]])  # opens the block, decodes its start: members now known
        assert not fetcher.cached(digests[5]) and not fetcher.cached(digests[13])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, digests[5])  # starts the load (through chunk 5 plus slack)
            nursery.start_soon(read, digests[13])  # joins it, and needs the block's end

    run(main)
    assert got == {d: data[d] for d in (digests[5], digests[13])}
    assert counting.calls["get"] == 0, "no fallback decode through store.get"
    assert counting.calls["open_block"] == 1


def test_concurrent_misses_in_one_block_make_one_load(
        one_block: tuple[LocalStore, list[bytes], dict[bytes, bytes]]) -> None:
    store, digests, data = one_block
    counting = CountingStore(store)
    fetcher = new_fetcher(counting)
    got: dict[bytes, bytes] = {}

    async def read(digest: bytes) -> None:
        got[digest] = await fetcher.get(digest)

    async def main() -> None:
        await fetcher.fetch([digests[0]])
        hops = fetcher.hops
        async with trio.open_nursery() as nursery:
            for d in digests[3:8]:
                nursery.start_soon(read, d)
        # Each load decodes at least 128 KiB past its chunk, so the five 64 KiB chunks need at
        # most three loads, whichever reader trio schedules first; never one per reader.
        assert fetcher.hops - hops <= 3

    run(main)
    assert got == {d: data[d] for d in digests[3:8]}
    assert counting.calls["open_block"] == 1, "one reader of the block, continued"
    assert counting.calls["get"] == 0


def test_missing_and_corrupt_chunks_fail_alone(tmp_path: Path,
                                              one_block: tuple[LocalStore, list[bytes], dict[bytes, bytes]]) -> None:
    store, digests, data = one_block
    # A second block, raw (incompressible), with one byte flipped on disk.
    rnd = random.Random(7)
    raw_chunks = [rnd.randbytes(CHUNK) for _ in range(2)]
    with store.writer() as w:
        bad = [w.add(c, T_CHUNK) for c in raw_chunks]
        w.commit()
    loc = store.locate(bad[0])
    assert loc is not None and loc.codec == 0
    pack = store.packs_dir / f"{store.pack_files()[loc.pack]}.pack"
    with open(pack, "r+b") as f:
        f.seek(loc.offset + loc.inner + 100)
        byte = f.read(1)
        f.seek(loc.offset + loc.inner + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    fetcher = new_fetcher(store)

    async def main() -> None:
        with pytest.raises(CorruptObjectError, match="is corrupt"):
            await fetcher.get(bad[0])
        assert await fetcher.get(bad[1]) == raw_chunks[1], "its neighbour still verifies"
        with pytest.raises(MissingObjectError):
            await fetcher.get(b"\x01" * 32)
        assert await fetcher.get(digests[2]) == data[digests[2]], "the fetcher keeps serving"

    run(main)


def test_remembered_failures_are_bounded(one_block: tuple[LocalStore, list[bytes], dict[bytes, bytes]]) -> None:
    store, digests, data = one_block
    fetcher = new_fetcher(store)
    absent = [i.to_bytes(32, "big") for i in range(1, 6001)]

    async def main() -> None:
        await fetcher.fetch(absent)
        with pytest.raises(MissingObjectError):
            await fetcher.get(absent[-1])
        assert await fetcher.get(digests[1]) == data[digests[1]]

    run(main)
    assert len(fetcher._failed) <= 4096


def test_remote_backed_mounts_get_a_worker_per_remote_request() -> None:
    """Workers waiting on the network must not starve the fetches of other readers (issue 12)."""
    from types import SimpleNamespace

    from cnpsfs.fs.fetcher import worker_threads

    local = SimpleNamespace()
    assert worker_threads(local, 4) == 4  # a local store: workers are for the CPU
    cached = SimpleNamespace(remotes=[SimpleNamespace(parallel=8), SimpleNamespace(parallel=4)])
    assert worker_threads(cached, 4) == 16
    assert worker_threads(cached, 60) == 64  # never past the mount's limit


def test_blocks_located_together_are_decoded_in_parallel_each_once(tmp_path: Path) -> None:
    """A read-ahead over several blocks: the first in the locating hop, the others on their
    own workers at once; a reader waiting for a chunk of the last gets it from that load."""
    store = LocalStore(tmp_path / "store", create=True)
    data = [text_chunk(100 + i) for i in range(40)]
    with store.writer() as w:
        digests = [w.add(d, T_CHUNK) for d in data]
        w.commit()
    blocks = {loc.block for loc in store.locate_many(digests).values()}
    assert len(blocks) >= 3
    counting = CountingStore(store)
    fetcher = new_fetcher(counting)
    running = {"now": 0, "most": 0}
    advance = fetcher._advance

    def tracked(*args: Any) -> Any:
        running["now"] += 1
        running["most"] = max(running["most"], running["now"])
        try:
            time.sleep(0.05)  # long enough for the other workers to start meanwhile
            return advance(*args)
        finally:
            running["now"] -= 1

    fetcher._advance = tracked  # type: ignore[method-assign]
    got: dict[bytes, bytes] = {}

    async def main() -> None:
        async def read(digest: bytes) -> None:
            got[digest] = await fetcher.get(digest)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetcher.fetch, digests)
            await trio.sleep(0.01)
            nursery.start_soon(read, digests[-1])  # joins the read-ahead's load of the last block

    run(main)
    assert got == {digests[-1]: data[-1]}
    assert all(fetcher.cached(d) for d in digests)
    assert counting.calls["open_block"] == len(blocks), "each block opened once"
    assert counting.calls["locate_many"] == 1 and counting.calls["get"] == 0
    assert running["most"] >= 2, "the other blocks were decoded one after the other"


def _sequential_blocks(tmp_path: Path, count: int = 48) -> tuple[LocalStore, list[bytes], list[bytes]]:
    store = LocalStore(tmp_path / "store", create=True)
    data = [text_chunk(500 + i) for i in range(count)]
    with store.writer() as w:
        digests = [w.add(d, T_CHUNK) for d in data]
        w.commit()
    return store, digests, data


def test_a_front_to_back_reader_gets_the_next_block_loaded_ahead(tmp_path: Path) -> None:
    """Small files are stored in path order: once a reader takes a block to its end, the
    block stored after it is decoded before the reader gets there, once, and in turn the next."""
    store, digests, data = _sequential_blocks(tmp_path)
    blocks = {store.locate(d).block for d in digests}  # type: ignore[union-attr]
    assert len(blocks) >= 3
    counting = CountingStore(store)
    fetcher = new_fetcher(counting)
    got: list[bytes] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher.nursery = nursery
            for digest in digests:  # one chunk at a time, as tar reads small files
                got.append(await fetcher.get(digest))
                await trio.sleep(0.002)  # the reader's own work: the load ahead runs meanwhile
            fetcher.nursery = None

    run(main)
    assert got == data
    assert fetcher.ahead_loads >= 1
    # Every block decoded once: by demand (opens) or ahead of it, never both.
    assert fetcher.opens + fetcher.ahead_loads == len(blocks)
    assert counting.calls["get"] == 0


def test_a_corrupt_block_loaded_ahead_fails_only_its_own_chunks(tmp_path: Path) -> None:
    store, digests, data = _sequential_blocks(tmp_path)
    locs = [store.locate(d) for d in digests]
    keys = list(dict.fromkeys(loc.block for loc in locs if loc))
    second = next(loc for loc in locs if loc and loc.block == keys[1])
    pack = store.packs_dir / f"{store.pack_files()[second.pack]}.pack"
    with open(pack, "r+b") as f:  # damage the second block's payload
        f.seek(second.offset + second.stored // 2)
        byte = f.read(1)
        f.seek(second.offset + second.stored // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    fetcher = new_fetcher(store)
    outcome: dict[bytes, bytes | None] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher.nursery = nursery
            for digest in digests:
                try:
                    outcome[digest] = await fetcher.get(digest)
                except CorruptObjectError:
                    outcome[digest] = None
                await trio.sleep(0.002)
            fetcher.nursery = None

    run(main)
    for digest, loc, expected in zip(digests, locs, data, strict=True):
        assert loc is not None
        if loc.block == keys[1]:
            assert outcome[digest] in (None, expected)  # never wrong bytes
        else:
            assert outcome[digest] == expected, "the blocks around it still read"
    assert None in outcome.values()


# --------------------------------------------------------------------------- chunks as views of their block


def test_chunks_of_a_block_decoded_whole_are_views_of_it_counted_once(
        one_block: tuple[LocalStore, list[bytes], dict[bytes, bytes]]) -> None:
    """No copy per chunk: every member of a block decoded in one call is a view of the one
    decoded block, and the cache counts that block once, whole."""
    store, digests, data = one_block
    fetcher = new_fetcher(store)

    async def main() -> None:
        await fetcher.fetch(digests)
        got = [await fetcher.get(d) for d in digests]
        assert [bytes(g) for g in got] == [data[d] for d in digests]
        assert all(isinstance(g, memoryview) and g.readonly for g in got)
        assert len({id(g.obj) for g in got if isinstance(g, memoryview)}) == 1
        assert fetcher.cache.size == len(digests) * CHUNK  # the block's raw size, not 14 copies
        # A small first miss streams the block into a growing bytearray: its members are copies.
        streamed = new_fetcher(store)
        first = await streamed.get(digests[0])
        assert type(first) is bytes and first == data[digests[0]]

    run(main)


def _recount(cache: ChunkCache) -> int:
    """What the cache holds, counted from scratch: own chunks, and each viewed block once."""
    blocks = {id(v.obj): memoryview(v.obj).nbytes for v in cache._data.values() if isinstance(v, memoryview)}
    return sum(len(v) for v in cache._data.values() if not isinstance(v, memoryview)) + sum(blocks.values())


def test_the_cache_bound_counts_the_blocks_its_views_keep_alive() -> None:
    """Random puts of views of 12 blocks and of chunks of their own, in a cache smaller than
    four blocks: the bytes held (each block counted whole while any view of it is cached)
    never exceed the bound, and a block is let go of with its last view only."""
    rnd = random.Random(3)
    blocks = [rnd.randbytes(rnd.randrange(50_000, 120_000)) for _ in range(12)]
    cache = ChunkCache(400_000)
    for step in range(3000):
        digest = step.to_bytes(4, "big")
        if rnd.random() < 0.2:
            cache.put(digest, rnd.randbytes(rnd.randrange(1, 30_000)))
        else:
            block = rnd.choice(blocks)
            start = rnd.randrange(len(block) - 1)
            cache.put(digest, memoryview(block)[start : start + rnd.randrange(1, 20_000)])
        assert cache.size == _recount(cache) <= cache.capacity, step
    # A block stays counted until its last view goes.
    cache = ChunkCache(10 * CHUNK)
    block = bytes(4 * CHUNK)
    for i in range(4):
        cache.put(b"v%d" % i, memoryview(block)[i * CHUNK : (i + 1) * CHUNK])
    assert cache.size == 4 * CHUNK
    for i in range(3):
        cache.put(b"own%d" % i, bytes(2 * CHUNK))  # 10 chunks' worth: nothing evicted yet
    assert cache.size == 10 * CHUNK and cache.contains(b"v0")
    cache.put(b"own3", bytes(1))  # over: evicting one view frees nothing, so all four go
    assert not any(cache.contains(b"v%d" % i) for i in range(4))
    assert all(cache.contains(b"own%d" % i) for i in range(4))
    assert cache.size == 6 * CHUNK + 1 == _recount(cache)


def test_a_small_cache_of_views_stays_bounded_while_blocks_stream_through(tmp_path: Path) -> None:
    """Reading 6 blocks through a cache of a block and a half: right bytes, bound respected."""
    store = LocalStore(tmp_path / "store", create=True)
    chunks = [text_chunk(100 + i) for i in range(6 * 14)]
    with store.writer() as w:
        digests = [w.add(c, T_CHUNK) for c in chunks]
        w.commit()
    assert len({loc.block for loc in store.locate_many(digests).values()}) >= 5
    fetcher = ChunkFetcher(store, ChunkCache(21 * CHUNK), trio.CapacityLimiter(2))

    async def main() -> None:
        for i in range(0, len(digests), 7):
            await fetcher.fetch(digests[i : i + 7])
            for d, c in zip(digests[i : i + 7], chunks[i : i + 7], strict=True):
                assert await fetcher.get(d) == c
            assert fetcher.cache.size == _recount(fetcher.cache) <= fetcher.cache.capacity

    run(main)
