"""The synthesised dpkg database against the real dpkg: trigger interests.

Small packages with ``triggers`` control files are unpacked by ``dpkg --root`` into an
empty system and imported and written by :mod:`cnpsfs.debian.dpkgdb`; the ``triggers/``
directories must match file for file. Needs root (dpkg --root) and dpkg-deb.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cnpsfs_testlib import IS_ROOT

from cnpsfs.debian.deb import import_deb
from cnpsfs.debian.dpkgdb import InstalledPackage, trigger_files, trigger_interests, write_database
from cnpsfs.errors import CnpsfsError
from cnpsfs.store import Store

pytestmark = pytest.mark.skipif(not IS_ROOT or shutil.which("dpkg-deb") is None,
                                reason="needs root and dpkg (dpkg --root --unpack)")

ARCH = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip() \
    if shutil.which("dpkg") else "amd64"

#: (package, Architecture, Multi-Arch, triggers file): every directive, comments, blanks,
#: extra whitespace, two packages interested in one file, repeated interests with other
#: options (the last wins, in the first one's place), a Multi-Arch: same package (named
#: pkg:arch), and packages that only activate or have no triggers.
PACKAGES = [
    ("trig-a", "all", "", "# comment\n\ninterest-noawait /usr/share/trig-a\ninterest trig-explicit\n"),
    ("trig-b", ARCH, "same", "interest-await /usr/lib/trig-b\n  interest-noawait \t trig-explicit  \n"
                             "activate-noawait trig-explicit\n"),
    ("trig-c", "all", "", "activate trig-explicit\nactivate-await /usr/share/trig-a\n"),
    ("trig-d", "all", "", "interest-noawait trig-other\ninterest /usr/share/trig-a\n"
                          "interest-noawait /usr/lib/trig-d\ninterest-noawait /usr/share/trig-a\n"
                          "interest trig-other\n"),
    ("trig-e", ARCH, "", ""),
]


def _deb(tmp: Path, package: str, arch: str, multi_arch: str, triggers: str | None) -> Path:
    root = tmp / package
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/share" / package).mkdir(parents=True)
    (root / "usr/share" / package / "file").write_text(f"{package}\n")
    extra = f"Multi-Arch: {multi_arch}\n" if multi_arch else ""
    (root / "DEBIAN/control").write_text(f"Package: {package}\nVersion: 1.0\nArchitecture: {arch}\n{extra}"
                                         "Maintainer: Test <t@example.org>\nDescription: test\n")
    if triggers is not None:
        (root / "DEBIAN/triggers").write_text(triggers)
    out = tmp / f"{package}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(out)], check=True,
                   capture_output=True)
    return out


def _tree(root: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (stat.S_IMODE(p.stat().st_mode), p.read_bytes()) for p in sorted(root.iterdir())}


def test_trigger_interests_match_dpkg_unpack(store: Store, tmp_path: Path) -> None:
    debs = [_deb(tmp_path, name, arch, ma, trig or None) for name, arch, ma, trig in PACKAGES]
    real = tmp_path / "real"
    (real / "var/lib/dpkg/info").mkdir(parents=True)
    (real / "var/lib/dpkg/updates").mkdir()
    (real / "var/lib/dpkg/status").write_text("")
    unpack = subprocess.run(["dpkg", f"--root={real}", "--unpack", *map(str, debs)], capture_output=True,
                            text=True)
    assert unpack.returncode == 0, unpack.stderr

    pkgs = []
    for deb in debs:
        result = import_deb(store, deb)
        pkgs.append(InstalledPackage(result.digest, result.fileset))
    ours = tmp_path / "ours"
    write_database(store, list(reversed(pkgs)), ours, ARCH)  # input order must not matter

    expected = _tree(real / "var/lib/dpkg/triggers")
    assert _tree(ours / "var/lib/dpkg/triggers") == expected
    assert set(expected) == {"File", "Lock", "Unincorp", "trig-explicit", "trig-other"}
    assert expected["File"][1].decode().splitlines() == [
        "/usr/share/trig-a trig-a/noawait", f"/usr/lib/trig-b trig-b:{ARCH}", "/usr/share/trig-a trig-d/noawait",
        "/usr/lib/trig-d trig-d/noawait"]
    assert expected["trig-explicit"][1] == f"trig-a\ntrig-b:{ARCH}/noawait\n".encode()
    assert expected["trig-other"][1] == b"trig-d\n"
    # The status stays "unpacked" without Triggers-Pending on both sides: nothing was
    # configured, so the activations had no one to notify.
    assert "Triggers-" not in (real / "var/lib/dpkg/status").read_text()
    assert "Triggers-" not in (ours / "var/lib/dpkg/status").read_text()
    for name in ("trig-a.triggers", f"trig-b:{ARCH}.triggers"):
        assert (ours / "var/lib/dpkg/info" / name).read_bytes() == (real / "var/lib/dpkg/info" / name).read_bytes()


@pytest.mark.parametrize("text, message", [
    ("interest-later foo\n", "unknown directive 'interest-later'"),
    ("interest\n", "names no trigger"),
    ("interest /usr//share\n", "invalid trigger name"),
    ("interest /usr/share/\n", "invalid trigger name"),
    ("interest foo_bar\n", "invalid trigger name"),
    ("interest foo # comment\n", "invalid trigger name"),
])
def test_invalid_triggers_file_is_refused(store: Store, tmp_path: Path, text: str, message: str) -> None:
    """dpkg refuses to unpack these; the build must not record a database dpkg would not."""
    result = import_deb(store, _deb(tmp_path, "bad", "all", "", text))
    pkg = InstalledPackage(result.digest, result.fileset)
    with pytest.raises(CnpsfsError, match=message):
        trigger_interests(pkg)
    if shutil.which("dpkg"):
        real = tmp_path / "real"
        (real / "var/lib/dpkg/info").mkdir(parents=True)
        (real / "var/lib/dpkg/updates").mkdir()
        (real / "var/lib/dpkg/status").write_text("")
        deb = tmp_path / "bad.deb"
        assert subprocess.run(["dpkg", f"--root={real}", "--unpack", str(deb)], capture_output=True).returncode != 0


def test_no_triggers_no_interest_files(store: Store, tmp_path: Path) -> None:
    result = import_deb(store, _deb(tmp_path, "plain", "all", "", None))
    assert trigger_files([InstalledPackage(result.digest, result.fileset)]) == {}
    write_database(store, [InstalledPackage(result.digest, result.fileset)], tmp_path / "db", ARCH)
    assert sorted(os.listdir(tmp_path / "db/var/lib/dpkg/triggers")) == ["Lock", "Unincorp"]
