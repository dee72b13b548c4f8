"""Package resolution and download with the real apt, in a private state directory.

apt is the authority on what a package list means (dependencies, alternatives,
Provides, version choice), so we ask it rather than reimplement its solver. It runs
with its own configuration, sources, lists, cache and an empty dpkg status file under
one directory (``<cache>/apt/<key>``, key = hash of sources and architecture), so the
host's apt state is never read or written and nothing needs root beyond what apt's
downloader wants:

    APT_CONFIG=<dir>/apt.conf      private config; Dir::Etc::parts is an empty dir, so the
                                   host's apt.conf.d (docker-clean, GzipIndexes ...) is ignored
    <dir>/etc/sources.list         the recipe's sources (or a copy of the host's)
    <dir>/state/lists              Packages indices, refreshed after a TTL or on request
    <dir>/state/status             empty: apt plans as for an empty root filesystem

Downloaded packages live in ``<cache>/debs/<sha256>.deb``, named by the SHA-256 the
Packages index gives, and are verified against it before use, so the cache is shared
by every suite and never serves a wrong file.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cnpsfs.debian.control import ControlError, parse_control
from cnpsfs.debian.version import compare_versions
from cnpsfs.errors import CnpsfsError

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("CNPSFS_BUILD_CACHE", "/var/cache/cnpsfs"))
LISTS_TTL = 24 * 3600
_INST = re.compile(r"^Inst (?P<name>\S+) (?:\[\S+\] )?\((?P<version>\S+) (?P<origin>.*?) ?\[(?P<arch>[^\]]+)\]\)")


class AptError(CnpsfsError):
    """apt refused or failed; the message carries apt's own words."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One binary package apt chose, with what its Packages record says."""

    package: str
    version: str
    arch: str
    origin: str  # apt's "Origin:Version/Suite" text from the simulation, e.g. "Debian:12.10/stable"
    sha256: str = ""
    size: int = 0
    filename: str = ""
    source: str = ""
    essential: bool = False

    @property
    def key(self) -> str:
        return f"{self.package}:{self.arch}"


def host_arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()


def host_codename() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    raise AptError("cannot tell the host's Debian release (no VERSION_CODENAME in /etc/os-release); "
                   "set debian.suite in the recipe")


def host_sources() -> list[tuple[str, str]]:
    """The host's apt sources as (file name, text), one-line and deb822 styles alike."""
    out = []
    main = Path("/etc/apt/sources.list")
    if main.is_file():
        out.append(("sources.list", main.read_text()))
    parts = Path("/etc/apt/sources.list.d")
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix in (".list", ".sources") and path.is_file():
                out.append((path.name, path.read_text()))
    return out


def host_mirror() -> str:
    """The first Debian mirror URI of the host's sources (for recipes naming another suite)."""
    for _name, text in host_sources():
        for line in text.splitlines():
            words = line.split()
            if line.startswith("URIs:") and len(words) > 1:
                return words[1]
            if words[:1] == ["deb"]:
                return next(w for w in words[1:] if not w.startswith("["))
    return "http://deb.debian.org/debian"


def parse_stanzas(data: bytes) -> list[dict[str, str]]:
    """A Packages index (or apt-cache output): stanzas separated by blank lines."""
    out = []
    for chunk in re.split(rb"\n\s*\n", data):
        if not chunk.strip():
            continue
        try:
            fields = parse_control(chunk.strip(b"\n") + b"\n")
        except ControlError as exc:
            raise AptError(f"malformed package index stanza: {exc}") from None
        out.append({k: v if isinstance(v, str) else v.decode("utf-8", "replace") for k, v in fields})
    return out


