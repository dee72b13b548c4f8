"""Faults for the store tests, made for real: damaged SQLite pages, a full or read-only file
system, and system calls that fail or kill at the n-th call.

* :func:`damage_pages` overwrites B-tree leaf pages of the index file, chosen by the
  digests they hold (SQLite stores the key of a WITHOUT ROWID table in its leaf cells).
* :func:`small_fs` mounts a tmpfs of a given size; :func:`read_only_view` a read-only bind
  mount (what a read-only NFS export looks like to the reader).
* :func:`trace` runs a command under ``strace -f -y`` and lists the calls it makes of some
  system calls, with the file each fd names; :func:`inject` runs it again with one call
  failing (``error=ENOSPC``) or killing the process (``signal=KILL``). strace counts calls
  per system call and per thread (``when=N``), and with ``-P FILE`` only the calls about
  that file, so :func:`points` names each call as "the N-th ``pwrite64`` on
  ``index.sqlite-wal``" (files with stable names) or "the N-th ``write``" (temporary
  packs, whose names are random), keeping only calls one thread alone makes: then the
  same point is hit on every run. No LD_PRELOAD, no code in cnpsfs that knows it is
  being tested.
* :func:`leftovers` lists what a failed or killed writer may have left in a store.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Calls that change a store: each is a point where a fault or a kill can land.
WRITE_CALLS = ("write", "pwrite64", "fsync", "fdatasync")
#: Kill points add the calls that create, name, lock or open files (openat, reads included:
#: a process can die anywhere).
KILL_CALLS = (*WRITE_CALLS, "rename", "unlink", "link", "ftruncate", "openat", "mkdir", "flock")

STRACE = shutil.which("strace")
needs_strace = pytest.mark.skipif(STRACE is None and os.environ.get("CI", "") not in ("true", "1"),
                                  reason="strace is not installed (apt-get install strace)")


def require_strace() -> str:
    if STRACE is None:
        pytest.fail("strace is not installed (apt-get install strace)", pytrace=False)
    return STRACE


# --------------------------------------------------------------------------- SQLite pages


def leaf_pages(db_path: Path, table: str) -> tuple[int, list[int]]:
    """(page size, the leaf pages of *table*'s B-tree), read from the file itself."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name=?", (table,)).fetchone()[0]
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
    finally:
        db.close()
    data = db_path.read_bytes()
    leaves: list[int] = []
    stack = [root]
    while stack:
        page = stack.pop()
        base = (page - 1) * page_size
        header = base + (100 if page == 1 else 0)
        kind = data[header]
        cells = struct.unpack_from(">H", data, header + 3)[0]
        if kind in (0x0A, 0x0D):  # leaf index / leaf table page
            leaves.append(page)
            continue
        stack.append(struct.unpack_from(">I", data, header + 8)[0])  # right-most child
        for i in range(cells):
            cell = struct.unpack_from(">H", data, header + 12 + 2 * i)[0]
            stack.append(struct.unpack_from(">I", data, base + cell)[0])
    return page_size, leaves


def damage_pages(db_path: Path, table: str, hit: Iterable[bytes], spare: Iterable[bytes] = ()) -> list[int]:
    """Overwrite every leaf page of *table* holding a key of *hit*; fail if one holds a key of *spare*.

    The page becomes 0xff bytes: not a valid page type, so SQLite reports
    ``database disk image is malformed`` when a query reaches it, and only then.
    """
    page_size, leaves = leaf_pages(db_path, table)
    data = bytearray(db_path.read_bytes())
    hit, spare = set(hit), set(spare)
    damaged = []
    for page in leaves:
        content = bytes(data[(page - 1) * page_size : page * page_size])
        if any(d in content for d in hit):
            held = [d for d in spare if d in content]
            assert not held, f"page {page} holds {len(held)} keys that must stay readable: pick other data"
            damaged.append(page)
            data[(page - 1) * page_size : page * page_size] = b"\xff" * page_size
    db_path.write_bytes(data)
    return damaged


# --------------------------------------------------------------------------- file systems


@contextlib.contextmanager
def small_fs(size: str, *, prefix: str = "cnpsfs-full-") -> Iterator[Path]:
    """A tmpfs of *size* (``8m``), mounted for the block and removed after it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where = Path(tempfile.mkdtemp(prefix=prefix))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        with contextlib.suppress(OSError):
            where.rmdir()


@contextlib.contextmanager
def read_only_view(source: Path, where: Path) -> Iterator[Path]:
    """*source* bind-mounted read-only at *where* for the block."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(source), str(where)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(where)], check=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path, *, leave: int = 0) -> Path:
    """Write a file in *directory* until its file system has at most *leave* bytes free."""
    path = directory / "filler"
    with open(path, "wb") as f:
        chunk = b"\0" * (1 << 16)
        while True:
            st = os.statvfs(directory)
            free = st.f_bavail * st.f_frsize
            if free <= leave:
                break
            try:
                f.write(chunk[: max(1, min(len(chunk), free - leave))])
                f.flush()
            except OSError:
                break
    return path


# --------------------------------------------------------------------------- system calls


@dataclass(frozen=True)
class Call:
    tid: int
    name: str
    path: str  # the file the call is about ("" when strace could not tell)
    nth: int  # 1-based: the how-many-th call of *name* by thread *tid*
    nth_on_path: int  # ... of *name* on *path* by thread *tid*
    target: str = ""  # the second path of rename and link (the name a file gets)


@dataclass(frozen=True)
class Point:
    """Where a fault lands: the *nth* call of *call* (on *path*, when given)."""

    call: str
    nth: int
    path: str | None = None

    def __str__(self) -> str:
        return f"{self.call} #{self.nth}" + (f" on {os.path.basename(self.path)}" if self.path else "")


_LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)$")
_FD_PATH = re.compile(r"^-?\d+<([^>]*)>")
_STR_ARG = re.compile(r'^"((?:[^"\\]|\\.)*)"')
_SECOND_ARG = re.compile(r'^"(?:[^"\\]|\\.)*", "((?:[^"\\]|\\.)*)"')


