"""Reading file bytes from extents, touching only the chunks that hold the range.

A file's extents are mapped to a prefix sum of their lengths once; ``bisect`` then finds
the first extent of any offset (restic's file reader does the same). Decompressed chunks
are kept in a bounded LRU: neighbouring reads, and small files that share a chunk, are
served without decompressing again.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate

from cnpsfs import format as fmt
from cnpsfs.errors import CorruptObjectError
from cnpsfs.store import Store

#: The chunk cache of a FileReader: small files share chunks (they are cut from one
#: stream in canonical path order, the order exports read them), so a few MiB are hit
#: again and again; the bound only matters for large files read once.
READER_CACHE_BYTES = 64 << 20


class ChunkCache:
    """A thread-safe LRU of verified, decompressed chunks, bounded in bytes.

    A chunk is kept as bytes of its own, or as a read-only memoryview of the decoded block
    it came from (:meth:`BlockStream.advance <cnpsfs.store.blocks.BlockStream.advance>`
    hands out views, not copies). A view keeps its whole block alive, so the bound counts
    what is really held: a block is counted whole, once, from the first of its views
    cached to the last one evicted; a chunk of its own counts its length.
    """

    def __init__(self, capacity_bytes: int = 64 << 20) -> None:
        self.capacity = capacity_bytes
        self._data: OrderedDict[bytes, bytes | memoryview] = OrderedDict()
        self._size = 0
        #: id of a block some cached views show -> (the block, how many views, its size).
        self._blocks: dict[int, tuple[object, int, int]] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def size(self) -> int:
        """The bytes held: chunks of their own, and every block a cached view keeps alive."""
        return self._size

    def get(self, digest: bytes) -> bytes | memoryview | None:
        with self._lock:
            data = self._data.get(digest)
            if data is not None:
                self._data.move_to_end(digest)
                self.hits += 1
            else:
                self.misses += 1
            return data

    def contains(self, digest: bytes) -> bool:
        return digest in self._data

    def put(self, digest: bytes, data: bytes | memoryview) -> None:
        with self._lock:
            if digest in self._data:
                return
            self._data[digest] = data
            self._size += self._hold(data)
            while self._size > self.capacity and self._data:
                _d, old = self._data.popitem(last=False)
                self._size -= self._let_go(old)

    def _hold(self, data: bytes | memoryview) -> int:
        """The bytes caching *data* adds: its length, or its block's size for the block's first view."""
        if not isinstance(data, memoryview):
            return len(data)
        base = data.obj
        key = id(base)  # stable while the entry below holds the block
        held = self._blocks.get(key)
        if held is not None:
            self._blocks[key] = (base, held[1] + 1, held[2])
            return 0
        size = memoryview(base).nbytes
        self._blocks[key] = (base, 1, size)
        return size

    def _let_go(self, data: bytes | memoryview) -> int:
        """The bytes evicting *data* frees: its length, or its block's size with the block's last view."""
        if not isinstance(data, memoryview):
            return len(data)
        key = id(data.obj)
        base, views, size = self._blocks[key]
        if views > 1:
            self._blocks[key] = (base, views - 1, size)
            return 0
        del self._blocks[key]
        return size


class ExtentMap:
    """Offsets of a file's extents, for O(log n) range lookup."""

    __slots__ = ("extents", "size", "starts")

    def __init__(self, extents: Sequence[fmt.Extent]) -> None:
        self.extents = tuple(extents)
        self.starts = [0, *accumulate(e.length for e in self.extents)]
        self.size = self.starts[-1]

    def pieces(self, offset: int, size: int) -> Iterator[tuple[fmt.Extent, int, int]]:
        """(extent, offset inside the extent, length) covering ``[offset, offset+size)``."""
        end = min(offset + size, self.size)
        if offset >= end:
            return
        index = bisect.bisect_right(self.starts, offset) - 1
        while offset < end:
            ext = self.extents[index]
            inner = offset - self.starts[index]
            n = min(ext.length - inner, end - offset)
            yield ext, inner, n
            offset += n
            index += 1

    def chunks_for(self, offset: int, size: int) -> list[bytes]:
        return [e.digest for e, _i, _n in self.pieces(offset, size) if e.digest is not None]


def read_range(emap: ExtentMap, offset: int, size: int,
               get_chunk: Callable[[bytes], bytes | memoryview]) -> bytes:
    """Assemble ``[offset, offset+size)`` from chunks fetched by *get_chunk* (blocking)."""
    out: list[bytes | memoryview] = []
    for ext, inner, n in emap.pieces(offset, size):
        if ext.digest is None:
            out.append(bytes(n))
        else:
            chunk = get_chunk(ext.digest)
            start = ext.offset + inner
            piece = chunk[start : start + n]
            if len(piece) != n:
                raise past_the_end(ext, len(chunk))
            out.append(piece)
    return out[0] if len(out) == 1 and isinstance(out[0], bytes) else b"".join(out)


def past_the_end(ext: fmt.Extent, chunk_size: int) -> CorruptObjectError:
    """An extent that reaches past its chunk: the object naming it is wrong, never pad or cut the data."""
    assert ext.digest is not None
    return CorruptObjectError(f"extent [{ext.offset}, +{ext.length}) runs past the end of chunk "
                              f"{fmt.format_digest(ext.digest)} ({chunk_size} bytes)")


class StoreFile:
    """A file-like reader over a stored file (for export and ``cat``)."""

    def __init__(self, emap: ExtentMap, get_chunk: Callable[[bytes], bytes | memoryview]) -> None:
        self.emap = emap
        self.get_chunk = get_chunk
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self.emap.size - self.pos
        data = read_range(self.emap, self.pos, n, self.get_chunk)
        self.pos += len(data)
        return data


def cached_getter(store_get: Callable[[bytes], bytes], cache: ChunkCache) -> Callable[[bytes], bytes | memoryview]:
    def get_chunk(digest: bytes) -> bytes | memoryview:
        data = cache.get(digest)
        if data is None:
            data = store_get(digest)
            cache.put(digest, data)
        return data

    return get_chunk


class FileReader:
    """Reads stored files outside a mount (export, ``cat``, bundles, builds): whole, as a
    range or as a file object, through one bounded cache of verified chunks shared by
    every file read with it. The store verifies each chunk before it enters the cache."""

    def __init__(self, store: Store, cache_bytes: int = READER_CACHE_BYTES) -> None:
        self.store = store
        self.get_chunk = cached_getter(store.get, ChunkCache(cache_bytes))

    def extent_map(self, entry: fmt.Entry) -> ExtentMap:
        return ExtentMap(self.store.file_extents(entry))

    def read(self, entry: fmt.Entry) -> bytes:
        """The whole content of the regular file *entry*."""
        emap = self.extent_map(entry)
        return read_range(emap, 0, emap.size, self.get_chunk)

    def pieces(self, emap: ExtentMap) -> Iterator[memoryview | int]:
        """The file front to back: its bytes piece by piece, and holes as their length
        (a writer seeks over them and leaves the file sparse)."""
        for ext, inner, n in emap.pieces(0, emap.size):
            if ext.digest is None:
                yield n
                continue
            chunk = self.get_chunk(ext.digest)
            start = ext.offset + inner
            piece = memoryview(chunk)[start : start + n]
            if len(piece) != n:
                raise past_the_end(ext, len(chunk))
            yield piece

    def open(self, entry: fmt.Entry) -> StoreFile:
        """A file object over *entry* (``read(n)``), for tarfile and shutil.copyfileobj."""
        return StoreFile(self.extent_map(entry), self.get_chunk)
