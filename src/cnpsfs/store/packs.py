"""Pack files and block records (docs/format.md 2.1), and the file-system primitives of writes.

A pack is ``CNPSPK01`` and then block records back to back; a record is a 17-byte header,
one 37-byte member header per member (digest, type code, length), then the payload.
Records describe themselves, so the index can be rebuilt from the packs, and a block's
members are known from one read of its record without asking the index.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from cnpsfs.errors import CorruptObjectError, MissingObjectError, StoreError
from cnpsfs.process import pid_alive
from cnpsfs.store.index import Location

PACK_MAGIC = b"CNPSPK01"
RECORD_HEADER = struct.Struct("<4sBII I")  # b"BLK1", codec, stored length, raw length, member count
MEMBER_HEADER = struct.Struct("<32sBI")  # digest, type code, length (members follow in payload order)
BLOCK_MAGIC = b"BLK1"
PACK_ROLLOVER = 1 << 30
#: Records closer than this are advised to the kernel as one range (one call, one I/O).
ADVISE_GAP = 64 << 10

Member = tuple[bytes, int, int, int]  # (digest, type code, inner offset, length)


def encode_record_header(codec: int, stored: int, raw: int, members: list[tuple[bytes, int, int]]) -> bytes:
    """The record header and member headers for a block of *members* (digest, type, length)."""
    header = bytearray(RECORD_HEADER.pack(BLOCK_MAGIC, codec, stored, raw, len(members)))
    for digest, type_code, length in members:
        header += MEMBER_HEADER.pack(digest, type_code, length)
    return bytes(header)


def header_size(count: int) -> int:
    return RECORD_HEADER.size + count * MEMBER_HEADER.size


def parse_record(data: bytes, start: int, loc: Location) -> list[Member] | None:
    """Members of the record whose header starts at data[start:], if it agrees with *loc*."""
    if len(data) < start + RECORD_HEADER.size:
        return None
    magic, codec, stored, raw, count = RECORD_HEADER.unpack_from(data, start)
    if magic != BLOCK_MAGIC or codec != loc.codec or stored != loc.stored or raw != loc.raw:
        return None
    end = start + header_size(count)
    if end > len(data):
        return None
    members: list[Member] = []
    inner = 0
    for digest, type_code, length in MEMBER_HEADER.iter_unpack(data[start + RECORD_HEADER.size : end]):
        members.append((digest, type_code, inner, length))
        inner += length
    return members if inner == raw else None


class PackFiles:
    """Open pack files (one read-only fd each, shared by all threads) and record reads."""

    def __init__(self, packs_dir: Path, name_of: Callable[[int], str | None]) -> None:
        self.dir = packs_dir
        self._name_of = name_of
        self._fds: dict[int, int] = {}
        self._names: dict[int, str] = {}
        self._lock = threading.Lock()

    def name(self, pack: int) -> str:
        name = self._names.get(pack)
        if name is None:
            found = self._name_of(pack)
            if found is None:
                raise MissingObjectError(f"pack {pack} is missing from the index")
            name = self._names[pack] = found
        return name

    def label(self, loc: Location) -> str:
        """Where a block is, for messages: ``<pack name>.pack offset <n>``."""
        return f"{self.name(loc.pack)}.pack offset {loc.offset}"

    def forget(self, pack: int) -> None:
        """Drop what is remembered of *pack* (gc repacked it: the next read looks it up again)."""
        with self._lock:
            self._names.pop(pack, None)
            fd = self._fds.pop(pack, None)
        if fd is not None:
            os.close(fd)

    def fd(self, pack: int) -> int:
        """An fd of the pack file; FileNotFoundError when it is gone (gc repacked it: look again)."""
        fd = self._fds.get(pack)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(pack)
            if fd is None:
                path = self.dir / f"{self.name(pack)}.pack"
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise
                except OSError as exc:
                    raise StoreError(f"cannot open pack {path}: {exc.strerror or exc}") from exc
                self._fds[pack] = fd
            return fd

    def pread(self, pack: int, size: int, offset: int) -> bytes:
        """Bytes of a pack; an I/O error is a StoreError naming the pack and the offset."""
        fd = self.fd(pack)
        try:
            return os.pread(fd, size, offset)
        except OSError as exc:
            raise StoreError(f"cannot read pack {self.dir / self.name(pack)}.pack at offset {offset}:"
                             f" {exc.strerror or exc}") from exc

    def advise(self, locs: Iterable[Location]) -> None:
        """Start reading the records of *locs* in the background, adjacent ones merged;
        best effort (packs not open yet, or without a header offset, are left alone)."""
        ranges: dict[int, list[tuple[int, int]]] = {}
        for loc in locs:
            if loc.header is not None:
                ranges.setdefault(loc.pack, []).append((loc.header, loc.offset + loc.stored))
        for pack, spans in ranges.items():
            fd = self._fds.get(pack)
            if fd is None:
                continue
            spans.sort()
            start, end = spans[0]
            for s, e in [*spans[1:], (-1, -1)]:
                if s != -1 and s <= end + ADVISE_GAP:
                    end = max(end, e)
                    continue
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
                start, end = s, e

    def read_payload(self, loc: Location) -> bytes:
        """The stored payload of the block at *loc*, as on disk (maybe compressed)."""
        payload = self.pread(loc.pack, loc.stored, loc.offset)
        if len(payload) != loc.stored:
            raise CorruptObjectError(f"pack {self.name(loc.pack)} is truncated at offset {loc.offset}")
        return payload

    def read_record(self, loc: Location) -> tuple[bytes, list[Member]]:
        """The payload of the block at *loc* and its members, from one read of its record.

        With the header offset from the index (layout 2) this is one pread and no search.
        A store migrated from layout 1 may still lack it for a block: then the header is
        found by trying each member count from the payload backwards; a match must agree
        with the index on codec and both lengths and its member lengths must add up
        (every member is verified against its digest before use anyway).
        """
        data, start, members = self._record(loc)
        return data[start:], members

    def read_record_view(self, loc: Location) -> tuple[memoryview, list[Member]]:
        """:meth:`read_record` with the payload as a view of what was read, not a copy (the
        read path decodes it and lets it go; a block's payload is a few hundred KB)."""
        data, start, members = self._record(loc)
        return memoryview(data)[start:], members

    def _record(self, loc: Location) -> tuple[bytes, int, list[Member]]:
        """(bytes read, where the payload starts in them, members) of the block at *loc*."""
        if loc.header is not None:
            size = loc.offset + loc.stored - loc.header
            data = self.pread(loc.pack, size, loc.header)
            if len(data) != size:
                raise CorruptObjectError(f"pack {self.name(loc.pack)} is truncated at offset {loc.offset}")
            members = parse_record(data, 0, loc)
            if members is None or header_size(len(members)) != loc.offset - loc.header:
                raise CorruptObjectError(f"block at {self.label(loc)}: its record header does not match the index")
            return data, loc.offset - loc.header, members
        _header, found = self.find_header(loc)
        return self.pread(loc.pack, loc.stored, loc.offset), 0, found

    def find_header(self, loc: Location) -> tuple[int, list[Member]]:
        """(file offset of the record header, members) of the block whose payload is at *loc*."""
        window = min(loc.offset, 8192)
        while True:
            data = self.pread(loc.pack, window, loc.offset - window)
            if len(data) != window:
                raise CorruptObjectError(f"pack {self.name(loc.pack)} is truncated at offset {loc.offset}")
            for count in range((window - RECORD_HEADER.size) // MEMBER_HEADER.size + 1):
                start = window - header_size(count)
                members = parse_record(data, start, loc)
                if members is not None and len(members) == count:
                    return loc.offset - window + start, members
            if window == loc.offset:
                raise CorruptObjectError(f"block at {self.label(loc)}: no record header in front of it")
            window = min(loc.offset, window * 8)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


# ---------------------------------------------------------------------- file primitives


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: A temporary file of another host (or without an owner) older than this is a dead writer's.
TEMPORARY_MAX_AGE = 24 * 3600.0
_TEMPORARY_OWNER = re.compile(r"^\..+\+(?P<pid>\d+)@(?P<host>[^/+]+)\+[0-9a-f]+\.tmp$")


def _host() -> str:
    return socket.gethostname().replace("/", "_").replace("+", "_") or "localhost"


def temporary_name(path: Path) -> Path:
    """``.NAME+PID@HOST+RANDOM.tmp`` beside *path*: hidden (no stored name starts with a
    dot) and saying whose it is, so a later writer can tell a dead one's and remove it
    (:func:`reclaim_temporary`; docs/format.md 3.8)."""
    return path.with_name(f".{path.name}+{os.getpid()}@{_host()}+{secrets.token_hex(4)}.tmp")


def reclaim_temporary(directories: Iterable[Path], *, max_age: float = TEMPORARY_MAX_AGE,
                      dry_run: bool = False) -> list[Path]:
    """Remove the temporary files (``.*.tmp``) dead writers left in *directories*.

    A file of this host whose process is gone (a zombie counts as gone) is removed at
    once; any other (another host's on a shared file system, or a name without an owner)
    once it is *max_age* seconds old, since a live writer renames or removes its temporary
    file within one write. Returns the files removed (or that would be, with *dry_run*).
    """
    removed: list[Path] = []
    now = time.time()
    host = _host()
    for directory in directories:
        try:
            names = [e.name for e in os.scandir(directory) if e.name.startswith(".") and e.name.endswith(".tmp")]
        except OSError:
            continue
        for name in names:
            owner = _TEMPORARY_OWNER.match(name)
            path = directory / name
            try:
                if owner is not None and owner["host"] == host:
                    gone = not pid_alive(int(owner["pid"]))
                else:
                    gone = now - path.stat().st_mtime > max_age
                if gone:
                    if not dry_run:
                        path.unlink()
                    removed.append(path)
            except FileNotFoundError:
                continue
    return removed


def atomic_write(path: Path, data: bytes) -> None:
    """Write *path* whole or not at all: temporary name, fsync, rename, fsync the directory."""
    tmp = temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def store_io(what: str) -> Iterator[None]:
    """Turn an OSError into a StoreError: ``<what>: <cause>`` (``No space left on device``)."""
    try:
        yield
    except OSError as exc:
        raise StoreError(f"{what}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def flock(path: Path, how: int) -> Iterator[None]:
    with store_io(f"cannot open the store lock {path}"):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)


def is_locked(path: Path) -> bool:
    """True when another process holds a flock on *path* (a live writer's temp pack)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)
    return False
