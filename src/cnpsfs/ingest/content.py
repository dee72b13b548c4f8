"""Content-defined chunking of a FileSet's file data (docs/format.md, "Chunking").

Two kinds of file are cut differently, by a rule that depends only on content and
canonical paths, so the same tree always gives the same chunks:

* A *large* file (``size >= LARGE_FILE``) is cut on its own, starting at its first byte.
  Identical large files anywhere (another package, another image) give identical chunks.
* *Small* files are concatenated in canonical path order into one stream per FileSet,
  and the stream is cut. Half the files of a root filesystem are under 4 KiB: cut one
  per chunk they compress badly and cost an index row each; concatenated, neighbouring
  files (same package, same directory) compress together, and because the cut points
  are content-defined an insertion elsewhere only disturbs the chunks around it.

Which open block a chunk joins (docs/format.md 2.1) is decided here too, from the files
it holds: a large file's chunks go to the data stream (or the cold one), a small-file
chunk to the hot stream unless every file it holds is cold (see :mod:`cnpsfs.ingest.layout`),
so the files a program reads at start-up share blocks with each other, not with sources
and documentation nobody reads then. That changes blocks only, never a digest.

A chunk made only of zero bytes is never stored: extents over it are holes, which is
how sparse files stay cheap whatever source they come from.

Hashing and compression run on thread pools (both release the GIL); the calling thread
cuts and appends records, so the pack layout is produced by one thread. The chunks cut in
one round (up to 8 MiB of stream) are hashed and looked up in the store as one job: a
future, a pool hand-off and an index query per chunk cost more Python than the hashing.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import blake3

from cnpsfs import format as fmt
from cnpsfs.format.chunker import new_chunker
from cnpsfs.store import DataStream, Store, StoreWriter

_FLUSH = 8 << 20  # cut the buffered stream in pieces of this size
_READ = 4 << 20
_ZERO = bytes(_READ)
#: Rounds of cut chunks hashed ahead of the writer (each up to _FLUSH bytes and a chunk):
#: one, hashed while the next is cut, keeps both cores busy (3 imported v2 no faster) and
#: the import's data no more than about 16 MiB behind what it has read, as the crash and
#: gc tests of tests/test_store.py rely on (a kill mid-import finds blocks written).
_PENDING_MAX = 1


def _is_zero(data: bytes) -> bool:
    # The ends first: almost every chunk has a non-zero byte there, and count() reads it all.
    return not data or (not data[-1] and not data[0] and data.count(0) == len(data))


@dataclass(slots=True, eq=False)
class _Batch:
    """The chunks of one cut round and the job hashing them: per chunk, its digest (None
    for an all-zero chunk, never stored) and whether the store already has it."""

    chunks: list[bytes]
    streams: list[DataStream]  # the open block each chunk joins
    job: concurrent.futures.Future[list[tuple[bytes | None, bool]]]


@dataclass(slots=True)
class _Span:
    """A file's byte range in a stream; resolved to extents once its chunks are cut."""

    start: int
    length: int
    sink: Callable[[tuple[fmt.Extent, ...]], None]


