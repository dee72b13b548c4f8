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
* ``triggers/``: the trigger interests dpkg registers while unpacking each package's
  ``triggers`` control file (deb-triggers(5)): ``File`` lists file-trigger interests as
  ``PATH PKG[/noawait]``, ``triggers/NAME`` lists the packages interested in explicit
  trigger NAME, one ``PKG[/noawait]`` a line (``PKG`` is ``pkg:arch`` for Multi-Arch:
  same), as if unpacked in (package, arch) order; ``Unincorp`` is empty and ``Lock``
  exists, as dpkg leaves them. ``activate`` directives record nothing: on a system where
  nothing is configured yet, dpkg's unpack does not make triggers pending either (they
  fire when the activating packages are configured). Without this, the first dpkg run
  would take dpkg's transitional path (no ``Unincorp``: interests rebuilt from
  ``info/*.triggers``) and the state would land in whatever layer ran it;
* ``info/format`` (``1``), empty ``available``, ``diversions``, ``statoverride``,
  ``arch`` (the native architecture) and the ``updates``, ``alternatives`` and
  ``parts`` directories dpkg expects.

Everything is a pure function of the packages' FileSets, so the layer's digest is too.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError
from cnpsfs.image.reader import FileReader
from cnpsfs.ingest.directory import import_directory
from cnpsfs.ingest.tree import ImportOptions, ImportResult
from cnpsfs.store import Store

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


#: Interest directives of a triggers control file and the suffix dpkg writes for each.
INTEREST = {"interest": "", "interest-await": "", "interest-noawait": "/noawait"}
ACTIVATE = ("activate", "activate-await", "activate-noawait")
_EXPLICIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9+.-]*")


def _valid_trigger(name: str) -> bool:
    """dpkg's classification: a file trigger is an absolute path without empty components
    or a trailing slash; an explicit trigger is spelled like a package name, without ``_``."""
    if name.startswith("/"):
        return all(name.split("/")[1:])
    return _EXPLICIT_NAME.fullmatch(name) is not None


def trigger_interests(pkg: InstalledPackage) -> list[tuple[str, str]]:
    """(trigger, suffix) for each interest of the package's ``triggers`` control file, in
    file order, parsed as dpkg parses it: blank lines and lines whose first non-blank
    character is ``#`` are skipped, a directive is its first word and the trigger name the
    rest of the line; an unknown directive or an invalid name is an error (dpkg refuses
    to unpack such a package)."""
    text = pkg.debian["files"].get("triggers")
    if text is None:
        return []
    out: list[tuple[str, str]] = []
    for number, line in enumerate(_text(text).splitlines(), 1):
        words = line.split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        where = f"{pkg.package}: triggers line {number}"
        if len(words) < 2:
            raise CnpsfsError(f"{where}: {words[0]!r} names no trigger (dpkg refuses to unpack it)")
        directive, name = words[0], words[1].strip()
        if directive not in INTEREST and directive not in ACTIVATE:
            raise CnpsfsError(f"{where}: unknown directive {directive!r} (dpkg refuses to unpack it)")
        valid = all(" " < c < "\x7f" for c in name)
        if not valid or (directive in INTEREST and not _valid_trigger(name)):
            raise CnpsfsError(f"{where}: invalid trigger name {name!r} (dpkg refuses to unpack it)")
        if directive in INTEREST:
            out.append((name, INTEREST[directive]))
    return out


def trigger_files(packages: list[InstalledPackage]) -> dict[str, str]:
    """The interest files dpkg writes under ``triggers/`` when unpacking *packages* in this
    order onto an empty system: ``File`` (if any file trigger) and one file per explicit
    trigger. A package repeating an interest is listed once, where it first appeared,
    with the options of its last spelling, as dpkg 1.21 does."""
    file_lines: dict[tuple[str, str], str] = {}
    explicit: dict[str, dict[str, str]] = {}
    for pkg in packages:
        for name, suffix in trigger_interests(pkg):
            if name.startswith("/"):
                file_lines[name, pkg.info_name] = f"{name} {pkg.info_name}{suffix}"
            else:
                explicit.setdefault(name, {})[pkg.info_name] = f"{pkg.info_name}{suffix}"
    out = {name: "".join(line + "\n" for line in lines.values()) for name, lines in explicit.items()}
    if file_lines:
        out["File"] = "".join(line + "\n" for line in file_lines.values())
    return out


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
    reader = FileReader(store)
    for pkg in ordered:
        want: dict[str, Any] = dict.fromkeys(conffiles(pkg))
        lists[pkg.info_name] = package_paths(store, pkg.fileset, want)
        for path, entry in want.items():
            if entry is not None and entry.kind is fmt.Kind.FILE:
                hashes[path] = hashlib.md5(reader.read(entry)).hexdigest()
    (admin / "status").write_text("\n".join(status_stanza(p, hashes) for p in ordered))
    for name in ("available", "diversions", "statoverride"):
        (admin / name).write_text("")
    (admin / "arch").write_text(f"{arch}\n")
    (admin / "info/format").write_text("1\n")
    triggers = admin / "triggers"
    for name, text in trigger_files(ordered).items():
        (triggers / name).write_text(text)
    (triggers / "Unincorp").write_text("")
    (triggers / "Lock").write_text("")
    os.chmod(triggers / "Lock", 0o600)
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
