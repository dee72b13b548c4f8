"""Helpers shared by the test modules: the CLI runner, tree builders and tree snapshots.

Plain functions and classes (conftest.py wraps them in fixtures); test modules import
them directly, since pytest puts this directory on sys.path.
"""

from __future__ import annotations

import os
import random
import re
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import blake3

REPO = Path(__file__).resolve().parents[1]
_VENV_CLI = REPO / ".venv" / "bin" / "cnpsfs"
CNPSFS: list[str] = [str(_VENV_CLI)] if _VENV_CLI.exists() else [sys.executable, "-m", "cnpsfs.cli"]
IS_ROOT = os.geteuid() == 0

#: Extended attributes that belong to the host, not to a tree (never imported).
HOST_XATTRS = (b"security.selinux", b"trusted.overlay.", b"system.nfs4_acl")


# --------------------------------------------------------------------------- the CLI


@dataclass
class CliResult:
    args: list[str]
    rc: int
    stdout_bytes: bytes
    stderr: str

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "surrogateescape")

    @property
    def last_line(self) -> str:
        lines = self.stdout.strip().splitlines()
        return lines[-1] if lines else ""

    def __str__(self) -> str:
        return f"cnpsfs {' '.join(self.args)} -> rc {self.rc}\nstdout: {self.stdout[-2000:]}\nstderr: {self.stderr}"


class Cli:
    """Runs the installed ``cnpsfs`` binary against one store, as a user would."""

    def __init__(self, store_path: Path) -> None:
        self.store_path = store_path

    def argv(self, *args: str | os.PathLike[str], store: Path | None = None) -> list[str]:
        return [*CNPSFS, "--store", str(store or self.store_path), *(os.fspath(a) for a in args)]

    def __call__(self, *args: str | os.PathLike[str], input: bytes | None = None, check: bool = False,
                 store: Path | None = None, cwd: Path | None = None, timeout: float = 300,
                 env: Mapping[str, str] | None = None) -> CliResult:
        argv = self.argv(*args, store=store)
        proc = subprocess.run(argv, input=input if input is not None else b"", capture_output=True,
                              cwd=cwd, timeout=timeout, env={**os.environ, **(env or {})})
        result = CliResult([os.fspath(a) for a in args], proc.returncode, proc.stdout,
                           proc.stderr.decode("utf-8", "replace"))
        if check and result.rc != 0:
            raise AssertionError(f"command failed:\n{result}")
        return result

    def ok(self, *args: str | os.PathLike[str], **kwargs: Any) -> CliResult:
        """Run and require exit 0."""
        return self(*args, check=True, **kwargs)

    def popen(self, *args: str | os.PathLike[str], store: Path | None = None,
              **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(*args, store=store), **kwargs)


T = TypeVar("T")


