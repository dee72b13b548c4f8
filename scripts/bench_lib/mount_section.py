"""Section ``mount``: the cost of reading v2 through each filesystem, against the plain directory.

Every peer serves the same v2 tree and runs the same workloads in the same run, so ratios to the
native directory are comparable. Cold runs remount and drop caches before every repetition;
warm runs execute once to warm the caches and then measure. A peer that cannot run here (no
loop devices, no FUSE, no cnpsfs yet) becomes a row of "n/a (reason)", never a failed run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import stat
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .cnpsfs_cli import CnpsfsCli
from .common import (
    CHROOT_ENV,
    SQUASHFUSE_PACKAGES,
    BenchError,
    drop_caches,
    ensure_packages,
    fuse_unavailable,
    is_mounted,
    rmtree,
    run,
    sh,
    timed,
    umount,
    umount_all_under,
)
from .corpus import Corpus

log = logging.getLogger(__name__)

MOUNT_TIMEOUT = 60.0  # seconds to wait for a FUSE daemon to show up in mountinfo
MEASURE_TIMEOUT = 1800.0  # a hung peer fails its cell instead of hanging the run
OPEN_CLOSE_ITERATIONS = 10_000
OPEN_CLOSE_FILE = "usr/lib/python3.11/json/__init__.py"
PARALLEL_READERS = 8
PY_IMPORTS = "import json, email, http.client, asyncio"
#: The cnpsfs prefetch profile the profiled measures replay (recorded from PY_IMPORTS).
PROFILE = "python"
WAIT_PREFETCH_S = "30"  # the bound given to mount --wait-prefetch (a replay takes well under 1 s)
# PYTHONDONTWRITEBYTECODE: the native peer is the cached corpus itself, which must stay pristine.
CHROOT_RUN_ENV = {**CHROOT_ENV, "PYTHONDONTWRITEBYTECODE": "1"}


# ---------------------------------------------------------------- peers


class Peer(ABC):
    """One way of presenting v2 at a mount point."""

    name: str
    label: str
    # Debian packages this peer needs, as command -> package.
    packages: ClassVar[dict[str, str]] = {}

    def unavailable(self) -> str | None:
        return None

    def prepare(self, corpus: Corpus, work: Path) -> None:  # noqa: B027 - optional hook
        """Build whatever the mount needs (images, stores); untimed."""

    @abstractmethod
    def _mount(self, mnt: Path) -> None: ...

    #: Set by :meth:`mount` for a measure with a profile (``Measure.profiled``); only cnpsfs has profiles.
    profiled: bool = False
    #: ... and whether the mount waits for the profile's replay (``Measure.wait_prefetch``).
    wait_prefetch: bool = False

    def mount(self, mnt: Path, *, profiled: bool = False, wait_prefetch: bool = False) -> None:
        """Mount and return only once ``mnt`` is usable, so the timing covers daemon start-up."""
        self.profiled = profiled
        self.wait_prefetch = wait_prefetch
        self._mount(mnt)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(mnt):
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: {mnt} not mounted {MOUNT_TIMEOUT:.0f}s after mount returned")
            time.sleep(0.005)

    def unmount(self, mnt: Path) -> None:
        umount(mnt)

    def counters(self, mnt: Path) -> dict[str, int] | None:
        return None


def _needs_loop() -> str | None:
    if not Path("/dev/loop-control").exists():
        return "no loop devices (/dev/loop-control missing)"
    return None



def _needs_fs(fstype: str) -> str | None:
    """Load the kernel module if needed; report when the kernel cannot mount ``fstype``."""
    if fstype not in Path("/proc/filesystems").read_text().split():
        with contextlib.suppress(OSError):  # no kmod installed: the check below reports it
            subprocess.run(["modprobe", "-q", fstype], check=False, capture_output=True)
    if fstype not in Path("/proc/filesystems").read_text().split():
        return f"kernel has no {fstype} support"
    return None


class Native(Peer):
    """The directory itself, through a read-only bind mount so no workload can modify the corpus."""

    name, label = "native", "native dir (ro bind)"

    def prepare(self, corpus: Corpus, work: Path) -> None:
        self.src = corpus.v2

    def _mount(self, mnt: Path) -> None:
        run(["mount", "--bind", "-o", "ro", self.src, mnt])


class Overlay(Peer):
    name, label = "overlayfs", "kernel overlayfs (ro)"

    def unavailable(self) -> str | None:
        return _needs_fs("overlay")

    def prepare(self, corpus: Corpus, work: Path) -> None:
        self.empty = work / "empty-lower"
        self.empty.mkdir(parents=True, exist_ok=True)
        self.lower = f"{corpus.v2}:{self.empty}"

    def _mount(self, mnt: Path) -> None:
        run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={self.lower}", mnt])


class Images:
    """Images built once per run and shared by the peers that read them (squashfs, squashfuse)."""

    def __init__(self, corpus: Corpus, work: Path) -> None:
        self.corpus, self.dir = corpus, work / "images"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sizes: dict[str, int] = {}

    def squashfs(self) -> Path:
        img = self.dir / "v2.squashfs"
        if not img.exists():
            log.info("mount: building squashfs image")
            run(["mksquashfs", self.corpus.v2, img, "-comp", "zstd", "-noappend", "-no-progress"])
            self.sizes["squashfs (zstd)"] = img.stat().st_size
        return img

    def erofs(self) -> Path:
        img = self.dir / "v2.erofs"
        if not img.exists():
            log.info("mount: building erofs image")
            run(["mkfs.erofs", img, self.corpus.v2])
            self.sizes["erofs (uncompressed)"] = img.stat().st_size
        return img


class Squashfs(Peer):
    name, label = "squashfs", "kernel squashfs (zstd, loop)"
    packages: ClassVar[dict[str, str]] = {"mksquashfs": "squashfs-tools"}

    def __init__(self, images: Images) -> None:
        self.images = images

    def unavailable(self) -> str | None:
        return _needs_loop() or _needs_fs("squashfs")

    def prepare(self, corpus: Corpus, work: Path) -> None:
        self.img = self.images.squashfs()

    def _mount(self, mnt: Path) -> None:
        run(["mount", "-t", "squashfs", "-o", "loop,ro", self.img, mnt])


class Erofs(Peer):
    name, label = "erofs", "kernel erofs (loop)"
    packages: ClassVar[dict[str, str]] = {"mkfs.erofs": "erofs-utils"}

    def __init__(self, images: Images) -> None:
        self.images = images

    def unavailable(self) -> str | None:
        return _needs_loop() or _needs_fs("erofs")

    def prepare(self, corpus: Corpus, work: Path) -> None:
        self.img = self.images.erofs()

    def _mount(self, mnt: Path) -> None:
        run(["mount", "-t", "erofs", "-o", "loop,ro", self.img, mnt])


class Squashfuse(Peer):
    name, label = "squashfuse", "squashfuse (zstd)"
    packages: ClassVar[dict[str, str]] = SQUASHFUSE_PACKAGES

    def __init__(self, images: Images) -> None:
        self.images = images

    def unavailable(self) -> str | None:
        return fuse_unavailable()

    def prepare(self, corpus: Corpus, work: Path) -> None:
        self.img = self.images.squashfs()

    def _mount(self, mnt: Path) -> None:
        run(["squashfuse", self.img, mnt])


class FuseOverlayfs(Peer):
    name, label = "fuse-overlayfs", "fuse-overlayfs (ro)"
    packages: ClassVar[dict[str, str]] = {"fuse-overlayfs": "fuse-overlayfs", "fusermount3": "fuse3"}

    def unavailable(self) -> str | None:
        return fuse_unavailable()

    def prepare(self, corpus: Corpus, work: Path) -> None:
        self.lower = corpus.v2

    def _mount(self, mnt: Path) -> None:
        run(["fuse-overlayfs", "-o", f"lowerdir={self.lower}", mnt])


class Cnpsfs(Peer):
    """cnpsfs with the kernel-cache extensions of its pyfuse3 patch (when installed).

    The measures marked ``profiled`` mount with the prefetch profile ``python``, recorded once
    in :meth:`prepare` by running the python measure's command on a mount of the store; every
    other measure mounts with ``--no-prefetch``.
    """

    name, label = "cnpsfs", "cnpsfs (kernel-cache)"
    packages: ClassVar[dict[str, str]] = {"fusermount3": "fuse3"}
    mount_args: tuple[str, ...] = ()

    def __init__(self, cli: CnpsfsCli) -> None:
        self.cli = cli
        self.ref = ""
        self.profile: dict[str, Any] | str | None = None  # what recording stored, or why there is none

    def unavailable(self) -> str | None:
        return fuse_unavailable() or self.cli.mount_unavailable()

    def prepare(self, corpus: Corpus, work: Path) -> None:
        self.store = work / f"{self.name}-store"
        rmtree(self.store)
        log.info("mount: importing v2 into a cnpsfs store")
        self.ref = self.cli.import_dir(self.store, corpus.v2, "v2")
        self.profile = self.cli.profile_unavailable()
        if self.profile is None:
            self._record(work / f"{self.name}-record")

    def _record(self, mnt: Path) -> None:
        """Record the profile ``python`` of the python measure's command (untimed)."""
        mnt.mkdir(parents=True, exist_ok=True)
        self.cli.mount(self.store, self.ref, mnt, *self.mount_args, "--no-prefetch")
        try:
            drop_caches()
            log.info("mount: recording the %s profile %s", self.name, PROFILE)
            self.profile = self.cli.record_profile(mnt, PROFILE, ["chroot", str(mnt), "python3", "-c", PY_IMPORTS],
                                                   env=CHROOT_RUN_ENV)
        finally:
            self.cli.detach(mnt)

    def _mount(self, mnt: Path) -> None:
        if self.profiled:
            if not isinstance(self.profile, dict):
                raise BenchError(f"no profile: {self.profile}")
            prefetch: tuple[str, ...] = ("--profile", PROFILE)
            if self.wait_prefetch:
                prefetch += ("--wait-prefetch", WAIT_PREFETCH_S)
        else:
            prefetch = ("--no-prefetch",) if self.profile is not None and isinstance(self.profile, dict) else ()
        self.cli.mount(self.store, self.ref, mnt, *self.mount_args, *prefetch)

    def unmount(self, mnt: Path) -> None:
        self.cli.detach(mnt)

    def counters(self, mnt: Path) -> dict[str, int] | None:
        return self.cli.counters(mnt)


