"""Verified blob streams: hash and count bytes as they pass, decompress in one pass.

A layer is read once, front to back: the raw bytes are hashed (the blob digest the
manifest names) and counted (its size), decompressed, and the decompressed bytes hashed
again (the diff_id the config names) on their way into the tar importer. Nothing is
spooled to disk first, so a hostile blob can cost at most its declared size in reading
and a bounded amount of memory. Callers compare the digests after the last byte, before
anything is committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import queue
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import IO, Any, cast

import zstandard

from cnpsfs.errors import ImportRejected
from cnpsfs.oci.model import digest_of

_inflater: Callable[[int], Any]
try:  # ISA-L's inflate: the same gzip, CRC and length checks as zlib, at 2-3x the speed
    from isal import isal_zlib

    _inflater = isal_zlib.decompressobj
    _INFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error, cast(type[Exception], isal_zlib.error))
except ImportError:  # a platform without its wheels: zlib
    _inflater = zlib.decompressobj
    _INFLATE_ERRORS = (zlib.error,)

log = logging.getLogger(__name__)

_READ = 1 << 20

#: Magic numbers of the compressions a layer may hide in an undeclared way.
COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"\xfd7zXZ\x00": "xz", b"BZh": "bzip2"}


@contextlib.contextmanager
def scratch_file(directory: str | None, prefix: str) -> Iterator[tuple[IO[bytes], str]]:
    """A temporary file (its open handle and path) removed on exit, whatever its consumer did."""
    fd, path = tempfile.mkstemp(dir=directory, prefix=prefix)
    try:
        with open(fd, "wb") as f:
            yield f, path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def atomic_file(path: str, *, prefix: str = ".tmp-", suffix: str = "") -> Iterator[IO[bytes]]:
    """A file that replaces *path* only once written whole: a temporary beside it, fsynced,
    renamed into place, the directory fsynced; on any failure the temporary is removed and
    *path* is as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    try:
        with open(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def sniff_compression(head: bytes) -> str:
    """The compression whose magic *head* starts with, or "" (plain tar, or not a known one)."""
    for magic, name in COMPRESSION_MAGIC.items():
        if head.startswith(magic):
            return name
    return ""


class Cancelled(ImportRejected):
    """A read stopped because a sibling layer failed (never the error reported)."""


class HashingReader(io.RawIOBase):
    """Passes bytes through, hashing and counting them; refuses more than *limit*.

    *abort* lets a sibling layer's failure stop this one at its next read.
    """

    def __init__(self, raw: Any, what: str, *, algorithm: str = "sha256", limit: int | None = None,
                 on_bytes: Callable[[int], None] | None = None, abort: threading.Event | None = None) -> None:
        super().__init__()
        self.raw = raw
        self.what = what
        self.algorithm = algorithm
        self.hash = hashlib.new(algorithm)
        self.count = 0
        self.limit = limit
        self.on_bytes = on_bytes
        self.abort = abort

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.abort is not None and self.abort.is_set():
            raise Cancelled(f"{self.what}: cancelled (another layer failed)")
        want = len(buffer)
        if self.limit is not None:
            # Ask for one byte past the limit so an oversized blob shows, never more.
            want = min(want, self.limit - self.count + 1)
            if want <= 0:
                want = 1
        data = self.raw.read(want)
        n = len(data)
        if not n:
            return 0
        self.count += n
        if self.limit is not None and self.count > self.limit:
            raise ImportRejected(f"{self.what}: more data than the {self.limit} bytes the manifest gives")
        buffer[:n] = data
        self.hash.update(data)
        if self.on_bytes is not None:
            self.on_bytes(n)
        return n

    def digest(self) -> str:
        return f"{self.algorithm}:{self.hash.hexdigest()}"

    def drain(self) -> None:
        while self.read(_READ):
            pass


class GzipReader(io.RawIOBase):
    """gzip (one or more concatenated members) through ISA-L (else zlib): CRC and length are checked.

    Output per call is bounded by the caller's buffer, so a gzip bomb costs time, not memory.
    Inflating is the largest part of a layer's reading that cannot be split across cores (a
    gzip stream decodes front to back), so it goes through the fastest inflate at hand;
    both release the GIL while they work.
    """

    def __init__(self, src: IO[bytes], what: str) -> None:
        super().__init__()
        self.src = src
        self.what = what
        self._d = _inflater(31)
        self._in = b""
        self._started = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            while True:
                if self._d.eof:
                    rest = self._d.unused_data or self.src.read(_READ)
                    if not rest:
                        return 0
                    self._d = _inflater(31)  # concatenated members are one gzip stream
                    self._in = rest
                if not self._in:
                    self._in = self.src.read(_READ)
                    if not self._in:
                        raise ImportRejected(f"{self.what}: truncated gzip data"
                                             + ("" if self._started else " (empty blob)"))
                self._started = True
                out = self._d.decompress(self._in, len(buffer))
                self._in = self._d.unconsumed_tail
                if out:
                    buffer[: len(out)] = out
                    return len(out)
        except _INFLATE_ERRORS as exc:
            raise ImportRejected(f"{self.what}: corrupt gzip data ({exc})") from None


class ZstdReader(io.RawIOBase):
    """zstd (one or more frames) through zstandard's stream reader, bounded per read.

    The stream reader does not report a frame cut short at the end of its input; the blob's
    size and digest, and the diff_id of what came out, catch that (and every other damage).
    """

    def __init__(self, src: IO[bytes], what: str) -> None:
        super().__init__()
        self.what = what
        self._r = zstandard.ZstdDecompressor().stream_reader(src, read_size=64 << 10, read_across_frames=True,
                                                            closefd=False)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._r.read(len(buffer))
        except zstandard.ZstdError as exc:
            raise ImportRejected(f"{self.what}: corrupt zstd data ({exc})") from None
        buffer[: len(data)] = data
        return len(data)


#: What a :class:`QueuedReader`'s producer queues after its last piece.
EOF = object()


class QueuedReader(io.RawIOBase):
    """A readable stream fed by a thread of its own over a bounded queue.

    The producer (a subclass's thread) queues pieces with :meth:`_put`, then ``EOF`` or the
    exception that ended it; the consumer's reads take them in order and raise that
    exception. At most *depth* pieces wait, so memory stays bounded whatever the stream's
    size, and :meth:`_put` gives up once :meth:`close` was called, so a producer never
    blocks on a consumer that went away. Shared by the layer decoder (:class:`ReadAhead`)
    and the registry's blob fetch (``oci.registry``).
    """

    def __init__(self, depth: int) -> None:
        super().__init__()
        self._queue: queue.Queue[Any] = queue.Queue(depth)
        self._stop = threading.Event()
        self._piece = memoryview(b"")
        self._done = False

    def _put(self, item: Any) -> bool:
        """Queue *item*; False when the consumer went away (close) first."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.25)
                return True
            except queue.Full:
                continue
        return False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._piece:
            if self._done:
                return 0
            item = self._queue.get()  # the producer always ends: its reads have deadlines, its puts check _stop
            if item is EOF:
                self._done = True
                return 0
            if isinstance(item, BaseException):
                self._done = True
                raise item
            self._piece = memoryview(item)
        n = min(len(buffer), len(self._piece))
        buffer[:n] = self._piece[:n]
        self._piece = self._piece[n:]
        return n


class ReadAhead(QueuedReader):
    """Reads *source* on a thread of its own, handing pieces over a bounded queue.

    A layer's verification and decompression (sha256 of the blob, gunzip or zstd, sha256 of
    the tar: zlib, zstandard and hashlib release the GIL) then run on one core while the
    tar parser, the chunker and the store writer run on the other. At most *depth* pieces
    of *piece* bytes wait in the queue, so memory stays bounded whatever the layer's size.

    *epilogue* runs on the same thread after the source's end (draining what it left
    unread, so every hash covers every byte) and before the end is reported: a consumer
    that has read to the end may read every hasher. An exception on the thread is raised
    by the consumer's next read. :meth:`close` stops the thread and waits for it.
    """

    def __init__(self, source: IO[bytes] | io.RawIOBase, what: str, *, piece: int = _READ, depth: int = 8,
                 epilogue: Callable[[], None] | None = None) -> None:
        super().__init__(depth)
        self.what = what
        self._thread = threading.Thread(target=self._run, args=(source, piece, epilogue), daemon=True,
                                        name="cnpsfs-decode")
        self._thread.start()

    def _run(self, source: IO[bytes] | io.RawIOBase, piece: int, epilogue: Callable[[], None] | None) -> None:
        try:
            while True:
                data = source.read(piece)
                if not data:
                    break
                if not self._put(data):
                    return
            if epilogue is not None:
                epilogue()
            result: Any = EOF
        except BaseException as exc:  # handed to the reader, who raises it
            result = exc
        self._put(result)

    def close(self, timeout: float = 60.0) -> None:
        """Stop the thread and wait for it (its reads are bounded by the source's deadlines)."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("%s: the decoding thread did not stop within %.0f s", self.what, timeout)
        super().close()


def decompressor(src: IO[bytes], compression: str, what: str) -> IO[bytes]:
    if compression == "gzip":
        return io.BufferedReader(GzipReader(src, what), _READ)
    if compression == "zstd":
        return io.BufferedReader(ZstdReader(src, what), _READ)
    if compression == "":
        return src
    raise ImportRejected(f"{what}: unsupported compression {compression!r}")


def read_verified(stream: Any, size: int, digest: str, what: str, *, limit: int) -> bytes:
    """A small blob (manifest, config) read whole and checked against its descriptor."""
    if size > limit:
        raise ImportRejected(f"{what}: {size} bytes, more than the {limit >> 20} MiB allowed")
    data = stream.read(size + 1)
    if len(data) != size:
        raise ImportRejected(f"{what}: {len(data) if len(data) <= size else 'more than ' + str(size)} bytes,"
                             f" the descriptor says {size}")
    algorithm = digest.partition(":")[0]
    actual = digest_of(data, algorithm)
    if actual != digest:
        raise ImportRejected(f"{what}: digest mismatch: the blob hashes to {actual}, expected {digest}")
    return data