def wait_until(predicate: Callable[[], T], *, timeout: float = 30.0, what: str = "the condition",
               interval: float = 0.01) -> T:
    """Poll *predicate* until it returns something true, and return that; fail naming *what*
    after *timeout* seconds. What a test checks waits on a condition, never on a sleep."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return result


def lock_waiters() -> set[int]:
    """Pids blocked waiting for a file lock (flock, POSIX or OFD), from /proc/locks."""
    waiting = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 5 and fields[1] == "->":
                waiting.add(int(fields[5]))
    return waiting


def digest_of(result: CliResult) -> str:
    """The reference an import printed (the last line of stdout)."""
    ref = result.last_line
    assert re.fullmatch(r"blake3:[0-9a-f]{64}", ref), f"no digest on the last line:\n{result}"
    return ref


# --------------------------------------------------------------------------- building trees


@dataclass
class Node:
    """One path of a tree to build (see :func:`build_tree`); ``path`` is relative, bytes."""

    path: bytes
    type: str  # file dir symlink hardlink chardev blockdev fifo socket sparse
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime_ns: int | None = None
    data: bytes = b""
    target: bytes = b""  # symlink target, or the path a hard link points at
    rdev: tuple[int, int] = (0, 0)
    xattrs: Mapping[bytes, bytes] | None = None
    size: int = 0  # sparse files: apparent size; data is written at each offset in ``pieces``
    pieces: Sequence[tuple[int, bytes]] = ()


_DEFAULT_MODES = {"file": 0o644, "dir": 0o755, "chardev": 0o600, "blockdev": 0o600, "fifo": 0o644,
                  "sparse": 0o644, "socket": 0o755}


def build_tree(root: Path, nodes: Sequence[Node], *, root_mode: int = 0o755, root_mtime_ns: int | None = None,
               root_owner: tuple[int, int] = (0, 0)) -> Path:
    """Create *nodes* under *root* (made if missing), then apply modes and times.

    Parent directories are created implicitly (0755). Metadata is applied last, children
    before parents, so read-only directories can be filled and directory mtimes stick.
    Ownership and device nodes need root.
    """
    root.mkdir(parents=True, exist_ok=True)
    rootb = os.fsencode(root)
    meta: list[tuple[bytes, Node]] = []
    for node in nodes:
        path = os.path.join(rootb, node.path)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        kind = node.type
        if kind == "file":
            with open(path, "wb") as f:
                f.write(node.data)
        elif kind == "sparse":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, node.size)
                for offset, data in node.pieces:
                    os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        elif kind == "dir":
            os.makedirs(path, exist_ok=True)
        elif kind == "symlink":
            os.symlink(node.target, path)
        elif kind == "hardlink":
            os.link(os.path.join(rootb, node.target), path)
            continue  # shares its inode's metadata
        elif kind in ("chardev", "blockdev"):
            ifmt = stat.S_IFCHR if kind == "chardev" else stat.S_IFBLK
            os.mknod(path, ifmt | 0o600, os.makedev(*node.rdev))
        elif kind == "fifo":
            os.mkfifo(path, 0o600)
        elif kind == "socket":
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind(path)
        else:
            raise ValueError(f"unknown node type {kind!r}")
        meta.append((path, node))
    dirs = [(p, n) for p, n in meta if n.type == "dir"]
    others = [(p, n) for p, n in meta if n.type != "dir"]
    for path, node in others + sorted(dirs, key=lambda pn: -pn[0].count(b"/")):
        _apply(path, node)
    if IS_ROOT:
        os.chown(rootb, *root_owner)
    os.chmod(rootb, root_mode)
    if root_mtime_ns is not None:
        os.utime(rootb, ns=(root_mtime_ns, root_mtime_ns))
    return root


def _apply(path: bytes, node: Node) -> None:
    symlink = node.type == "symlink"
    if IS_ROOT:  # before xattrs and mode: chown drops security.capability and setuid/setgid
        os.chown(path, node.uid, node.gid, follow_symlinks=False)
    for name, value in (node.xattrs or {}).items():
        os.setxattr(path, name, value, follow_symlinks=False)
    if not symlink:
        mode = node.mode if node.mode is not None else _DEFAULT_MODES[node.type]
        os.chmod(path, mode)
    if node.mtime_ns is not None:
        os.utime(path, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)


#: A setcap-style ``security.capability`` value (VFS_CAP_REVISION_2, cap_net_raw+ep).
CAP_NET_RAW_EP = bytes.fromhex("01000002" "00200000" "00000000" "00000000" "00000000")

LONG_NAME = b"n" * 251 + b".txt"  # 255 bytes
NON_UTF8 = b"caf\xe9-latin1"


def synthetic_nodes(*, seed: int = 0, large: bool = True, sparse: bool = False,
                    devices: bool = True) -> list[Node]:
    """A small tree with every entry type the format knows (sockets aside: tar cannot hold them).

    Deterministic for a given *seed*; mtimes are fixed and have non-zero nanoseconds.
    """
    rng = random.Random(seed)
    t = 1_700_000_000_123_456_789
    nodes = [
        Node(b"etc", "dir", 0o755, mtime_ns=t + 1),
        Node(b"etc/hello.txt", "file", 0o644, mtime_ns=t + 2, data=b"hello, world\n"),
        Node(b"etc/empty", "file", 0o600, 1000, 1000, t + 3),
        Node(b"etc/owned", "file", 0o640, 1000, 2000, t + 4, data=b"owned by 1000:2000\n",
             xattrs={b"user.comment": b"a comment", b"user.binary": bytes(range(256))}),
        Node(b"etc/passwd-link", "symlink", target=b"../usr/share/passwd", mtime_ns=t + 5),
        Node(b"etc/absolute", "symlink", target=b"/usr/bin/tool", mtime_ns=t + 6),
        Node(b"etc/dangling", "symlink", target=b"does/not/exist", mtime_ns=t + 7, uid=7, gid=8),
        Node(b"usr/bin", "dir", 0o755, mtime_ns=t + 8, xattrs={b"user.dir": b"yes"}),
        Node(b"usr/bin/tool", "file", 0o4755, mtime_ns=t + 9, data=b"#!/bin/sh\necho tool\n"),
        Node(b"usr/bin/sgid", "file", 0o2755, 0, 50, t + 10, data=b"#!/bin/sh\necho sgid\n"),
        Node(b"usr/bin/ping", "file", 0o755, mtime_ns=t + 11, data=rng.randbytes(3000),
             xattrs={b"security.capability": CAP_NET_RAW_EP}),
        Node(b"usr/bin/hl-a", "file", 0o755, mtime_ns=t + 12, data=b"hard linked three times\n"),
        Node(b"usr/lib/hl-b", "hardlink", target=b"usr/bin/hl-a"),
        Node(b"usr/lib/sub/hl-c", "hardlink", target=b"usr/bin/hl-a"),
        Node(b"usr/lib", "dir", 0o755, mtime_ns=t + 13),
        Node(b"usr/lib/sub", "dir", 0o750, 3, 4, t + 14),
        Node(b"usr/share/passwd", "file", 0o644, mtime_ns=t + 15, data=b"root:x:0:0::/root:/bin/sh\n" * 40),
        Node(b"usr/share/zeros", "file", 0o644, mtime_ns=t + 16, data=bytes(20000)),
        Node(b"usr/share", "dir", 0o755, mtime_ns=t + 17),
        Node(b"usr", "dir", 0o755, mtime_ns=t + 18),
        Node(b"tmp", "dir", 0o1777, mtime_ns=t + 19),
        Node(b"run/fifo", "fifo", 0o620, 0, 5, t + 20),
        Node(b"run", "dir", 0o755, mtime_ns=t + 21),
        Node(b"names/" + NON_UTF8, "file", 0o644, mtime_ns=t + 22, data=b"latin-1 name\n"),
        Node(b"names/" + LONG_NAME, "file", 0o644, mtime_ns=t + 23, data=b"a 255-byte name\n"),
        Node("names/ünïcödé ✓".encode(), "file", 0o644, mtime_ns=t + 24, data=b"utf-8 name\n"),
        Node(b"names/dir-\xff\xfe", "dir", 0o700, mtime_ns=t + 25),
        Node(b"names/dir-\xff\xfe/x", "file", 0o000, mtime_ns=t + 26, data=b"mode 000\n"),
        Node(b"names", "dir", 0o755, mtime_ns=t + 27),
        Node(b"ro", "dir", 0o555, mtime_ns=t + 28),
        Node(b"ro/inside", "file", 0o444, mtime_ns=-1_000_000_001, data=b"before 1970\n"),
        Node(b"sticky-file", "file", 0o1644, mtime_ns=t + 29, data=b"sticky\n"),
    ]
    if large:
        # Incompressible, several chunks, and a tail shorter than CDC_MIN.
        nodes.append(Node(b"usr/lib/big.bin", "file", 0o644, mtime_ns=t + 30,
                          data=rng.randbytes(1_500_000 + 1234)))
        nodes.append(Node(b"usr/lib/big-copy.bin", "file", 0o600, mtime_ns=t + 31,
                          data=nodes[-1].data))
    if devices:
        nodes += [
            Node(b"dev/null", "chardev", 0o666, mtime_ns=t + 32, rdev=(1, 3)),
            Node(b"dev/sda1", "blockdev", 0o660, 0, 6, t + 33, rdev=(8, 1)),
            Node(b"dev/big-minor", "chardev", 0o600, mtime_ns=t + 34, rdev=(4095, 1048575)),
            Node(b"dev", "dir", 0o755, mtime_ns=t + 35),
        ]
    if sparse:
        gib = 1 << 30
        nodes.append(Node(b"var/sparse.img", "sparse", 0o644, mtime_ns=t + 36, size=5 * gib + 12345,
                          pieces=[(0, b"head"), (gib + 7, rng.randbytes(100_000)),
                                  (5 * gib + 12345 - 5, b"tail!")]))
    return nodes


# --------------------------------------------------------------------------- comparing trees


@dataclass(frozen=True)
class Meta:
    """What a tree must preserve about one path (not atime, ctime, inode or device numbers)."""

    type: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int | None  # regular files only
    rdev: tuple[int, int] | None
    target: bytes | None
    content: str | None  # BLAKE3 hex of regular-file data
    xattrs: tuple[tuple[bytes, bytes], ...]
    links: tuple[bytes, ...]  # every path of this inode (hard links), sorted


def _file_hash(path: bytes) -> str:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: Path | str, *, content: bool = True, ignore_xattrs: Sequence[bytes] = HOST_XATTRS,
             skip: Callable[[bytes], bool] | None = None) -> dict[bytes, Meta]:
    """Every path under *root* (b"" for the root) with the metadata a round trip must keep."""
    rootb = os.fsencode(root)
    raw: dict[bytes, tuple[os.stat_result, bytes]] = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        path = os.path.join(rootb, rel) if rel else rootb
        st = os.lstat(path)
        raw[rel] = (st, path)
        if stat.S_ISDIR(st.st_mode):
            for name in os.listdir(path):
                child = os.path.join(rel, name) if rel else name
                if skip is None or not skip(child):
                    stack.append(child)
    inodes: dict[tuple[int, int], list[bytes]] = {}
    for rel, (st, _path) in raw.items():
        if not stat.S_ISDIR(st.st_mode):
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    out: dict[bytes, Meta] = {}
    for rel, (st, path) in raw.items():
        mode = st.st_mode
        kind = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "chardev",
                stat.S_IFBLK: "blockdev", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}[stat.S_IFMT(mode)]
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError:
            names = []
        xattrs = []
        for xname in names:
            key = os.fsencode(xname)
            if key.startswith(tuple(ignore_xattrs)):
                continue
            xattrs.append((key, os.getxattr(path, xname, follow_symlinks=False)))
        is_file = kind == "file"
        links = tuple(sorted(inodes[(st.st_dev, st.st_ino)])) if kind != "dir" and st.st_nlink > 1 else ()
        out[rel] = Meta(
            kind, stat.S_IMODE(mode), st.st_uid, st.st_gid, st.st_mtime_ns,
            st.st_size if is_file else None,
            (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("chardev", "blockdev") else None,
            os.readlink(path) if kind == "symlink" else None,
            _file_hash(path) if is_file and content else None,
            tuple(sorted(xattrs)),
            links,
        )
    return out


def assert_same_tree(expected: Mapping[bytes, Meta], actual: Mapping[bytes, Meta]) -> None:
    """Compare two snapshots path by path, reporting the first differences readably."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    diffs = []
    for rel in sorted(set(expected) & set(actual)):
        a, b = expected[rel], actual[rel]
        if a != b:
            fields = [f"{k}: {getattr(a, k)!r} != {getattr(b, k)!r}" for k in Meta.__dataclass_fields__
                      if getattr(a, k) != getattr(b, k)]
            diffs.append(f"{rel!r}: " + "; ".join(fields))
    problems = [f"missing: {m!r}" for m in missing[:20]] + [f"unexpected: {e!r}" for e in extra[:20]] + diffs[:40]
    assert not problems, f"{len(missing)} missing, {len(extra)} unexpected, {len(diffs)} differ:\n" + "\n".join(
        problems)




# --------------------------------------------------------------------------- store state


def index_counts(store_path: Path) -> dict[str, int]:
    """Rows per index table, read straight from SQLite (no cnpsfs code involved)."""
    if not (store_path / "index.sqlite").exists():
        return {"objects": 0, "packs": 0, "tags": 0}
    db = sqlite3.connect(f"file:{store_path / 'index.sqlite'}?mode=ro", uri=True)
    try:
        return {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("objects", "packs", "tags")}
    finally:
        db.close()


def listing(root: Path, *, exclude: Sequence[str] = ()) -> set[str]:
    """Every path under *root* (relative), minus the subtrees named in *exclude*."""
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if os.path.normpath(os.path.join(rel, d)) not in exclude]
        for name in dirnames + filenames:
            out.add(os.path.normpath(os.path.join(rel, name)))
    return out
