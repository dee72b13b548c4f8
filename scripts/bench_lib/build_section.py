"""Section ``build``: images of about 100 Debian packages, built by ``cnpsfs build`` and by
``mmdebstrap`` + ``tar -czf`` (issue 4's benchmark).

The recipe is python3, curl and ca-certificates plus the Essential set (and usr-is-merged):
104 packages in bookworm. Both systems get the same package set from the same apt sources
(the host's), with merged /usr, no Recommends, and .debs and package lists already cached,
so neither measures the network:

- cnpsfs: ``cnpsfs --store STORE build RECIPE --cache CACHE --json``; CACHE holds the apt
  lists (fresh for 24 h) and the .debs.
- mmdebstrap: ``--mode=root --variant=essential --include=...`` with the merged-usr hook;
  the .debs are copied in from a cache directory by a ``sync-in`` setup hook and the lists
  from a saved copy (``--skip=update``), as mmdebstrap's manual suggests for caching. Then
  ``tar -czf IMAGE.tar.gz -C ROOTFS .``: the image a Dockerfile-style pipeline would ship.

Measures (every timed build starts with dropped caches, and records the 1-minute load
average just before it):

1. **cold full build**: the base recipe into an empty store (cnpsfs) or an empty directory
   followed by ``tar -czf`` (mmdebstrap), ``--reps`` times each, medians.
2. **one package changed**: the base recipe with one package pinned to another version the
   sources offer (libssl3, bookworm against bookworm-security), built into the store that
   holds the base image (``--reps`` times). mmdebstrap has nothing to reuse: it is one more
   full build (once).
3. **5 images sharing most packages**: the base recipe, and the base plus one of jq, less,
   nano or file; all into one cnpsfs store, against five ``.tar.gz`` files. Sizes are block
   usage (``du --block-size=1``). The store after the first full build gives the size of one
   image beside one ``.tar.gz``.

The two systems alternate (cnpsfs rep 1, mmdebstrap rep 1, cnpsfs rep 2, ...; then the
five images the same way), so that on a shared machine both see the same load.

An untimed priming pass fills both caches first (two builds each: every variant's packages,
and the pinned version). The harness checks that both systems install the same packages at
the same versions (the base image, and the pinned version in the changed one) and that no
.deb or package list is left in the mmdebstrap trees; any difference is printed under the
table. ``--systems cnpsfs`` or ``--systems mmdebstrap`` runs one side only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cnpsfs_cli import CnpsfsCli
from .common import BenchError, drop_caches, du_bytes, ensure_packages, median, rmtree, run, umount_all_under

log = logging.getLogger(__name__)

BASE = ("python3", "curl", "ca-certificates")
EXTRAS = ((), ("jq",), ("less",), ("nano",), ("file",))
#: Packages to change, in order of preference: the first with a second version is used.
CHANGE_CANDIDATES = ("libssl3", "libpython3.11-stdlib", "tzdata")
IMAGE = "bench.example/app"
MERGED_USR_HOOK = "/usr/share/mmdebstrap/hooks/merged-usr"


@dataclass
class BuildResults:
    packages: int = 0
    change: dict[str, str] = field(default_factory=dict)
    cnpsfs_full: list[dict[str, Any]] = field(default_factory=list)  # wall + build timings per rep
    cnpsfs_full_bytes: list[int] = field(default_factory=list)  # the store after one full build
    cnpsfs_changed: list[dict[str, Any]] = field(default_factory=list)
    cnpsfs_changed_added_bytes: list[int] = field(default_factory=list)
    cnpsfs_five_seconds: list[float] = field(default_factory=list)  # one per image, in order
    cnpsfs_five_bytes: int = 0
    mm_full_seconds: list[float] = field(default_factory=list)  # the base image, mmdebstrap alone, per rep
    mm_full_tar_seconds: list[float] = field(default_factory=list)
    mm_five_seconds: list[float] = field(default_factory=list)  # mmdebstrap alone, per image
    mm_five_tar_seconds: list[float] = field(default_factory=list)
    mm_five_tar_bytes: list[int] = field(default_factory=list)
    mm_five_rootfs_bytes: list[int] = field(default_factory=list)  # apparent size of each tree
    mm_packages: int = 0
    cnpsfs_versions: dict[str, str] = field(default_factory=dict)  # the base image, package -> version
    notes: list[str] = field(default_factory=list)  # consistency problems between the two systems
    mm_changed_seconds: float = 0.0
    mm_changed_tar_seconds: float = 0.0
    mm_changed_tar_bytes: int = 0
    mm_loadavg: list[float] = field(default_factory=list)  # before each timed mmdebstrap build
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.cnpsfs_full:
            out["cnpsfs_full_seconds"] = median([r["wall"] for r in self.cnpsfs_full])
            out["cnpsfs_changed_seconds"] = median([r["wall"] for r in self.cnpsfs_changed])
            out["cnpsfs_five_bytes"] = self.cnpsfs_five_bytes
            out["cnpsfs_one_bytes"] = median(self.cnpsfs_full_bytes)
        if self.mm_full_seconds:
            out["mm_full_seconds"] = median([a + b for a, b in zip(self.mm_full_seconds,
                                                                  self.mm_full_tar_seconds, strict=True)])
        if self.mm_five_seconds:
            out["mm_five_bytes"] = sum(self.mm_five_tar_bytes)
            out["mm_one_bytes"] = self.mm_five_tar_bytes[0]
        return out


def host_codename() -> str:
    text = Path("/etc/os-release").read_text()
    m = re.search(r"^VERSION_CODENAME=\"?([^\"\n]+)", text, re.M)
    if m is None:
        raise BenchError("no VERSION_CODENAME in /etc/os-release")
    return m.group(1)


def host_source_files() -> list[Path]:
    """The host's apt sources, exactly the files ``cnpsfs build`` copies by default."""
    files = [Path("/etc/apt/sources.list")] if Path("/etc/apt/sources.list").is_file() else []
    parts = Path("/etc/apt/sources.list.d")
    files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources")) if parts.is_dir() else []
    files = [f for f in files if any(ln.strip() and not ln.lstrip().startswith("#")
                                     for ln in f.read_text().splitlines())]
    if not files:
        raise BenchError("the host has no apt sources")
    return files


