"""Section ``scale``: does mounting (and a first lookup) cost the same for 1,000 and 1,000,000 files?

Issue 3 asks for a mount under 0.3 s at any image size, the same for a 1,000-file and a
1,000,000-file image. Two synthetic trees, built once and cached beside the Debian corpus:

- ``scale-1k``: one leaf directory of 1,000 files,
- ``scale-1m``: 1,000 leaf directories of 1,000 files each,

both as ``usr/share/scale/aI/bJ/cK/fNNNN`` (10 × 10 × 10 leaf directories for 1m), so the
probed paths have the same depth and the probed directory the same 1,000 entries in both.
Files are small (0 to about 600 bytes: a text line repeated, then a slice of a random pool)
and different from each other.

Each tree is imported into a fresh cnpsfs store in every run (``cnpsfs import dir``, timed
from dropped caches, with its peak RSS, store size by block usage). For comparison it is
packed with ``mksquashfs -comp zstd`` and mounted with ``squashfuse`` and with the kernel's
squashfs (loop device); the squashfs images are cached beside the trees (3 minutes for 1m
here), with the time and peak RSS their build took. ``native`` is the tree through a
read-only bind mount.

A cycle is: unmount, (cold: drop caches), time the mount command until the mount point
shows in mountinfo (``cnpsfs mount`` returns once the daemon answers), then time one probe
in the harness process:

- **stat**: ``os.stat`` of the deepest file (7 path components, every one a first lookup),
- **ls -l**: ``os.scandir`` of its 1,000-entry directory and an ``lstat`` of every entry.

Each probe gets its own fresh mount, so neither benefits from the other's lookups. The
two trees alternate inside every repetition, so drift from other work on the machine hits
both alike. **warm**: one untimed mount and both probes first; then the store, image or
tree is in the page cache, but every mount is still new (the daemon and the kernel's
dentries start empty). Medians over max(--reps, 5) repetitions (1 with --quick); both
cycles of a repetition time a mount, so the mount medians have twice as many samples.

Then one **walk** per system and tree (heavy at 1m, so once, whatever --reps says): a fresh
mount, caches dropped, ``find MNT | wc -l`` timed (the count is checked), then again warm;
for cnpsfs the daemon's RSS after mounting, after the walk and after ``echo 2 >
/proc/sys/vm/drop_caches`` (the kernel then forgets its inodes and the daemon lets go of
what it composed for them), with the inode table's size from ``cnpsfs status --json``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shlex
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .cnpsfs_cli import CnpsfsCli
from .common import (
    SQUASHFUSE_PACKAGES,
    BenchError,
    drop_caches,
    du_bytes,
    ensure_packages,
    fuse_unavailable,
    is_mounted,
    last_line,
    median,
    rmtree,
    run,
    umount,
    umount_all_under,
)

log = logging.getLogger(__name__)

FILES_PER_DIR = 1000
PREFIX = "usr/share/scale"
#: Tree name -> number of 1,000-file leaf directories.
TREES: dict[str, int] = {"1k": 1, "1m": 1000}
POOL_BYTES = 1 << 20
MAX_RANDOM = 320  # bytes of random pool per file, at most
MOUNT_TIMEOUT = 60.0
PROBES = ("stat", "ls")
WALKS = ("find cold", "find warm")
FORGET_WAIT = 3.0  # seconds for the kernel's FORGETs to reach the daemon after drop_caches
MODES = ("cold", "warm")
INFO_VERSION = 1  # bump when the generator changes: cached trees with another version are rebuilt


def leaf_dir(index: int) -> str:
    return f"{PREFIX}/a{index // 100}/b{index // 10 % 10}/c{index % 10}"


@dataclass
class ScaleTree:
    name: str
    path: Path
    files: int
    dirs: int
    apparent_bytes: int
    block_bytes: int
    build_seconds: float
    built_now: bool = False

    @property
    def probe_dir(self) -> str:
        """The last leaf directory: every component of its path is a different name in 1k and 1m."""
        return leaf_dir(TREES[self.name] - 1)

    @property
    def probe_file(self) -> str:
        return f"{self.probe_dir}/f{FILES_PER_DIR - 1:04d}"


# ---------------------------------------------------------------- the trees


def _write_tree(root: Path, leaves: int) -> tuple[int, int]:
    """Write ``leaves`` × 1,000 small files; return (files, apparent bytes).

    Plain os.open/os.write/os.close relative to a directory descriptor, no fsync: a million
    files take well under a minute this way.
    """
    pool = random.Random(0).randbytes(POOL_BYTES)
    files = total = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for d in range(leaves):
        rel = leaf_dir(d)
        path = root / rel
        path.mkdir(parents=True)
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(FILES_PER_DIR):
                h = ((d * FILES_PER_DIR + i + 1) * 2654435761) & 0xFFFFFFFF  # Knuth's multiplicative hash
                name = f"f{i:04d}"
                line = f"{rel}/{name} {h:08x}\n".encode()
                start = (h >> 3) % (POOL_BYTES - MAX_RANDOM)
                data = line * (h % 8) + pool[start : start + (h >> 7) % MAX_RANDOM]
                fd = os.open(name, flags, 0o644, dir_fd=dfd)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                files += 1
                total += len(data)
        finally:
            os.close(dfd)
    return files, total


def ensure_tree(cache: Path, name: str) -> ScaleTree:
    """The cached tree ``cache/scale-NAME``, built in ``NAME.tmp`` and renamed when complete."""
    dest = cache / f"scale-{name}"
    info_file = cache / f"scale-{name}.json"
    try:
        info = json.loads(info_file.read_text())
        if dest.is_dir() and info.get("version") == INFO_VERSION:
            return ScaleTree(name, dest, info["files"], info["dirs"], info["apparent_bytes"],
                             info["block_bytes"], info["build_seconds"])
    except (OSError, ValueError, KeyError):
        pass
    log.info("scale: building %s (%d × %d files)", dest, TREES[name], FILES_PER_DIR)
    tmp = cache / f"scale-{name}.tmp"
    rmtree(tmp)
    rmtree(dest)
    for derived in (cache / f"scale-{name}.squashfs", cache / f"scale-{name}.squashfs.json"):
        derived.unlink(missing_ok=True)
    started = time.monotonic()
    files, _apparent = _write_tree(tmp, TREES[name])
    seconds = time.monotonic() - started
    dirs = sum(1 for _ in os.walk(tmp))
    apparent, blocks = du_bytes([tmp])
    tmp.rename(dest)
    info = {"version": INFO_VERSION, "files": files, "dirs": dirs, "apparent_bytes": apparent,
            "block_bytes": blocks, "build_seconds": round(seconds, 1)}
    info_file.write_text(json.dumps(info) + "\n")
    log.info("scale: built %s: %d files, %d dirs, %.0f MB in %.0f s", dest, files, dirs, apparent / 1e6, seconds)
    return ScaleTree(name, dest, files, dirs, apparent, blocks, round(seconds, 1), built_now=True)


# ---------------------------------------------------------------- systems


class System(ABC):
    """One way of serving a tree at a mount point; ``prepare`` builds per-tree state, untimed by the caller."""

    name: str
    label: str
    packages: ClassVar[dict[str, str]] = {}

    def unavailable(self) -> str | None:
        return None

    def prepare(self, tree: ScaleTree, work: Path) -> dict[str, Any]:
        """Build what the mount of ``tree`` needs; return facts worth reporting (times, sizes)."""
        return {}

    @abstractmethod
    def _mount(self, tree: ScaleTree, mnt: Path) -> None: ...

    def mount(self, tree: ScaleTree, mnt: Path) -> None:
        self._mount(tree, mnt)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(mnt):
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: {mnt} not mounted {MOUNT_TIMEOUT:.0f}s after mount returned")
            time.sleep(0.002)

    def unmount(self, mnt: Path) -> None:
        umount(mnt)

    def counters(self, mnt: Path) -> dict[str, int] | None:
        return None

    def memory(self, mnt: Path) -> dict[str, Any] | None:
        """The serving process's RSS and what it reports keeping (cnpsfs only)."""
        return None