class _Stream:
    """A byte stream cut by FastCDC; chunks are hashed and stored as they complete."""

    def __init__(self, writer: ContentWriter, stream: DataStream | None = None) -> None:
        """*stream*: the block stream of every chunk (a large file's); None for the small-file
        stream, whose chunks are hot when they hold a byte of a hot span (:meth:`add_span`)."""
        self.owner = writer
        self.stream = stream
        self.hot: deque[list[int]] = deque()  # [start, end) of hot spans, in order, adjacent ones merged
        self.buf = bytearray()
        self.base = 0  # stream offset of buf[0]
        self.length = 0
        self.cuts: list[tuple[int, int, _Batch, int]] = []  # (start, len, batch, index in it)
        self.spans: deque[_Span] = deque()

    def write(self, data: bytes | memoryview) -> None:
        self.buf += data
        self.length += len(data)
        if len(self.buf) >= _FLUSH:
            self._cut(final=False)

    def add_span(self, start: int, length: int, sink: Callable[[tuple[fmt.Extent, ...]], None],
                 *, hot: bool = True) -> None:
        self.spans.append(_Span(start, length, sink))
        if hot and length:
            if self.hot and self.hot[-1][1] == start:
                self.hot[-1][1] = start + length
            else:
                self.hot.append([start, start + length])

    def _streams(self, cut: list[tuple[int, int]]) -> list[DataStream]:
        """The block stream of each chunk cut (offsets relative to ``self.base``, in order)."""
        if self.stream is not None:
            return [self.stream] * len(cut)
        out = []
        hot = self.hot
        for offset, length in cut:
            start = self.base + offset
            end = start + length
            while hot and hot[0][1] <= start:
                hot.popleft()
            out.append(DataStream.HOT if hot and hot[0][0] < end else DataStream.COLD)
        return out

    def _cut(self, *, final: bool) -> None:
        # Cut a snapshot: pyfastcdc's chunks are views into the buffer they were cut from.
        data = bytes(self.buf)
        cut = [(ch.offset, ch.length) for ch in self.owner.cdc.cut_buf(data)]
        if not final:
            cut = cut[:-1]  # the last chunk may have been cut short by the buffer's end: kept for the next round
        consumed = cut[-1][0] + cut[-1][1] if cut else 0
        if cut:
            batch = self.owner.submit([data[offset : offset + length] for offset, length in cut], self._streams(cut))
            base = self.base
            self.cuts.extend((base + offset, length, batch, number) for number, (offset, length) in enumerate(cut))
        self.buf = bytearray(data[consumed:])
        self.base += consumed
        self._resolve_spans()

    def finish(self) -> None:
        if self.buf:
            self._cut(final=True)
        self._resolve_spans(wait=True)
        assert not self.spans, "every span ends inside the stream"

    def _resolve_spans(self, *, wait: bool = False) -> None:
        # Spans are in stream order; each is resolved once the chunks covering it are cut
        # and hashed. Mid-stream (*wait* false) a span whose chunk digests are still being
        # computed is left for a later round, so cutting never waits behind the pool.
        cut_end = self.base
        while self.spans and self.spans[0].start + self.spans[0].length <= cut_end:
            span = self.spans[0]
            extents = self._extents(span.start, span.length, wait=wait)
            if extents is None:
                break
            self.spans.popleft()
            span.sink(extents)
        # Drop cuts no pending span can still need.
        first_needed = self.spans[0].start if self.spans else cut_end
        drop = 0
        while drop < len(self.cuts) and self.cuts[drop][0] + self.cuts[drop][1] <= first_needed:
            drop += 1
        if drop:
            del self.cuts[:drop]

    def _extents(self, start: int, length: int, *, wait: bool = True) -> tuple[fmt.Extent, ...] | None:
        """The extents of [start, start+length), or None if *wait* is false and a digest is pending."""
        out: list[fmt.Extent] = []
        end = start + length
        for cstart, clen, batch, number in self.cuts:
            if cstart + clen <= start:
                continue
            if cstart >= end:
                break
            if not wait and not batch.job.done():
                return None
            lo = max(start, cstart)
            hi = min(end, cstart + clen)
            digest = batch.job.result()[number][0]
            prev = out[-1] if out else None
            if digest is None and prev is not None and prev.digest is None:
                out[-1] = fmt.Extent(None, 0, prev.length + hi - lo)  # merge adjacent holes
            else:
                out.append(fmt.Extent(digest, lo - cstart if digest else 0, hi - lo))
        return tuple(out)