def _recipe(path: Path, version: str, packages: list[str]) -> Path:
    listed = ", ".join(json.dumps(p) for p in packages)
    path.write_text(f'name = "{IMAGE}"\nversion = "{version}"\n[debian]\npackages = [{listed}]\n')
    return path


def _other_version(current: dict[str, str]) -> tuple[str, str, str]:
    """(package, version in the base image, another version the host's apt offers)."""
    for name in CHANGE_CANDIDATES:
        if name not in current:
            continue
        out = run(["apt-cache", "madison", name], capture=True).stdout
        offered = [f[1].strip() for f in (ln.split("|") for ln in out.splitlines()) if len(f) >= 3]
        others = [v for v in offered if v != current[name]]
        if others:
            return name, current[name], others[0]
    raise BenchError(f"build: none of {', '.join(CHANGE_CANDIDATES)} has a second version in the apt sources")


class Cnpsfs:
    def __init__(self, cli: CnpsfsCli, cache: Path) -> None:
        self.cli = cli
        self.cache = cache

    def build(self, store: Path, recipe: Path) -> dict[str, Any]:
        """One timed build (caches dropped first); the CLI's JSON plus the wall time and
        the 1-minute load average just before it."""
        drop_caches()
        load = loadavg()
        started = time.perf_counter()
        reply = self.cli.build(store, recipe, self.cache)
        reply["wall"] = time.perf_counter() - started
        reply["loadavg"] = load
        return reply