def _peak_of(argv: list[str | os.PathLike[str]]) -> tuple[str, float, float, int]:
    """Run *argv* from dropped caches: (stdout, wall s, CPU s, peak RSS bytes) of that process
    alone (os.wait4: RUSAGE_CHILDREN would give the largest of every child so far)."""
    drop_caches()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen([os.fspath(a) for a in argv], stdout=out, stderr=err)
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        text, problem = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        last = problem.strip().splitlines()[-1:] or ["(no message)"]
        raise BenchError(f"{os.fspath(argv[0])} exited {proc.returncode}: {last[0]}")
    return text, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


class Native(System):
    name, label = "native", "native dir (ro bind)"

    def _mount(self, tree: ScaleTree, mnt: Path) -> None:
        run(["mount", "--bind", "-o", "ro", tree.path, mnt])


class Cnpsfs(System):
    name, label = "cnpsfs", "cnpsfs (kernel-cache)"
    packages: ClassVar[dict[str, str]] = {"fusermount3": "fuse3"}

    def __init__(self, cli: CnpsfsCli) -> None:
        self.cli = cli
        self.stores: dict[str, tuple[Path, str]] = {}

    def unavailable(self) -> str | None:
        return fuse_unavailable() or self.cli.mount_unavailable()

    def prepare(self, tree: ScaleTree, work: Path) -> dict[str, Any]:
        store = work / f"store-{tree.name}"
        rmtree(store)
        log.info("scale: cnpsfs import of %s", tree.name)
        out, seconds, cpu, peak = _peak_of(self.cli.import_argv(store, tree.path, tree.name))
        ref = last_line(out)
        if ref == "(no message)":
            raise BenchError("cnpsfs import printed no FileSet reference")
        self.stores[tree.name] = (store, ref)
        apparent, blocks = du_bytes([store])
        log.info("scale: cnpsfs import of %s: %.1f s (CPU %.1f s, peak RSS %.0f MB), %.1f MB", tree.name, seconds,
                 cpu, peak / 1e6, blocks / 1e6)
        return {"build_seconds": seconds, "cpu_seconds": cpu, "peak_rss": peak, "apparent_bytes": apparent,
                "block_bytes": blocks}

    def _mount(self, tree: ScaleTree, mnt: Path) -> None:
        store, ref = self.stores[tree.name]
        self.cli.mount(store, ref, mnt)

    def unmount(self, mnt: Path) -> None:
        self.cli.detach(mnt)

    def counters(self, mnt: Path) -> dict[str, int] | None:
        return self.cli.counters(mnt)

    def memory(self, mnt: Path) -> dict[str, Any] | None:
        status = self.cli.status(mnt)
        if status is None or not isinstance(status.get("pid"), int):
            return None
        try:
            with open(f"/proc/{status['pid']}/status") as f:
                rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            return None
        return {"rss": rss, "inodes": status.get("inodes"), "inode_table": status.get("inode_table")}


