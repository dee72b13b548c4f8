"""Importing .deb packages, checked against dpkg-deb on real Debian packages.

Packages come from the Debian mirror with ``apt-get download`` and are cached in
/var/cache/cnpsfs-tests/debs (``$CNPSFS_TEST_DEBS``) between runs; a cached file is
reused only while its SHA256 matches what apt's lists say. Trees are compared path by
path with what ``dpkg-deb -x`` extracts, metadata with ``dpkg-deb -f`` and ``-e``.

Malformed packages are made from real ones: members extracted and reassembled with
binutils ``ar``, truncated, flipped or replaced; a few odd ar layouts are written by
hand. Note on iputils-ping: in bookworm its .deb carries no ``security.capability``
(postinst runs ``setcap cap_net_raw+ep`` on /bin/ping), so there is nothing to import
there and the test checks that the tree has no xattrs at all.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
import zstandard

from cnpsfs import format as fmt
from cnpsfs.debian import naming
from cnpsfs.debian.ar import ArError, read_members
from cnpsfs.debian.control import ControlError, get_field, parse_control, stored_fields
from cnpsfs.debian.deb import import_deb, import_debs, open_deb
from cnpsfs.debian.version import (
    Constraint,
    VersionError,
    compare_versions,
    parse_constraint,
    parse_version,
    satisfies,
)
from cnpsfs.errors import ImportRejected
from cnpsfs.image.reader import ExtentMap, read_range
from cnpsfs.image.walk import walk
from cnpsfs.ingest.tree import ImportResult
from cnpsfs.store import LocalStore, Store

CACHE = Path(os.environ.get("CNPSFS_TEST_DEBS", "/var/cache/cnpsfs-tests/debs"))
#: hello: small; bash: conffiles, many docs; libc6: large, triggers, shlibs, symbols;
#: iputils-ping: an epoch; perl-base: hard links; passwd: setuid, setgid root:shadow;
#: tzdata: Architecture all, many symlinks, debconf templates and config.
PACKAGES = ["hello", "bash", "libc6", "iputils-ping", "perl-base", "passwd", "tzdata"]
CLOSURE_ROOTS = ["python3", "coreutils", "bash", "tzdata"]

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None or shutil.which("apt-get") is None
                                or shutil.which("ar") is None,
                                reason="needs dpkg-deb, apt-get and binutils' ar (Debian)")
pytestmark = needs_dpkg


# --------------------------------------------------------------------------- fetching


def _apt(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["apt-get", "-q", *args], capture_output=True, text=True, **kw)


def _print_uris(names: list[str]) -> list[tuple[str, int, str]]:
    """(file name, size, sha256) of each package's candidate .deb, updating lists if needed."""
    result = _apt(["download", "--print-uris", *names])
    if result.returncode != 0:
        update = _apt(["update"])
        assert update.returncode == 0, f"apt-get update failed:\n{update.stderr}"
        result = _apt(["download", "--print-uris", *names])
    assert result.returncode == 0, f"apt-get download --print-uris failed:\n{result.stderr}"
    out = []
    for line in result.stdout.splitlines():
        _uri, filename, size, checksum = line.split()
        assert checksum.startswith("SHA256:"), line
        out.append((filename, int(size), checksum[len("SHA256:"):]))
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


def fetch_debs(names: list[str]) -> list[Path]:
    """The .debs of *names* (in apt's order), downloaded into the cache when missing."""
    CACHE.mkdir(parents=True, exist_ok=True)
    wanted = _print_uris(names)
    missing = [f for f, size, sha in wanted
               if not (CACHE / f).exists() or (CACHE / f).stat().st_size != size or _sha256(CACHE / f) != sha]
    if missing:
        packages = [f.split("_")[0] for f in missing]
        result = _apt(["download", *packages], cwd=CACHE)
        if result.returncode != 0:
            assert _apt(["update"]).returncode == 0
            result = _apt(["download", *packages], cwd=CACHE)
        assert result.returncode == 0, f"apt-get download failed:\n{result.stderr}"
    paths = [CACHE / f for f, _size, _sha in wanted]
    for (f, _size, sha), path in zip(wanted, paths, strict=True):
        assert _sha256(path) == sha, f"{f}: checksum differs from the apt lists after download"
    return paths


@pytest.fixture(scope="module")
def debs() -> dict[str, Path]:
    paths = fetch_debs(PACKAGES)
    return {p.name.split("_")[0]: p for p in paths}


