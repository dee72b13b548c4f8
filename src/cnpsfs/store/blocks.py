"""Blocks: compression, front-to-back partial decoding, and the decoded-block cache.

A block is about a megabyte of chunks (or 128 KiB of objects) compressed as one zstd
frame: neighbouring small files compress together. Reads rarely want all of it, so a
block can be decoded only as far as the wanted members end (:class:`BlockStream`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import zstandard

from cnpsfs import format as fmt
from cnpsfs.errors import CorruptObjectError
from cnpsfs.store.index import Location
from cnpsfs.store.packs import Member

CODEC_RAW = 0
CODEC_ZSTD = 1


def compress_block(members: list[tuple[bytes, int, bytes]], cctx: zstandard.ZstdCompressor) -> tuple[int, bytes, int]:
    """(codec, payload, raw length) for a block; stored raw when compression does not help."""
    raw = b"".join(data for _d, _t, data in members)
    compressed = cctx.compress(raw)
    if len(compressed) < len(raw):
        return CODEC_ZSTD, compressed, len(raw)
    return CODEC_RAW, raw, len(raw)


def decompress_block(loc: Location, payload: bytes, dctx: zstandard.ZstdDecompressor, where: str) -> bytes:
    """The decoded block; *where* names it in errors (:meth:`Store.pack_label`)."""
    if loc.codec == CODEC_ZSTD:
        try:
            raw = dctx.decompress(payload, max_output_size=loc.raw)
        except zstandard.ZstdError:
            raise CorruptObjectError(f"block at {where} does not decompress") from None
    elif loc.codec == CODEC_RAW:
        raw = payload
    else:
        raise CorruptObjectError(f"block at {where}: unknown codec {loc.codec}")
    if len(raw) != loc.raw:
        raise CorruptObjectError(f"block at {where} has the wrong size")
    return raw


class BlockStream:
    """A block decoded front to back, only as far as its readers have needed so far.

    A mount's small reads land anywhere in a 1 MiB block; decoding the whole block for
    a 4 KiB file at its start costs most of a cold random read (python start-up reads
    about 70 blocks). A stream decodes up to the end of the members wanted, hands out
    the members completed on the way, verified, and continues from there on the next
    miss, so a block read front to back (a sequential reader) is still decoded once.
    Not thread-safe: one load of a block runs at a time (the FUSE layer's single flight).
    """

    #: Decode at least this far past the wanted members: their neighbours come cheap.
    SLACK = 128 << 10
    #: A first advance that wants at least this share of the block decodes all of it in one
    #: call: straight into one buffer, without the streaming decoder's window, its copies
    #: and the growing buffer (a sequential reader wants whole blocks; measured about a
    #: third less CPU per byte than streaming the same block).
    WHOLE_SHARE = 0.5

    def __init__(self, loc: Location, payload: bytes | memoryview, members: list[Member],
                 dctx: zstandard.ZstdDecompressor | Callable[[], zstandard.ZstdDecompressor], where: str) -> None:
        """*dctx* is a decompressor for this stream alone, or a function returning one for
        the calling thread (the store's per-thread one): a stream may run on several threads,
        so it then makes its own when it has to stream."""
        self.loc = loc
        self.members = members  # in block order: inner offsets ascend
        self._where = where
        self._next = 0  # first member not handed out yet
        self._payload: bytes | memoryview | None = None
        self._reader: Any = None
        self.data: bytes | bytearray | memoryview
        if loc.codec == CODEC_ZSTD:
            self._payload = payload
            self._dctx = dctx
            self.data = bytearray()
        elif loc.codec == CODEC_RAW:
            self.data = payload
        else:
            raise CorruptObjectError(f"block at {where}: unknown codec {loc.codec}")

    def _decoder(self) -> zstandard.ZstdDecompressor:
        return self._dctx if isinstance(self._dctx, zstandard.ZstdDecompressor) else self._dctx()

    @property
    def done(self) -> bool:
        return self._next >= len(self.members)

    @property
    def decoded(self) -> int:
        """How far the block is decoded (members ending there or before are complete)."""
        return len(self.data)

    def advance(self, upto: int) -> dict[bytes, bytes | memoryview | None]:
        """Decode through byte *upto* (plus slack); the members completed by it, in order.

        Values are the verified bytes, or None for a member that does not match its
        digest. Raises CorruptObjectError when the payload does not decode.

        A block decoded whole (or stored raw) is immutable, so its members are handed out
        as read-only views of it, not copies: each copy cost fresh pages, their faults and
        a memmove per chunk. A view keeps the whole block alive, which the chunk cache
        counts (:class:`~cnpsfs.image.reader.ChunkCache`). A block being streamed grows a
        ``bytearray``, which cannot be resized while viewed: its members are copied.
        """
        want = min(self.loc.raw, max(upto + self.SLACK, self.decoded))
        if self.decoded and want > self.decoded:
            # A second miss in a block means it is read front to back (tar, an export, a small
            # file after its neighbour: they are stored in path order), so a continued stream
            # decodes to the block's end: one more load for the block, not one per file.
            want = self.loc.raw
        payload = self._payload
        if payload is not None and self.decoded < want:
            if self._reader is None and want >= self.loc.raw * self.WHOLE_SHARE:
                try:
                    whole = self._decoder().decompress(payload, max_output_size=self.loc.raw)
                except zstandard.ZstdError:
                    raise CorruptObjectError(f"block at {self._where} does not decompress") from None
                if len(whole) != self.loc.raw:
                    raise CorruptObjectError(f"block at {self._where} has the wrong size")
                self.data = whole
                self._payload = None
            else:
                if self._reader is None:
                    dctx = self._dctx
                    if not isinstance(dctx, zstandard.ZstdDecompressor):
                        dctx = zstandard.ZstdDecompressor()  # it keeps state between calls: our own
                    self._reader = dctx.stream_reader(payload)
                buf = self.data
                assert isinstance(buf, bytearray)
                while len(buf) < want:
                    try:
                        piece = self._reader.read(want - len(buf))
                    except zstandard.ZstdError:
                        piece = b""
                    if not piece:
                        raise CorruptObjectError(f"block at {self._where} does not decompress")
                    buf += piece
                if len(buf) >= self.loc.raw:
                    self._payload = self._reader = None
        out: dict[bytes, bytes | memoryview | None] = {}
        view = memoryview(self.data)
        share = view.readonly  # immutable: bytes, or a view of bytes (never a bytearray's)
        members = self.members
        while self._next < len(members):
            digest, _type, inner, length = members[self._next]
            if inner + length > self.decoded:
                break
            data = view[inner : inner + length] if share else bytes(view[inner : inner + length])
            out[digest] = data if fmt.digest_bytes(data) == digest else None
            self._next += 1
        view.release()
        if self.done:
            self.data = b""  # handed out: the chunk cache holds what is wanted now
            self._payload = self._reader = None
        return out


class BlockCache:
    """A thread-safe LRU of decompressed blocks, bounded in bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[Hashable, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            data = self._data.get(key)
            if data is not None:
                self._data.move_to_end(key)
            return data

    def put(self, key: Hashable, data: bytes) -> None:
        if len(data) > self.capacity:
            return
        with self._lock:
            if key in self._data:
                return
            self._data[key] = data
            self._size += len(data)
            while self._size > self.capacity:
                _k, old = self._data.popitem(last=False)
                self._size -= len(old)

    def drop(self, key: Hashable) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._size -= len(old)
