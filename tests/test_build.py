"""cnpsfs build: package lists to images, end to end with the real apt and dpkg.

Needs root (chroot, bind mounts), FUSE and the Debian mirror; .debs and apt lists are
cached in $CNPSFS_BUILD_CACHE (default /var/cache/cnpsfs), so reruns are fast.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cnpsfs_testlib import IS_ROOT
from mountutil import FUSE, mount_image

from cnpsfs.debian import apt
from cnpsfs.debian.build import BuildError, BuildResult, _package_layers, build, parse_recipe
from cnpsfs.debian.deb import import_deb
from cnpsfs.debian.dpkgdb import InstalledPackage
from cnpsfs.store import LocalStore, Store

pytestmark = [*FUSE, pytest.mark.skipif(not IS_ROOT, reason="building needs root (chroot, bind mounts)")]

SMALL = """
name = "example.org/small"
version = "1"
[debian]
essential = false
packages = [{packages}]
[config]
cmd = ["/usr/bin/hello"]
"""
SMALL_PACKAGES = ["hello", "dpkg", "dash", "coreutils", "libc-bin", "sed", "grep", "diffutils"]
#: The issue's example recipe, with full python3 (ssl, sqlite3) beside python3-minimal.
REALISTIC = """
name = "example.org/hello"
version = "{version}"
[debian]
packages = ["hello", "python3-minimal", "python3"{extra}]
[config]
cmd = ["/usr/bin/hello"]
"""


def _realistic(version: str = "1", extra: list[str] | tuple[str, ...] = ()) -> str:
    return REALISTIC.format(version=version, extra="".join(f', "{p}"' for p in extra))


def _small(order: list[str]) -> str:
    return SMALL.format(packages=", ".join(f'"{p}"' for p in order))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, bytes, Path]]:
    base = tmp_path_factory.mktemp("small")
    store = LocalStore(base / "store", create=True)
    result = build(store, parse_recipe(_small(SMALL_PACKAGES)))
    yield store, result.digest, base
    store.close()


@pytest.fixture(scope="module")
def realistic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, BuildResult]]:
    """hello + python3 + the Essential set (86 packages in bookworm), into an empty store."""
    store = LocalStore(tmp_path_factory.mktemp("realistic") / "store", create=True)
    result = build(store, parse_recipe(_realistic()))
    yield store, result
    store.close()


def _chroot(mnt: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chroot", str(mnt), *args], capture_output=True, text=True,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})


def assert_dpkg_verify_silent(store: Store, digest: bytes, tmp_path: Path) -> None:
    """Issue 15 bug 12: every built image passes ``dpkg --verify`` without a word."""
    mnt = tmp_path / f"verify-{digest.hex()[:12]}"
    mnt.mkdir()
    with mount_image(store.path, "blake3:" + digest.hex(), mnt):
        verify = _chroot(mnt, "dpkg", "--verify")
        assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", ""), verify.stdout + verify.stderr


def test_reproducible_and_order_free(small: tuple[Store, bytes, Path], tmp_path: Path) -> None:
    _store, digest, _base = small
    other = LocalStore(tmp_path / "store2", create=True)
    try:
        again = build(other, parse_recipe(_small(list(reversed(SMALL_PACKAGES)))))
    finally:
        other.close()
    assert again.digest == digest


def test_small_image_mounted(small: tuple[Store, bytes, Path], tmp_path: Path) -> None:
    store, digest, _base = small
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mount_image(store.path, "blake3:" + digest.hex(), mnt):
        listing = _chroot(mnt, "dpkg-query", "-W", "-f", "${db:Status-Abbrev}${Package}\n")
        assert listing.returncode == 0, listing.stderr
        rows = listing.stdout.splitlines()
        assert rows and all(r.startswith("ii ") for r in rows), rows
        assert "ii hello" in rows
        assert _chroot(mnt, "dpkg", "--audit").stdout == ""
        verify = _chroot(mnt, "dpkg", "--verify")
        assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", ""), verify.stdout + verify.stderr
        assert _chroot(mnt, "dpkg", "-S", "/usr/bin/hello").stdout.strip() == "hello: /usr/bin/hello"
        assert _chroot(mnt, "/usr/bin/hello").stdout == "Hello, world!\n"
        for path in ("etc/machine-id", "var/lib/dbus/machine-id", "usr/sbin/policy-rc.d"):
            assert not (mnt / path).exists(), path
        assert not list((mnt / "var/log").glob("*.log")) if (mnt / "var/log").exists() else True


def test_union_equals_dpkg_deb_x(small: tuple[Store, bytes, Path], tmp_path: Path) -> None:
    """The package layers' files are exactly dpkg-deb -x of every .deb into one dir."""
    store, digest, _base = small
    image = store.get_image(digest)
    ref = tmp_path / "ref"
    ref.mkdir()
    for pkg in image.metadata["debian"]["packages"]:
        deb = Path(os.environ.get("CNPSFS_BUILD_CACHE", "/var/cache/cnpsfs")) / "debs" / f"{pkg['sha256']}.deb"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(ref)], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mount_image(store.path, "blake3:" + digest.hex(), mnt):
        for dirpath, _dirs, files in os.walk(ref):
            for name in files:
                path = Path(dirpath, name)
                rel = path.relative_to(ref)
                if path.is_symlink():
                    assert os.readlink(mnt / rel) == os.readlink(path), rel
                elif str(rel).startswith("etc/") or "dpkg" in str(rel):
                    continue  # conffiles may be rewritten by configure; checked by dpkg --verify
                else:
                    assert (mnt / rel).read_bytes() == path.read_bytes(), rel