class Mmdebstrap:
    def __init__(self, work: Path, cache: Path) -> None:
        self.work = work
        self.debs = cache / "debs"
        self.lists = cache / "lists"
        self.suite = host_codename()
        self.sources = host_source_files()
        self.loads: list[float] = []

    def _argv(self, packages: list[str], target: Path, *, prime: bool) -> list[str | os.PathLike[str]]:
        argv: list[str | os.PathLike[str]] = [
            "mmdebstrap", "--mode=root", "--variant=essential", "--include=" + ",".join(packages),
            "--aptopt=Apt::Install-Recommends \"false\"", f"--hook-dir={MERGED_USR_HOOK}",
            "--skip=essential/unlink",
            '--setup-hook=mkdir -p "$1"/var/cache/apt/archives/ "$1"/var/lib/apt/lists/',
            f"--setup-hook=sync-in {self.debs} /var/cache/apt/archives/",
        ]
        if prime:
            argv += [f"--customize-hook=sync-out /var/cache/apt/archives {self.debs}",
                     f"--customize-hook=sync-out /var/lib/apt/lists {self.lists}"]
        else:
            argv += ["--skip=update", f"--setup-hook=sync-in {self.lists} /var/lib/apt/lists/"]
        return [*argv, self.suite, target, *self.sources]

    def build(self, packages: list[str], target: Path, *, prime: bool = False) -> float:
        rmtree(target)
        self.debs.mkdir(parents=True, exist_ok=True)
        self.lists.mkdir(parents=True, exist_ok=True)
        if not prime:
            drop_caches()
            self.loads.append(loadavg())
        started = time.perf_counter()
        try:
            run(self._argv(packages, target, prime=prime), timeout=3600)
        finally:
            umount_all_under(target)
        return time.perf_counter() - started

    @staticmethod
    def versions(root: Path) -> dict[str, str]:
        """Installed packages ("ii") of the tree: package -> version."""
        out = run(["chroot", root, "dpkg-query", "-W", "-f", "${db:Status-Abbrev}\t${Package}\t${Version}\n"],
                  capture=True).stdout
        rows = (line.split("\t") for line in out.splitlines())
        return {row[1]: row[2] for row in rows if len(row) == 3 and row[0].startswith("ii")}

    @staticmethod
    def leftovers(root: Path) -> list[str]:
        """Downloaded .debs or package lists left in the tree (they would inflate its tarball)."""
        found = [*root.glob("var/cache/apt/archives/*.deb"), *root.glob("var/lib/apt/lists/*_Packages*")]
        return sorted(str(p.relative_to(root)) for p in found)

    @staticmethod
    def tar(root: Path, out: Path) -> tuple[float, int]:
        started = time.perf_counter()
        run(["tar", "-czf", out, "-C", root, "."])
        return time.perf_counter() - started, du_bytes([out])[1]


class CnpsfsSteps:
    """cnpsfs's share of the section, one method per step so the two systems can alternate."""

    def __init__(self, cn: Cnpsfs, work: Path, res: BuildResults) -> None:
        self.cn, self.res = cn, res
        self.recipes = work / "recipes"
        self.store = work / "store"
        self.five = work / "five-store"
        self.recipes.mkdir(parents=True, exist_ok=True)
        self.base = _recipe(self.recipes / "base.toml", "base", list(BASE))
        self.changed = self.base

    def prime(self) -> None:
        log.info("build: priming the cnpsfs cache (untimed)")
        prime = self.store.parent / "prime-store"
        rmtree(prime)
        union = sorted({*BASE, *(p for extra in EXTRAS for p in extra)})
        self.cn.build(prime, _recipe(self.recipes / "union.toml", "union", union))
        self.cn.build(prime, self.base)
        current = {p["package"]: p["version"] for p in self.cn.cli.packages(prime, f"{IMAGE}@base")}
        self.res.packages = len(current)
        self.res.cnpsfs_versions = current
        package, was, other = _other_version(current)
        self.res.change = {"package": package, "from": was, "to": other}
        self.changed = _recipe(self.recipes / "changed.toml", "changed", [*BASE, f"{package}={other}"])
        self.cn.build(prime, self.changed)
        rmtree(prime)
        rmtree(self.five)

    def image(self, number: int, extra: tuple[str, ...]) -> None:
        log.info("build: cnpsfs image %d/%d into one store", number, len(EXTRAS))
        recipe = _recipe(self.recipes / f"image{number}.toml", f"image{number}", [*BASE, *extra])
        self.res.cnpsfs_five_seconds.append(self.cn.build(self.five, recipe)["wall"])
        if number == len(EXTRAS):
            self.res.cnpsfs_five_bytes = du_bytes([self.five])[1]
            rmtree(self.five)

    def full_and_changed(self, rep: int, reps: int) -> None:
        log.info("build: cnpsfs cold full build and one-package change, rep %d/%d", rep + 1, reps)
        rmtree(self.store)
        self.res.cnpsfs_full.append(self.cn.build(self.store, self.base))
        before = du_bytes([self.store])[1]
        self.res.cnpsfs_full_bytes.append(before)
        self.res.cnpsfs_changed.append(self.cn.build(self.store, self.changed))
        self.res.cnpsfs_changed_added_bytes.append(du_bytes([self.store])[1] - before)
        rmtree(self.store)


