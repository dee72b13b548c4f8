"""Reading the ar archive a .deb is wrapped in (deb(5), ar(5)).

We read ar ourselves rather than through python-debian's ``arfile`` or a generic ar
library: the format is an 8-byte magic and fixed 60-byte headers, and what a .deb
importer needs is unusual -- a strict check of every header (so a damaged package is
rejected with the member named, never half-read), and a seekable, bounded view of one
member so the data tar (hundreds of MiB for some packages) streams from disk instead
of being loaded into memory. ``arfile`` reads lazily but accepts malformed numeric
fields and stops silently at a short header, and is in any case only ~100 lines.

Accepted: the common ("System V / GNU") layout as ``dpkg-deb`` writes and reads it.
Member names are up to 16 bytes, space padded (BSD style) and optionally terminated by
``/`` (GNU style); dpkg normalises both the same way (``dpkg_ar_normalize_name``).
Rejected: GNU symbol and long-name tables (``/``, ``//``) and BSD ``#1/len`` long names,
which dpkg does not accept in a .deb either, and any header whose fields are not the
decimal (octal for the mode) ASCII numbers ar(5) specifies.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass

AR_MAGIC = b"!<arch>\n"
#: name, mtime, uid, gid, mode, size, terminator
HEADER = struct.Struct("16s12s6s6s8s10s2s")
HEADER_END = b"`\n"


class ArError(ValueError):
    """The file is not a well-formed ar archive; the message names the member."""


@dataclass(frozen=True, slots=True)
class ArMember:
    name: str
    offset: int  # of the member's data in the archive file
    size: int
    mtime: int
    uid: int
    gid: int
    mode: int


def _number(field: bytes, base: int, what: str, *, required: bool) -> int:
    """A left-aligned, space-padded ASCII number, as ar(5) writes them."""
    digits = field.rstrip(b" ")
    if not digits:
        if required:
            raise ArError(f"{what} is empty")
        return 0
    allowed = b"01234567" if base == 8 else b"0123456789"
    if any(c not in allowed for c in digits):
        raise ArError(f"{what} is not a {'octal' if base == 8 else 'decimal'} number: {field!r}")
    return int(digits, base)


def normalize_name(raw: bytes) -> bytes:
    """Strip the space padding, then one GNU-style ``/`` terminator (as dpkg does)."""
    name = raw.rstrip(b" ")
    return name[:-1] if name.endswith(b"/") else name


def read_members(fd: int, size: int) -> list[ArMember]:
    """Every member header of the archive open on *fd* (of *size* bytes), checked.

    Only headers are read; member data is left on disk for :class:`MemberReader`.
    """
    magic = os.pread(fd, len(AR_MAGIC), 0)
    if magic != AR_MAGIC:
        raise ArError(f"not an ar archive (bad magic {magic[:8]!r})")
    members: list[ArMember] = []
    pos = len(AR_MAGIC)
    while pos < size:
        where = f"member {len(members) + 1} at offset {pos}"
        raw = os.pread(fd, HEADER.size, pos)
        if len(raw) < HEADER.size:
            raise ArError(f"{where}: truncated header ({len(raw)} of {HEADER.size} bytes)")
        name_f, mtime_f, uid_f, gid_f, mode_f, size_f, end = HEADER.unpack(raw)
        if end != HEADER_END:
            raise ArError(f"{where}: bad header terminator {end!r}")
        name_b = normalize_name(name_f)
        if name_b in (b"", b"/") or name_b.startswith(b"/"):
            raise ArError(f"{where}: GNU symbol or long-name table ({name_f!r}) is not allowed in a .deb")
        if name_b.startswith(b"#1/"):
            raise ArError(f"{where}: BSD long member name ({name_f!r}) is not allowed in a .deb")
        if any(c < 0x21 or c > 0x7E or c == 0x2F for c in name_b):
            raise ArError(f"{where}: invalid member name {name_f!r}")
        name = name_b.decode("ascii")
        where = f"member {name!r}"
        member = ArMember(
            name=name,
            offset=pos + HEADER.size,
            size=_number(size_f, 10, f"{where}: size", required=True),
            mtime=_number(mtime_f, 10, f"{where}: mtime", required=False),
            uid=_number(uid_f, 10, f"{where}: uid", required=False),
            gid=_number(gid_f, 10, f"{where}: gid", required=False),
            mode=_number(mode_f, 8, f"{where}: mode", required=False),
        )
        end_of_data = member.offset + member.size
        if end_of_data > size:
            raise ArError(f"{where}: truncated data ({size - member.offset} of {member.size} bytes present)")
        members.append(member)
        pos = end_of_data
        if member.size % 2:
            # Data is padded to an even offset with "\n". A missing pad after the last
            # member is tolerated, as dpkg (which stops reading at data.tar) does.
            if pos < size:
                pad = os.pread(fd, 1, pos)
                if pad != b"\n":
                    raise ArError(f"{where}: bad padding byte {pad!r} after odd-sized data")
            pos += 1
    return members


class MemberReader(io.RawIOBase):
    """A read-only window on one member's data, read with ``pread``.

    Each reader keeps its own position, so several can be open on one descriptor.
    """

    def __init__(self, fd: int, member: ArMember) -> None:
        super().__init__()
        self._fd = fd
        self._start = member.offset
        self._size = member.size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        data = os.pread(self._fd, want, self._start + self._pos)
        n = len(data)
        memoryview(buffer)[:n] = data
        self._pos += n
        return n

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def read_member(fd: int, member: ArMember) -> bytes:
    data = os.pread(fd, member.size, member.offset)
    if len(data) != member.size:
        raise ArError(f"member {member.name!r}: file shrank while reading")
    return data