class CnpsfsStock(Cnpsfs):
    """cnpsfs using only stock pyfuse3 features (what a plain `pip install` gets)."""

    name, label = "cnpsfs-stock", "cnpsfs (stock pyfuse3 mode)"
    mount_args = ("--fuse-mode", "stock")


def peers(corpus: Corpus, work: Path, cli: CnpsfsCli) -> list[Peer]:
    images = Images(corpus, work)
    return [
        Native(),
        Overlay(),
        Squashfs(images),
        Erofs(images),
        Squashfuse(images),
        FuseOverlayfs(),
        Cnpsfs(cli),
        CnpsfsStock(cli),
    ]


# ---------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """What every peer is asked to do, fixed from the native tree before any peer runs."""

    big_files: tuple[str, ...]
    big_bytes: int
    open_file: str


def pick_workload(v2: Path) -> Workload:
    """Choose the 8 largest distinct regular files (hard links count once) and the open target."""
    by_inode: dict[tuple[int, int], tuple[int, str]] = {}
    for dirpath, _dirs, files in os.walk(v2):
        for fname in files:
            path = os.path.join(dirpath, fname)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                rel = os.path.relpath(path, v2)
                if key not in by_inode or rel < by_inode[key][1]:
                    by_inode[key] = (st.st_size, rel)
    largest = sorted(by_inode.values(), key=lambda sr: (-sr[0], sr[1]))[:PARALLEL_READERS]
    if not (v2 / OPEN_CLOSE_FILE).is_file():
        raise BenchError(f"corpus v2 has no {OPEN_CLOSE_FILE}")
    return Workload(tuple(rel for _s, rel in largest), sum(s for s, _r in largest), OPEN_CLOSE_FILE)


