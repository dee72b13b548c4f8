"""Recording a prefetch profile on a live mount (``cnpsfs profile record``).

The FUSE handlers report what they serve: a directory composed for a lookup, a listing,
a file range read. Everything is keyed by path, kept in first-access order (a dict keeps
insertion order), and bounded by the format's limits (docs/format.md §1.13): past them,
new paths are dropped and a file's ranges are coalesced, so a forgotten recording costs a
few MiB at most. The handlers call in on the trio loop between awaits, so nothing here
needs a lock; each call is O(1) apart from an occasional merge of one file's ranges.

What the handlers see is what reached the daemon: the kernel answers warm lookups, opens
and reads from its own caches. Starting a recording therefore drops this mount's kernel
caches first (:meth:`cnpsfs.fs.operations.Operations.drop_kernel_caches`), so the
profile lists everything the program touches from then on, kernel read-ahead included
(which is what a replay should warm anyway).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from cnpsfs import format as fmt
from cnpsfs.format.profile import PROFILE_MAX_ENTRIES, PROFILE_MAX_PATH_BYTES, PROFILE_MAX_RANGES

#: Ranges kept per file before they are merged; a file still above it becomes one range
#: from its first to its last byte read (a profile is advice: more data, never less).
FILE_RANGES_MAX = 4096


class ProfileRecorder:
    """What a mount served, by path, since :meth:`__init__`; made a profile by :meth:`profile`."""

    def __init__(self, *, generation: int, image: bytes | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.generation = generation  # a swap to another generation aborts the recording
        self.image = image
        self.clock = clock
        self.started = clock()
        self.last = self.started  # when the last request was recorded (for --until-idle)
        self.events = 0
        self.truncated = False  # a limit was reached: some paths or ranges were dropped or merged
        self.aborted: str | None = None
        # path -> [touch, spans]: spans is a list of [offset, length] for files, None for the rest
        self._entries: dict[bytes, list[Any]] = {}
        self._ranges = 0
        self._path_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def idle(self) -> float:
        """Seconds since the last recorded request (since the start when there was none)."""
        return self.clock() - self.last

    def _new(self, key: bytes, touch: fmt.Touch, spans: list[list[int]] | None) -> list[Any] | None:
        if len(key) > fmt.PATH_MAX:
            return None  # a name looked up below a deep path: no image could hold it
        if len(self._entries) >= PROFILE_MAX_ENTRIES or self._path_bytes + len(key) > PROFILE_MAX_PATH_BYTES:
            self.truncated = True
            return None
        entry = self._entries[key] = [touch, spans]
        self._path_bytes += len(key)
        return entry

    def directory(self, path: tuple[bytes, ...], *, listed: bool = False) -> None:
        """A directory was composed for a lookup in it (or of it), or listed."""
        self.events += 1
        self.last = self.clock()
        key = b"/".join(path)
        entry = self._entries.get(key)
        if entry is None:
            self._new(key, fmt.Touch.LISTED if listed else fmt.Touch.DIR, None)
        elif (listed and entry[0] is fmt.Touch.DIR) or entry[0] is fmt.Touch.LOOKUP:
            entry[0], entry[1] = fmt.Touch.LISTED if listed else fmt.Touch.DIR, None

    def lookup(self, path: tuple[bytes, ...]) -> None:
        """A name was looked up that is not a directory: a file or symlink, or no such name."""
        self.events += 1
        self.last = self.clock()
        key = b"/".join(path)
        if key not in self._entries:
            self._new(key, fmt.Touch.LOOKUP, None)

    def read(self, path: tuple[bytes, ...], offset: int, size: int, file_size: int) -> None:
        """A file was read at [offset, offset + size) (clipped to its size)."""
        self.events += 1
        self.last = self.clock()
        size = min(size, file_size - offset)
        if size <= 0:
            return
        key = b"/".join(path)
        entry = self._entries.get(key)
        if entry is not None and entry[0] is fmt.Touch.LOOKUP:
            entry[0], entry[1] = fmt.Touch.FILE, []  # looked up first, now read: it keeps its place
        elif entry is None or entry[0] is not fmt.Touch.FILE:
            if entry is not None:
                return  # a path seen as a directory before: a swap changed it; keep the first
            entry = self._new(key, fmt.Touch.FILE, [])
            if entry is None:
                return
        spans: list[list[int]] = entry[1]
        if spans:
            last = spans[-1]
            if last[0] <= offset <= last[0] + last[1]:  # sequential, or re-read: extend in place
                last[1] = max(last[1], offset + size - last[0])
                return
        if self._ranges >= PROFILE_MAX_RANGES:
            self.truncated = True
            self._collapse(entry, [offset, size])
            return
        spans.append([offset, size])
        self._ranges += 1
        if len(spans) > FILE_RANGES_MAX:
            merged = fmt.merge_ranges((o, n) for o, n in spans)
            new = [[merged[i], merged[i + 1]] for i in range(0, len(merged), 2)]
            self._ranges += len(new) - len(spans)
            entry[1] = new
            if len(new) > FILE_RANGES_MAX:
                self.truncated = True
                self._collapse(entry, None)

    def _collapse(self, entry: list[Any], extra: list[int] | None) -> None:
        """One range from the first to the last byte of a file's spans (and *extra*)."""
        spans = entry[1] + ([extra] if extra else [])
        start = min(o for o, _n in spans)
        end = max(o + n for o, n in spans)
        self._ranges -= len(entry[1]) - 1
        entry[1] = [[start, end - start]]

    def profile(self, name: str, *, image: bytes, created_ns: int | None = None,
                metadata: dict[str, Any] | None = None) -> fmt.Profile:
        entries = []
        for key, (touch, spans) in self._entries.items():
            if touch is fmt.Touch.FILE:
                entries.append(fmt.ProfileEntry(touch, key, fmt.merge_ranges((o, n) for o, n in spans)))
            else:
                entries.append(fmt.ProfileEntry(touch, key))
        return fmt.Profile(name, image, entries, time.time_ns() if created_ns is None else created_ns,
                           metadata or {})

    def summary(self) -> dict[str, Any]:
        files = [spans for touch, spans in self._entries.values() if touch is fmt.Touch.FILE]
        lookups = sum(1 for touch, _spans in self._entries.values() if touch is fmt.Touch.LOOKUP)
        return {"entries": len(self._entries), "files": len(files), "lookups": lookups,
                "directories": len(self._entries) - len(files) - lookups,
                "ranges": self._ranges, "bytes": sum(n for spans in files for _o, n in spans),
                "events": self.events, "seconds": round(self.clock() - self.started, 3),
                "idle": round(self.idle, 3), "truncated": self.truncated, "generation": self.generation,
                "aborted": self.aborted}