def _tiny_deb(tmp: Path, package: str, content: bytes, replaces: str = "") -> Path:
    root = tmp / package
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/share").mkdir(parents=True)
    (root / "usr/share/shared.txt").write_bytes(content)
    extra = f"Replaces: {replaces}\n" if replaces else ""
    (root / "DEBIAN/control").write_text(f"Package: {package}\nVersion: 1.0\nArchitecture: all\n"
                                         f"Maintainer: Test <t@example.org>\n{extra}Description: test\n")
    out = tmp / f"{package}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(out)], check=True,
                   capture_output=True)
    return out


def test_conflict_names_both_packages(store: Store, tmp_path: Path) -> None:
    pkgs = []
    for name, content in (("conflict-a", b"a\n"), ("conflict-b", b"b\n")):
        result = import_deb(store, _tiny_deb(tmp_path, name, content))
        pkgs.append(InstalledPackage(result.digest, result.fileset))
    recipe = parse_recipe(_small(["x"]))
    with pytest.raises(BuildError, match=r"conflict-a.*conflict-b.*usr/share/shared.txt"):
        _package_layers(store, recipe, pkgs, {})
    # A package that declares Replaces takes precedence instead.
    result = import_deb(store, _tiny_deb(tmp_path, "conflict-c", b"c\n", replaces="conflict-a"))
    layers = _package_layers(store, recipe, [pkgs[0], InstalledPackage(result.digest, result.fileset)], {})
    assert [layer.override for layer in layers] == [False, True]


def test_realistic_image(realistic: tuple[Store, BuildResult], tmp_path: Path) -> None:
    store, result = realistic
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mount_image(store.path, "blake3:" + result.digest.hex(), mnt):
        assert os.readlink(mnt / "bin") == "usr/bin"
        assert _chroot(mnt, "dpkg", "-S", "/bin/bash").stdout.strip() == "bash: /bin/bash"
        assert _chroot(mnt, "/usr/bin/hello").stdout == "Hello, world!\n"
        verify = _chroot(mnt, "dpkg", "--verify")
        assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", ""), verify.stdout + verify.stderr


