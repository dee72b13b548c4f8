"""Running a mount: the daemon process, its runtime records, and unmounting.

``cnpsfs mount`` checks what it can in the calling process (the mountpoint, the
reference, the composition), then forks. The child becomes the daemon: it mounts, starts
serving, proves the mount answers (a stat of the mountpoint goes through our own
getattr), and only then reports "ready" over a pipe, so the parent returns once the
mount is usable. Any failure before that is sent over the same pipe and printed by the
parent as one line; no daemon is left behind.

Each mount leaves a record in the runtime directory (``/run/cnpsfs`` for root,
``$XDG_RUNTIME_DIR/cnpsfs`` otherwise) keyed by the mountpoint, naming the daemon's pid,
its log file and its control socket, so ``umount`` and ``status`` need no store.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnpsfs.errors import CnpsfsError, MountpointBusyError, UsageError
from cnpsfs.fs.options import READY_TIMEOUT, UNMOUNT_TIMEOUT
from cnpsfs.process import pid_alive

# faulthandler, shutil, signal and subprocess are imported where used: `cnpsfs status` and
# every live swap read a record here and need none of them.
try:  # hashlib's own blake2b (it never takes OpenSSL's), without loading libcrypto for it
    from _blake2 import blake2b
except ImportError:  # a Python built without its builtin hashes
    from hashlib import blake2b

log = logging.getLogger(__name__)

READY = b"ready\n"


def runtime_dir() -> Path:
    """Where mount records, control sockets, logs and mountpoint locks live, checked safe.

    ``/run/cnpsfs`` for root; ``$XDG_RUNTIME_DIR/cnpsfs``, else ``/tmp/cnpsfs-UID/cnpsfs``,
    for other users. Each directory on the way that cnpsfs owns must be a real directory
    (not a symlink) owned by the user and writable by nobody else, as the XDG Base
    Directory rules ask of ``XDG_RUNTIME_DIR``: in a shared ``/tmp`` another user could
    plant ``/tmp/cnpsfs-UID`` first and then read the logs or replace records and sockets.
    """
    uid = os.geteuid()
    if uid == 0:
        chain = [Path("/run/cnpsfs")]
    else:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        parent = Path(xdg) if xdg else Path(f"/tmp/cnpsfs-{os.getuid()}")
        chain = [parent, parent / "cnpsfs"]
    for path in chain:
        _safe_runtime_dir(path, uid)
    return chain[-1]


def _safe_runtime_dir(path: Path, uid: int) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise CnpsfsError(f"cannot create runtime directory {path}: {exc.strerror}") from None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        problem = "it is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "not a directory"
    elif st.st_uid != uid:
        problem = f"owned by uid {st.st_uid}, not {uid}"
    elif st.st_mode & 0o022:
        problem = f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    else:
        return
    raise CnpsfsError(f"unsafe runtime directory {path}: {problem}; remove it, or set XDG_RUNTIME_DIR to a "
                      "directory of your own (mode 0700)")


def mount_key(mountpoint: str) -> str:
    return blake2b(os.path.realpath(mountpoint).encode(), digest_size=8).hexdigest()


@dataclass(slots=True)
class MountRecord:
    mountpoint: str
    pid: int
    store: str
    ref: str
    log_file: str
    control: str
    lower: str = ""  # writable mounts: where the read-only FUSE composition is mounted
    upperdir: str = ""  # writable mounts: the overlayfs upper/work directory

    @classmethod
    def path_for(cls, mountpoint: str) -> Path:
        return runtime_dir() / f"{mount_key(mountpoint)}.json"

    def save(self) -> None:
        path = self.path_for(self.mountpoint)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: getattr(self, k) for k in self.__slots__}))
        os.replace(tmp, path)

    @classmethod
    def load(cls, mountpoint: str) -> MountRecord | None:
        try:
            data = json.loads(cls.path_for(mountpoint).read_text())
        except (OSError, ValueError):
            return None
        return cls(**data)

    def remove(self) -> None:
        """Remove the record, and the log too when the daemon wrote nothing to it.

        A log with lines in it is kept (it says why a mount failed or what it served), and
        the next mount on the same mountpoint appends to it, so logs stay one per
        mountpoint; empty ones would otherwise pile up, one per mountpoint ever used.
        """
        with contextlib.suppress(FileNotFoundError):
            self.path_for(self.mountpoint).unlink()
        _remove_if_empty(self.log_file)


def _remove_if_empty(path: str) -> None:
    with contextlib.suppress(OSError):
        if path and os.stat(path).st_size == 0:
            os.unlink(path)


def lock_mountpoint(mountpoint: str) -> int:
    """Take the mountpoint's lock (``<runtime dir>/<key>.lock``); returns its descriptor.

    Whoever mounts holds it from before the checks until its daemon exits (the forked
    daemon inherits the descriptor), so of two mounts started at once on one directory
    exactly one gets past here and the other is told the mountpoint is busy. Leftovers of
    killed daemons are cleaned first, so a dead one never holds a mountpoint.
    """
    real = os.path.realpath(mountpoint)
    rt = runtime_dir()
    forget_dead_mounts(rt)
    path = rt / f"{mount_key(real)}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            record = MountRecord.load(real)
            holder = f" (cnpsfs daemon pid {record.pid})" if record else ""
            raise MountpointBusyError(f"mountpoint {mountpoint} is busy: another cnpsfs mount is starting or "
                                      f"serving there{holder}", path=real) from None
        # unmount removes the lock file once its daemon is gone: a lock taken on a file
        # that was removed meanwhile protects nothing, so take the new one instead.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def unlock_mountpoint(fd: int, mountpoint: str) -> None:
    """Let go of a mountpoint lock taken by :func:`lock_mountpoint`, removing its file first.

    For the one holding it when it is done with the mountpoint (a mount that failed, a
    daemon about to exit). Removing the file while still holding the lock is safe: a mount
    that opened it meanwhile finds, once it gets the lock, that the path no longer names
    the file it locked, and takes a new one.
    """
    path = runtime_dir() / f"{mount_key(os.path.realpath(mountpoint))}.lock"
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    os.close(fd)


def _release_lock_file(real: str) -> None:
    """Remove a mountpoint's lock file when nobody holds it (after its daemon exited)."""
    path = runtime_dir() / f"{mount_key(real)}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    except BlockingIOError:
        pass  # a new mount is starting there
    finally:
        os.close(fd)