@pytest.fixture(scope="module")
def imported(debs: dict[str, Path],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, dict[str, ImportResult]]]:
    store = LocalStore(tmp_path_factory.mktemp("store"), create=True)
    names = list(debs)
    results = import_debs(store, [debs[n] for n in names])
    yield store, dict(zip(names, results, strict=True))
    store.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh store for one test (the same as conftest's, kept here so this module stands alone)."""
    store = LocalStore(tmp_path / "store", create=True)
    yield store
    store.close()


# --------------------------------------------------------------------------- comparing trees

Info = tuple[Any, ...]


def _kind(mode: int) -> str:
    return {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "chardev",
            stat.S_IFBLK: "blockdev", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}[stat.S_IFMT(mode)]


def snapshot_dir(root: Path) -> tuple[dict[str, Info], list[frozenset[str]]]:
    """Every path under *root* (``""`` is root itself) with its lstat fields and content hash."""
    out: dict[str, Info] = {}
    inodes: dict[tuple[int, int], set[str]] = {}

    def visit(rel: str, full: str) -> None:
        st = os.lstat(full)
        kind = _kind(st.st_mode)
        target = os.readlink(full) if kind == "symlink" else None
        content = None
        if kind == "file":
            with open(full, "rb") as f:
                content = blake3.blake3(f.read()).hexdigest()
            if st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), set()).add(rel)
        mode = None if kind == "symlink" else stat.S_IMODE(st.st_mode)
        rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("chardev", "blockdev") else None
        out[rel] = (kind, mode, st.st_uid, st.st_gid, st.st_size if kind == "file" else None,
                    st.st_mtime_ns, target, content, rdev)

    visit("", str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            visit(os.path.relpath(full, root), full)
    return out, [frozenset(g) for g in inodes.values() if len(g) > 1]


def snapshot_fileset(store: Store, root: fmt.Entry) -> tuple[dict[str, Info], list[frozenset[str]]]:
    out: dict[str, Info] = {}
    links: dict[bytes, set[str]] = {}
    for parts, entry, _opaque in walk(store, root):
        rel = os.fsdecode(b"/".join(parts))
        kind = {fmt.Kind.FILE: "file", fmt.Kind.DIR: "dir", fmt.Kind.SYMLINK: "symlink",
                fmt.Kind.CHARDEV: "chardev", fmt.Kind.BLOCKDEV: "blockdev", fmt.Kind.FIFO: "fifo",
                fmt.Kind.SOCKET: "socket"}[entry.kind]
        content = None
        if kind == "file":
            data = read_range(ExtentMap(store.file_extents(entry)), 0, entry.size, store.get)
            assert len(data) == entry.size
            content = blake3.blake3(data).hexdigest()
            if entry.size:
                assert entry.hash is not None and entry.hash.hex() == content, rel
        if entry.link is not None:
            links.setdefault(entry.link[0], set()).add(rel)
        assert not entry.xattrs, f"{rel}: unexpected xattrs {entry.xattrs}"
        out[rel] = (kind, None if kind == "symlink" else entry.mode, entry.uid, entry.gid,
                    entry.size if kind == "file" else None, entry.mtime_ns,
                    os.fsdecode(entry.target) if kind == "symlink" else None, content,
                    entry.rdev if kind in ("chardev", "blockdev") else None)
    return out, [frozenset(g) for g in links.values()]


FIELDS = ("type", "mode", "uid", "gid", "size", "mtime_ns", "target", "content", "rdev")


def diff_trees(ours: dict[str, Info], theirs: dict[str, Info], extracted_at: int) -> list[str]:
    """Differences, except directory mtimes that GNU tar left at extraction time.

    tar restores a directory's mtime when it leaves the directory in the archive; a
    member that comes back to it later (bash's ./bin/rbash symlink, listed after
    ./usr) touches it again, so ``dpkg-deb -x`` shows the time of extraction there.
    The FileSet keeps the mtime the archive records, which is what is meant.
    """
    problems = [f"only in the FileSet: {p}" for p in sorted(ours.keys() - theirs.keys())]
    problems += [f"only in dpkg-deb -x: {p}" for p in sorted(theirs.keys() - ours.keys())]
    for path in sorted(ours.keys() & theirs.keys()):
        for name, a, b in zip(FIELDS, ours[path], theirs[path], strict=True):
            if name == "mtime_ns" and theirs[path][0] == "dir" and b >= extracted_at:
                continue
            if a != b:
                problems.append(f"{path or '/'}: {name} {a!r} (FileSet) != {b!r} (dpkg-deb -x)")
    return problems


def dpkg_extract(deb: Path, dest: Path) -> int:
    """Run ``dpkg-deb -x``; returns a time (ns) just before extraction started."""
    started = time.time_ns() - 1_000_000_000
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True, capture_output=True)
    return started


def assert_same_as_dpkg(store: Store, result: ImportResult, deb: Path, dest: Path) -> None:
    started = dpkg_extract(deb, dest)
    ours, our_links = snapshot_fileset(store, result.fileset.root)
    theirs, their_links = snapshot_dir(dest)
    problems = diff_trees(ours, theirs, started)
    assert not problems, f"{deb.name}: {len(problems)} differences:\n" + "\n".join(problems[:40])
    assert sorted(map(sorted, our_links)) == sorted(map(sorted, their_links)), "hard link groups differ"
    assert result.entries == len(theirs)


# --------------------------------------------------------------------------- real packages