def test_python3_image(realistic: tuple[Store, BuildResult], tmp_path: Path) -> None:
    """Issue 4: python3 works, dpkg -l lists every package as installed, dpkg --audit is silent."""
    store, result = realistic
    packages = result.image.metadata["debian"]["packages"]
    assert {"python3", "python3.11", "libpython3.11-stdlib", "libssl3", "libsqlite3-0"} <= {
        p["package"] for p in packages}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mount_image(store.path, "blake3:" + result.digest.hex(), mnt):
        py = _chroot(mnt, "python3", "-c", "import ssl, sqlite3, json")
        assert py.returncode == 0 and py.stdout == "" and py.stderr == "", py.stderr
        listing = _chroot(mnt, "dpkg", "-l")
        assert listing.returncode == 0, listing.stderr
        rows = [line.split()[:3] for line in listing.stdout.splitlines() if line[:1].islower()]
        listed = {name.split(":")[0]: (status, version) for status, name, version in rows}
        assert listed == {p["package"]: ("ii", p["version"]) for p in packages}
        audit = _chroot(mnt, "dpkg", "--audit")
        assert (audit.returncode, audit.stdout, audit.stderr) == (0, "", "")


def _trigger_deb(tmp: Path) -> Path:
    """A package that activates libc-bin's explicit trigger (ldconfig) and ships a file
    under debianutils' file trigger (/usr/share/debianutils/shells.d)."""
    root = tmp / "tinysh"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/share/debianutils/shells.d").mkdir(parents=True)
    (root / "usr/share/debianutils/shells.d/tinysh").write_text("/usr/bin/tinysh\n")
    (root / "DEBIAN/control").write_text("Package: tinysh\nVersion: 1.0\nArchitecture: all\n"
                                         "Maintainer: Test <t@example.org>\nDescription: test\n")
    (root / "DEBIAN/triggers").write_text("activate-noawait ldconfig\n")
    out = tmp / "tinysh.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(out)], check=True,
                   capture_output=True)
    return out


def test_trigger_interests_registered(realistic: tuple[Store, BuildResult], tmp_path: Path) -> None:
    """The dpkg database layer registers the packages' trigger interests as dpkg's unpack
    does, so a later dpkg -i in the image processes libc-bin's and debianutils' triggers."""
    store, result = realistic
    triggers_of = {p["package"]: store.get_fileset(store.resolve(p["fileset"])).metadata["debian"]["files"]
                   .get("triggers", "") for p in result.image.metadata["debian"]["packages"]}
    # The interests the image's packages declare, read without dpkgdb's parser.
    interests = sorted((line.split()[1], name) for name, text in triggers_of.items()
                       for line in text.splitlines() if line.startswith("interest"))
    assert interests == [("/usr/share/debianutils/shells.d", "debianutils"), ("ldconfig", "libc-bin")]
    assert "interest-await ldconfig" in triggers_of["libc-bin"].splitlines()
    assert "interest-noawait /usr/share/debianutils/shells.d" in triggers_of["debianutils"].splitlines()
    mnt, upper = tmp_path / "mnt", tmp_path / "upper"
    mnt.mkdir()
    with mount_image(store.path, "blake3:" + result.digest.hex(), mnt, args=["--writable", str(upper)]):
        triggers = mnt / "var/lib/dpkg/triggers"
        # What real dpkg (mmdebstrap, same package set) leaves: checked by hand, docs/debian.md.
        assert (triggers / "File").read_text() == "/usr/share/debianutils/shells.d debianutils/noawait\n"
        assert (triggers / "ldconfig").read_text() == "libc-bin\n"
        assert (triggers / "Unincorp").read_text() == ""
        assert sorted(os.listdir(triggers)) == ["File", "Lock", "Unincorp", "ldconfig"]
        from cnpsfs.debian.introspect import why

        for name in ("File", "ldconfig"):
            assert why(store, "blake3:" + result.digest.hex(), f"/var/lib/dpkg/triggers/{name}")[
                "label"] == "dpkg database"
        (mnt / "tmp/tinysh.deb").write_bytes(_trigger_deb(tmp_path).read_bytes())
        install = _chroot(mnt, "dpkg", "-i", "/tmp/tinysh.deb")
        assert install.returncode == 0, install.stdout + install.stderr
        assert "Processing triggers for libc-bin " in install.stdout, install.stdout
        assert "Processing triggers for debianutils " in install.stdout, install.stdout
        assert "/usr/bin/tinysh" in (mnt / "etc/shells").read_text().splitlines()  # update-shells ran
        for check in (("dpkg", "--audit"), ("dpkg", "-C")):
            out = _chroot(mnt, *check)
            assert (out.returncode, out.stdout, out.stderr) == (0, "", ""), check