def forget_dead_mounts(rt: Path | None = None) -> list[MountRecord]:
    """Clean up after daemons that died without doing it themselves (SIGKILL, OOM, a crash).

    For each record whose daemon is gone: its control socket and the gc roots file it
    registered in its store (``run/<pid>.roots``, docs/format.md §2) are removed, so gc no
    longer keeps what it served; the record itself is removed too unless its mount is
    still attached (a dead FUSE connection), which ``cnpsfs umount`` detaches using it.
    Returns the records of dead daemons.
    """
    dead = []
    for path in sorted((rt or runtime_dir()).glob("*.json")):
        try:
            record = MountRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if pid_alive(record.pid):
            continue
        dead.append(record)
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(record.control).st_mode):
                os.unlink(record.control)
        with contextlib.suppress(OSError):
            os.unlink(Path(record.store) / "run" / f"{record.pid}.roots")
        attached = mounted_fstype(record.mountpoint) is not None or (
            bool(record.lower) and mounted_fstype(record.lower) is not None)
        if not attached:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            _remove_if_empty(record.log_file)
            log.info("removed the record of %s: its daemon (pid %d) is gone", record.mountpoint, record.pid)
    return dead


def forget_dead_roots(run_dir: Path) -> int:
    """Remove gc roots files (``run/<pid>.roots``) of processes that are gone; returns how many.

    A zombie counts as gone: a killed daemon nobody reaps (in a container whose init does
    not) still answers kill(pid, 0), and its roots would otherwise be kept forever.
    """
    removed = 0
    for path in run_dir.glob("*.roots"):
        try:
            pid = int(path.stem)
        except ValueError:
            continue
        if not pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


# --------------------------------------------------------------------------- why a mount failed