@pytest.mark.parametrize("package", PACKAGES)
def test_tree_matches_dpkg_deb_extract(package: str, debs: dict[str, Path],
                                       imported: tuple[Store, dict[str, ImportResult]], tmp_path: Path) -> None:
    store, results = imported
    assert_same_as_dpkg(store, results[package], debs[package], tmp_path / "x")


@pytest.mark.parametrize("package", PACKAGES)
def test_metadata_matches_dpkg_deb(package: str, debs: dict[str, Path],
                                   imported: tuple[Store, dict[str, ImportResult]], tmp_path: Path) -> None:
    store, results = imported
    deb = debs[package]
    fileset = store.get_fileset(results[package].digest)  # as stored, not as built
    meta = fileset.metadata["debian"]
    assert meta["layout"] == 1 and meta["format"] == "2.0"
    assert meta["members"] == subprocess.run(["ar", "t", str(deb)], check=True, capture_output=True,
                                             text=True).stdout.split()

    # Control fields: the same names in the same order, each value as dpkg-deb -f prints it.
    printed = subprocess.run(["dpkg-deb", "-f", str(deb)], check=True, capture_output=True, text=True).stdout
    names = [line.split(":", 1)[0] for line in printed.splitlines() if line and not line[0].isspace()]
    assert meta["fields"] == names
    assert list(meta["control"]) == sorted(names, key=lambda n: (len(n.encode()), n.encode()))  # canonical CBOR
    assert [name for name, _value in stored_fields(fileset.metadata)] == names
    for name in names:
        value = subprocess.run(["dpkg-deb", "-f", str(deb), name], check=True, capture_output=True,
                               text=True).stdout
        assert meta["control"][name] == value.removesuffix("\n"), name

    # Every file of the control archive, byte for byte, with its mode.
    ctl = tmp_path / "DEBIAN"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(ctl)], check=True, capture_output=True)
    on_disk = {p.name: p for p in ctl.iterdir()}
    assert set(meta["files"]) == set(on_disk)
    for name, path in on_disk.items():
        stored = meta["files"][name]
        assert (stored.encode() if isinstance(stored, str) else stored) == path.read_bytes(), name
        assert meta["modes"][name] == stat.S_IMODE(path.lstat().st_mode), name
    assert meta["archive"] == {"sha256": _sha256(deb), "size": deb.stat().st_size}

    # Name and version come from the control file; the epoch's colon is kept.
    control = meta["control"]
    assert fileset.name == f"debian.org/{control['Package']}"
    assert fileset.version == f"{control['Version']}_{control['Architecture']}"
    assert store.resolve(f"{fileset.name}@{fileset.version}") == results[package].digest


def test_epoch_and_expected_control_files(imported: tuple[Store, dict[str, ImportResult]]) -> None:
    _store, results = imported
    ping = results["iputils-ping"].fileset
    assert ping.name == "debian.org/iputils-ping"
    version, arch = naming.split_tag_version(ping.version)
    assert version.startswith("3:") and arch == "amd64"
    assert parse_version(version).epoch == "3"
    # No capability in the .deb: bookworm's postinst sets it with setcap.
    assert "setcap" in ping.metadata["debian"]["files"]["postinst"]
    libc = results["libc6"].fileset.metadata["debian"]
    assert {"shlibs", "symbols", "triggers", "md5sums", "control"} <= set(libc["files"])
    assert libc["control"]["Multi-Arch"] == "same"
    tz = results["tzdata"].fileset
    assert tz.version.endswith("_all")
    assert {"config", "templates"} <= set(tz.metadata["debian"]["files"])
    bash = results["bash"].fileset.metadata["debian"]
    assert bash["control"]["Essential"] == "yes" and "conffiles" in bash["files"]
    assert bash["modes"]["postinst"] == 0o755


def test_same_deb_twice_stores_nothing_new(debs: dict[str, Path], tmp_path: Path, store: Store) -> None:
    first = import_deb(store, debs["bash"])
    objects = sum(store.counts()[:2])
    packs = store.pack_files()
    copy = tmp_path / "elsewhere.deb"  # the path is not part of the FileSet
    shutil.copyfile(debs["bash"], copy)
    for again in (import_deb(store, debs["bash"]), import_deb(store, copy)):
        assert again.digest == first.digest
        assert again.new_bytes == 0
    assert sum(store.counts()[:2]) == objects
    assert store.pack_files() == packs
    assert [t.ref for t in store.tags()] == [f"debian.org/bash@{first.fileset.version}"]


def test_import_debs_keeps_input_order_and_reports_progress(debs: dict[str, Path], store: Store) -> None:
    order = ["tzdata", "hello", "iputils-ping"]
    seen: list[int] = []
    results = import_debs(store, [debs[n] for n in order], on_progress=seen.append)
    assert [r.fileset.name for r in results] == [f"debian.org/{n}" for n in order]
    assert sum(seen) == sum(r.logical_bytes for r in results) > 0