class Squashfuse(System):
    name, label = "squashfuse", "squashfuse (zstd)"
    packages: ClassVar[dict[str, str]] = SQUASHFUSE_PACKAGES

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.images: dict[str, Path] = {}

    def unavailable(self) -> str | None:
        return fuse_unavailable()

    def prepare(self, tree: ScaleTree, work: Path) -> dict[str, Any]:
        """The cached image of ``tree`` (ensure_tree deletes it when it rebuilds the tree), built if missing."""
        img = self.cache / f"scale-{tree.name}.squashfs"
        info_file = img.with_name(img.name + ".json")
        self.images[tree.name] = img
        try:
            if img.is_file():
                return {**json.loads(info_file.read_text()), "cached": True}
        except (OSError, ValueError):
            pass
        tmp = img.with_name(img.name + ".tmp")
        tmp.unlink(missing_ok=True)
        log.info("scale: mksquashfs of %s", tree.name)
        _out, seconds, cpu, peak = _peak_of(["mksquashfs", tree.path, tmp, "-comp", "zstd", "-noappend",
                                             "-no-progress"])
        size = tmp.stat().st_size
        info = {"build_seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "peak_rss": peak,
                "apparent_bytes": size, "block_bytes": size}
        info_file.write_text(json.dumps(info) + "\n")
        tmp.rename(img)
        log.info("scale: mksquashfs of %s: %.1f s (CPU %.1f s, peak RSS %.0f MB), %.1f MB", tree.name, seconds, cpu,
                 peak / 1e6, size / 1e6)
        return {**info, "cached": False}

    def _mount(self, tree: ScaleTree, mnt: Path) -> None:
        run(["squashfuse", self.images[tree.name], mnt])


class KernelSquashfs(System):
    """The same cached images as squashfuse, through the kernel's squashfs on a loop device."""

    name, label = "squashfs", "kernel squashfs (zstd, loop)"
    packages: ClassVar[dict[str, str]] = {"mksquashfs": "squashfs-tools"}

    def __init__(self, images: Squashfuse) -> None:
        self.images = images

    def unavailable(self) -> str | None:
        if not Path("/dev/loop-control").exists():
            return "no loop devices (/dev/loop-control missing)"
        if "squashfs" not in Path("/proc/filesystems").read_text() and not Path("/sys/module/squashfs").exists():
            return "the kernel has no squashfs"
        return None

    def prepare(self, tree: ScaleTree, work: Path) -> dict[str, Any]:
        if tree.name not in self.images.images:
            self.images.prepare(tree, work)
        return {}

    def _mount(self, tree: ScaleTree, mnt: Path) -> None:
        run(["mount", "-t", "squashfs", "-o", "loop,ro", self.images.images[tree.name], mnt])


