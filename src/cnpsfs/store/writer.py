"""The store writer: new chunks and objects into blocks in private temporary packs, then commit.

Write protocol (docs/format.md 2.3, crash safety): records are appended to
``tmp/<id>.pack`` under an exclusive flock (a live writer's mark); commit fsyncs it,
renames it into ``packs/``, fsyncs the directory, and only then inserts the index rows
and tags in one SQLite transaction. A process killed at any point leaves either nothing
visible or everything; an orphaned temporary pack is invisible and gc deletes it.

A failure (a full disk, an I/O error) is a :class:`~cnpsfs.errors.StoreError` naming the
file and the cause, and leaves nothing behind: temporary packs are removed, and so is a
pack already renamed into ``packs/`` whose index commit then failed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import zstandard

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError, FormatError
from cnpsfs.store.blocks import compress_block
from cnpsfs.store.packs import PACK_MAGIC, PACK_ROLLOVER, encode_record_header, fsync_dir, store_io, write_all
from cnpsfs.store.protocol import T_CHUNK, TYPE_CODES, DataStream, Tag

if TYPE_CHECKING:
    from cnpsfs.store.local import LocalStore

BLOCK_TARGET = 1 << 20
#: Directory, extents, FileSet and image objects go in blocks of their own, smaller ones:
#: a cold lookup then decodes metadata only, and little of it.
META_BLOCK_TARGET = 128 << 10
#: Hot small-file chunks (docs/format.md 2.1): a cold read of one small file decodes, and a
#: lazy mount fetches, a quarter of what a 1 MiB block costs (docs/performance.md).
SMALL_BLOCK_TARGET = 256 << 10
#: Cold chunks (sources beside their compiled forms, documentation) are seldom read: larger
#: blocks compress better and pay for the smaller hot ones.
COLD_BLOCK_TARGET = 4 << 20
DEFAULT_ZSTD_LEVEL = 9


#: Each stream's seal target (the metadata block's is META_BLOCK_TARGET).
STREAM_TARGETS = {DataStream.DATA: BLOCK_TARGET, DataStream.HOT: SMALL_BLOCK_TARGET,
                  DataStream.COLD: COLD_BLOCK_TARGET}


@dataclass(slots=True)
class _OpenBlock:
    members: list[tuple[bytes, int, bytes]] = field(default_factory=list)  # (digest, type, data)
    size: int = 0


_BlockFuture = concurrent.futures.Future[tuple[int, bytes, int]]  # (codec, payload, raw length)


class StoreWriter:
    """Groups new chunks into blocks in private temporary packs; :meth:`commit` publishes them.

    Chunks are added from one thread, in order; blocks are compressed on *pool* when one
    is given (several at once), and written to the pack in the order they were sealed.
    """

    def __init__(self, store: LocalStore, level: int, pool: concurrent.futures.Executor | None = None) -> None:
        self.store = store
        self.level = level
        self.pool = pool
        self._local = threading.local()
        # digest -> (writer pack#, offset, stored, raw, codec, type, inner, length, header); None while in an
        # open block
        self._new: dict[bytes, tuple[int, int, int, int, int, int, int, int, int] | None] = {}
        #: Directory objects added here that decode_directory accepted (recorded at commit).
        self._checked: set[bytes] = set()
        self._open = {stream: _OpenBlock() for stream in DataStream}  # file chunks, by stream
        self._open_meta = _OpenBlock()  # objects: kept apart from file data
        self.targets = dict(STREAM_TARGETS)
        self._sealed: deque[tuple[list[tuple[bytes, int, bytes]], _BlockFuture]] = deque()
        self._packs: list[tuple[Path, int]] = []  # (tmp path, fd)
        self._current_size = 0
        self._committed = False
        self.bytes_written = 0

    def compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(level=self.level)
        return c

    def has(self, digest: bytes) -> bool:
        return digest in self._new or self.store.contains(digest)

    def _open_pack(self) -> int:
        path = self.store.tmp_dir / f"{secrets.token_hex(16)}.pack"
        with store_io(f"cannot create a pack in {self.store.tmp_dir}"):
            self.store.tmp_dir.mkdir(exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._packs.append((path, fd))  # from here on discard() removes it
        with store_io(f"cannot write pack {path}"):
            # The lock tells gc this temporary pack belongs to a live writer.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            write_all(fd, PACK_MAGIC)
        self._current_size = len(PACK_MAGIC)
        return fd

    def add_chunk(self, digest: bytes, data: bytes, type_code: int = T_CHUNK,
                  stream: DataStream = DataStream.DATA) -> None:
        """Queue a blob for the open block of its kind unless the store or this writer has it.

        Objects go to the metadata block; chunks to the data block of *stream*.
        """
        if digest in self._new:
            return
        self._new[digest] = None
        meta = type_code != T_CHUNK
        block = self._open_meta if meta else self._open[stream]
        block.members.append((digest, type_code, data))
        block.size += len(data)
        if block.size >= (META_BLOCK_TARGET if meta else self.targets[stream]):
            self.seal(meta=meta, stream=stream)

    def seal(self, *, meta: bool = False, stream: DataStream = DataStream.DATA) -> None:
        """Close an open data block (or the metadata block): compress it on the pool and queue it."""
        if meta:
            members, self._open_meta = self._open_meta.members, _OpenBlock()
        else:
            members, self._open[stream] = self._open[stream].members, _OpenBlock()
        if not members:
            return
        if self.pool is not None:
            future = self.pool.submit(self._compress, members)
        else:
            future = concurrent.futures.Future()
            future.set_result(self._compress(members))
        self._sealed.append((members, future))
        while len(self._sealed) > 4 or (self._sealed and self._sealed[0][1].done()):
            self._write_sealed()

    def _compress(self, members: list[tuple[bytes, int, bytes]]) -> tuple[int, bytes, int]:
        return compress_block(members, self.compressor())

    def _write_sealed(self) -> None:
        members, future = self._sealed.popleft()
        codec, payload, raw_len = future.result()
        if not self._packs or self._current_size >= PACK_ROLLOVER:
            self._open_pack()
        path, fd = self._packs[-1]
        header = encode_record_header(codec, len(payload), raw_len, [(d, t, len(data)) for d, t, data in members])
        header_at = self._current_size
        with store_io(f"cannot write pack {path}"):
            write_all(fd, header)
            write_all(fd, payload)
        offset = header_at + len(header)
        self._current_size = offset + len(payload)
        self.bytes_written += len(header) + len(payload)
        pack = len(self._packs) - 1
        inner = 0
        for digest, type_code, data in members:
            self._new[digest] = (pack, offset, len(payload), raw_len, codec, type_code, inner, len(data), header_at)
            inner += len(data)

    def flush(self) -> None:
        for stream in DataStream:
            self.seal(stream=stream)
        self.seal(meta=True)
        while self._sealed:
            self._write_sealed()

    def add_record(self, codec: int, payload: bytes, raw: int, members: list[tuple[bytes, int, int]]) -> None:
        """Append a block record exactly as given (a block fetched from a remote, verified).

        *members* are (digest, type code, length) in block order. The record's bytes are
        the ones the remote holds, so nothing is recompressed; members already in the
        store keep their existing rows at commit (``INSERT OR IGNORE``).
        """
        while self._sealed:
            self._write_sealed()
        if not self._packs or self._current_size >= PACK_ROLLOVER:
            self._open_pack()
        fd = self._packs[-1][1]
        header = encode_record_header(codec, len(payload), raw, members)
        header_at = self._current_size
        write_all(fd, header)
        offset = header_at + len(header)
        write_all(fd, payload)
        self._current_size = offset + len(payload)
        self.bytes_written += len(header) + len(payload)
        pack = len(self._packs) - 1
        inner = 0
        for digest, type_code, length in members:
            if self._new.get(digest) is None:
                self._new[digest] = (pack, offset, len(payload), raw, codec, type_code, inner, length, header_at)
            inner += length

    def add(self, data: bytes, type_code: int) -> bytes:
        """Hash and queue *data*; returns its digest."""
        digest = fmt.digest_bytes(data)
        if not self.has(digest):
            self.add_chunk(digest, data, type_code)
        return digest

    def add_object(self, encoded: bytes) -> bytes:
        kind = fmt.object_type(encoded)
        digest = self.add(encoded, TYPE_CODES[kind])
        if kind == fmt.TYPE_DIR and digest not in self._checked:
            # Checked in full once, here, so that composing it need not check each entry
            # again (fmt.pack_directory's *checked*): about 3 µs an entry, 3 s of a 1M import's 100 s of CPU.
            try:
                fmt.decode_directory(encoded)
            except FormatError:
                pass  # not recorded: whoever reads it checks it, and refuses it
            else:
                self._checked.add(digest)
        return digest

    def commit(self, tags: Iterable[tuple[str, str, int, bytes]] = (), *, replace: bool = False,
               retire_packs: Iterable[int] = (), attach: Iterable[tuple[bytes, bytes]] = (),
               cache: str | None = None, adopt: Iterable[int] = ()) -> list[int]:
        """Make everything written visible, then point *tags* at it, atomically; returns the new pack ids.

        *replace* re-points existing index rows at the new copies and *retire_packs* drops
        packs from the index in the same transaction (both for gc's repack). *attach* files
        detached objects (subject, object digest) under their subjects in that transaction.
        *cache* marks the new packs as cache packs of that remote (refetchable, evictable);
        *adopt* makes cache packs ordinary ones (a pull that completed).
        """
        self.flush()
        store = self.store
        published: list[tuple[str, int]] = []  # (name, size), in writer pack order
        renamed: list[Path] = []
        try:
            for path, fd in self._packs:
                with store_io(f"cannot write pack {path}"):
                    os.fsync(fd)
                    size = os.fstat(fd).st_size
                final = store.packs_dir / path.name
                with store_io(f"cannot move pack {path} into {store.packs_dir}"):
                    os.rename(path, final)
                renamed.append(final)
                published.append((path.stem, size))
            if published:
                with store_io(f"cannot write {store.packs_dir}"):
                    fsync_dir(store.packs_dir)
            rows = []
            for digest, where in self._new.items():
                assert where is not None, "flush() wrote every block"
                pack, offset, stored, raw, codec, type_code, inner, length, header = where
                rows.append((digest, type_code, pack, offset, stored, raw, codec, inner, length, header))
            now = time.time_ns()
            stamped = [Tag(name, version, type_code, digest, now) for name, version, type_code, digest in tags]
            keys = [(t.name, t.version) for t in stamped]
            if stamped:
                previous = store.index.tag_rows(keys)
                store.journal.record_set(stamped, seed=store._journal_seed())
            try:
                ids = store.index.publish(published, rows, [(t.name, t.version, t.type, t.digest, t.created_ns)
                                                            for t in stamped],
                                          replace=replace, retire_packs=retire_packs, attach=attach, cache=cache,
                                          adopt=adopt,
                                          checked=[(digest, fmt.DIRECTORY_RULES) for digest in self._checked])
            except CnpsfsError:
                # The index refused the transaction (a full disk, damage): nothing committed.
                if stamped:
                    store.journal.revert(keys, previous)
                raise
            except BaseException:
                # An interrupt may land after COMMIT succeeded: ask the index what it holds.
                if stamped and not self._tags_committed(stamped):
                    store.journal.revert(keys, previous)
                self._remove_unpublished(renamed, ask=True)
                renamed = []
                raise
        except BaseException:
            self._remove_unpublished(renamed)
            raise
        self._committed = True
        for _path, fd in self._packs:
            with contextlib.suppress(OSError):
                os.close(fd)
        return ids

    def _tags_committed(self, stamped: list[Tag]) -> bool:
        """Whether the index holds exactly these tags (a failure after COMMIT); False if it cannot say."""
        try:
            now = self.store.index.tag_rows([(t.name, t.version) for t in stamped])
        except CnpsfsError:
            return False
        return all(now.get((t.name, t.version)) == t for t in stamped)

    def _remove_unpublished(self, renamed: list[Path], *, ask: bool = False) -> None:
        """After a failed commit: remove the packs renamed into packs/, which no index row names.

        With *ask*, the index is asked first: an interrupt can land after the COMMIT itself
        succeeded, and then the packs are the store's. When it cannot say, they stay, for gc.
        """
        removed = False
        for final in renamed:
            if ask:
                try:
                    if self.store.index.has_pack(final.stem):
                        continue
                except CnpsfsError:
                    continue
            with contextlib.suppress(OSError):
                final.unlink()
                removed = True
        if removed:
            with contextlib.suppress(OSError):
                fsync_dir(self.store.packs_dir)

    def discard(self) -> None:
        """Remove uncommitted temporary packs (called on every exit path)."""
        if self._committed:
            return
        for _members, future in self._sealed:
            future.cancel()
        self._sealed.clear()
        for path, fd in self._packs:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._packs.clear()