def mount_failure_cause(*, allow_other: bool, fuse_output: str = "") -> str | None:
    """Why libfuse could not mount, in words a user can act on, or None when unknown.

    libfuse reports only ``fuse_session_mount failed``; the cause is on its stderr (or
    fusermount3's) or in the system's setup, which is checked here in the order a user
    would fix things. *fuse_output* is what libfuse and fusermount3 wrote meanwhile.
    """
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return "/dev/fuse does not exist (load the fuse module: modprobe fuse)"
    except OSError as exc:
        try:
            st = os.stat("/dev/fuse")
            how = f"mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}"
        except OSError:
            how = "its mode is unknown"
        return (f"cannot open /dev/fuse: {exc.strerror} ({how}; a user can mount only where the device is readable "
                "and writable by them, e.g. mode 0666 as Debian's fuse3 package installs it)")
    os.close(fd)
    if os.geteuid() != 0:
        import shutil

        if shutil.which("fusermount3") is None:
            return "fusermount3 is not installed (apt-get install fuse3): users other than root mount through it"
        if allow_other and not _user_allow_other():
            return ("--allow-other is refused for users other than root unless /etc/fuse.conf has the line "
                    "user_allow_other")
    lines = [line.strip() for line in fuse_output.splitlines() if line.startswith(("fuse:", "fusermount3:"))]
    return lines[-1] if lines else None


def _user_allow_other() -> bool:
    try:
        with open("/etc/fuse.conf", encoding="utf-8", errors="replace") as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def mounted_fstype(path: str) -> str | None:
    """The filesystem type mounted exactly at *path*, or None (from /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            mount_point = os.fsdecode(_unescape_mountinfo(fields[4]))
            if mount_point == real:
                sep = fields.index(b"-")
                found = fields[sep + 1].decode()
    return found


def mounted_device(path: str, device: int) -> bool:
    """Whether a filesystem with device number *device* (an ``st_dev``) is mounted at *path*.

    From /proc/self/mountinfo, so it never asks a FUSE daemon anything (the daemon asking
    may be the one that would have to answer, after its loop stopped): *path* must already
    be real, as resolving it (realpath) would stat the mount's root through FUSE.
    """
    real = os.path.normpath(os.path.abspath(path))
    wanted = f"{os.major(device)}:{os.minor(device)}".encode()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if fields[2] == wanted and os.fsdecode(_unescape_mountinfo(fields[4])) == real:
                return True
    return False


def _unescape_mountinfo(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040); bytes stay bytes."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def check_mountpoint(mountpoint: str) -> str:
    real = os.path.realpath(mountpoint)
    try:
        # statfs always reaches a FUSE daemon, where a stat may be answered from the
        # kernel's attribute cache (ours never expires): only this shows a dead mount.
        os.statvfs(real)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise CnpsfsError(f"{mountpoint} is a dead FUSE mount: run `cnpsfs umount {mountpoint}` first") from None
    if not os.path.exists(real):
        raise UsageError(f"mountpoint {mountpoint} does not exist")
    if not os.path.isdir(real):
        raise UsageError(f"mountpoint {mountpoint} is not a directory")
    fstype = mounted_fstype(real)
    if fstype is not None and real != "/":
        record = MountRecord.load(real)
        holder = f" (cnpsfs daemon pid {record.pid})" if record else ""
        raise MountpointBusyError(f"mountpoint {mountpoint} is busy: {fstype} is already mounted there{holder}",
                                  path=real)
    return real


# --------------------------------------------------------------------------- forking


def spawn_daemon(serve: Callable[[int], None], *, timeout: float = READY_TIMEOUT) -> int:
    """Fork; the child runs *serve(ready_fd)* as a daemon. Returns the child's pid once ready.

    The child writes READY, or ``error: message`` and exits non-zero.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        code = 0
        try:
            os.setsid()
            _detach_stdio()
            serve(write_fd)
        except CnpsfsError as exc:
            _report(write_fd, f"error: {exc}")
            code = exc.exit_code
        except BaseException as exc:  # must never return into the parent's code
            log.exception("daemon failed")
            _report(write_fd, f"error: internal error: {type(exc).__name__}: {exc}")
            code = 70
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(write_fd)
    message = _read_all(read_fd, timeout)
    os.close(read_fd)
    if message == READY:
        return pid
    _reap(pid)
    text = message.decode(errors="replace").strip()
    if text.startswith("error: "):
        raise CnpsfsError(text[len("error: "):])
    raise CnpsfsError("the mount daemon exited before the mount was ready"
                      + (f": {text}" if text else " (see its log)"))


def _report(fd: int, message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, message.encode() + b"\n")


def _read_all(fd: int, timeout: float) -> bytes:
    import select

    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"".join(chunks) or b"error: timed out waiting for the mount to become ready"
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        data = os.read(fd, 4096)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
        if b"\n" in data:
            return b"".join(chunks)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)