class MmdebstrapSteps:
    """mmdebstrap's share of the section; every image is built into the same directory."""

    def __init__(self, mm: Mmdebstrap, work: Path, res: BuildResults) -> None:
        self.mm, self.res = mm, res
        self.root = work / "rootfs"
        self.out = work / "tars"

    def prime(self) -> None:
        rmtree(self.out)
        self.out.mkdir(parents=True)
        log.info("build: priming the mmdebstrap cache (untimed)")
        self.mm.build(sorted({*BASE, *(p for extra in EXTRAS for p in extra)}), self.root, prime=True)
        if self.res.change:
            self.mm.build([*BASE, f"{self.res.change['package']}={self.res.change['to']}"], self.root, prime=True)

    def _built(self, what: str) -> None:
        if left := self.mm.leftovers(self.root):
            self.res.notes.append(f"mmdebstrap {what} keeps {len(left)} cache files, e.g. {left[0]}")

    def image(self, number: int, extra: tuple[str, ...]) -> None:
        log.info("build: mmdebstrap image %d/%d", number, len(EXTRAS))
        self.res.mm_five_seconds.append(self.mm.build([*BASE, *extra], self.root))
        if number == 1:
            installed = self.mm.versions(self.root)
            self.res.mm_packages = len(installed)
            if self.res.cnpsfs_versions and installed != self.res.cnpsfs_versions:
                self.res.notes.append(_version_diff(self.res.cnpsfs_versions, installed))
        self._built(f"image {number}")
        self.res.mm_five_rootfs_bytes.append(du_bytes([self.root])[0])
        seconds, size = self.mm.tar(self.root, self.out / f"image{number}.tar.gz")
        self.res.mm_five_tar_seconds.append(seconds)
        self.res.mm_five_tar_bytes.append(size)

    def full(self, rep: int, reps: int) -> None:
        log.info("build: mmdebstrap cold full build, rep %d/%d", rep + 1, reps)
        self.res.mm_full_seconds.append(self.mm.build(list(BASE), self.root))
        seconds, _size = self.mm.tar(self.root, self.out / "base.tar.gz")
        self.res.mm_full_tar_seconds.append(seconds)

    def changed(self) -> None:
        change = self.res.change
        if not change:
            return
        log.info("build: mmdebstrap, one package changed")
        self.res.mm_changed_seconds = self.mm.build([*BASE, f"{change['package']}={change['to']}"], self.root)
        got = self.mm.versions(self.root).get(change["package"])
        if got != change["to"]:
            self.res.notes.append(f"mmdebstrap's changed image has {change['package']} {got}, not {change['to']}")
        self._built("changed image")
        self.res.mm_changed_tar_seconds, self.res.mm_changed_tar_bytes = self.mm.tar(
            self.root, self.out / "changed.tar.gz")

    def finish(self) -> None:
        self.res.mm_loadavg = self.mm.loads
        rmtree(self.root)
        rmtree(self.out)


def _version_diff(cnpsfs: dict[str, str], mm: dict[str, str]) -> str:
    only_cn = sorted(f"{p} {v}" for p, v in cnpsfs.items() if mm.get(p) != v)
    only_mm = sorted(f"{p} {v}" for p, v in mm.items() if cnpsfs.get(p) != v)
    return (f"package sets differ: only in cnpsfs's image {', '.join(only_cn) or '-'}; "
            f"only in mmdebstrap's {', '.join(only_mm) or '-'}")


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_build(work: Path, cache: Path, reps: int, cli: CnpsfsCli, systems: set[str] | None) -> BuildResults:
    """Both systems, alternating step by step so that both see the same load on a shared
    machine; one that cannot run or fails is recorded in ``skipped`` and the other goes on."""
    ensure_packages({"mmdebstrap": "mmdebstrap", "tar": "tar", "gzip": "gzip", "apt-cache": "apt"})
    work = work / "build"
    res = BuildResults()
    steps: dict[str, Any] = {}
    if systems is None or "cnpsfs" in systems:
        reason = cli.build_unavailable()
        if reason is None:
            steps["cnpsfs"] = CnpsfsSteps(Cnpsfs(cli, cache / "build-cache"), work, res)
        else:
            log.warning("build: cnpsfs skipped: %s", reason)
            res.skipped["cnpsfs"] = reason
    if systems is None or "mmdebstrap" in systems:
        steps["mmdebstrap"] = MmdebstrapSteps(Mmdebstrap(work, cache / "mmdebstrap-cache"), work, res)

    def step(system: str, method: str, *args: Any) -> None:
        if system not in steps:
            return
        try:
            getattr(steps[system], method)(*args)
        except BenchError as exc:
            log.warning("build: %s skipped: %s", system, exc)
            res.skipped[system] = f"failed: {exc}"
            del steps[system]

    try:
        step("cnpsfs", "prime")
        step("mmdebstrap", "prime")
        for rep in range(reps):
            step("cnpsfs", "full_and_changed", rep, reps)
            step("mmdebstrap", "full", rep, reps)
        step("mmdebstrap", "changed")
        for number, extra in enumerate(EXTRAS, 1):
            step("cnpsfs", "image", number, extra)
            step("mmdebstrap", "image", number, extra)
        step("mmdebstrap", "finish")
    finally:
        umount_all_under(work)
    return res