@dataclass(frozen=True)
class Sample:
    value: float  # in the measure's unit
    detail: int | None = None  # e.g. entry count or byte count, to check peers agree


_OPEN_CLOSE_PY = """
import os, sys, time
path, n = sys.argv[1], int(sys.argv[2])
open_, close, flags = os.open, os.close, os.O_RDONLY
start = time.perf_counter_ns()
for _ in range(n):
    close(open_(path, flags))
print((time.perf_counter_ns() - start) / n / 1000)
"""

# Threads are enough: os.readv releases the GIL, so 8 readers really run in parallel.
_READERS_PY = """
import os, sys, threading, time
paths = sys.argv[1:]
got = [0] * len(paths)
def read(i):
    buf = bytearray(1 << 20)
    fd = os.open(paths[i], os.O_RDONLY)
    try:
        while (n := os.readv(fd, [buf])) > 0:
            got[i] += n
    finally:
        os.close(fd)
threads = [threading.Thread(target=read, args=(i,)) for i in range(len(paths))]
start = time.perf_counter()
for t in threads: t.start()
for t in threads: t.join()
print(sum(got), time.perf_counter() - start)
"""


def _py(code: str, *args: str | os.PathLike[str]) -> str:
    return run([sys.executable, "-c", code, *args], capture=True, timeout=MEASURE_TIMEOUT).stdout


