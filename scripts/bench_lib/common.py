"""Process, package, mount and cache helpers shared by every bench section.

Everything here fails with :class:`BenchError` carrying one readable line, so the harness can
print a clean message instead of a traceback, and every mount helper has a lazy fallback so a
failed run never leaves mounts or loop devices behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shlex
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# Chroot commands get a clean, predictable environment instead of the caller's.
CHROOT_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
}


class BenchError(Exception):
    """A user-facing failure: printed as one line, without a traceback."""


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    capture: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; on failure raise BenchError naming the command and its last stderr line.

    stderr is always captured so the error can say *why*; stdout only when asked for.
    """
    argv = [os.fspath(c) for c in cmd]
    log.debug("run: %s", shlex.join(argv))
    try:
        proc = subprocess.run(
            argv,
            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise BenchError(f"command not found: {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout}s: {shlex.join(argv)}") from None
    if check and proc.returncode != 0:
        raise BenchError(f"`{shlex.join(argv)}` exited {proc.returncode}: {last_line(proc.stderr)}")
    return proc


def sh(
    script: str, *, capture: bool = False, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a shell pipeline with ``pipefail`` so a failing stage is not hidden by ``wc``."""
    return run(["bash", "-o", "pipefail", "-c", script], capture=capture, timeout=timeout)


def last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no message)"


def timed(fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    """Wall-clock seconds of one call; ``perf_counter`` because only intervals matter."""
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------- packages


def ensure_packages(commands: Mapping[str, str]) -> None:
    """Install the Debian package for every command (name -> package) missing from PATH.

    Idempotent: apt-get runs only when something is really missing, so repeated runs stay fast
    and offline.
    """
    missing = sorted({pkg for cmd, pkg in commands.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise BenchError(f"missing packages {' '.join(missing)} and not root to install them")
    log.info("installing %s", " ".join(missing))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not any(Path("/var/lib/apt/lists").glob("*_Packages*")):
        run(["apt-get", "update"], env=env)
    run(["apt-get", "install", "-y", "--no-install-recommends", *missing], env=env)


def require_root() -> None:
    if os.geteuid() != 0:
        raise BenchError("the benchmark needs root (debootstrap, chroot, mounts, drop_caches)")


# ---------------------------------------------------------------- caches and sizes


def drop_caches() -> None:
    """Write back dirty pages, then drop page cache, dentries and inodes so the next step is cold."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def du_bytes(paths: Sequence[Path]) -> tuple[int, int]:
    """Return (apparent bytes, allocated block bytes) of ``paths`` counted together.

    Counted in one ``du`` call so hard links shared between paths count once, exactly as they
    occupy the disk.
    """
    apparent = run(["du", "-s", "-c", "-b", *paths], capture=True).stdout.splitlines()[-1].split()[0]
    blocks = (
        run(["du", "-s", "-c", "--block-size=1", *paths], capture=True).stdout.splitlines()[-1].split()[0]
    )
    return int(apparent), int(blocks)


def rmtree(path: Path) -> None:
    """Remove ``path`` but refuse to descend into anything still mounted below it."""
    if not path.exists() and not path.is_symlink():
        return
    for mnt in mounts_under(path):
        raise BenchError(f"refusing to delete {path}: {mnt} is still mounted")
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


# ---------------------------------------------------------------- mounts


def _unescape_mountinfo(field: str) -> str:
    return field.encode().decode("unicode_escape")


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [_unescape_mountinfo(line.split()[4]) for line in f]


def is_mounted(path: Path) -> bool:
    return os.path.realpath(path) in mount_points()


def mounts_under(path: Path) -> list[str]:
    root = os.path.realpath(path)
    return [m for m in mount_points() if m == root or m.startswith(root + "/")]


def umount(path: Path) -> None:
    """Unmount ``path`` (FUSE or kernel), falling back to a lazy unmount.

    Never raises: it runs in finally blocks, where a second exception would hide the first.
    Loop devices set up by ``mount -o loop`` are auto-cleared by the kernel on unmount.
    """
    target = os.path.realpath(path)
    for attempt in (["umount", target], ["fusermount3", "-u", target], ["umount", "-l", target]):
        if not is_mounted(Path(target)):
            return
        proc = subprocess.run(
            attempt, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False
        )
        if proc.returncode != 0:
            log.debug("%s failed: %s", shlex.join(attempt), last_line(proc.stderr))
    if is_mounted(Path(target)):
        log.warning("could not unmount %s", target)


@contextlib.contextmanager
def exclusive_work_dir(work: Path) -> Iterator[None]:
    """Hold ``WORK/.bench-lock`` for the run: a run starts by unmounting everything under its
    work directory, which must never hit the mounts of another run still going."""
    work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work / ".bench-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BenchError(f"another scripts/bench run is using {work}: give this one its own --work") from None
        yield
    finally:
        os.close(fd)


#: Debian packages the squashfuse peer needs (command -> package), in every section that runs it.
SQUASHFUSE_PACKAGES = {"mksquashfs": "squashfs-tools", "squashfuse": "squashfuse", "fusermount3": "fuse3"}


def fuse_unavailable() -> str | None:
    """Why FUSE peers cannot run here, or None."""
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"no FUSE (/dev/fuse: {exc.strerror})"
    return None


def umount_all_under(path: Path) -> None:
    """Unmount everything at or below ``path``, deepest first."""
    for mnt in sorted(mounts_under(path), key=len, reverse=True):
        umount(Path(mnt))


@contextlib.contextmanager
def bind_mounts(root: Path, sources: Sequence[str]) -> Iterator[None]:
    """Bind host ``sources`` (e.g. /proc, /dev) into the chroot ``root`` and always undo it."""
    done: list[Path] = []
    try:
        for src in sources:
            dst = root / src.lstrip("/")
            dst.mkdir(parents=True, exist_ok=True)
            run(["mount", "--rbind", src, dst])
            run(["mount", "--make-rslave", dst])
            done.append(dst)
        yield
    finally:
        for dst in reversed(done):
            umount_all_under(dst)
