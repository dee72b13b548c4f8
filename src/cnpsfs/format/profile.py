"""Prefetch profiles: what a program touched on a mount, in the order it touched it.

A profile is a detached object (docs/format.md §1.13): it is about an image without being
part of the image's digest, like a signature. The store files it under the image it was
recorded on; a mount replays it in the background to compose directories and decode
chunks before the program asks for them. It is advice only: every path in it is looked
up in the mounted image like any other, so a stale or wrong profile costs time, never
correctness. That is also why it names paths, not chunk digests: a profile recorded on
one version of an image still helps the next, where the files that changed are simply
read from their new chunks.

This module is pure like the rest of :mod:`cnpsfs.format`: values to bytes and back.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cnpsfs.errors import FormatError
from cnpsfs.format.objects import (
    DIGEST_SIZE,
    FORMAT_VERSION,
    PATH_MAX,
    TYPE_PROFILE,
    decode_object,
    encode_canonical,
)

#: Limits (docs/format.md §1.13). They bound what a recorder keeps and what a reader
#: accepts, so a profile decodes in bounded memory and fits one control-socket reply.
PROFILE_MAX_ENTRIES = 1 << 16
PROFILE_MAX_RANGES = 1 << 18  # (offset, length) pairs over all files
PROFILE_MAX_PATH_BYTES = 4 << 20  # the sum of the entries' path lengths
PROFILE_NAME_MAX = 64
#: Profile names: what a user types after --profile; no slash, so they never look like paths.
PROFILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
DEFAULT_PROFILE = "default"
_I63 = 1 << 63


class Touch(enum.IntEnum):
    """What happened to a path. Values are part of the format."""

    DIR = 0  # a directory looked up, or looked up in: its children were composed
    LISTED = 1  # a directory listed (readdir): its children and theirs composed
    FILE = 2  # a regular file read in the given ranges
    LOOKUP = 3  # a name looked up and neither read nor listed: a file, a symlink, or no such name


@dataclass(frozen=True, slots=True)
class ProfileEntry:
    """One path of a profile. ``ranges`` is flat: offset, length, offset, length, ..."""

    touch: Touch
    path: bytes  # inside the image, components joined by "/", no leading "/"; b"" is the root
    ranges: tuple[int, ...] = ()

    def spans(self) -> Iterable[tuple[int, int]]:
        """The ranges as (offset, length) pairs."""
        it = iter(self.ranges)
        return zip(it, it, strict=True)


@dataclass(slots=True)
class Profile:
    name: str
    image: bytes  # digest of the image it was recorded on
    entries: list[ProfileEntry]
    created_ns: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ranges(self) -> int:
        return sum(len(e.ranges) // 2 for e in self.entries)

    @property
    def data_bytes(self) -> int:
        """Bytes of file data the profile names."""
        return sum(length for e in self.entries for _o, length in e.spans())


def check_profile_name(name: str) -> str:
    if type(name) is not str or not PROFILE_NAME_RE.fullmatch(name) or len(name) > PROFILE_NAME_MAX:
        raise FormatError(f"invalid profile name {str(name)[:80]!r}: use 1-{PROFILE_NAME_MAX} letters, digits, "
                          "'.', '_' or '-', starting with a letter or digit")
    return name


def check_profile_path(path: bytes) -> None:
    """The path rules of §1.13: relative, normalised, every component a valid entry name."""
    if type(path) is not bytes:
        raise FormatError("profile path is not a byte string")
    if not path:
        return
    if len(path) > PATH_MAX:
        raise FormatError(f"profile path longer than {PATH_MAX} bytes: {path[:40]!r}...")
    for part in path.split(b"/"):
        if not part or part in (b".", b"..") or b"\0" in part or len(part) > 255:
            raise FormatError(f"profile path {path[:80]!r} is not a normalised relative path")


def merge_ranges(spans: Iterable[tuple[int, int]]) -> tuple[int, ...]:
    """Sorted, merged (overlapping and touching ranges joined), flat: what §1.13 requires."""
    out: list[int] = []
    for offset, length in sorted(s for s in spans if s[1] > 0):
        if out and offset <= out[-2] + out[-1]:
            out[-1] = max(out[-1], offset + length - out[-2])
        else:
            out += [offset, length]
    return tuple(out)


def _check_ranges(ranges: Any, path: bytes) -> None:
    if len(ranges) % 2 or not ranges:
        raise FormatError(f"profile file {path[:80]!r}: ranges must be a non-empty list of offset, length pairs")
    end = -1
    for i in range(0, len(ranges), 2):
        offset, length = ranges[i], ranges[i + 1]
        if type(offset) is not int or type(length) is not int or offset < 0 or length <= 0 \
                or offset + length >= _I63:
            raise FormatError(f"profile file {path[:80]!r}: a range is out of bounds")
        if offset <= end:
            raise FormatError(f"profile file {path[:80]!r}: ranges are not sorted, merged and apart")
        end = offset + length


def _check_limits(entries: int, ranges: int, path_bytes: int) -> None:
    if entries > PROFILE_MAX_ENTRIES:
        raise FormatError(f"profile of {entries} entries exceeds the limit of {PROFILE_MAX_ENTRIES} entries")
    if ranges > PROFILE_MAX_RANGES:
        raise FormatError(f"profile of {ranges} ranges exceeds the limit of {PROFILE_MAX_RANGES} ranges")
    if path_bytes > PROFILE_MAX_PATH_BYTES:
        raise FormatError(f"profile paths of {path_bytes} bytes exceed the limit of {PROFILE_MAX_PATH_BYTES} bytes")


def encode_profile(profile: Profile) -> bytes:
    check_profile_name(profile.name)
    if type(profile.image) is not bytes or len(profile.image) != DIGEST_SIZE:
        raise FormatError("a profile's image is not a digest")
    if not 0 <= profile.created_ns < _I63:
        raise FormatError("a profile's created_ns is out of range")
    raw: list[list[Any]] = []
    seen: set[bytes] = set()
    for entry in profile.entries:
        check_profile_path(entry.path)
        if entry.path in seen:
            raise FormatError(f"profile path {entry.path[:80]!r} appears twice")
        seen.add(entry.path)
        if entry.touch is Touch.FILE:
            _check_ranges(entry.ranges, entry.path)
            raw.append([int(entry.touch), entry.path, list(entry.ranges)])
        else:
            if entry.ranges:
                raise FormatError(f"profile entry {entry.path[:80]!r} has ranges (only a file entry has)")
            raw.append([int(entry.touch), entry.path])
    _check_limits(len(raw), profile.ranges, sum(len(p) for p in seen))
    obj: dict[int, Any] = {0: TYPE_PROFILE, 1: FORMAT_VERSION, 2: profile.name, 3: profile.image, 4: raw}
    if profile.created_ns:
        obj[5] = profile.created_ns
    if profile.metadata:
        if not all(type(k) is str for k in profile.metadata):
            raise FormatError("profile metadata must have text keys")
        obj[6] = profile.metadata  # encode_canonical checks the values
    return encode_canonical(obj)


_TOUCH = {t.value: t for t in Touch}


def decode_profile(data: bytes) -> Profile:
    """A profile, every field and limit checked (FormatError naming what is wrong)."""
    obj = decode_object(data)
    if obj[0] != TYPE_PROFILE:
        raise FormatError(f"expected a {TYPE_PROFILE} object, found {obj[0]}")
    name = obj.get(2)
    if type(name) is not str:
        raise FormatError("profile name (key 2) is missing or not text")
    check_profile_name(name)
    image = obj.get(3)
    if type(image) is not bytes or len(image) != DIGEST_SIZE:
        raise FormatError(f"profile image (key 3) is not a {DIGEST_SIZE}-byte digest")
    raw = obj.get(4)
    if type(raw) is not list:
        raise FormatError("profile entries (key 4) are missing or not an array")
    if len(raw) > PROFILE_MAX_ENTRIES:
        _check_limits(len(raw), 0, 0)
    created = obj.get(5, 0)
    if type(created) is not int or not 0 <= created < _I63:
        raise FormatError("profile created_ns (key 5) is not an integer in range")
    metadata = obj.get(6, {})
    if type(metadata) is not dict or not all(type(k) is str for k in metadata):
        raise FormatError("profile metadata (key 6) is not a map with text keys")
    entries: list[ProfileEntry] = []
    seen: set[bytes] = set()
    ranges = path_bytes = 0
    for item in raw:
        if type(item) is not list or len(item) < 2 or type(item[0]) is not int or item[0] not in _TOUCH:
            raise FormatError("malformed profile entry: not [touch, path, ...] with a known touch")
        touch, path = _TOUCH[item[0]], item[1]
        check_profile_path(path)
        if path in seen:
            raise FormatError(f"profile path {path[:80]!r} appears twice")
        seen.add(path)
        path_bytes += len(path)
        if touch is Touch.FILE:
            if len(item) != 3 or type(item[2]) is not list:
                raise FormatError(f"profile file {path[:80]!r} has no range list")
            _check_ranges(item[2], path)
            ranges += len(item[2]) // 2
            entries.append(ProfileEntry(touch, path, tuple(item[2])))
        else:
            if len(item) != 2:
                raise FormatError(f"profile entry {path[:80]!r} has ranges (only a file entry has)")
            entries.append(ProfileEntry(touch, path))
        if ranges > PROFILE_MAX_RANGES or path_bytes > PROFILE_MAX_PATH_BYTES:
            _check_limits(len(entries), ranges, path_bytes)
    return Profile(name, image, entries, created, metadata)
