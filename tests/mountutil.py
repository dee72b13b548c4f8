"""Real FUSE mounts for the test suite: a skip marker that probes, a mount that always
goes away again, and a check of the daemon's log (S3QL's checklogs idea).

Test modules import from here directly (pytest puts this directory on sys.path)::

    from mountutil import FUSE, FUSE_MODES, mount_image

    pytestmark = FUSE

``mount_image`` runs ``cnpsfs mount`` in a subprocess, exactly as a user would, waits
until the mountpoint is really mounted, fails at once (showing the daemon's log) if the
daemon is gone, and in teardown runs ``cnpsfs umount``, then ``fusermount3 -u -z``, then
kills the daemon, whatever happened in the test. Afterwards a WARNING, ERROR or traceback
in the daemon's log fails the test unless the test allowed it by pattern.

With ``CI=true`` in the environment nothing is skipped for want of FUSE: the tests fail,
so a CI runner without /dev/fuse cannot pass silently.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cnpsfs_testlib import CNPSFS, HOST_XATTRS

from cnpsfs.fs.daemon import pid_alive

IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")

#: ``auto`` uses the patched pyfuse3's kernel-cache extensions, ``stock`` asks for every request.
#: Module-scoped mount fixtures take ``params=FUSE_MODES`` so every test runs in both.
FUSE_MODES = ("auto", "stock")
#: For the heavy cases (swaps under load, 100,000-entry directories, whole Debian trees):
#: ``auto``, where the kernel caches and a swap must invalidate them, in the default run;
#: ``stock`` too with ``--long``. test_mount.py and the fault tests keep both modes always.
FUSE_MODES_STOCK_LONG = ("auto", pytest.param("stock", marks=pytest.mark.long))

#: Daemon log lines that fail a test unless allowed.
BAD_LOG_LINE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|Exception ignored")

MOUNT_TIMEOUT = 120.0
UMOUNT_TIMEOUT = 60.0


# --------------------------------------------------------------------------- can we mount at all?


def fuse_unavailable() -> str | None:
    """Why real FUSE mounts cannot work here, or None. Really opens /dev/fuse."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (modprobe fuse, or pass --device /dev/fuse to the container)"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open /dev/fuse: {exc.strerror}"
    os.close(fd)
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not on PATH (apt-get install fuse3)"
    return None


FUSE_PROBLEM = fuse_unavailable()

#: ``pytestmark = FUSE`` (or ``@pytest.mark.fuse``) on every test that mounts. The marker is
#: all there is: ``conftest.py`` checks :data:`FUSE_PROBLEM` before each marked test and
#: skips it, saying why, or under CI=true fails it, so no mount test can pass by skipping
#: in CI whatever helper it uses.
FUSE = [pytest.mark.fuse]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, device nodes, setuid, owners)")


def require_fuse() -> None:
    """Skip (fail under CI=true) unless FUSE works: for code that mounts outside a marked test."""
    if FUSE_PROBLEM is None:
        return
    if IN_CI:
        pytest.fail(f"real FUSE tests must not be skipped in CI (CI=true), but FUSE is unusable: {FUSE_PROBLEM}",
                    pytrace=False)
    pytest.skip(f"no FUSE: {FUSE_PROBLEM}")


# --------------------------------------------------------------------------- processes and mounts


def _unescape(field: bytes) -> bytes:
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field)


def mount_fstype(path: str | os.PathLike[str]) -> str | None:
    """The filesystem type mounted exactly at *path* (topmost), from /proc/self/mountinfo."""
    real = os.fsencode(os.path.realpath(path))
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) == real:
                found = fields[fields.index(b"-") + 1].decode()
    return found


def is_mounted(path: str | os.PathLike[str]) -> bool:
    return mount_fstype(path) is not None



def processes_mentioning(text: str | os.PathLike[str]) -> list[int]:
    """Live processes whose command line contains *text* (a test's unique path)."""
    needle = os.fsencode(text)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle in cmdline and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def cnpsfs(*args: str | os.PathLike[str], store: Path | None = None, timeout: float = 120.0,
           ) -> subprocess.CompletedProcess[str]:
    argv = [*CNPSFS, *(["--store", str(store)] if store else []), *map(os.fspath, args)]
    return subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout,
                          stdin=subprocess.DEVNULL)


def runtime_log_file(mountpoint: Path) -> Path:
    """Where the daemon of *mountpoint* will log (the same key ``cnpsfs mount`` uses)."""
    from cnpsfs.fs.daemon import MountRecord

    return MountRecord.path_for(str(mountpoint)).with_suffix(".log")