def build_table(res: BuildResults) -> str:
    from .report import fmt_bytes, fmt_seconds

    cn_cells = [f"n/a ({res.skipped['cnpsfs']})"] * 4 if "cnpsfs" in res.skipped else [""] * 4
    if res.cnpsfs_full:
        full, changed = res.cnpsfs_full, res.cnpsfs_changed
        t = {k: median([r["timings"][k] for r in full]) for k in full[0]["timings"]}
        tc = {k: median([r["timings"][k] for r in changed]) for k in changed[0]["timings"]}
        cn_cells = [
            f"{fmt_seconds(median([r['wall'] for r in full]))} (resolve {fmt_seconds(t['resolve'])}, "
            f"import {fmt_seconds(t['import'])}, configure {fmt_seconds(t['configure'])})",
            f"{fmt_seconds(median([r['wall'] for r in changed]))} ({changed[0]['imported']} imported, "
            f"{changed[0]['reused']} reused; configure {fmt_seconds(tc['configure'])}); "
            f"store +{fmt_bytes(median(res.cnpsfs_changed_added_bytes))}",
            f"{fmt_bytes(median(res.cnpsfs_full_bytes))} (the store)",
            f"{fmt_bytes(res.cnpsfs_five_bytes)} (5 builds: {fmt_seconds(sum(res.cnpsfs_five_seconds))})",
        ]
    mm_cells = [f"n/a ({res.skipped['mmdebstrap']})"] * 4 if "mmdebstrap" in res.skipped else [""] * 4
    if res.mm_five_seconds and res.mm_full_seconds:
        build, tar = median(res.mm_full_seconds), median(res.mm_full_tar_seconds)
        total = median([a + b for a, b in zip(res.mm_full_seconds, res.mm_full_tar_seconds, strict=True)])
        mm_cells = [
            f"{fmt_seconds(total)} (mmdebstrap {fmt_seconds(build)}, tar -czf {fmt_seconds(tar)})",
            f"{fmt_seconds(res.mm_changed_seconds + res.mm_changed_tar_seconds)} (a full build); "
            f"+{fmt_bytes(res.mm_changed_tar_bytes)}" if res.mm_changed_seconds else "",
            f"{fmt_bytes(res.mm_five_tar_bytes[0])} (the .tar.gz; rootfs {fmt_bytes(res.mm_five_rootfs_bytes[0])})",
            f"{fmt_bytes(sum(res.mm_five_tar_bytes))} (5 builds: "
            f"{fmt_seconds(sum(res.mm_five_seconds) + sum(res.mm_five_tar_seconds))}; each rootfs "
            f"{fmt_bytes(median(res.mm_five_rootfs_bytes))} uncompressed)",
        ]
    change = res.change and f"{res.change['package']} {res.change['from']} -> {res.change['to']}"
    measures = [f"cold full build, {res.packages or res.mm_packages} packages",
                f"rebuild, one package changed ({change or 'n/a'})",
                "1 image: stored",
                "5 images sharing most packages: stored"]
    rows = ["| measure | cnpsfs build (one store) | mmdebstrap + tar -czf (a .tar.gz per image) |",
            "|---|---|---|"]
    rows += [f"| {m} | {c} | {d} |" for m, c, d in zip(measures, cn_cells, mm_cells, strict=True)]
    if res.mm_packages and res.packages and res.mm_packages != res.packages:
        rows.append(f"\n_package counts differ: cnpsfs {res.packages}, mmdebstrap {res.mm_packages}_")
    rows += [f"\n- {note}" for note in res.notes]
    return "\n".join(rows)