def test_source_date_epoch_clamps_mtimes(debs: dict[str, Path], tmp_path: Path, store: Store) -> None:
    result = import_deb(store, debs["hello"], source_date_epoch=1_000_000)
    assert {e.mtime_ns for _p, e, _o in walk(store, result.fileset.root)} == {1_000_000 * 10**9}


# --------------------------------------------------------------------------- repacked packages


def ar_extract(deb: Path, dest: Path) -> dict[str, bytes]:
    dest.mkdir(parents=True, exist_ok=True)
    names = subprocess.run(["ar", "t", str(deb)], check=True, capture_output=True, text=True).stdout.split()
    subprocess.run(["ar", "x", str(deb)], check=True, cwd=dest)
    return {n: (dest / n).read_bytes() for n in names}


def ar_build(dest: Path, members: list[tuple[str, bytes]]) -> Path:
    """An archive written by binutils' ar (GNU-style ``name/`` headers)."""
    work = dest.parent / (dest.name + ".members")
    work.mkdir()
    for name, data in members:
        (work / name).write_bytes(data)
    subprocess.run(["ar", "rc", str(dest.resolve()), *[n for n, _d in members]], check=True, cwd=work)
    return dest


def ar_by_hand(members: list[tuple[bytes, bytes]], *, terminator: bytes = b"`\n") -> bytes:
    """An archive with dpkg-style (space-padded, no ``/``) headers, byte by byte."""
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
        out += str(len(data)).encode().ljust(10) + terminator + data
        if len(data) % 2:
            out += b"\n"
    return bytes(out)


def decompress(name: str, data: bytes) -> bytes:
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".zst"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "": lambda d: d,
    ".gz": lambda d: gzip.compress(d, mtime=0),
    ".xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ),
    ".zst": lambda d: zstandard.ZstdCompressor(write_checksum=True).compress(d),
    ".bz2": bz2.compress,
    ".lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
}