# ---------------------------------------------------------------- probes


def probe_stat(mnt: Path, tree: ScaleTree) -> float:
    path = mnt / tree.probe_file
    start = time.perf_counter()
    os.stat(path)
    return time.perf_counter() - start


def probe_ls(mnt: Path, tree: ScaleTree) -> float:
    """What ``ls -l`` asks of the filesystem: one listing and an lstat per entry."""
    path = mnt / tree.probe_dir
    start = time.perf_counter()
    count = 0
    with os.scandir(path) as entries:
        for entry in entries:
            entry.stat(follow_symlinks=False)
            count += 1
    seconds = time.perf_counter() - start
    if count != FILES_PER_DIR:
        raise BenchError(f"{path} has {count} entries, expected {FILES_PER_DIR}")
    return seconds


PROBE_FNS: dict[str, Callable[[Path, ScaleTree], float]] = {"stat": probe_stat, "ls": probe_ls}


# ---------------------------------------------------------------- driver


@dataclass
class ScaleResult:
    """Samples per tree, mode and measure ("mount", "stat", "ls"); ``built`` per tree."""

    name: str
    label: str
    skipped: str | None = None
    error: str | None = None
    built: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    requests: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # "tree/mode/probe" -> counts
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)  # tree -> moment -> rss, inode table

    def add(self, tree: str, mode: str, key: str, value: float) -> None:
        self.samples.setdefault(tree, {}).setdefault(mode, {}).setdefault(key, []).append(value)

    def med(self, tree: str, mode: str, key: str) -> float | None:
        values = self.samples.get(tree, {}).get(mode, {}).get(key)
        return median(values) if values else None

    def summary(self) -> dict[str, Any]:
        return {tree: {mode: {k: median(v) for k, v in by_key.items()} for mode, by_key in modes.items()}
                for tree, modes in self.samples.items()}


def _delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    return {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}


def _measure(system: System, trees: list[ScaleTree], mnt: Path, reps: int, result: ScaleResult) -> None:
    def cycle(tree: ScaleTree, mode: str, probe: str, record: bool) -> None:
        if is_mounted(mnt):
            system.unmount(mnt)
        if mode == "cold":
            drop_caches()
        start = time.perf_counter()
        system.mount(tree, mnt)
        mount_seconds = time.perf_counter() - start
        before = system.counters(mnt) if record else None
        probe_seconds = PROBE_FNS[probe](mnt, tree)
        if not record:
            return
        result.add(tree.name, mode, "mount", mount_seconds)
        result.add(tree.name, mode, probe, probe_seconds)
        requests = _delta(before, system.counters(mnt))
        if requests is not None:
            result.requests[f"{tree.name}/{mode}/{probe}"] = requests

    for mode in MODES:
        if mode == "warm":
            for tree in trees:
                for probe in PROBES:
                    cycle(tree, mode, probe, record=False)
        for _ in range(reps):
            for tree in trees:
                for probe in PROBES:
                    cycle(tree, mode, probe, record=True)
        for tree in trees:
            log.info("scale: %s %s %s: mount %.0f ms, stat %.2f ms, ls %.1f ms", system.name, tree.name, mode,
                     (result.med(tree.name, mode, "mount") or 0) * 1000,
                     (result.med(tree.name, mode, "stat") or 0) * 1000,
                     (result.med(tree.name, mode, "ls") or 0) * 1000)


