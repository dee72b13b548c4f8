"""Synthesise the dpkg database for a set of imported packages, as dpkg's unpack leaves it.

A built image's package FileSets hold exactly what ``dpkg --unpack`` extracts; this
module writes what dpkg would have recorded while doing so, so the image is a system on
which ``dpkg --configure --pending`` completes the installation and ``dpkg -l``, ``-S``
and ``--verify`` work:

* ``var/lib/dpkg/status``: one stanza per package, sorted by (package, arch), with
  ``Status: install ok unpacked`` after ``Package`` and the control fields in their
  original order; conffiles are listed as ``Conffiles:`` with the MD5 of the file the
  package ships. (dpkg's own unpack extracts a conffile as ``PATH.dpkg-new`` and renames
  it when configuring; ours are already in place, and with the shipped hash recorded
  ``dpkg --configure`` sees an unmodified conffile and keeps it, so ``dpkg --verify``
  is clean afterwards);
* ``var/lib/dpkg/info/<pkg>.list``: ``/.`` then every path of the package, directories
  included, without trailing slashes (dpkg writes them in archive order; we write them
  sorted, which nothing depends on);
* ``info/<pkg>.md5sums``, ``.conffiles``, and the control archive's other members
  (maintainer scripts, ``config``, ``templates``, ``triggers``, ``shlibs``, ``symbols``)
  with the modes the package gives them; Multi-Arch: same packages use ``<pkg>:<arch>.``;
* ``info/format`` (``1``), empty ``available``, ``diversions``, ``statoverride``,
  ``arch`` (the native architecture) and the ``updates``, ``triggers``, ``alternatives``
  and ``parts`` directories dpkg expects.

Everything is a pure function of the packages' FileSets, so the layer's digest is too.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import format as fmt
from ..export import read_file
from ..importers.directory import import_directory
from ..importers.tree import ImportOptions, ImportResult
from ..store import Store

#: Control-archive members dpkg keeps in its info directory (others are not copied).
INFO_FILES = ("preinst", "postinst", "prerm", "postrm", "config", "templates", "triggers", "shlibs",
              "symbols", "md5sums", "conffiles", "isinstallable")


@dataclass(frozen=True, slots=True)
class InstalledPackage:
    """A package FileSet with its dpkg metadata (``FileSet.metadata["debian"]``)."""

    digest: bytes
    fileset: fmt.FileSet

    @property
    def debian(self) -> dict[str, Any]:
        return self.fileset.metadata["debian"]

    @property
    def control(self) -> dict[str, Any]:
        return self.debian["control"]

    @property
    def package(self) -> str:
        return str(self.control["Package"])

    @property
    def arch(self) -> str:
        return str(self.control["Architecture"])

    @property
    def info_name(self) -> str:
        """The name of its files in info/: ``pkg`` or ``pkg:arch`` for Multi-Arch: same."""
        if str(self.control.get("Multi-Arch", "")).strip() == "same":
            return f"{self.package}:{self.arch}"
        return self.package


def _text(value: Any) -> str:
    return value if isinstance(value, str) else bytes(value).decode("utf-8", "surrogateescape")


def _raw(value: Any) -> bytes:
    return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)


def package_paths(store: Store, fileset: fmt.FileSet, want: dict[str, fmt.Entry] | None = None) -> list[str]:
    """Every path of a package FileSet as dpkg lists it: ``/.`` first, then the rest.

    Entries whose path is a key of *want* are stored there (to hash conffiles)."""
    out = ["/."]
    stack: list[tuple[str, bytes]] = [("", fileset.root.tree or b"")]
    while stack:
        prefix, tree = stack.pop()
        for entry in store.get_directory(tree).entries:
            path = f"{prefix}/{entry.name.decode('utf-8', 'surrogateescape')}"
            out.append(path)
            if want is not None and path in want:
                want[path] = entry
            if entry.kind is fmt.Kind.DIR and entry.tree is not None:
                stack.append((path, entry.tree))
    out[1:] = sorted(out[1:])
    return out


def conffiles(pkg: InstalledPackage) -> list[str]:
    text = _text(pkg.debian["files"].get("conffiles", ""))
    # "remove-on-upgrade" flags (dpkg 1.20+) follow the path; keep only absolute paths.
    return [line.split()[0] for line in text.splitlines() if line.strip().startswith("/")]


def status_stanza(pkg: InstalledPackage, hashes: dict[str, str]) -> str:
    control = pkg.control
    lines = [f"Package: {pkg.package}", "Status: install ok unpacked"]
    for name in pkg.debian["fields"]:
        if name.lower() in ("package", "status"):
            continue
        if name == "Description":
            files = conffiles(pkg)
            if files:
                lines.append("Conffiles:")
                lines.extend(f" {path} {hashes.get(path, 'newconffile')}" for path in files)
        lines.append(f"{name}: {_text(control[name])}")
    if "Description" not in pkg.debian["fields"] and conffiles(pkg):
        lines.append("Conffiles:")
        lines.extend(f" {path} {hashes.get(path, 'newconffile')}" for path in conffiles(pkg))
    return "\n".join(lines) + "\n"


def write_database(store: Store, packages: list[InstalledPackage], root: Path, arch: str) -> None:
    """Write the dpkg database for *packages* below *root* (a scratch directory)."""
    admin = root / "var/lib/dpkg"
    for sub in ("info", "updates", "triggers", "alternatives", "parts"):
        (admin / sub).mkdir(parents=True, exist_ok=True)
    ordered = sorted(packages, key=lambda p: (p.package, p.arch))
    lists: dict[str, list[str]] = {}
    hashes: dict[str, str] = {}
    for pkg in ordered:
        want: dict[str, Any] = dict.fromkeys(conffiles(pkg))
        lists[pkg.info_name] = package_paths(store, pkg.fileset, want)
        for path, entry in want.items():
            if entry is not None and entry.kind is fmt.Kind.FILE:
                hashes[path] = hashlib.md5(read_file(store, entry)).hexdigest()
    (admin / "status").write_text("\n".join(status_stanza(p, hashes) for p in ordered))
    for name in ("available", "diversions", "statoverride"):
        (admin / name).write_text("")
    (admin / "arch").write_text(f"{arch}\n")
    (admin / "info/format").write_text("1\n")
    for pkg in ordered:
        info = admin / "info"
        (info / f"{pkg.info_name}.list").write_bytes(
            "".join(p + "\n" for p in lists[pkg.info_name]).encode("utf-8", "surrogateescape"))
        files, modes = pkg.debian["files"], pkg.debian.get("modes", {})
        for member in INFO_FILES:
            if member in files:
                target = info / f"{pkg.info_name}.{member}"
                target.write_bytes(_raw(files[member]))
                os.chmod(target, stat.S_IMODE(modes.get(member, 0o644)))


def import_database(store: Store, packages: list[InstalledPackage], arch: str, *, source_date_epoch: int,
                    name: str, version: str, scratch: str | None = None) -> ImportResult:
    """Write the database to a scratch directory and import it as one FileSet."""
    with tempfile.TemporaryDirectory(prefix="cnpsfs-dpkgdb-", dir=scratch) as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)
        write_database(store, packages, root, arch)
        for dirpath, dirs, names in os.walk(root):
            for item in [*dirs, *names]:
                os.utime(os.path.join(dirpath, item), (source_date_epoch, source_date_epoch), follow_symlinks=False)
        os.utime(root, (source_date_epoch, source_date_epoch))
        options = ImportOptions(source_date_epoch=source_date_epoch, name=name, version=version,
                                metadata={"cnpsfs": {"kind": "dpkg-database", "packages": len(packages)}})
        return import_directory(store, tmp, options)
