"""The benchmark corpus: two Debian bookworm root filesystems that share most of their files.

v1 is a minbase debootstrap; v2 is v1 plus python3 and perl. The pair models an image update,
so "v1 and v2 into one store" shows how much a system deduplicates between versions. Both trees
are cached and rebuilt only when missing; a build goes to ``NAME.tmp`` and is renamed when
complete, so an interrupted build is never mistaken for a finished one.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .common import CHROOT_ENV, BenchError, bind_mounts, ensure_packages, rmtree, run, umount_all_under

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("/var/cache/cnpsfs-bench")
SUITE = "bookworm"
FALLBACK_MIRROR = "http://deb.debian.org/debian"
V2_PACKAGES = ("python3", "perl")
POLICY_RC_D = "#!/bin/sh\n# cnpsfs bench: never start services inside the build chroot\nexit 101\n"


@dataclass(frozen=True)
class Corpus:
    v1: Path
    v2: Path
    mirror: str


def host_mirror() -> str:
    """The host's main Debian mirror, so the corpus comes from the same (possibly pinned) archive.

    Reads deb822 ``*.sources`` first and the classic one-line format second; the security
    archive is skipped because debootstrap needs the main suite.
    """
    candidates: list[str] = []
    for src in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in src.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, flags=re.M))
            suites = fields.get("Suites", "").split()
            if "deb" in fields.get("Types", "").split() and SUITE in suites:
                candidates += fields.get("URIs", "").split()
    for listing in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        if listing.exists():
            for m in re.finditer(rf"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+{SUITE}\s", listing.read_text(), re.M):
                candidates.append(m.group(1))
    for uri in candidates:
        if "security" not in uri:
            return uri
    return FALLBACK_MIRROR


def chroot(root: Path, *argv: str) -> None:
    run(["chroot", root, *argv], env=CHROOT_ENV)


def clean_apt(root: Path) -> None:
    """Drop downloaded .debs and package lists: they are build leftovers, not part of an image."""
    chroot(root, "apt-get", "clean")
    lists = root / "var/lib/apt/lists"
    for entry in lists.iterdir() if lists.is_dir() else []:
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _fresh_tmp(final: Path) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    umount_all_under(tmp)
    rmtree(tmp)
    return tmp


def build_v1(dest: Path, mirror: str) -> None:
    tmp = _fresh_tmp(dest)
    log.info("corpus: debootstrap --variant=minbase %s from %s (several minutes)", SUITE, mirror)
    try:
        run(["debootstrap", "--variant=minbase", SUITE, tmp, mirror])
        clean_apt(tmp)
    finally:
        umount_all_under(tmp)
    tmp.rename(dest)


def build_v2(v1: Path, dest: Path) -> None:
    tmp = _fresh_tmp(dest)
    log.info("corpus: v2 = v1 + %s", " ".join(V2_PACKAGES))
    run(["cp", "-a", v1, tmp])
    resolv = tmp / "etc/resolv.conf"
    saved_resolv = resolv.read_bytes() if resolv.is_file() and not resolv.is_symlink() else None
    policy = tmp / "usr/sbin/policy-rc.d"
    try:
        resolv.unlink(missing_ok=True)
        shutil.copyfile("/etc/resolv.conf", resolv)
        policy.write_text(POLICY_RC_D)
        policy.chmod(0o755)
        with bind_mounts(tmp, ["/proc", "/sys", "/dev"]):
            chroot(tmp, "apt-get", "update")
            chroot(tmp, "apt-get", "install", "-y", "--no-install-recommends", *V2_PACKAGES)
            clean_apt(tmp)
    finally:
        umount_all_under(tmp)
    # Leave v2 differing from v1 only by what the packages installed.
    policy.unlink(missing_ok=True)
    resolv.unlink(missing_ok=True)
    if saved_resolv is not None:
        resolv.write_bytes(saved_resolv)
    tmp.rename(dest)


def ensure_corpus(cache: Path = DEFAULT_CACHE) -> Corpus:
    """Return the cached corpus, building whatever part is missing."""
    ensure_packages({"debootstrap": "debootstrap", "chroot": "coreutils"})
    cache.mkdir(parents=True, exist_ok=True)
    mirror = host_mirror()
    v1, v2 = cache / "v1", cache / "v2"
    if not v1.is_dir():
        build_v1(v1, mirror)
    if not v2.is_dir():
        build_v2(v1, v2)
    for tree in (v1, v2):
        if not (tree / "usr/bin").is_dir():
            raise BenchError(f"corpus tree {tree} looks broken (no usr/bin); delete it to rebuild")
    return Corpus(v1=v1, v2=v2, mirror=mirror)