def _find(mnt: Path, expected: int) -> float:
    """``find MNT | wc -l``, timed; the count must be the tree's."""
    start = time.perf_counter()
    proc = subprocess.run(f"find {shlex.quote(os.fspath(mnt))} | wc -l", shell=True, capture_output=True, text=True,
                          timeout=1800, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not proc.stdout.strip().isdigit():
        raise BenchError(f"find {mnt} failed: {proc.stderr.strip()[-200:]}")
    if int(proc.stdout) != expected:
        raise BenchError(f"find {mnt} counted {int(proc.stdout)} entries, expected {expected}")
    return seconds


def _walk(system: System, trees: list[ScaleTree], mnt: Path, result: ScaleResult) -> None:
    """One cold and one warm ``find | wc -l`` per tree; the daemon's memory around them (cnpsfs)."""
    for tree in trees:
        if is_mounted(mnt):
            system.unmount(mnt)
        drop_caches()
        system.mount(tree, mnt)
        memory: dict[str, Any] = {}
        if (m := system.memory(mnt)) is not None:
            memory["mounted"] = m
        drop_caches()
        before = system.counters(mnt)
        result.add(tree.name, "walk", "find cold", _find(mnt, tree.files + tree.dirs))
        if (requests := _delta(before, system.counters(mnt))) is not None:
            result.requests[f"{tree.name}/cold/find"] = requests
        if (m := system.memory(mnt)) is not None:
            memory["walked"] = m
        result.add(tree.name, "walk", "find warm", _find(mnt, tree.files + tree.dirs))
        if memory:
            Path("/proc/sys/vm/drop_caches").write_text("2\n")  # dentries and inodes: the kernel FORGETs
            time.sleep(FORGET_WAIT)
            if (m := system.memory(mnt)) is not None:
                memory["dropped"] = m
            result.memory[tree.name] = memory
        log.info("scale: %s %s: find cold %.2f s, warm %.2f s%s", system.name, tree.name,
                 result.med(tree.name, "walk", "find cold") or 0, result.med(tree.name, "walk", "find warm") or 0,
                 "".join(f", RSS {k} {v['rss'] / 1e6:.0f} MB" for k, v in memory.items()))


MOUNT_IMPORTS = "import cnpsfs.cli, cnpsfs.fs.daemon, cnpsfs.store.maintenance, cnpsfs.image.manifest, cnpsfs.fs.mount"


def _import_floor(cli: CnpsfsCli, reps: int) -> dict[str, float] | None:
    """Python start-up plus the modules ``cnpsfs mount`` imports, cold and warm: what no image size changes."""
    python = cli.exe.parent / "python"
    if not os.access(python, os.X_OK):
        return None
    floor = {}
    for mode in MODES:
        samples = []
        for _ in range(reps):
            if mode == "cold":
                drop_caches()
            start = time.perf_counter()
            run([python, "-c", MOUNT_IMPORTS], timeout=60)
            samples.append(time.perf_counter() - start)
        floor[mode] = median(samples)
    return floor


def run_scale(cache: Path, work: Path, reps: int, cli: CnpsfsCli,
              systems: set[str] | None) -> tuple[list[ScaleResult], dict[str, Any]]:
    cache.mkdir(parents=True, exist_ok=True)
    trees = [ensure_tree(cache, name) for name in TREES]
    base = work / "scale"
    umount_all_under(base)
    rmtree(base)
    base.mkdir(parents=True)
    info: dict[str, Any] = {
        "trees": {t.name: {**vars(t), "path": str(t.path), "probe_file": t.probe_file, "probe_dir": t.probe_dir}
                  for t in trees},
        "import_floor": _import_floor(cli, reps),
    }
    results: list[ScaleResult] = []
    try:
        squashfuse = Squashfuse(cache)
        for system in (Native(), Cnpsfs(cli), squashfuse, KernelSquashfs(squashfuse)):
            if systems is not None and system.name not in systems and system.name != "native":
                continue
            result = ScaleResult(system.name, system.label)
            results.append(result)
            reason = system.unavailable()
            if reason is not None:
                log.warning("scale: %s skipped: %s", system.name, reason)
                result.skipped = reason
                continue
            mnt = base / "mnt" / system.name
            mnt.mkdir(parents=True)
            try:
                ensure_packages(system.packages)
                for tree in trees:
                    if built := system.prepare(tree, base):
                        result.built[tree.name] = built
                _measure(system, trees, mnt, reps, result)
                _walk(system, trees, mnt, result)
            except BenchError as exc:
                log.warning("scale: %s failed: %s", system.name, exc)
                result.error = str(exc)
            finally:
                if is_mounted(mnt):
                    system.unmount(mnt)
                umount_all_under(mnt)
    finally:
        umount_all_under(base)
    rmtree(base)
    return results, info


# ---------------------------------------------------------------- report


def _ms(secs: float | None) -> str:
    if secs is None:
        return ""
    return f"{secs * 1000:.2f} ms" if secs < 0.01 else f"{secs * 1000:.0f} ms"


def _pair(result: ScaleResult, mode: str, key: str) -> str:
    """'1k → 1m (ratio)' for one measure."""
    small, large = result.med("1k", mode, key), result.med("1m", mode, key)
    if small is None or large is None:
        return ""
    return f"{_ms(small)} → {_ms(large)} ({large / small:.2f}×)"


def scale_table(results: list[ScaleResult], info: dict[str, Any]) -> str:
    trees = info["trees"]
    rows = [
        "| tree | files | dirs | apparent / in blocks | built in |",
        "|---|---|---|---|---|",
    ]
    for name, t in trees.items():
        rows.append(f"| scale-{name} | {t['files']:,} | {t['dirs']:,} | {t['apparent_bytes'] / 1e6:.1f} MB / "
                    f"{t['block_bytes'] / 1e6:.1f} MB | {t['build_seconds']:.1f} s |")
    rows += ["", "| system | 1k: import or image build (CPU) / size | 1m: import or image build (CPU) / size |",
             "|---|---|---|"]
    for r in results:
        if r.built:
            cells = [f"{b['build_seconds']:.2f} s ({b['cpu_seconds']:.1f} s) / {b['block_bytes'] / 1e6:.1f} MB"
                     + (" (cached image)" if b.get("cached") else "") if b else ""
                     for b in (r.built.get(n) for n in trees)]
            rows.append(f"| {r.label} | {' | '.join(cells)} |")
    rows += [
        "",
        "| system | mode | mount: 1k → 1m | first stat of the deep file | ls -l of a 1,000-entry dir |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if r.skipped or (r.error and not r.samples):
            rows.append(f"| {r.label} | | n/a ({r.skipped or r.error}) | | |")
            continue
        for mode in MODES:
            rows.append(f"| {r.label} | {mode} | {_pair(r, mode, 'mount')} | {_pair(r, mode, 'stat')} | "
                        f"{_pair(r, mode, 'ls')} |")
        if r.error:
            rows.append(f"| {r.label} | | error: {r.error} | | |")
    requests = [(r.label, key, counts) for r in results for key, counts in r.requests.items()]
    if requests:
        rows += ["", "| system | tree / mode / probe | FUSE requests (last sample) |", "|---|---|---|"]
        for label, key, counts in requests:
            top = ", ".join(f"{op} {n}" for op, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            rows.append(f"| {label} | {key} | {sum(counts.values())}: {top} |")
    walks = [r for r in results if any("walk" in modes for modes in r.samples.values())]
    if walks:
        rows += ["", "| system | `find \\| wc -l` cold: 1k → 1m | 1m: ratio to native | warm: 1k → 1m |",
                 "|---|---|---|---|"]
        native = next((r for r in walks if r.name == "native"), None)
        base = native.med("1m", "walk", "find cold") if native is not None else None
        for r in walks:
            cold = r.med("1m", "walk", "find cold")
            ratio = f"{cold / base:.2f}×" if cold is not None and base else ""
            rows.append(f"| {r.label} | {_pair(r, 'walk', 'find cold')} | {ratio} | {_pair(r, 'walk', 'find warm')} |")
    memory = [(r, tree, m) for r in results for tree, m in r.memory.items()]
    if memory:
        rows += ["", "| system | tree | RSS mounted | after the cold walk | after `drop_caches` (2) | "
                 "entries composed: walked → dropped |", "|---|---|---|---|---|---|"]
        for r, tree, m in memory:
            def rss(moment: str, m: dict[str, Any] = m) -> str:
                return f"{m[moment]['rss'] / 1e6:.0f} MB" if moment in m else ""

            def inodes(moment: str, m: dict[str, Any] = m) -> str:
                return f"{m[moment]['inodes']:,}" if isinstance(m.get(moment, {}).get("inodes"), int) else "?"
            rows.append(f"| {r.label} | {tree} | {rss('mounted')} | {rss('walked')} | {rss('dropped')} | "
                        f"{inodes('walked')} → {inodes('dropped')} |")
    peaks = [(r.label, n, b) for r in results for n, b in r.built.items() if b.get("peak_rss")]
    if peaks:
        rows += ["", "| system | tree | import or image build: wall (CPU) | peak RSS |", "|---|---|---|---|"]
        for label, n, b in peaks:
            rows.append(f"| {label} | {n} | {b['build_seconds']:.1f} s ({b['cpu_seconds']:.1f} s) | "
                        f"{b['peak_rss'] / 1e6:.0f} MB |")
    if floor := info.get("import_floor"):
        rows.append(f"\n_Python start-up and the imports of `cnpsfs mount` (`python -c '{MOUNT_IMPORTS}'`): "
                    f"{_ms(floor['cold'])} cold, {_ms(floor['warm'])} warm_")
    return "\n".join(rows)