def redirect_output(log_file: str) -> None:
    """Send the daemon's stdout/stderr (and so its log handler) to *log_file*."""
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def install_faulthandler() -> None:
    """SIGUSR1 dumps every thread's stack to the log: how to ask a hung mount what it does."""
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)


# --------------------------------------------------------------------------- unmounting


def unmount(mountpoint: str, *, lazy: bool = False, timeout: float = UNMOUNT_TIMEOUT,
            terminate: bool = False) -> None:
    """Unmount and wait for the daemon to exit; works when the daemon was killed too.

    A writable mount is taken down in order: the overlay first, then the FUSE lower.
    After a lazy detach the daemon serves on until the last process using the mount lets
    go; *terminate* stops it at once instead (SIGTERM; those processes then get ENOTCONN),
    which is what stopping a service needs.
    """
    real = os.path.realpath(mountpoint)
    record = MountRecord.load(real)  # before the sweep, which drops the records of dead daemons
    forget_dead_mounts()
    try:
        _unmount(mountpoint, real, record, lazy=lazy, timeout=timeout, terminate=terminate)
    finally:
        if record is not None and not pid_alive(record.pid):
            forget_dead_mounts()
        if mounted_fstype(real) is None:
            _release_lock_file(real)


def _unmount(mountpoint: str, real: str, record: MountRecord | None, *, lazy: bool, timeout: float,
             terminate: bool) -> None:
    if record is not None and pid_alive(record.pid):
        _quiesce(record)
    if record is not None and record.lower:
        from cnpsfs.fs.overlay import unmount_overlay

        if mounted_fstype(real) == "overlay":
            unmount_overlay(real, lazy=lazy)
        if mounted_fstype(record.lower) is not None:
            _unmount_fuse(record.lower, record, lazy=True)
        _stop_daemon(record.pid, timeout, terminate=terminate)
        record.remove()
        with contextlib.suppress(OSError):
            os.rmdir(record.lower)
        return
    if mounted_fstype(real) is None:
        if record is not None:
            _stop_daemon(record.pid, timeout)
            record.remove()
            return
        raise UsageError(f"{mountpoint} is not mounted")
    _unmount_fuse(real, record, lazy=lazy)
    if record is not None:
        _stop_daemon(record.pid, timeout, terminate=terminate and lazy)
        record.remove()


def _quiesce(record: MountRecord) -> None:
    """Ask the daemon to stop its prefetch first: the lookups it makes through the mount
    would make a plain umount fail as busy. Best effort: an old or hung daemon is unmounted anyway."""
    from cnpsfs.fs.control import control_request

    try:
        control_request(record.control, {"op": "quiesce"}, timeout=10.0)
    except (CnpsfsError, OSError, ValueError) as exc:
        log.debug("quiesce %s: %s", record.mountpoint, exc)


def _unmount_fuse(real: str, record: MountRecord | None, *, lazy: bool) -> None:
    import subprocess

    mountpoint = real
    args = ["fusermount3", "-u", *(["-z"] if lazy else []), real]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        alive = record is not None and pid_alive(record.pid)
        stderr = result.stderr.strip()
        if "busy" in stderr.lower() and alive:
            raise MountpointBusyError(f"{mountpoint} is busy: a process still uses it (use --lazy to detach it anyway)",
                                      path=real)
        # A killed daemon leaves a dead connection: detach it lazily.
        lazy_result = subprocess.run(["fusermount3", "-u", "-z", real], capture_output=True, text=True)
        if lazy_result.returncode != 0 and mounted_fstype(real) is not None:
            umount = subprocess.run(["umount", "-l", real], capture_output=True, text=True)
            if umount.returncode != 0:
                raise CnpsfsError(f"cannot unmount {mountpoint}: {stderr or umount.stderr.strip()}")


def _stop_daemon(pid: int, timeout: float, *, terminate: bool = False) -> None:
    import signal

    if terminate:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def status_record(mountpoint: str) -> dict[str, Any]:
    forget_dead_mounts()
    record = MountRecord.load(mountpoint)
    if record is None:
        raise UsageError(f"no cnpsfs mount is recorded at {mountpoint}")
    return {k: getattr(record, k) for k in record.__slots__} | {"alive": pid_alive(record.pid)}