def log_problems(text: str, allow: Sequence[str | re.Pattern[str]] = ()) -> list[str]:
    patterns = [re.compile(a) if isinstance(a, str) else a for a in allow]
    return [line for line in text.splitlines()
            if BAD_LOG_LINE.search(line) and not any(p.search(line) for p in patterns)]


# --------------------------------------------------------------------------- a mount


@dataclass
class Mount:
    """A running ``cnpsfs mount``: where, which daemon, its log, and its counters."""

    mountpoint: Path
    store: Path
    ref: str
    mode: str
    pid: int
    log_file: Path
    log_offset: int
    allow_log: list[str | re.Pattern[str]] = field(default_factory=list)
    expect_exit: bool = False  # set by tests that kill or unmount the daemon themselves

    def __truediv__(self, rel: str | bytes) -> Any:
        if isinstance(rel, bytes):
            return os.path.join(os.fsencode(self.mountpoint), rel)
        return self.mountpoint / rel

    def log(self) -> str:
        """What the daemon logged since this mount started."""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(self.log_offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def status(self) -> dict[str, Any]:
        result = cnpsfs("status", self.mountpoint, "--json")
        assert result.returncode == 0, f"cnpsfs status failed: {result.stderr}\ndaemon log:\n{self.log()}"
        return json.loads(result.stdout)

    def requests(self) -> collections.Counter[str]:
        return collections.Counter(self.status()["requests"])

    def cnpsfs(self, *args: str | os.PathLike[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """A ``cnpsfs`` command against this mount's store."""
        return cnpsfs(*args, store=self.store, timeout=timeout)

    def upgrade(self, ref: str | os.PathLike[str]) -> dict[str, Any]:
        """``cnpsfs upgrade MNT REF --json``, as a user runs it; fails the test if refused."""
        result = self.cnpsfs("upgrade", self.mountpoint, ref, "--json")
        assert result.returncode == 0, (f"cnpsfs upgrade {ref} failed: {result.stderr}\n"
                                        f"daemon log:\n{self.log()[-4000:]}")
        return json.loads(result.stdout)

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        """One control-socket request without starting a CLI process (raises CnpsfsError):
        the JSON request the CLI sends, for tests that need many swaps quickly."""
        from cnpsfs.fs.control import control_request
        from cnpsfs.fs.daemon import status_record

        record = status_record(os.path.realpath(self.mountpoint))
        return control_request(record["control"], request)

    def assert_alive(self) -> None:
        assert pid_alive(self.pid), f"the daemon (pid {self.pid}) exited; its log:\n{self.log()}"
        assert is_mounted(self.mountpoint), f"{self.mountpoint} is no longer mounted; log:\n{self.log()}"

    def teardown(self) -> list[str]:
        """Unmount by every means necessary; returns what went wrong on the way."""
        issues = []
        if not self.expect_exit and not pid_alive(self.pid):
            issues.append(f"the daemon (pid {self.pid}) died during the test")
        if is_mounted(self.mountpoint):
            try:
                result = cnpsfs("umount", self.mountpoint, timeout=UMOUNT_TIMEOUT)
                if result.returncode != 0:
                    issues.append(f"cnpsfs umount exited {result.returncode}: {result.stderr.strip()}")
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGUSR1)  # faulthandler: stacks into the log
                time.sleep(0.5)
                issues.append(f"cnpsfs umount hung for {UMOUNT_TIMEOUT:.0f}s")
        if is_mounted(self.mountpoint):
            issues.append("still mounted after cnpsfs umount: detached with fusermount3 -u -z")
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        if pid_alive(self.pid):
            issues.append(f"the daemon (pid {self.pid}) outlived its mount: killed")
            _terminate(self.pid)
        return issues


def _terminate(pid: int) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not pid_alive(pid):
            return


def _fuse_mode_args(mode: str) -> list[str]:
    if mode not in FUSE_MODES:
        raise ValueError(f"unknown fuse mode {mode!r}")
    return ["--fuse-mode", mode]


def start_mount(store: Path, ref: str | os.PathLike[str], mountpoint: Path, *, mode: str = "auto",
                allow_log: Sequence[str | re.Pattern[str]] = (), args: Sequence[str] = ()) -> Mount:
    """``cnpsfs mount`` and wait until it is mounted; fails the test (cleaning up) otherwise."""
    require_fuse()
    mountpoint.mkdir(parents=True, exist_ok=True)
    log_file = runtime_log_file(mountpoint)
    offset = log_file.stat().st_size if log_file.exists() else 0
    argv = ["mount", *_fuse_mode_args(mode), *args, os.fspath(ref), mountpoint]
    try:
        result = cnpsfs(*argv, store=store, timeout=MOUNT_TIMEOUT)
    except subprocess.TimeoutExpired:
        _cleanup_failed_mount(mountpoint)
        pytest.fail(f"cnpsfs mount did not return within {MOUNT_TIMEOUT:.0f}s; daemon log:\n"
                    f"{_tail(log_file, offset)}", pytrace=False)
    if result.returncode != 0:
        _cleanup_failed_mount(mountpoint)
        pytest.fail(f"cnpsfs mount {ref} failed (rc {result.returncode}): {result.stderr.strip()}\n"
                    f"daemon log:\n{_tail(log_file, offset)}", pytrace=False)
    match = re.search(r"daemon pid (\d+), log (.+)\)\s*$", result.stderr)
    if match:
        pid, log_file = int(match[1]), Path(match[2])
    else:
        record = cnpsfs("status", mountpoint, "--json")
        _cleanup_failed_mount(mountpoint)
        pytest.fail(f"cannot tell the daemon's pid from the mount message {result.stderr!r} ({record.stderr})",
                    pytrace=False)
    mount = Mount(mountpoint, store, os.fspath(ref), mode, pid, log_file, offset, list(allow_log))
    deadline = time.monotonic() + 10
    while not is_mounted(mountpoint):
        if not pid_alive(pid) or time.monotonic() > deadline:
            issues = mount.teardown()
            pytest.fail(f"cnpsfs mount returned but {mountpoint} is not mounted (daemon alive: {pid_alive(pid)}; "
                        f"{issues}); daemon log:\n{mount.log()}", pytrace=False)
        time.sleep(0.02)
    if not pid_alive(pid):
        issues = mount.teardown()
        pytest.fail(f"the daemon exited right after mounting ({issues}); its log:\n{mount.log()}", pytrace=False)
    return mount


def _tail(log_file: Path, offset: int) -> str:
    try:
        with open(log_file, "rb") as f:
            f.seek(offset)
            return f.read()[-4000:].decode("utf-8", "replace") or "(empty)"
    except FileNotFoundError:
        return "(no log file)"


def _cleanup_failed_mount(mountpoint: Path) -> None:
    """A failed ``cnpsfs mount`` must leave nothing; if it did, remove it (the test fails anyway)."""
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
    for pid in processes_mentioning(mountpoint):
        _terminate(pid)


def finish_mount(mount: Mount) -> None:
    """Tear *mount* down, then fail if that went wrong or the daemon logged problems."""
    issues = mount.teardown()
    bad = log_problems(mount.log(), mount.allow_log)
    if bad:
        issues.append("unexpected lines in the daemon log:\n  " + "\n  ".join(bad[:20]))
    if issues:
        pytest.fail(f"mount of {mount.ref} at {mount.mountpoint} ({mount.mode} mode): " + "\n".join(issues)
                    + f"\n--- daemon log ---\n{mount.log()[-6000:]}", pytrace=False)


@contextlib.contextmanager
def mount_image(store: Path, ref: str | os.PathLike[str], mountpoint: Path, *, mode: str = "auto",
                allow_log: Sequence[str | re.Pattern[str]] = (), args: Sequence[str] = ()) -> Iterator[Mount]:
    """Mount for the duration of a ``with`` block (or a fixture's yield); always unmounts."""
    mount = start_mount(store, ref, mountpoint, mode=mode, allow_log=allow_log, args=args)
    try:
        yield mount
    finally:
        finish_mount(mount)


# --------------------------------------------------------------------------- manifests


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(value)


def manifest_text(name: str, layers: Sequence[Mapping[str, Any] | str], *, version: str = "1",
                  mode: str | None = None, extra: str = "") -> str:
    """A manifest; each layer is a reference or a table (fileset, at, unlinked, override, ...)."""
    lines = [f"name = {json.dumps(name)}", f"version = {json.dumps(version)}"]
    if mode is not None:
        lines.append(f"mode = {json.dumps(mode)}")
    for layer in layers:
        table = {"fileset": layer} if isinstance(layer, str) else layer
        lines.append("[[layers]]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n" + extra


def write_manifest(path: Path, name: str, layers: Sequence[Mapping[str, Any] | str], **kwargs: Any) -> Path:
    path.write_text(manifest_text(name, layers, **kwargs))
    return path


# --------------------------------------------------------------------------- comparing a mount with its source


def cat(path: str | bytes | os.PathLike[Any]) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def file_digest(path: str | bytes | os.PathLike[Any]) -> str:
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def xattrs_of(path: bytes, ignore: Sequence[bytes] = HOST_XATTRS) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out = {}
    for name in names:
        key = os.fsencode(name)
        if not key.startswith(tuple(ignore)):
            out[key] = os.getxattr(path, name, follow_symlinks=False)
    return out


def walk_lstat(root: str | os.PathLike[str]) -> dict[bytes, os.stat_result]:
    """lstat of every path under *root*, keyed by relative bytes path (b"" is the root)."""
    rootb = os.fsencode(root)
    out = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        path = os.path.join(rootb, rel) if rel else rootb
        st = os.lstat(path)
        out[rel] = st
        if stat.S_ISDIR(st.st_mode):
            stack.extend(os.path.join(rel, n) if rel else n for n in os.listdir(path))
    return out


def data_bytes(path: bytes, size: int) -> int:
    """Bytes of a file that are not holes (what the mount's st_blocks counts)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        total, pos = 0, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            total += end - start
            pos = end
        return total
    finally:
        os.close(fd)


def file_has_no_zero_run(path: bytes, run: int = 4096) -> bool:
    """No block-sized run of zero bytes (which the store may keep as a hole)."""
    zeros = bytes(run)
    with open(path, "rb") as f:
        data = f.read()
    return zeros not in data


def compare_mount(source: str | os.PathLike[str], mounted: str | os.PathLike[str], *,
                  content: Callable[[bytes], bool] = lambda rel: True,
                  source_stats: Mapping[bytes, os.stat_result] | None = None,
                  source_digests: dict[bytes, str] | None = None) -> list[str]:
    """Every difference between a source tree and its mount, path by path.

    Compares every lstat field but atime, ctime and st_dev: type and mode bits, owner,
    mtime to the nanosecond, st_size (not for directories: 4096 on the mount), st_rdev,
    st_nlink, st_blksize and st_blocks (by the mount's rule: stored bytes in 512-byte
    units, so exactly size/512 for a file without holes or zero runs, and less than the
    size for a sparse one). Inode numbers must map one to one: hard links share one, nothing else does.
    Also file contents (where *content(rel)*), symlink targets and xattrs.
    *source_digests* caches the source's file digests between calls.
    """
    src_root, mnt_root = os.fsencode(source), os.fsencode(mounted)
    src = dict(source_stats) if source_stats is not None else walk_lstat(source)
    mnt = walk_lstat(mounted)
    problems = [f"missing on the mount: {p!r}" for p in sorted(set(src) - set(mnt))[:20]]
    problems += [f"not in the source: {p!r}" for p in sorted(set(mnt) - set(src))[:20]]
    ino_map: dict[int, int] = {}
    ino_back: dict[int, int] = {}
    for rel in sorted(set(src) & set(mnt)):
        a, b = src[rel], mnt[rel]
        sp, mp = (os.path.join(src_root, rel) if rel else src_root), (os.path.join(mnt_root, rel) if rel else mnt_root)
        diffs = []
        is_dir = stat.S_ISDIR(a.st_mode)
        is_reg = stat.S_ISREG(a.st_mode)
        for name in ("st_mode", "st_uid", "st_gid", "st_mtime_ns", "st_nlink"):
            if getattr(a, name) != getattr(b, name):
                diffs.append(f"{name} {getattr(a, name)!r} != {getattr(b, name)!r}")
        if not is_dir and a.st_size != b.st_size:
            diffs.append(f"st_size {a.st_size} != {b.st_size}")
        if is_dir and (b.st_size, b.st_blocks) != (4096, 8):
            diffs.append(f"directory st_size/st_blocks {b.st_size}/{b.st_blocks} != 4096/8")
        if (stat.S_ISCHR(a.st_mode) or stat.S_ISBLK(a.st_mode)) and a.st_rdev != b.st_rdev:
            diffs.append(f"st_rdev {os.major(a.st_rdev)}:{os.minor(a.st_rdev)} != "
                         f"{os.major(b.st_rdev)}:{os.minor(b.st_rdev)}")
        if b.st_blksize != 4096:
            diffs.append(f"st_blksize {b.st_blksize}")
        if is_reg:
            # The mount counts stored extents; the store may keep zeros next to data (its
            # chunks are cut by content) and drop all-zero chunks, so only bounds are exact.
            full = (a.st_size + 511) // 512
            data = data_bytes(sp, a.st_size)
            if b.st_blocks > full or (data == a.st_size and b.st_blocks < full and file_has_no_zero_run(sp)):
                diffs.append(f"st_blocks {b.st_blocks}, expected {full} (size / 512)")
            elif data < a.st_size and b.st_blocks * 512 >= a.st_size > 1 << 20:
                diffs.append(f"st_blocks {b.st_blocks} counts the holes of a sparse file")
        elif not is_dir and b.st_blocks != 0:
            diffs.append(f"st_blocks {b.st_blocks} != 0")
        # Inode numbers: one per source inode (hard links share), never one for two.
        if ino_map.setdefault(a.st_ino, b.st_ino) != b.st_ino:
            diffs.append("a hard link of this file has a different inode number on the mount")
        if ino_back.setdefault(b.st_ino, a.st_ino) != a.st_ino:
            diffs.append(f"shares inode {b.st_ino} with an unrelated path on the mount")
        if stat.S_ISLNK(a.st_mode) and os.readlink(sp) != os.readlink(mp):
            diffs.append(f"target {os.readlink(sp)!r} != {os.readlink(mp)!r}")
        if xattrs_of(sp) != xattrs_of(mp):
            diffs.append(f"xattrs {xattrs_of(sp)!r} != {xattrs_of(mp)!r}")
        if is_reg and not diffs and content(rel):
            want_digest = source_digests.get(rel) if source_digests is not None else None
            if want_digest is None:
                want_digest = file_digest(sp)
                if source_digests is not None:
                    source_digests[rel] = want_digest
            if want_digest != file_digest(mp):
                diffs.append("content differs")
        if diffs:
            problems.append(f"{rel!r}: " + "; ".join(diffs))
    return problems


@dataclass(frozen=True)
class PathMeta:
    """What a live-upgrade test compares per path: type, permission bits, size, content."""

    kind: str  # f l d o
    mode: int
    size: int
    content: str  # a file's digest, a symlink's target, "" otherwise


def tree_meta(root: str | os.PathLike[str]) -> dict[str, PathMeta]:
    """Every path below *root* (relative) with its :class:`PathMeta`."""
    out: dict[str, PathMeta] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                out[rel] = PathMeta("f", stat.S_IMODE(st.st_mode), st.st_size, file_digest(path))
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = PathMeta("l", 0, 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = PathMeta("d", stat.S_IMODE(st.st_mode), 0, "")
            else:
                out[rel] = PathMeta("o", stat.S_IMODE(st.st_mode), st.st_size, "")
    return out


def overlay_meta(*roots: Path) -> dict[str, PathMeta]:
    """What stacking plain directories (no whiteouts) in order looks like."""
    out: dict[str, PathMeta] = {}
    for root in roots:
        out.update(tree_meta(root))
    return out


# --------------------------------------------------------------------------- raw directory reads


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_GETDENTS64 = 217  # x86_64
_DIRENT_HEAD = 19  # d_ino u64, d_off s64, d_reclen u16, d_type u8


@dataclass(frozen=True)
class Dirent:
    ino: int
    off: int
    type: int
    name: bytes


def getdents(fd: int, bufsize: int = 4096) -> list[Dirent]:
    """One getdents64 call: the entries that fit in *bufsize* bytes (empty at the end)."""
    if os.uname().machine != "x86_64":
        pytest.skip("getdents64 syscall number is only known here for x86_64")
    buf = ctypes.create_string_buffer(bufsize)
    n = _libc.syscall(_SYS_GETDENTS64, fd, buf, bufsize)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    raw = buf.raw[:n]
    out = []
    pos = 0
    while pos < n:
        ino = int.from_bytes(raw[pos : pos + 8], "little")
        off = int.from_bytes(raw[pos + 8 : pos + 16], "little", signed=True)
        reclen = int.from_bytes(raw[pos + 16 : pos + 18], "little")
        dtype = raw[pos + 18]
        name = raw[pos + _DIRENT_HEAD : pos + reclen].split(b"\0", 1)[0]
        out.append(Dirent(ino, off, dtype, name))
        pos += reclen
    return out


def read_dir_raw(path: str | os.PathLike[str], bufsize: int = 4096) -> list[Dirent]:
    """Every entry of a directory, ``.`` and ``..`` included, with the offsets the kernel reports."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        out: list[Dirent] = []
        while batch := getdents(fd, bufsize):
            out += batch
        return out
    finally:
        os.close(fd)