def _timed_sh(script: str) -> tuple[float, str]:
    start = time.perf_counter()
    out = sh(script, capture=True, timeout=MEASURE_TIMEOUT).stdout
    return time.perf_counter() - start, out


def m_find_count(m: Path, w: Workload) -> Sample:
    secs, out = _timed_sh(f"find {shlex.quote(str(m))} | wc -l")
    return Sample(secs, int(out))


def m_find_sizes(m: Path, w: Workload) -> Sample:
    secs, _ = _timed_sh(f"find {shlex.quote(str(m))} -printf '%s\\n' > /dev/null")
    return Sample(secs)


def m_tar(m: Path, w: Workload) -> Sample:
    secs, out = _timed_sh(f"tar -cf - -C {shlex.quote(str(m))} . | wc -c")
    return Sample(secs, int(out))


def _timed_chroot(m: Path, *argv: str) -> float:
    return timed(run, ["chroot", m, *argv], env=CHROOT_RUN_ENV, timeout=MEASURE_TIMEOUT)


def m_py_import(m: Path, w: Workload) -> Sample:
    return Sample(_timed_chroot(m, "python3", "-c", PY_IMPORTS))


def m_true_loop(m: Path, w: Workload) -> Sample:
    return Sample(_timed_chroot(m, "bash", "-c", "for i in $(seq 100); do /bin/true; done"))


def m_open_close(m: Path, w: Workload) -> Sample:
    return Sample(float(_py(_OPEN_CLOSE_PY, m / w.open_file, str(OPEN_CLOSE_ITERATIONS))))


def m_readers(m: Path, w: Workload) -> Sample:
    got, secs = _py(_READERS_PY, *(m / rel for rel in w.big_files)).split()
    if int(got) != w.big_bytes:
        raise BenchError(f"parallel readers got {got} bytes, expected {w.big_bytes}")
    return Sample(int(got) / 1e6 / float(secs), int(got))


@dataclass(frozen=True)
class Measure:
    key: str
    title: str
    unit: str
    higher_is_better: bool
    fn: Callable[[Path, Workload], Sample] | None  # None: mount time, measured by the driver
    # Cold with a prefetch profile (cnpsfs; the same run elsewhere): caches are dropped
    # before the mount, and the command starts as soon as the mount returns, racing the
    # replay, as a container start would.
    profiled: bool = False
    # ... with ``mount --wait-prefetch``: the mount returns once the replay is done (its time
    # is kept beside the command's, in the peer's notes, as ``profiled_mount_s``).
    wait_prefetch: bool = False


MEASURES: tuple[Measure, ...] = (
    Measure("mount", "mount", "s", False, None),
    Measure("find_count", "find | wc -l", "s", False, m_find_count),
    Measure("find_sizes", "find -printf %s", "s", False, m_find_sizes),
    Measure("tar", "tar -cf - | wc -c", "s", False, m_tar),
    Measure("py_import", "chroot python3 imports", "s", False, m_py_import),
    Measure("py_import_profile", "python3 imports, profile", "s", False, m_py_import, profiled=True),
    Measure("py_import_profile_wait", "python3 imports, profile, mount --wait-prefetch", "s", False, m_py_import,
            profiled=True, wait_prefetch=True),
    Measure("true_loop", "chroot 100× /bin/true", "s", False, m_true_loop),
    Measure("open_close", "open+close", "µs/op", False, m_open_close),
    Measure("readers", f"{PARALLEL_READERS} parallel readers", "MB/s", True, m_readers),
)


# ---------------------------------------------------------------- driver


@dataclass
class PeerResult:
    """Raw samples per mode ("cold"/"warm") and measure key; errors replace a cell."""

    name: str
    label: str
    skipped: str | None = None
    samples: dict[str, dict[str, list[float]]] = field(default_factory=lambda: {"cold": {}, "warm": {}})
    details: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    requests: dict[str, dict[str, dict[str, int]]] = field(default_factory=lambda: {"cold": {}, "warm": {}})
    notes: dict[str, Any] = field(default_factory=dict)


def _delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    return {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}