class AptEnv:
    """One private apt: configuration, sources and lists for a suite and architecture."""

    def __init__(self, cache: Path, arch: str, sources: list[tuple[str, str]]) -> None:
        self.arch = arch
        self.sources = sources
        key = hashlib.sha256(repr((arch, sources)).encode()).hexdigest()[:16]
        self.root = cache / "apt" / key
        self.debs = cache / "debs"
        self.config = self.root / "apt.conf"
        self._setup()

    def _setup(self) -> None:
        for sub in ("etc/sources.list.d", "etc/apt.conf.d", "etc/preferences.d", "state/lists/partial",
                    "cache/archives/partial"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.debs.mkdir(parents=True, exist_ok=True)
        (self.root / "state/status").touch()
        sources_dir = self.root / "etc/sources.list.d"
        for old in sources_dir.iterdir():
            old.unlink()
        for name, text in self.sources:
            (sources_dir / name).write_text(text)
        r = self.root
        self.config.write_text(f"""\
Dir::Etc::main "/dev/null";
Dir::Etc::parts "{r}/etc/apt.conf.d";
Dir::Etc::sourcelist "{r}/etc/sources.list";
Dir::Etc::sourceparts "{r}/etc/sources.list.d";
Dir::Etc::preferences "{r}/etc/preferences";
Dir::Etc::preferencesparts "{r}/etc/preferences.d";
Dir::State "{r}/state";
Dir::State::lists "{r}/state/lists";
Dir::State::status "{r}/state/status";
Dir::Cache "{r}/cache";
Dir::Cache::archives "{r}/cache/archives";
Dir::Log "{r}/log";
APT::Architecture "{self.arch}";
APT::Architectures {{ "{self.arch}"; }};
APT::Install-Recommends "false";
APT::Install-Suggests "false";
APT::Get::AllowUnauthenticated "false";
Acquire::Languages "none";
Acquire::GzipIndexes "false";
Acquire::Check-Valid-Until "false";
Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled "false";
Acquire::IndexTargets::deb::DEP-11::DefaultEnabled "false";
Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled "false";
Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled "false";
Debug::NoLocking "true";
""")
        if not (r / "etc/sources.list").exists():
            (r / "etc/sources.list").write_text("")

    def _run(self, args: list[str], *, cwd: Path | None = None) -> str:
        env = {**os.environ, "APT_CONFIG": str(self.config), "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
        log.debug("running %s", " ".join(args))
        result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd)
        if result.returncode != 0:
            lines = [ln for ln in (result.stderr + result.stdout).splitlines() if ln.startswith(("E:", "W:"))]
            detail = "; ".join(lines[-6:]) or result.stderr.strip()[-800:]
            raise AptError(f"{' '.join(args[:2])} failed: {detail}")
        return result.stdout

    def lists_age(self) -> float | None:
        stamp = self.root / "state/cnpsfs-updated"
        try:
            return time.time() - stamp.stat().st_mtime
        except OSError:
            return None

    def update(self, *, refresh: bool = False, ttl: float = LISTS_TTL) -> bool:
        """Download the Packages indices unless fresh ones are cached; True if it ran."""
        age = self.lists_age()
        if not refresh and age is not None and age < ttl:
            return False
        self._run(["apt-get", "update", "-q"])
        (self.root / "state/cnpsfs-updated").touch()
        return True

    def index_files(self) -> list[Path]:
        return sorted(p for p in (self.root / "state/lists").iterdir() if p.name.endswith("_Packages"))

    def essential(self) -> list[str]:
        """Packages marked ``Essential: yes`` for our architecture (or all), by name."""
        names: set[str] = set()
        for path in self.index_files():
            data = path.read_bytes()
            for chunk in re.split(rb"\n\n+", data):
                # Cheap prefilter; every candidate stanza is then parsed properly.
                if b"\nEssential: yes" not in chunk:
                    continue
                for stanza in parse_stanzas(chunk + b"\n"):
                    if stanza.get("Essential") == "yes" and stanza.get("Architecture") in (self.arch, "all"):
                        names.add(stanza["Package"])
        return sorted(names)

    def resolve(self, packages: list[str], essential: set[str]) -> list[Candidate]:
        """The closure apt would install on an empty system: Depends and Pre-Depends, no
        Recommends. Sorted by (package, arch); independent of the order of *packages*."""
        if not packages:
            raise AptError("no packages to install")
        out = self._run(["apt-get", "install", "--simulate", "-q", "--no-install-recommends", *sorted(packages)])
        chosen: dict[str, Candidate] = {}
        for line in out.splitlines():
            m = _INST.match(line)
            if m is None:
                continue
            name, _, arch = m.group("name").partition(":")
            arch = arch or m.group("arch")
            chosen[f"{name}:{arch}"] = Candidate(name, m.group("version"), arch, m.group("origin").strip())
        if not chosen:
            raise AptError(f"apt chose no packages for {', '.join(packages)}")
        specs = [f"{c.package}:{c.arch}={c.version}" for c in chosen.values()]
        records = parse_stanzas(self._run(["apt-cache", "show", "--no-all-versions", *specs]).encode())
        result = []
        for rec in records:
            arch = rec.get("Architecture", "")
            key = f"{rec['Package']}:{self.arch if arch == 'all' else arch}"
            cand = chosen.get(key) or chosen.get(f"{rec['Package']}:{arch}")
            if cand is None or rec.get("Version") != cand.version:
                continue
            source = rec.get("Source", rec["Package"]).split(" ")[0]
            result.append(Candidate(cand.package, cand.version, arch, cand.origin, rec.get("SHA256", ""),
                                    int(rec.get("Size", "0")), rec.get("Filename", ""), source,
                                    rec.get("Essential") == "yes" or cand.package in essential))
        found = {(c.package, c.version) for c in result}
        missing = [c for c in chosen.values() if (c.package, c.version) not in found]
        if missing:
            raise AptError(f"apt-cache has no record for {', '.join(c.key + '=' + c.version for c in missing)}")
        return sorted({(c.package, c.arch): c for c in result}.values(), key=lambda c: (c.package, c.arch))

    def versions(self, *packages: str) -> dict[str, list[str]]:
        """Every version of each package the sources offer (``apt-cache madison``), newest
        first: what a recipe can pin with ``pkg=version``. Unknown packages map to ``[]``."""
        out: dict[str, list[str]] = {p: [] for p in packages}
        for line in self._run(["apt-cache", "madison", *packages]).splitlines():
            fields = [f.strip() for f in line.split("|")]
            if len(fields) >= 3 and fields[0] in out and fields[1] not in out[fields[0]]:
                out[fields[0]].append(fields[1])
        for found in out.values():
            found.sort(key=functools.cmp_to_key(compare_versions), reverse=True)
        return out

    def deb_path(self, cand: Candidate) -> Path:
        return self.debs / f"{cand.sha256}.deb"

    def download(self, candidates: list[Candidate]) -> dict[str, Path]:
        """Make sure every candidate's .deb is in the cache, verified; returns key -> path."""
        missing = [c for c in candidates if not self.deb_path(c).exists()]
        if missing:
            with tempfile.TemporaryDirectory(dir=self.debs, prefix="dl-") as tmp:
                self._run(["apt-get", "download", "-q", *(f"{c.package}:{c.arch}={c.version}" for c in missing)],
                          cwd=Path(tmp))
                by_name = {p.name.split("_")[0]: p for p in Path(tmp).iterdir() if p.suffix == ".deb"}
                for cand in missing:
                    path = by_name.get(cand.package)
                    if path is None:
                        raise AptError(f"apt-get download produced no file for {cand.package}")
                    digest = sha256_file(path)
                    if digest != cand.sha256:
                        raise AptError(f"{path.name}: SHA-256 {digest} does not match the index ({cand.sha256})")
                    os.replace(path, self.deb_path(cand))
        for cand in candidates:
            if not cand.sha256:
                raise AptError(f"the index lists no SHA256 for {cand.package}")
        return {c.key: self.deb_path(c) for c in candidates}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def default_sources(suite: str | None) -> list[tuple[str, str]]:
    """The host's sources when the recipe names no suite or the host's own; else the
    host's first mirror with that suite's main component."""
    if suite is None or suite == host_codename():
        return host_sources()
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    return [("cnpsfs.sources", f"Types: deb\nURIs: {host_mirror()}\nSuites: {suite}\nComponents: main\n"
                               f"Signed-By: {keyring}\n")]


def clear_lists(env: AptEnv) -> None:
    shutil.rmtree(env.root / "state/lists", ignore_errors=True)
