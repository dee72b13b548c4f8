"""The tags journal (``tags.log``): every tag change, written before the index commits it.

Packs describe their records, so the objects table can be rebuilt from them; tags live
only in the index, and a damaged index would take them along. Every change of a tag is
therefore appended here (and fsynced) before the transaction that makes it, so
``cnpsfs store repair`` can restore the tags too. Format (docs/format.md 2.7): one JSON
object per line, ``{"op": "set", "name", "version", "type", "digest", "ns"}`` or ``{"op":
"rm", "name", "version", "ns"}``; replaying the lines in order gives the tags.

Written before the commit means a line may name a change whose transaction never
committed. When the commit fails, the writer appends the tag's previous state right
after (:meth:`TagJournal.revert`); only a writer killed between the two writes leaves a
line the index never got. Replaying it restores a tag whose objects the killed writer
had already renamed into ``packs/``, so repair keeps it only if everything it names is in
the packs. gc compacts the journal to the index's tags while it holds the store lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cnpsfs import format as fmt
from cnpsfs.errors import FormatError, StoreError
from cnpsfs.store.packs import fsync_dir, write_all
from cnpsfs.store.protocol import T_FILESET, T_IMAGE, Tag

log = logging.getLogger(__name__)

JOURNAL_NAME = "tags.log"


@dataclass(slots=True)
class Replay:
    """The tags a journal describes, and how many lines could not be read."""

    tags: dict[tuple[str, str], Tag]
    bad_lines: int = 0


def _set_line(tag: Tag) -> bytes:
    return json.dumps({"op": "set", "name": tag.name, "version": tag.version, "type": tag.type,
                       "digest": fmt.format_digest(tag.digest), "ns": tag.created_ns},
                      ensure_ascii=False).encode() + b"\n"


def _rm_line(name: str, version: str, ns: int) -> bytes:
    return json.dumps({"op": "rm", "name": name, "version": version, "ns": ns}, ensure_ascii=False).encode() + b"\n"


class TagJournal:
    """Appends to and replays one store's ``tags.log``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def record_set(self, tags: Iterable[Tag], seed: Iterable[Tag] = ()) -> None:
        self._append(b"".join(_set_line(t) for t in tags), seed)

    def record_remove(self, name: str, version: str, ns: int, seed: Iterable[Tag] = ()) -> None:
        self._append(_rm_line(name, version, ns), seed)

    def revert(self, keys: Iterable[tuple[str, str]], previous: dict[tuple[str, str], Tag]) -> None:
        """After a failed commit: put each tag of *keys* back to its *previous* state.

        Best effort: on a full disk this append fails too, and the journal then names a
        change the index never made (repair keeps it only if its objects are all there).
        """
        lines = [_set_line(previous[k]) if k in previous else _rm_line(k[0], k[1], time.time_ns()) for k in keys]
        try:
            self._append(b"".join(lines), ())
        except StoreError as exc:
            log.warning("%s", exc)

    def _append(self, data: bytes, seed: Iterable[Tag]) -> None:
        """Append *data* with one write and fsync it; a missing journal starts from *seed*.

        *seed* is the index's tags: a store written before the journal existed (or whose
        journal was deleted) gets one that starts from what the index holds. It is made
        under a temporary name and linked into place, so of two writers seeding at once one
        wins and the other appends to it. A torn last line (a writer killed mid-write, a
        full disk) is ended first so the new line stays readable.
        """
        if not data:
            return
        try:
            if not self.path.exists():
                self._seed(seed)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                if size and _last_byte(self.path, size) != b"\n":
                    data = b"\n" + data
                try:
                    write_all(fd, data)
                    os.fsync(fd)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, size)  # no torn line left behind
                    raise
            finally:
                os.close(fd)
        except OSError as exc:
            raise StoreError(f"cannot write the tags journal {self.path}: {exc.strerror or exc}") from exc

    def _seed(self, tags: Iterable[Tag]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                write_all(fd, b"".join(_set_line(t) for t in tags))
                os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        fsync_dir(self.path.parent)

    def rewrite(self, tags: Iterable[Tag]) -> None:
        """Replace the journal by one ``set`` line per tag (gc, under the exclusive store lock)."""
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                write_all(fd, b"".join(_set_line(t) for t in tags))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
            fsync_dir(self.path.parent)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise StoreError(f"cannot write the tags journal {self.path}: {exc.strerror or exc}") from exc

    def lines(self) -> int:
        try:
            with open(self.path, "rb") as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0

    def replay(self) -> Replay | None:
        """The tags after every readable line, in order; None when there is no journal."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        replay = Replay({})
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                key = (_text(entry["name"]), _text(entry["version"]))
                ns = entry["ns"]
                if type(ns) is not int:
                    raise ValueError(ns)
                if entry["op"] == "set":
                    type_code = entry["type"]
                    if type_code not in (T_FILESET, T_IMAGE):
                        raise ValueError(type_code)
                    replay.tags[key] = Tag(key[0], key[1], type_code, fmt.parse_digest(entry["digest"]), ns)
                elif entry["op"] == "rm":
                    replay.tags.pop(key, None)
                else:
                    raise ValueError(entry["op"])
            except (ValueError, KeyError, TypeError, FormatError):
                replay.bad_lines += 1
        return replay


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(value)
    return value


def _last_byte(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1)