def trace(argv: Sequence[str], calls: Sequence[str], *, env: Mapping[str, str] | None = None,
          cwd: Path | None = None, timeout: float = 300) -> tuple[subprocess.CompletedProcess[bytes], list[Call]]:
    """Run *argv* under strace; the calls of *calls* it made, in order, with their files."""
    strace = require_strace()
    with tempfile.NamedTemporaryFile(prefix="cnpsfs-strace-", suffix=".txt") as out:
        proc = subprocess.run([strace, "-f", "-y", "-qq", "-s", "0", "-o", out.name,
                               "-e", f"trace={','.join(calls)}", "--", *argv],
                              capture_output=True, env=_env(env), cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL)
        lines = Path(out.name).read_text(errors="replace").splitlines()
    found: list[Call] = []
    counts: dict[tuple[int, str], int] = {}
    on_path: dict[tuple[int, str, str], int] = {}
    for line in lines:
        m = _LINE.match(line)
        if m is None or m[2] not in calls:
            continue
        tid, name, args = int(m[1]), m[2], m[3]
        fd = _FD_PATH.match(args)
        path = fd[1] if fd else ""
        if not fd:
            s = _STR_ARG.match(args)
            path = s[1] if s else ""
        if path and not path.startswith("/") and cwd is None:
            path = os.path.abspath(path)
        counts[(tid, name)] = counts.get((tid, name), 0) + 1
        on_path[(tid, name, path)] = on_path.get((tid, name, path), 0) + 1
        second = _SECOND_ARG.match(args) if name in ("rename", "link") else None
        target = second[1] if second else ""
        if target and not target.startswith("/") and cwd is None:
            target = os.path.abspath(target)
        found.append(Call(tid, name, path, counts[(tid, name)], on_path[(tid, name, path)], target))
    return proc, found


def points(calls: Sequence[Call], store: Path) -> list[Point]:
    """Every call on a file of *store* that :func:`inject` can hit again exactly (see the module doc)."""
    root = os.path.realpath(store)
    by_name: dict[str, set[int]] = {}
    by_path: dict[tuple[str, str], set[int]] = {}
    for c in calls:
        by_name.setdefault(c.name, set()).add(c.tid)
        by_path.setdefault((c.name, c.path), set()).add(c.tid)
    found = []
    for c in calls:
        if not (c.path == root or c.path.startswith(root + "/")):
            continue
        rel = c.path[len(root) + 1:]
        if not rel.startswith(("tmp/", "packs/")) and len(by_path[(c.name, c.path)]) == 1:
            found.append(Point(c.name, c.nth_on_path, c.path.replace(root, "{store}", 1)))
        elif len(by_name[c.name]) == 1:
            found.append(Point(c.name, c.nth))
    return found


def inject(argv: Sequence[str], point: Point, action: str, *, store: Path, env: Mapping[str, str] | None = None,
           cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    """Run *argv* with the call at *point* (in *store*) doing *action*: ``error=ENOSPC``, ``signal=KILL``."""
    strace = require_strace()
    where = ["-P", point.path.replace("{store}", os.path.realpath(store), 1)] if point.path else []
    return subprocess.run([strace, "-f", "-qq", "-o", "/dev/null", *where, "-e", f"trace={point.call}",
                           "-e", f"inject={point.call}:{action}:when={point.nth}", "--", *argv],
                          capture_output=True, env=_env(env), cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL)


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    # No byte-code writes: the same command makes the same calls every time.
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(extra or {})}


# --------------------------------------------------------------------------- what a writer leaves


def leftovers(store: Path) -> list[str]:
    """Temporary files, packs no index row names, index rows whose pack is gone: what gc must reclaim."""
    problems = [f"tmp/{p.name}" for p in sorted((store / "tmp").glob("*"))] if (store / "tmp").is_dir() else []
    db = sqlite3.connect(f"file:{store / 'index.sqlite'}?mode=ro", uri=True)
    try:
        named = {name for (name,) in db.execute("SELECT name FROM packs")}
        orphans = db.execute("SELECT count(*) FROM objects WHERE pack NOT IN (SELECT id FROM packs)").fetchone()[0]
    finally:
        db.close()
    files = {p.stem for p in (store / "packs").glob("*.pack")}
    problems += [f"packs/{n}.pack is in no index row" for n in sorted(files - named)]
    problems += [f"packs/{n}.pack is in the index but missing" for n in sorted(named - files)]
    if orphans:
        problems.append(f"{orphans} objects rows name no pack")
    problems += [f"{p.name} left beside the store files" for p in store.glob(".*.tmp")]
    return problems