class ContentWriter:
    """Turns file data into stored chunks and per-file extent lists for one FileSet."""

    def __init__(self, store: Store, writer: StoreWriter, pool: concurrent.futures.Executor) -> None:
        self.store = store
        self.writer = writer
        self.pool = pool
        self.cdc = new_chunker()
        self.small = _Stream(self)
        self.pending: deque[_Batch] = deque()
        self.logical_bytes = 0
        self.on_progress: Callable[[int], None] | None = None

    def submit(self, chunks: list[bytes], streams: list[DataStream]) -> _Batch:
        """Queue one round of cut chunks for hashing; the writer gets them in this order."""
        batch = _Batch(chunks, streams, self.pool.submit(self._hash, chunks))
        self.pending.append(batch)
        while len(self.pending) > _PENDING_MAX:
            self._drain_one()
        return batch

    def _hash(self, chunks: list[bytes]) -> list[tuple[bytes | None, bool]]:
        """Digests, and whether the store already has each chunk (runs on the pool)."""
        digests = [None if _is_zero(data) else fmt.digest_bytes(data) for data in chunks]
        have = self.store.existing([d for d in digests if d is not None])
        return [(digest, digest is None or digest in have) for digest in digests]

    def _drain_one(self) -> None:
        batch = self.pending.popleft()
        for data, stream, (digest, stored) in zip(batch.chunks, batch.streams, batch.job.result(), strict=True):
            if not stored:
                assert digest is not None
                self.writer.add_chunk(digest, data, stream=stream)
        batch.chunks, batch.streams = [], []  # the writer holds what it needs; the digests stay for the extents

    def drain(self) -> None:
        while self.pending:
            self._drain_one()

    # ------------------------------------------------------------------ files

    def add_small(self, data: bytes, sink: Callable[[tuple[fmt.Extent, ...]], None], *, cold: bool = False) -> bytes:
        """Append a small file to the FileSet's shared stream (call in canonical order).

        Returns the file's content hash; *sink* receives its extents once they are cut.
        *cold*: the file is unlikely to be read at start-up (:mod:`cnpsfs.ingest.layout`).
        """
        start = self.small.length
        self.small.add_span(start, len(data), sink, hot=not cold)
        self.small.write(data)
        self._progress(len(data))
        return fmt.digest_bytes(data)

    def add_large(self, pieces: Iterable[bytes | memoryview | int],
                  size: int, *, cold: bool = False) -> tuple[tuple[fmt.Extent, ...], bytes]:
        """Cut one large file on its own; returns its extents and content hash.

        *pieces* yields data, or an int for that many zeros (a hole in the source).
        *cold*: its chunks go to the cold block stream.
        """
        stream = _Stream(self, DataStream.COLD if cold else DataStream.DATA)
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        result: list[tuple[fmt.Extent, ...]] = []
        stream.add_span(0, size, result.append)
        for piece in pieces:
            if isinstance(piece, int):
                remaining = piece
                while remaining:
                    n = min(remaining, _READ)
                    zeros = memoryview(_ZERO)[:n]
                    stream.write(zeros)
                    hasher.update(zeros)
                    remaining -= n
                self._progress(piece)
            else:
                stream.write(piece)
                hasher.update(piece)
                self._progress(len(piece))
        if stream.length != size:
            raise ValueError(f"file data is {stream.length} bytes, expected {size}")
        stream.finish()
        return result[0], hasher.digest()

    def finish(self) -> None:
        self.small.finish()
        self.drain()

    def _progress(self, n: int) -> None:
        self.logical_bytes += n
        if self.on_progress is not None:
            self.on_progress(n)


def read_file_pieces(path: str | bytes, size: int) -> Iterable[bytes | int]:
    """Yield a regular file's data, holes as zero counts (SEEK_DATA/SEEK_HOLE), exactly *size* bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        pos = 0
        while pos < size:
            try:
                data_start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                data_start = size  # ENXIO: only a hole remains
            data_start = min(data_start, size)
            if data_start > pos:
                yield data_start - pos
                pos = data_start
                continue
            try:
                hole = min(os.lseek(fd, pos, os.SEEK_HOLE), size)
            except OSError:
                hole = size
            while pos < hole:
                data = os.pread(fd, min(_READ, hole - pos), pos)
                if not data:
                    raise OSError(f"file shrank while reading at offset {pos}")
                yield data
                pos += len(data)
        # SEEK_DATA past the end looks like a trailing hole: without this check a file that
        # shrank after it was listed would be imported padded with zeros.
        now = os.fstat(fd).st_size
        if now != size:
            raise OSError(f"file changed size while importing ({now} bytes, expected {size})")
    finally:
        os.close(fd)