class PeerRun:
    """Drives one peer through every measure, keeping it mounted exactly when it should be."""

    def __init__(self, peer: Peer, mnt: Path, workload: Workload, reps: int) -> None:
        self.peer, self.mnt, self.workload, self.reps = peer, mnt, workload, reps
        self.result = PeerResult(peer.name, peer.label)

    def remount(self) -> None:
        if is_mounted(self.mnt):
            self.peer.unmount(self.mnt)
        self.peer.mount(self.mnt)

    def _record(self, mode: str, measure: Measure, sample: Sample) -> None:
        self.result.samples[mode].setdefault(measure.key, []).append(sample.value)
        if sample.detail is not None:
            self.result.details.setdefault(measure.key, sample.detail)

    def _sample(self, mode: str, measure: Measure) -> Sample:
        assert measure.fn is not None
        before = self.peer.counters(self.mnt)
        sample = measure.fn(self.mnt, self.workload)
        requests = _delta(before, self.peer.counters(self.mnt))
        if requests is not None:
            self.result.requests[mode][measure.key] = requests
        return sample

    def mount_times(self, measure: Measure) -> None:
        for _ in range(self.reps):
            if is_mounted(self.mnt):
                self.peer.unmount(self.mnt)
            drop_caches()
            self._record("cold", measure, Sample(timed(self.peer.mount, self.mnt)))
        self.remount()  # warm-up mount: image and binaries now in the page cache
        for _ in range(self.reps):
            self.peer.unmount(self.mnt)
            self._record("warm", measure, Sample(timed(self.peer.mount, self.mnt)))

    def workload_times(self, measure: Measure) -> None:
        for _ in range(self.reps):
            if measure.profiled:  # cold means cold before the mount: the replay starts with it
                if is_mounted(self.mnt):
                    self.peer.unmount(self.mnt)
                drop_caches()
                took = timed(self.peer.mount, self.mnt, profiled=True, wait_prefetch=measure.wait_prefetch)
                self.result.notes.setdefault("profiled_mount_s", {}).setdefault(measure.key, []).append(took)
            else:
                self.remount()
                drop_caches()
            self._record("cold", measure, self._sample("cold", measure))
        if measure.profiled:
            self.remount()  # warm: the usual mount, caches as the cold runs left them
        self._sample("warm", measure)
        for _ in range(self.reps):
            self._record("warm", measure, self._sample("warm", measure))

    def run(self, only: set[str] | None) -> PeerResult:
        if isinstance(getattr(self.peer, "profile", None), dict):
            self.result.notes["profile"] = self.peer.profile  # type: ignore[attr-defined]
        for measure in MEASURES:
            if only is not None and measure.key not in only:
                continue
            log.info("mount: %s %s", self.peer.name, measure.key)
            try:
                if measure.fn is None:
                    self.mount_times(measure)
                else:
                    self.workload_times(measure)
            except BenchError as exc:
                log.warning("mount: %s %s failed: %s", self.peer.name, measure.key, exc)
                self.result.errors[measure.key] = str(exc)
                for mode in ("cold", "warm"):
                    self.result.samples[mode].pop(measure.key, None)
        return self.result


def measure_peer(
    peer: Peer, corpus: Corpus, work: Path, workload: Workload, reps: int, only: set[str] | None
) -> PeerResult:
    mnt = work / "mnt" / peer.name
    mnt.mkdir(parents=True, exist_ok=True)
    driver = PeerRun(peer, mnt, workload, reps)
    try:
        peer.prepare(corpus, work)
        driver.remount()  # a peer that cannot mount at all is skipped, not a row of errors
        return driver.run(only)
    finally:
        if is_mounted(mnt):
            peer.unmount(mnt)
        umount_all_under(mnt)


def run_mount(
    corpus: Corpus,
    work: Path,
    reps: int,
    cli: CnpsfsCli,
    systems: set[str] | None,
    only_measures: set[str] | None = None,
) -> tuple[list[PeerResult], dict[str, Any]]:
    """Measure every peer on v2; returns per-peer results and run-wide notes (workload, image sizes)."""
    base = work / "mount"
    umount_all_under(base)
    rmtree(base)
    base.mkdir(parents=True)
    workload = pick_workload(corpus.v2)
    all_peers = peers(corpus, base, cli)
    results: list[PeerResult] = []
    try:
        for peer in all_peers:
            if systems is not None and peer.name not in systems and peer.name != "native":
                continue
            reason = peer.unavailable()
            if reason is None:
                try:
                    ensure_packages(peer.packages)
                    results.append(measure_peer(peer, corpus, base, workload, reps, only_measures))
                    continue
                except BenchError as exc:
                    reason = str(exc)
            log.warning("mount: %s skipped: %s", peer.name, reason)
            results.append(PeerResult(peer.name, peer.label, skipped=reason))
    finally:
        umount_all_under(base)
    images = next((p for p in all_peers if isinstance(p, Squashfs)), None)
    notes = {
        "big_files": list(workload.big_files),
        "big_bytes": workload.big_bytes,
        "open_file": workload.open_file,
        "image_bytes": images.images.sizes if images else {},
    }
    rmtree(base)
    return results, notes