def test_package_added_reuses_the_rest(realistic: tuple[Store, BuildResult], tmp_path: Path) -> None:
    store, first = realistic
    result = build(store, parse_recipe(_realistic("added", ["bzip2"])))
    assert (result.imported, result.reused) == (1, len(first.image.metadata["debian"]["packages"]))
    assert_dpkg_verify_silent(store, result.digest, tmp_path)
    from cnpsfs.debian.introspect import diff

    changes = diff(store, "example.org/hello@1", "example.org/hello@added")
    assert [p["package"] for p in changes["packages"]["added"]] == ["bzip2"]
    assert changes["packages"]["removed"] == changes["packages"]["changed"] == []


def _older_version(image_packages: list[dict[str, str]]) -> tuple[str, str, str]:
    """A package of the image with another version the sources still offer (libssl3 when
    it can be: bookworm and bookworm-security usually differ), and that version."""
    env = apt.AptEnv(apt.DEFAULT_CACHE, apt.host_arch(), apt.default_sources(None))
    current = {p["package"]: p["version"] for p in image_packages}
    offered = env.versions(*sorted(current))
    for name in ["libssl3", "tzdata", *sorted(current)]:
        others = [v for v in offered.get(name, []) if v != current[name]]
        if others:
            return name, current[name], others[0]
    pytest.fail("no package of the image has a second version in the apt sources")


def test_version_change_is_surgical(realistic: tuple[Store, BuildResult], tmp_path: Path) -> None:
    """Issue 4: one package version changed reuses every other FileSet; only the dpkg
    database and configure layers are new."""
    store, first = realistic
    package, was, pinned = _older_version(first.image.metadata["debian"]["packages"])
    result = build(store, parse_recipe(_realistic("pinned", [f"{package}={pinned}"])))
    assert_dpkg_verify_silent(store, result.digest, tmp_path)
    count = len(first.image.metadata["debian"]["packages"])
    assert (result.imported, result.reused) == (1, count - 1)
    before = {p["package"]: p for p in first.image.metadata["debian"]["packages"]}
    after = {p["package"]: p for p in result.image.metadata["debian"]["packages"]}
    assert after.keys() == before.keys()
    assert after[package]["version"] == pinned and after[package]["fileset"] != before[package]["fileset"]
    assert {n for n in after if after[n] != before[n]} == {package}
    old_layers = {layer.label: layer.fileset for layer in first.image.layers}
    new_layers = {layer.label: layer.fileset for layer in result.image.layers}
    changed = {label for label in new_layers if old_layers.get(label) != new_layers[label]}
    assert changed == {f"{package} {pinned}", "dpkg database", "configure"}
    assert len(result.image.layers) == len(first.image.layers)
    print(f"\n{package} {was} -> {pinned}: full build {first.timings}, version change {result.timings}")

    from cnpsfs.debian.introspect import diff, query

    changes = diff(store, "example.org/hello@1", "example.org/hello@pinned")["packages"]
    assert changes["added"] == changes["removed"] == []
    assert [(c["package"], c["from"], c["to"]) for c in changes["changed"]] == [(package, was, pinned)]
    assert [h["image"] for h in query(store, f"{package}={pinned}")] == ["example.org/hello@pinned"]
    if package == "libssl3":  # the library python's ssl module loads is the pinned one
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        with mount_image(store.path, "blake3:" + result.digest.hex(), mnt):
            py = _chroot(mnt, "python3", "-c", "import ssl; print(ssl.OPENSSL_VERSION)")
            assert py.stdout.startswith(f"OpenSSL {pinned.split('-')[0]} "), py.stdout + py.stderr
