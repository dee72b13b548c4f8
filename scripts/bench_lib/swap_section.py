"""Section ``swap``: how long a live upgrade of a mounted image takes, by size of the change.

The image is synthetic and package-like: 100 FileSets of 200 files each (``/usr/share/pkgN``
and ``/usr/lib/pkgN``, plus one file each in the shared ``/usr/share/doc`` and ``/usr/bin``),
composed in union mode, about 20,000 files. Three images are stored: ``base`` (every FileSet
at version 1), ``one`` (pkg0 at version 2) and ``all`` (every FileSet at version 2). Each
version 2 changes one file of its package and the package's ``/usr/bin`` program.

A sample is one ``cnpsfs upgrade MNT IMAGE --json`` from ``base`` to the target, timed from
the request until the command returns (the daemon has made the new generation current and
sent the kernel invalidations by then), plus the daemon-side ``seconds`` it reports. The
mount is swapped back to ``base`` untimed between samples.

- **warm**: one mount; before every sample a full ``find`` (untimed) loads every directory
  into the daemon and the kernel's caches, so the swap diffs against a fully loaded tree.
- **cold**: a fresh mount before every sample, nothing looked up yet.

The CLI is a Python program: most of its wall time is interpreter start-up. The table
gives ``cnpsfs status MNT --json`` (same start-up and socket round trip, no swap) as the
floor, so the swap's own cost is the difference.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cnpsfs_cli import CnpsfsCli
from .common import BenchError, median, rmtree, run, sh, umount

log = logging.getLogger(__name__)

PACKAGES = 100
FILES_PER_DIR = 100  # in /usr/share/pkgN and again in /usr/lib/pkgN
IMAGE = "bench.example/swap"
CHANGES = (("one", 1), ("all", PACKAGES))
MODES = ("warm", "cold")
MTIME = 1_700_000_000


@dataclass
class SwapResult:
    mode: str
    change: str
    packages: int
    wall: list[float] = field(default_factory=list)  # cnpsfs upgrade, request to return
    daemon: list[float] = field(default_factory=list)  # the daemon's own "seconds"
    changed_dirs: int = 0
    shared_dirs: int = 0
    invalidated: int = 0

    def summary(self) -> dict[str, Any]:
        return {"wall_median": median(self.wall), "daemon_median": median(self.daemon)}


def _write_package(root: Path, n: int, version: int) -> None:
    def put(rel: str, data: bytes, mode: int = 0o644) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
        os.utime(path, (MTIME, MTIME))

    for i in range(FILES_PER_DIR):
        body = f"pkg{n} file {i}\n".encode() * (1 + (i * 37 + n) % 200)
        if i == 0:
            body += f"version {version}\n".encode()
        put(f"usr/share/pkg{n}/data/f{i:03d}", body)
        put(f"usr/lib/pkg{n}/mod{i:03d}.so", body[::-1])
    put(f"usr/share/doc/pkg{n}/copyright", f"pkg{n} copyright\n".encode())
    put(f"usr/bin/pkg{n}", f"#!/bin/sh\necho pkg{n} {version}\n".encode(), 0o755)
    for dirpath, _dirs, _files in os.walk(root):
        os.chmod(dirpath, 0o755)
        os.utime(dirpath, (MTIME, MTIME))


def _manifest(path: Path, version: str, versions: list[int]) -> Path:
    lines = [f'name = "{IMAGE}"', f'version = "{version}"', 'mode = "union"']
    for n, v in enumerate(versions):
        lines += ["[[layers]]", f'fileset = "bench.example/pkg{n}@{v}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def _build(cli: CnpsfsCli, work: Path) -> Path:
    store = work / "swap-store"
    rmtree(store)
    src = work / "swap-src"
    rmtree(src)
    started = time.monotonic()
    for version in (1, 2):
        for n in range(PACKAGES):
            root = src / f"pkg{n}-{version}"
            _write_package(root, n, version)
            run([cli.exe, "--store", store, "import", "dir", root, "--name", f"bench.example/pkg{n}",
                 "--version", str(version)])
    for name, changed in (("base", 0), *CHANGES):
        versions = [2 if n < changed else 1 for n in range(PACKAGES)]
        run([cli.exe, "--store", store, "image", "create", _manifest(src / f"{name}.toml", name, versions)])
    log.info("swap: built %d FileSets and 3 images in %.0f s", 2 * PACKAGES, time.monotonic() - started)
    return store


def _upgrade(cli: CnpsfsCli, mnt: Path, version: str) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    proc = run([cli.exe, "upgrade", mnt, f"{IMAGE}@{version}", "--json"], capture=True, timeout=300)
    return time.perf_counter() - start, json.loads(proc.stdout)


def _status_wall(cli: CnpsfsCli, mnt: Path, reps: int) -> float:
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        run([cli.exe, "status", mnt, "--json"], capture=True, timeout=60)
        samples.append(time.perf_counter() - start)
    return median(samples)


def run_swap(work: Path, reps: int, cli: CnpsfsCli) -> tuple[list[SwapResult], dict[str, Any]]:
    missing = cli.mount_unavailable() or cli._missing("upgrade")
    if missing:
        raise BenchError(f"swap section: {missing}")
    store = _build(cli, work)
    mnt = work / "swap-mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    results: list[SwapResult] = []
    info: dict[str, Any] = {"packages": PACKAGES}

    def mount() -> None:
        run([cli.exe, "--store", store, "mount", f"{IMAGE}@base", mnt], timeout=300)

    def unmount() -> None:
        run([cli.exe, "umount", mnt], timeout=120, check=False)
        umount(mnt)

    try:
        mount()
        count = sh(f"find {mnt} -type f | wc -l", capture=True).stdout.strip()
        info["files"] = int(count)
        info["status_wall"] = _status_wall(cli, mnt, max(reps, 5))
        for mode in MODES:
            for change, packages in CHANGES:
                result = SwapResult(mode, change, packages)
                for _ in range(reps):
                    if mode == "cold":
                        unmount()
                        mount()
                    else:
                        sh(f"find {mnt} > /dev/null")
                    wall, reply = _upgrade(cli, mnt, change)
                    result.wall.append(wall)
                    result.daemon.append(reply["seconds"])
                    result.changed_dirs, result.shared_dirs = reply["changed_dirs"], reply["shared_dirs"]
                    result.invalidated = reply["invalidated_entries"] + reply["invalidated_dirs"]
                    _upgrade(cli, mnt, "base")
                log.info("swap %s %s: median %.1f ms (daemon %.1f ms)", mode, change,
                         median(result.wall) * 1000, median(result.daemon) * 1000)
                results.append(result)
    finally:
        unmount()
    return results, info


def swap_table(results: list[SwapResult], info: dict[str, Any]) -> str:
    rows = ["| state | change | `cnpsfs upgrade` (wall) | daemon `seconds` | changed / shared dirs | invalidations |",
            "|---|---|---|---|---|---|"]
    for r in results:
        what = "1 FileSet" if r.packages == 1 else f"{r.packages} FileSets"
        rows.append(f"| {r.mode} | {what} | {median(r.wall) * 1000:.0f} ms | {median(r.daemon) * 1000:.1f} ms | "
                    f"{r.changed_dirs} / {r.shared_dirs} | {r.invalidated} |")
    rows.append(f"\n_{info['files']} files in {info['packages']} FileSets; `cnpsfs status --json` alone "
                f"(CLI start-up + socket round trip, no swap): {info['status_wall'] * 1000:.0f} ms_")
    return "\n".join(rows)