@pytest.fixture(scope="module")
def hello_parts(debs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """hello's members, with control.tar and data.tar decompressed (keys 'control', 'data')."""
    raw = ar_extract(debs["hello"], tmp_path_factory.mktemp("hello"))
    return {"debian-binary": raw["debian-binary"], "control": decompress("x.xz", raw["control.tar.xz"]),
            "data": decompress("x.xz", raw["data.tar.xz"]), "control.tar.xz": raw["control.tar.xz"],
            "data.tar.xz": raw["data.tar.xz"]}


def make_deb(tmp_path: Path, parts: dict[str, bytes], *, control_ext: str = ".xz", data_ext: str = ".xz",
             control: bytes | None = None, data: bytes | None = None, name: str = "test.deb") -> Path:
    return ar_build(tmp_path / name, [
        ("debian-binary", parts["debian-binary"]),
        (f"control.tar{control_ext}", COMPRESS[control_ext](parts["control"] if control is None else control)),
        (f"data.tar{data_ext}", COMPRESS[data_ext](parts["data"] if data is None else data)),
    ])


@pytest.mark.parametrize(("control_ext", "data_ext"), [
    (".xz", ".gz"), (".gz", ".zst"), ("", ".bz2"), (".zst", ""), (".xz", ".lzma"),
])
def test_every_compression_dpkg_accepts(control_ext: str, data_ext: str, hello_parts: dict[str, bytes],
                                        imported: tuple[Store, dict[str, ImportResult]], tmp_path: Path,
                                        store: Store) -> None:
    deb = make_deb(tmp_path, hello_parts, control_ext=control_ext, data_ext=data_ext)
    result = import_deb(store, deb)
    assert_same_as_dpkg(store, result, deb, tmp_path / "x")
    original = imported[1]["hello"].fileset
    # Same tree and control data as the original; only the archive description differs.
    assert result.fileset.root.tree == original.root.tree
    assert result.fileset.metadata["debian"]["members"][1:] == [f"control.tar{control_ext}", f"data.tar{data_ext}"]
    assert result.fileset.metadata["debian"]["control"] == original.metadata["debian"]["control"]


def test_signature_and_trailing_members_are_ignored(hello_parts: dict[str, bytes], tmp_path: Path,
                                                    store: Store) -> None:
    deb = ar_build(tmp_path / "signed.deb", [
        ("debian-binary", hello_parts["debian-binary"]), ("_gpgbuilder", b"-----BEGIN PGP SIGNATURE-----\n"),
        ("control.tar.xz", hello_parts["control.tar.xz"]), ("data.tar.xz", hello_parts["data.tar.xz"]),
        ("extra-stuff", b"ignored by readers (deb(5))"),
    ])
    result = import_deb(store, deb)
    assert result.fileset.metadata["debian"]["members"] == [
        "debian-binary", "_gpgbuilder", "control.tar.xz", "data.tar.xz", "extra-stuff"]
    assert_same_as_dpkg(store, result, deb, tmp_path / "x")


def test_dpkg_style_headers_without_slash(hello_parts: dict[str, bytes], tmp_path: Path, store: Store) -> None:
    deb = tmp_path / "bsd.deb"
    deb.write_bytes(ar_by_hand([(b"debian-binary", hello_parts["debian-binary"]),
                                (b"control.tar.xz", hello_parts["control.tar.xz"]),
                                (b"data.tar.xz", hello_parts["data.tar.xz"])]))
    result = import_deb(store, deb)
    assert result.fileset.name == "debian.org/hello"


def test_a_future_minor_format_is_accepted(hello_parts: dict[str, bytes], tmp_path: Path, store: Store) -> None:
    parts = dict(hello_parts, **{"debian-binary": b"2.7\nsome future line\n"})
    result = import_deb(store, make_deb(tmp_path, parts))
    assert result.fileset.metadata["debian"]["format"] == "2.7"


def test_non_utf8_scripts_are_kept_as_bytes(hello_parts: dict[str, bytes], tmp_path: Path, store: Store) -> None:
    control = _retar(hello_parts["control"], add={"./postinst": b"#!/bin/sh\necho caf\xe9\n"})
    result = import_deb(store, make_deb(tmp_path, hello_parts, control=control))
    assert result.fileset.metadata["debian"]["files"]["postinst"] == b"#!/bin/sh\necho caf\xe9\n"
    assert result.fileset.metadata["debian"]["modes"]["postinst"] == 0o755


# --------------------------------------------------------------------------- malformed packages


def _retar(tar_bytes: bytes, *, add: dict[str, bytes] | None = None, drop: tuple[str, ...] = (),
           replace: dict[str, bytes] | None = None, extra: list[tarfile.TarInfo] | None = None) -> bytes:
    """Rewrite an uncompressed tar: drop, replace or add regular files, or append raw members."""
    out = io.BytesIO()
    replace = replace or {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as src, tarfile.open(fileobj=out, mode="w",
                                                                         format=tarfile.GNU_FORMAT) as dst:
        for member in src.getmembers():
            if member.name in drop:
                continue
            data = replace.get(member.name)
            if data is None and member.isreg():
                f = src.extractfile(member)
                assert f is not None
                data = f.read()
            if data is not None:
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
        for name, data in (add or {}).items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, 1_600_000_000
            dst.addfile(info, io.BytesIO(data))
        for info in extra or []:
            dst.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return out.getvalue()


def _flip(data: bytes, at: float) -> bytes:
    i = int(len(data) * at)
    return data[:i] + bytes(b ^ 0x55 for b in data[i:i + 16]) + data[i + 16:]


def _tarinfo(name: str, kind: bytes = tarfile.REGTYPE, size: int = 1, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size if kind == tarfile.REGTYPE else 0, linkname
    return info


def _deb_bytes(parts: dict[str, bytes], members: list[tuple[str, bytes]] | None = None) -> list[tuple[str, bytes]]:
    return members or [("debian-binary", parts["debian-binary"]), ("control.tar.xz", parts["control.tar.xz"]),
                       ("data.tar.xz", parts["data.tar.xz"])]


def _malformed_cases() -> dict[str, tuple[Callable[[dict[str, bytes], Path], Path], list[str]]]:
    """name -> (builder of the bad .deb, words the error message must contain)."""

    def ar_members(members: Callable[[dict[str, bytes]], list[tuple[str, bytes]]], *words: str) -> Any:
        return (lambda p, d: ar_build(d / "bad.deb", members(p)), list(words))

    def raw_bytes(mutate: Callable[[bytes], bytes], *words: str) -> Any:
        def build(p: dict[str, bytes], d: Path) -> Path:
            good = ar_build(d / "good.deb", _deb_bytes(p)).read_bytes()
            (d / "bad.deb").write_bytes(mutate(good))
            return d / "bad.deb"
        return build, list(words)

    def control_tar(**kw: Any) -> Callable[[dict[str, bytes]], list[tuple[str, bytes]]]:
        return lambda p: [("debian-binary", p["debian-binary"]),
                          ("control.tar.xz", COMPRESS[".xz"](_retar(p["control"], **kw))),
                          ("data.tar.xz", p["data.tar.xz"])]

    def data_tar(extra: list[tarfile.TarInfo]) -> Callable[[dict[str, bytes]], list[tuple[str, bytes]]]:
        return lambda p: [("debian-binary", p["debian-binary"]), ("control.tar.xz", p["control.tar.xz"]),
                          ("data.tar.xz", COMPRESS[".xz"](_retar(p["data"], extra=extra)))]

    def control_file(text: bytes) -> Callable[[dict[str, bytes]], list[tuple[str, bytes]]]:
        return control_tar(replace={"./control": text})

    ctl = b"Package: hello\nVersion: 2.10-3\nArchitecture: amd64\n"
    return {
        "bad magic": raw_bytes(lambda b: b"!<arcx>\n" + b[8:], "not a valid .deb", "bad magic"),
        "not an archive at all": raw_bytes(lambda b: b"hello", "bad magic"),
        "empty archive": raw_bytes(lambda b: b[:8], "empty"),
        "truncated header": raw_bytes(lambda b: b[:8 + 60 + 4 + 30], "member 2", "truncated header"),
        "truncated data": raw_bytes(lambda b: b[: len(b) - 1000], "data.tar.xz", "truncated data"),
        "bad header terminator": raw_bytes(lambda b: b[:8 + 58] + b"XX" + b[8 + 60:], "terminator"),
        "non-numeric size": raw_bytes(lambda b: b[:8 + 48] + b"12a4      " + b[8 + 58:], "size"),
        "missing data member": ar_members(lambda p: _deb_bytes(p)[:2], "missing member data.tar"),
        "missing control member": ar_members(lambda p: [_deb_bytes(p)[0], _deb_bytes(p)[2]], "data.tar.xz",
                                             "before the control archive"),
        "missing debian-binary": ar_members(lambda p: _deb_bytes(p)[1:], "control.tar.xz", "debian-binary"),
        "format 3.0": ar_members(lambda p: [("debian-binary", b"3.0\n"), *_deb_bytes(p)[1:]], "debian-binary",
                                 "only 2.x"),
        "format without newline": ar_members(lambda p: [("debian-binary", b"2.0"), *_deb_bytes(p)[1:]],
                                             "debian-binary"),
        "two control members": ar_members(lambda p: [*_deb_bytes(p)[:2], ("control.tar.gz", b"x"),
                                                     _deb_bytes(p)[2]], "control.tar.gz", "second control"),
        "two data members": ar_members(lambda p: [*_deb_bytes(p), ("data.tar.gz", b"x")], "data.tar.gz",
                                       "second data"),
        "unknown member before data": ar_members(lambda p: [*_deb_bytes(p)[:2], ("junk", b"x"),
                                                            _deb_bytes(p)[2]], "junk", "unexpected"),
        "unknown data compression": ar_members(lambda p: [*_deb_bytes(p)[:2], ("data.tar.lz4", b"x")],
                                               "data.tar.lz4", "unknown compression"),
        "control.tar.bz2 is not allowed": ar_members(
            lambda p: [_deb_bytes(p)[0], ("control.tar.bz2", bz2.compress(p["control"])), _deb_bytes(p)[2]],
            "control.tar.bz2", "unknown compression"),
        "corrupt control archive": ar_members(
            lambda p: [_deb_bytes(p)[0], ("control.tar.xz", _flip(p["control.tar.xz"], 0.5)),
                       _deb_bytes(p)[2]], "control.tar.xz"),
        "corrupt data archive": ar_members(
            lambda p: [*_deb_bytes(p)[:2], ("data.tar.xz", _flip(p["data.tar.xz"], 0.5))], "data.tar.xz"),
        "corrupt end of data archive": ar_members(
            lambda p: [*_deb_bytes(p)[:2], ("data.tar.gz", _flip(COMPRESS[".gz"](p["data"]), 0.9995))],
            "data.tar.gz"),
        "data compressed differently than named": ar_members(
            lambda p: [*_deb_bytes(p)[:2], ("data.tar.xz", COMPRESS[".gz"](p["data"]))], "data.tar.xz"),
        "uncompressed name, compressed data": ar_members(
            lambda p: [*_deb_bytes(p)[:2], ("data.tar", p["data.tar.xz"])], "data.tar", "xz-compressed"),
        "data archive is not a tar": ar_members(
            lambda p: [*_deb_bytes(p)[:2], ("data.tar.xz", COMPRESS[".xz"](b"no tar here" * 100))],
            "data.tar.xz"),
        "control archive without control": ar_members(control_tar(drop=("./control",)), "control.tar.xz",
                                                      "no 'control' file"),
        "control file without Package": ar_members(control_file(b"Version: 1.0\nArchitecture: all\n"),
                                                   "control.tar.xz", "Package"),
        "control file with a duplicate field": ar_members(control_file(ctl + b"version: 2\n"), "duplicate field"),
        "control file with two stanzas": ar_members(control_file(ctl + b"\nPackage: other\n"), "blank line"),
        "control file with a bad line": ar_members(control_file(ctl + b"no colon here\n"), "line 4"),
        "control file without final newline": ar_members(control_file(ctl.rstrip(b"\n")), "final newline"),
        "invalid version": ar_members(control_file(b"Package: hello\nVersion: 2.0 beta\nArchitecture: all\n"),
                                      "invalid Debian version"),
        "invalid package name": ar_members(control_file(b"Package: hel/lo\nVersion: 1\nArchitecture: all\n"),
                                           "invalid package name"),
        "subdirectory in control archive": ar_members(
            control_tar(extra=[_tarinfo("./sub/", tarfile.DIRTYPE), _tarinfo("./sub/x")]), "'./sub'"),
        "symlink in control archive": ar_members(
            control_tar(extra=[_tarinfo("./postrm", tarfile.SYMTYPE, linkname="postinst")]), "regular files"),
        "parent directory in data": ar_members(data_tar([_tarinfo("./usr/../../evil")]), "data.tar.xz",
                                               "../../evil", "'..'"),
        "absolute path in data": ar_members(data_tar([_tarinfo("/etc/evil")]), "data.tar.xz", "absolute"),
        "path through a symlink in data": ar_members(
            data_tar([_tarinfo("./escape", tarfile.SYMTYPE, linkname="/etc"), _tarinfo("./escape/passwd")]),
            "escape/passwd", "symlink"),
        "hard link to a missing member": ar_members(
            data_tar([_tarinfo("./usr/bin/x", tarfile.LNKTYPE, linkname="./nowhere")]), "hard link"),
        "duplicate data member": ar_members(data_tar([_tarinfo("./usr/bin/hello")]), "./usr/bin/hello",
                                            "duplicate"),
        "whiteout name in data": ar_members(data_tar([_tarinfo("./usr/.wh.bin")]), ".wh."),
    }


MALFORMED = _malformed_cases()
#: The dpkg-deb command that rejects the same package (``-x`` unless listed), or None
#: where dpkg-deb accepts it and we refuse on purpose: a second data.tar (dpkg reads the
#: first), absolute or duplicate data members (GNU tar strips the "/" or overwrites),
#: ``.wh.`` names (we could only store them as whiteouts) and non-file control members.
DPKG_ALSO_REJECTS: dict[str, str | None] = {
    "corrupt control archive": "-f", "control archive without control": "-f",
    "control file without Package": "-W", "control file with a duplicate field": "-W",
    "control file with two stanzas": "-W", "control file with a bad line": "-W",
    "control file without final newline": "-W", "invalid version": "-W", "invalid package name": "-W",
    "symlink in control archive": "-I",
    "two data members": None, "subdirectory in control archive": None, "absolute path in data": None,
    "duplicate data member": None, "whiteout name in data": None,
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_deb_is_rejected_and_nothing_stored(case: str, hello_parts: dict[str, bytes],
                                                      tmp_path: Path, store: Store) -> None:
    build, words = MALFORMED[case]
    deb = build(hello_parts, tmp_path)
    with pytest.raises(ImportRejected) as info:
        import_deb(store, deb)
    message = str(info.value)
    assert message.startswith(f"{deb}: ") or message.startswith(f"cannot open {deb}")
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert store.tags() == []
    assert sum(store.counts()[:2]) == 0
    assert store.pack_files() == {}
    assert not any(store.tmp_dir.glob("*.pack"))
    # dpkg-deb agrees the package is broken -- except where we are deliberately stricter.
    option = DPKG_ALSO_REJECTS.get(case, "-x")
    if option is not None:
        args = ["dpkg-deb", option, str(deb)] + ([str(tmp_path / "out")] if option == "-x" else [])
        assert subprocess.run(args, capture_output=True).returncode != 0, f"dpkg-deb {option} accepted it"


def test_import_debs_checks_every_file_before_importing(debs: dict[str, Path], tmp_path: Path, store: Store) -> None:
    bogus = tmp_path / "bogus.deb"
    bogus.write_bytes(b"!<arch>\n")
    with pytest.raises(ImportRejected, match=r"bogus\.deb"):
        import_debs(store, [debs["hello"], bogus])
    assert store.tags() == []
    with pytest.raises(ImportRejected, match="cannot open"):
        import_debs(store, [debs["hello"], tmp_path / "missing.deb"])
    with pytest.raises(ImportRejected, match="not a regular file"):
        import_debs(store, [debs["hello"], tmp_path])
    assert store.tags() == []


# --------------------------------------------------------------------------- helpers, in-process


def test_ar_reader_rejects_long_name_tables(tmp_path: Path) -> None:
    for name, words in ((b"//", "GNU"), (b"/", "GNU"), (b"#1/20", "BSD")):
        path = tmp_path / "a.ar"
        path.write_bytes(ar_by_hand([(b"debian-binary", b"2.0\n"), (name, b"x" * 20)]))
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(ArError, match=words):
                read_members(fd, path.stat().st_size)
        finally:
            os.close(fd)


def test_ar_reader_tolerates_missing_final_pad(tmp_path: Path) -> None:
    data = ar_by_hand([(b"debian-binary", b"2.0\n"), (b"odd", b"abc")])
    assert data.endswith(b"abc\n")
    path = tmp_path / "a.ar"
    path.write_bytes(data[:-1])
    fd = os.open(path, os.O_RDONLY)
    try:
        members = read_members(fd, len(data) - 1)
    finally:
        os.close(fd)
    assert [(m.name, m.size, m.mode) for m in members] == [("debian-binary", 4, 0o100644), ("odd", 3, 0o100644)]


def test_control_parser() -> None:
    text = (b"Package: x\nVersion:1.0\nDescription: short\n long line \n .\n more\nConffiles:\n /etc/a 123\n"
            b"Maintainer: Jos\xe9\n")
    fields = parse_control(text)
    assert fields == [("Package", "x"), ("Version", "1.0"), ("Description", "short\n long line \n .\n more"),
                      ("Conffiles", "\n /etc/a 123"), ("Maintainer", b"Jos\xe9")]
    assert get_field(dict(fields), "conffiles") == "\n /etc/a 123"
    assert parse_control(b"\n\nA: b\n\n") == [("A", "b")]
    for bad, words in ((b"", "empty"), (b" x: y\n", "continuation"), (b"A: b\nB c\n", "line 2"),
                       (b"-A: b\n", "invalid field name"), (b"#A: b\n", "invalid field name"),
                       (b"A B: c\n", "invalid field name"), (b"A: b\na: c\n", "duplicate")):
        with pytest.raises(ControlError, match=words):
            parse_control(bad)


def test_versions() -> None:
    assert compare_versions("1.0", "1.00") == 0
    assert compare_versions("1:1.0", "2.0") > 0
    assert compare_versions("1.0~rc1", "1.0") < 0
    assert compare_versions("2.36-9+deb12u4", "2.36-9+deb12u14") < 0
    assert satisfies("5.2.15-2+b13", ">=", "5.2") and not satisfies("5.2.15-2", "<<", "5.2")
    assert satisfies("1.0", "=", "0:1.0")
    with pytest.raises(VersionError):
        parse_version("1.0 beta")
    with pytest.raises(VersionError):
        satisfies("1", "<", "2")
    assert parse_constraint("bash>=5.2") == Constraint("bash", ">=", "5.2")
    assert parse_constraint("libc6:amd64 (<< 2.37)") == Constraint("libc6", "<<", "2.37", "amd64")
    assert parse_constraint("hello==2.10-3") == Constraint("hello", "=", "2.10-3")
    assert parse_constraint("iputils-ping") == Constraint("iputils-ping")
    assert parse_constraint("iputils-ping=3:20221126-1+deb12u1").matches("iputils-ping", "3:20221126-1+deb12u1")
    assert not parse_constraint("bash>>5.2.15-2+b13").matches("bash", "5.2.15-2+b13")
    for bad in ("bash<5", "bash>=", ">=5", "bash>=5 6"):
        with pytest.raises(VersionError):
            parse_constraint(bad)


def test_naming() -> None:
    assert naming.tag_name("libc6") == "debian.org/libc6"
    assert naming.split_tag_version("1:2.0-1_amd64") == ("1:2.0-1", "amd64")
    assert naming.package_of("debian.org/g++") == "g++"
    assert naming.package_of("localhost/x") is None
    with pytest.raises(ValueError):
        naming.split_tag_version("2.0")


def test_open_deb_reads_without_storing(debs: dict[str, Path]) -> None:
    with open_deb(debs["hello"]) as deb:
        assert (deb.package, deb.architecture) == ("hello", "amd64")
        assert deb.tag == ("debian.org/hello", "2.10-3_amd64")
        assert deb.data_member.name == "data.tar.xz"


# --------------------------------------------------------------------------- a whole closure


def closure_packages(roots: list[str]) -> list[str]:
    out = subprocess.run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
                          "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *roots],
                         check=True, capture_output=True, text=True).stdout
    return sorted({line for line in out.splitlines() if line and not line[0].isspace() and not line.startswith("<")})


@pytest.mark.slow
def test_closure_union_matches_dpkg_deb_extract(tmp_path: Path, store: Store) -> None:
    names = closure_packages(CLOSURE_ROOTS)
    paths = sorted(fetch_debs(names))
    assert len(paths) >= 50, names
    start = time.monotonic()
    results = import_debs(store, paths)
    seconds = time.monotonic() - start
    total = sum(p.stat().st_size for p in paths)
    print(f"\nimported {len(paths)} packages ({total >> 20} MiB of .deb, "
          f"{sum(r.logical_bytes for r in results) >> 20} MiB of data) in {seconds:.1f}s")

    # Extract in the same order dpkg-deb -x would overwrite in; the union's later package wins too.
    dest = tmp_path / "root"
    union: dict[str, Info] = {}
    owners: dict[str, list[str]] = {}
    conflicts: list[str] = []
    started = time.time_ns()
    for path, result in zip(paths, results, strict=True):
        started = min(started, dpkg_extract(path, dest))
        tree, _links = snapshot_fileset(store, result.fileset.root)
        for rel, info in tree.items():
            previous = union.get(rel)
            if previous is not None and info[0] != "dir" and previous[:8] != info[:8]:
                conflicts.append(f"{rel or '/'}: {owners[rel][-1]} and {result.fileset.name} differ")
            union[rel] = info
            owners.setdefault(rel, []).append(result.fileset.name)
    theirs, _links = snapshot_dir(dest)
    problems = diff_trees(union, theirs, started)
    assert not problems, f"{len(problems)} differences:\n" + "\n".join(problems[:40])
    shared = sorted(p for p, o in owners.items() if len(o) > 1 and union[p][0] != "dir")
    print(f"{len(union)} paths; {sum(1 for o in owners.values() if len(o) > 1)} in several packages "
          f"({len(shared)} of them not directories); file conflicts: {conflicts or 'none'}")
    for line in conflicts:
        print("conflict:", line)
