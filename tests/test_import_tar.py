"""Tar import: compressions, stdin, OCI whiteouts, hostile archives, and chunking that
depends only on content and canonical paths (not on the source or its member order).
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import random
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

import blake3
import pytest
import zstandard
from cnpsfs_testlib import (
    IS_ROOT,
    Cli,
    Node,
    assert_same_tree,
    build_tree,
    digest_of,
    index_counts,
    listing,
    snapshot,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnpsfs import format as fmt
from cnpsfs.format.chunker import CDC_MAX, CDC_MIN, LARGE_FILE
from cnpsfs.image.reader import FileReader
from cnpsfs.image.walk import walk
from cnpsfs.ingest.directory import import_directory
from cnpsfs.ingest.tar import import_tar
from cnpsfs.ingest.tree import ImportOptions
from cnpsfs.store import LocalStore, Store

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (owners, devices)")


# --------------------------------------------------------------------------- building archives


def tar_bytes(members: Sequence[tuple[tarfile.TarInfo, bytes | None]], *, fmt_: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt_) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, *, linkname: str = "", mode: int = 0o644,
           mtime: int = 1_600_000_000) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = mode
    info.mtime = mtime
    return info


def tar_of_tree(root: Path, *, seed: int | None = None) -> bytes:
    """A PAX archive of *root* written by Python, members shuffled by *seed* (None: canonical order).

    Whatever the order, a hard link's first member in the archive carries the data and the
    others are link members, and every xattr and nanosecond mtime is kept.
    """
    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            paths.append(os.path.relpath(os.path.join(dirpath, name), root))
    paths.sort()
    items = [".", *paths]
    if seed is not None:
        random.Random(seed).shuffle(items)
    seen_inodes: dict[tuple[int, int], str] = {}
    members = []
    for rel in items:
        full = root / rel
        st_ = os.lstat(full)
        info = tarfile.TarInfo(rel)
        info.mode, info.uid, info.gid = stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid
        info.uname = info.gname = ""
        sec, ns = divmod(abs(st_.st_mtime_ns), 10**9)
        sign = "-" if st_.st_mtime_ns < 0 else ""
        info.mtime = st_.st_mtime_ns // 10**9
        pax = {"mtime": f"{sign}{sec}.{ns:09d}"} if ns else {}
        for name in os.listxattr(full, follow_symlinks=False):
            value = os.getxattr(full, name, follow_symlinks=False)
            pax["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
        info.pax_headers = pax
        data = None
        key = (st_.st_dev, st_.st_ino)
        if stat.S_ISDIR(st_.st_mode):
            info.type = tarfile.DIRTYPE
        elif st_.st_nlink > 1 and key in seen_inodes:
            info.type, info.linkname = tarfile.LNKTYPE, seen_inodes[key]
        elif stat.S_ISREG(st_.st_mode):
            seen_inodes[key] = rel
            data = full.read_bytes()
        elif stat.S_ISLNK(st_.st_mode):
            seen_inodes[key] = rel
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(full)
        elif stat.S_ISCHR(st_.st_mode) or stat.S_ISBLK(st_.st_mode):
            seen_inodes[key] = rel
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(st_.st_mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st_.st_rdev), os.minor(st_.st_rdev)
        elif stat.S_ISFIFO(st_.st_mode):
            seen_inodes[key] = rel
            info.type = tarfile.FIFOTYPE
        members.append((info, data))
    return tar_bytes(members)


def pax_record(key: str, value: bytes) -> bytes:
    body = f" {key}=".encode() + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


# --------------------------------------------------------------------------- formats and sources


@pytest.fixture
def synthetic_tar(tmp_path: Path, cli: Cli, synthetic_tree) -> tuple[Path, str]:
    """The synthetic tree as a plain tar exported by cnpsfs, and the digest of its dir import."""
    tree = synthetic_tree()
    ref = digest_of(cli.ok("import", "dir", tree, "--name", "example.org/t", "--version", "1"))
    cli.ok("export", "tar", ref, tmp_path / "t.tar")
    return tmp_path / "t.tar", ref


@needs_root
@pytest.mark.parametrize("compress", ["gzip", "xz", "bzip2", "zstd"])
def test_compressed_archives(tmp_path: Path, cli: Cli, synthetic_tar: tuple[Path, str], compress: str) -> None:
    plain, ref = synthetic_tar
    packed = tmp_path / f"t.tar.{compress}"
    with open(packed, "wb") as out:
        subprocess.run([compress, "-c", plain], stdout=out, check=True)
    assert digest_of(cli.ok("import", "tar", packed, "--name", "example.org/t", "--version", "1")) == ref
    # The same through a pipe: compression is detected from magic bytes, not the file name.
    result = cli.ok("import", "tar", "-", "--name", "example.org/t", "--version", "1", input=packed.read_bytes())
    assert digest_of(result) == ref


@needs_root
def test_stdin_and_python_compressors(tmp_path: Path, cli: Cli, synthetic_tar: tuple[Path, str]) -> None:
    plain, ref = synthetic_tar
    data = plain.read_bytes()
    for blob in (data, gzip.compress(data), lzma.compress(data), bz2.compress(data),
                 zstandard.ZstdCompressor().compress(data[: len(data) // 2])
                 + zstandard.ZstdCompressor().compress(data[len(data) // 2 :])):  # two zstd frames
        assert digest_of(cli.ok("import", "tar", "-", "--name", "example.org/t", "--version", "1", input=blob)) == ref
    # Without --name, stdin imports are called localhost/stdin.
    cli.ok("import", "tar", "-", input=data)
    assert "localhost/stdin" in {t["name"] for t in json.loads(cli.ok("tag", "list", "--json").stdout)}


@needs_root
def test_gnu_tar_archive_matches_directory_import(tmp_path: Path, cli: Cli, synthetic_tree) -> None:
    """What GNU tar archives (PAX, xattrs, ns mtimes) imports to the same digest as the tree."""
    tree = synthetic_tree()
    ref = digest_of(cli.ok("import", "dir", tree, "--name", "example.org/t", "--version", "1"))
    archive = tmp_path / "gnu.tar.gz"
    subprocess.run(["tar", "--format=posix", "--pax-option=delete=atime,delete=ctime", "--numeric-owner",
                    "--xattrs", "--xattrs-include=*", "-C", tree, "-czf", archive, "."], check=True)
    assert digest_of(cli.ok("import", "tar", archive, "--name", "example.org/t", "--version", "1")) == ref


@needs_root
def test_gnu_sparse_members(tmp_path: Path, cli: Cli) -> None:
    size = 64 << 20
    tree = build_tree(tmp_path / "t", [Node(b"disk.img", "sparse", size=size, mtime_ns=10**18,
                                            pieces=[(5 << 20, b"data in the middle"), (size - 3, b"end")])],
                      root_mtime_ns=10**18)
    ref = digest_of(cli.ok("import", "dir", tree, "--name", "example.org/sparse"))
    for fmt_opt in ("--format=posix", "--format=gnu"):
        archive = tmp_path / f"sparse{fmt_opt[9:]}.tar"
        pax = ["--pax-option=delete=atime,delete=ctime"] if fmt_opt == "--format=posix" else []
        subprocess.run(["tar", fmt_opt, "--sparse", "--numeric-owner", *pax, "-C", tree, "-cf", archive, "."],
                       check=True)
        assert archive.stat().st_size < 1 << 20
        got = digest_of(cli.ok("import", "tar", archive, "--name", "example.org/sparse"))
        if fmt_opt == "--format=posix":
            assert got == ref  # the PAX format keeps nanoseconds, so the trees are identical
        out = tmp_path / f"out{fmt_opt[9:]}"
        cli.ok("export", "dir", got, out)
        with open(out / "disk.img", "rb") as f:
            f.seek(5 << 20)
            assert f.read(18) == b"data in the middle"
            f.seek(size - 3)
            assert f.read() == b"end"
        assert (out / "disk.img").stat().st_blocks * 512 < 8 << 20


# --------------------------------------------------------------------------- OCI whiteouts


def test_oci_whiteouts_and_opaque_directories(tmp_path: Path, cli: Cli) -> None:
    archive = tmp_path / "layer.tar"
    archive.write_bytes(tar_bytes([
        (member("etc", tarfile.DIRTYPE, mode=0o755), None),
        (member("etc/.wh.passwd"), b""),
        (member("etc/hosts"), b"127.0.0.1 localhost\n"),
        (member("var/lib/apt/.wh..wh..opq"), b""),  # opaque, before its directory is described
        (member("var/lib/apt", tarfile.DIRTYPE, mode=0o700), None),
        (member("var/lib/apt/lists"), b"new\n"),
        (member(".wh.removed-at-root"), b""),
        (member("opt/.wh..wh..opq"), b""),  # an opaque directory the archive never describes
    ]))
    ref = digest_of(cli.ok("import", "tar", archive, "--name", "example.org/layer"))
    etc = {e["name"]: e for e in json.loads(cli.ok("ls", "--json", ref, "/etc").stdout)}
    assert etc["passwd"]["type"] == "whiteout" and etc["hosts"]["type"] == "file"
    root = {e["name"]: e for e in json.loads(cli.ok("ls", "--json", ref, "/").stdout)}
    assert root["removed-at-root"]["type"] == "whiteout"
    assert "c-wh" in cli.ok("ls", "-l", ref, "/etc").stdout
    assert cli("ls", ref, "/etc/passwd").rc == 1  # a whiteout is not a path you can look up
    apt = {e["name"]: e for e in json.loads(cli.ok("ls", "--json", ref, "/var/lib").stdout)}
    assert apt["apt"]["mode"] == "0700"
    # Exported as a tar, whiteouts and opaque markers get their OCI names back ...
    with tarfile.open(fileobj=io.BytesIO(cli.ok("export", "tar", ref, "-").stdout_bytes)) as exported:
        names = exported.getnames()
    assert {"etc/.wh.passwd", "var/lib/apt/.wh..wh..opq", ".wh.removed-at-root", "opt/.wh..wh..opq"} <= set(names)
    assert "etc/passwd" not in names
    # ... and the round trip is exact.
    again = digest_of(cli.ok("import", "tar", "-", "--name", "example.org/layer",
                             input=cli.ok("export", "tar", ref, "-").stdout_bytes))
    assert again == ref
    if IS_ROOT:  # as overlayfs expects: char 0:0 whiteouts, trusted.overlay.opaque=y
        out = tmp_path / "out"
        cli.ok("export", "dir", ref, out)
        st_ = os.lstat(out / "etc" / "passwd")
        assert stat.S_ISCHR(st_.st_mode) and st_.st_rdev == 0
        assert os.getxattr(out / "var" / "lib" / "apt", "trusted.overlay.opaque") == b"y"
        assert os.getxattr(out / "opt", "trusted.overlay.opaque") == b"y"


def test_whiteout_and_file_of_the_same_name_conflict(tmp_path: Path, cli: Cli) -> None:
    archive = tmp_path / "bad.tar"
    archive.write_bytes(tar_bytes([(member("etc/.wh.x"), b""), (member("etc/x"), b"x")]))
    result = cli("import", "tar", archive)
    assert result.rc == 1 and "etc/x" in result.stderr and "duplicate" in result.stderr


# --------------------------------------------------------------------------- hostile and broken archives


def _gzip_flipped(data: bytes, where: int) -> bytes:
    """Random members are stored, not deflated: a flipped byte decodes fine and only the CRC tells."""
    packed = bytearray(gzip.compress(data))
    packed[where if where >= 0 else len(packed) + where] ^= 0x01
    return bytes(packed)


RANDOM_MEMBERS = tar_bytes([(member(f"f{i}"), blake3.blake3(b"%d" % i).digest(length=2000)) for i in range(50)])


def _nul_via_pax() -> bytes:
    record = pax_record("path", b"evil\x00name")
    pax = member("PaxHeaders/0", tarfile.XHDTYPE)
    return tar_bytes([(pax, record), (member("placeholder"), b"x")], fmt_=tarfile.USTAR_FORMAT)


def _damaged_header() -> bytes:
    data = bytearray(tar_bytes([(member("small"), b"s"), (member("second"), b"x" * 1000)]))
    data[1024 + 100] ^= 0xFF  # inside the second header: its checksum no longer matches
    return bytes(data)


def _zstd_flipped_checksum(data: bytes) -> bytes:
    packed = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(data))
    packed[-2] ^= 0x01
    return bytes(packed)


def _typed(type_byte: bytes) -> bytes:
    return tar_bytes([(member("ok"), b"fine"), (member("volume-label", type_byte), b"")], fmt_=tarfile.GNU_FORMAT)


BIG = blake3.blake3(b"truncated").digest(length=600_000)

BAD_ARCHIVES: dict[str, tuple[bytes, list[str]]] = {
    "dotdot": (tar_bytes([(member("ok"), b"1"), (member("a/../../etc/evil"), b"x")]), ["a/../../etc/evil", "'..'"]),
    "absolute": (tar_bytes([(member("/etc/evil"), b"x")]), ["/etc/evil", "absolute"]),
    "through-symlink": (tar_bytes([(member("l", tarfile.SYMTYPE, linkname="/etc"), None),
                                   (member("l/evil"), b"x")]), ["l/evil", "symlink l"]),
    "through-file": (tar_bytes([(member("f"), b"x"), (member("f/evil"), b"x")]), ["f/evil", "non-directory f"]),
    "hardlink-missing": (tar_bytes([(member("h", tarfile.LNKTYPE, linkname="nothere"), None)]), ["'h'", "nothere"]),
    "hardlink-later": (tar_bytes([(member("h", tarfile.LNKTYPE, linkname="target"), None),
                                  (member("target"), b"data")]), ["'h'", "later member"]),
    # Issue 15 bug 11: a hostile hard link names both the member and its target.
    "hardlink-outside": (tar_bytes([(member("h", tarfile.LNKTYPE, linkname="../etc/passwd"), None)]),
                         ["'h'", "'../etc/passwd'", "'..'"]),
    "hardlink-absolute": (tar_bytes([(member("h", tarfile.LNKTYPE, linkname="/etc/shadow"), None)]),
                          ["'h'", "'/etc/shadow'", "absolute"]),
    "hardlink-to-dir": (tar_bytes([(member("d", tarfile.DIRTYPE), None),
                                   (member("h", tarfile.LNKTYPE, linkname="d"), None)]), ["'h'", "directory"]),
    "duplicate": (tar_bytes([(member("usr/a"), b"1"), (member("usr/a"), b"2")]), ["usr/a", "duplicate"]),
    "duplicate-dir": (tar_bytes([(member("d", tarfile.DIRTYPE), None), (member("d/", tarfile.DIRTYPE), None)]),
                      ["'d'", "duplicate"]),
    "duplicate-root": (tar_bytes([(member(".", tarfile.DIRTYPE), None), (member("./", tarfile.DIRTYPE), None)]),
                       ["duplicate member for the root"]),
    "name-too-long": (tar_bytes([(member("d/" + "n" * 256), b"x")]), ["nnnn", "longer than 255"]),
    "nul-via-pax": (_nul_via_pax(), ["evil\\x00name", "NUL"]),
    "truncated": (tar_bytes([(member("small"), b"s"), (member("big"), BIG)])[:200_000],
                  ["truncated", "'big'"]),
    "truncated-header": (tar_bytes([(member("small"), b"s"), (member("second"), b"x" * 1000)])[:1024 + 256],
                         ["'small'", "truncated header"]),
    "bad-header-checksum": (_damaged_header(), ["'small'", "bad checksum"]),
    "corrupt-gzip": (_gzip_flipped(RANDOM_MEMBERS, 50_000), ["corrupt compressed data", "CRC check failed"]),
    "corrupt-gzip-crc": (_gzip_flipped(RANDOM_MEMBERS, -6), ["corrupt compressed data", "CRC check failed"]),
    "truncated-gzip": (gzip.compress(RANDOM_MEMBERS)[:-3], ["corrupt compressed data", "ended before"]),
    "corrupt-zstd-checksum": (_zstd_flipped_checksum(RANDOM_MEMBERS), ["doesn't match checksum"]),
    "truncated-xz": (lzma.compress(tar_bytes([(member("f"), BIG)]))[:-100], ["'f'"]),
    "gnu-volume-header": (_typed(b"V"), ["volume-label", "unsupported member type"]),
    "unknown-type": (_typed(b"Q"), ["volume-label", "unsupported member type"]),
    "not-a-tar": (b"This is a text file, not an archive.\n" * 40, ["not a readable tar archive"]),
    "random-bytes": (blake3.blake3(b"noise").digest(length=10_000), ["not a readable tar archive"]),
    "empty-symlink-target": (tar_bytes([(member("l", tarfile.SYMTYPE, linkname=""), None)]), ["'l'", "symlink"]),
    "whiteout-of-nothing": (tar_bytes([(member("d/.wh."), b"")]), ["d/.wh.", "invalid entry name"]),
}


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_bad_archives_are_rejected_whole(tmp_path: Path, cli: Cli, case: str) -> None:
    data, needles = BAD_ARCHIVES[case]
    cli.ok("import", "tar", "-", "--name", "example.org/before", input=tar_bytes([(member("x"), b"x")]))
    before = index_counts(cli.store_path)
    archive = tmp_path / f"{case}.tar"
    archive.write_bytes(data)
    work = tmp_path / "work"
    work.mkdir()
    outside = listing(tmp_path, exclude=["store"])
    for source, stdin in ((archive, None), ("-", data)):
        result = cli("import", "tar", source, "--name", "example.org/bad", input=stdin, cwd=work)
        assert result.rc == 1, str(result)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert lines[0].startswith("cnpsfs: error: ")
        assert ("stdin" if source == "-" else str(archive)) in lines[0]
        for needle in needles:
            assert needle in lines[0], lines[0]
        assert index_counts(cli.store_path) == before
        assert list((cli.store_path / "tmp").iterdir()) == []
        assert listing(tmp_path, exclude=["store"]) == outside
    assert not os.path.lexists("/etc/evil")


def test_strip_volatile_leaves_no_parent_it_needed_alone(tmp_path: Path, cli: Cli) -> None:
    """A volatile member whose parents the archive never lists leaves no directory behind."""
    data = tar_bytes([(member("etc/hostname"), b"h"), (member("var/log/apt/history.log"), b"x")])
    stripped = digest_of(cli.ok("import", "tar", "-", "--name", "example.org/v", "--strip-volatile", input=data))
    plain = digest_of(cli.ok("import", "tar", "-", "--name", "example.org/v",
                             input=tar_bytes([(member("etc/hostname"), b"h")])))
    assert stripped == plain


def test_missing_archive(tmp_path: Path, cli: Cli) -> None:
    result = cli("import", "tar", tmp_path / "absent.tar")
    assert result.rc == 1 and "cannot open" in result.stderr and "absent.tar" in result.stderr


def test_hard_links_in_any_member_order(tmp_path: Path, store: Store) -> None:
    """The target may come after the link's first name in canonical order."""
    archive = tmp_path / "links.tar"
    archive.write_bytes(tar_bytes([
        (member("z/original"), b"shared bytes"),
        (member("a/link", tarfile.LNKTYPE, linkname="z/original"), None),
        (member("m/big"), BIG),
        (member("b/big-link", tarfile.LNKTYPE, linkname="m/big"), None),
    ]))
    result = import_tar(store, str(archive), ImportOptions(name="example.org/l", version="1"))
    entries = {b"/".join(p): e for p, e, _o in walk(store, store.get_fileset(result.digest).root)}
    assert entries[b"a/link"].link == entries[b"z/original"].link == (b"a/link", 2)
    assert entries[b"b/big-link"].link == (b"b/big-link", 2)
    assert entries[b"a/link"].hash == entries[b"z/original"].hash == fmt.digest_bytes(b"shared bytes")
    assert entries[b"b/big-link"].hash == entries[b"m/big"].hash == fmt.digest_bytes(BIG)
    assert store.file_extents(entries[b"b/big-link"]) == store.file_extents(entries[b"m/big"])


# --------------------------------------------------------------------------- chunking properties

segment = st.tuples(st.sampled_from(["random", "zeros", "text"]),
                    st.sampled_from([1, 100, 4095, CDC_MIN - 1, CDC_MIN + 1, 70_000, CDC_MAX, CDC_MAX + 1,
                                     LARGE_FILE - 1]),
                    st.integers(0, 2**16))
file_contents = st.lists(segment, max_size=3)
file_names = st.sampled_from(["a", "b", "zz", "d/x", "d/y", "d/e/f", "e", "ä", "\udcff"])


def _content(segments: list[tuple[str, int, int]]) -> bytes:
    out = bytearray()
    for kind, n, seed in segments:
        if kind == "random":
            out += blake3.blake3(seed.to_bytes(4, "little")).digest(length=n)
        elif kind == "zeros":
            out += bytes(n)
        else:
            out += (b"line %d\n" % seed * (n // 6 + 1))[:n]
    return bytes(out)


def _write_tree(root: Path, files: dict[str, list[tuple[str, int, int]]]) -> None:
    root.mkdir()
    for name, segments in files.items():
        path = os.path.join(os.fsencode(root), os.fsencode(name))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(_content(segments))
        os.utime(path, ns=(1_700_000_000_000_000_005, 1_700_000_000_000_000_005))
    for dirpath, _dirs, _files in os.walk(root, topdown=False):
        os.utime(dirpath, ns=(1_600_000_000_000_000_007, 1_600_000_000_000_000_007))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(file_names, file_contents, min_size=1, max_size=6), st.integers(0, 1000))
def test_dir_and_tar_of_the_same_data_give_the_same_digests(files: dict[str, list[tuple[str, int, int]]],
                                                            order: int) -> None:
    # "d/x" and "d" as a file cannot both exist: keep the first spelling of each prefix.
    names = sorted(files)
    files = {n: files[n] for n in names if not any(n.startswith(o + "/") for o in names if o != n)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tree"
        _write_tree(root, files)
        store = LocalStore(Path(tmp) / "store", create=True)
        try:
            options = ImportOptions(name="example.org/p", version="1")
            from_dir = import_directory(store, str(root), options)
            archive = Path(tmp) / "t.tar"
            archive.write_bytes(tar_of_tree(root))
            from_tar = import_tar(store, str(archive), options)
            assert from_tar.digest == from_dir.digest
            archive.write_bytes(tar_of_tree(root, seed=order))
            shuffled = import_tar(store, str(archive), options)
            assert shuffled.digest == from_dir.digest
            # Every file reads back, and every all-zero chunk became a hole.
            reader = FileReader(store)
            for parts, entry, _o in walk(store, store.get_fileset(from_dir.digest).root):
                if entry.kind is fmt.Kind.FILE:
                    expected = (root / os.fsdecode(b"/".join(parts))).read_bytes()
                    assert reader.read(entry) == expected
                    for ext in store.file_extents(entry):
                        if ext.digest is not None:
                            assert store.get(ext.digest).count(0) != len(store.get(ext.digest))
        finally:
            store.close()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.integers(1, 40))
def test_small_file_stream_ignores_member_order(seed: int, count: int) -> None:
    rnd = random.Random(seed)
    members = []
    for i in range(count):
        size = rnd.choice([0, 1, 10, 1000, 20_000, 70_000, LARGE_FILE - 1, LARGE_FILE, 300_000])
        data = blake3.blake3(f"{seed}-{i}".encode()).digest(length=size)
        members.append((member(f"dir{i % 3}/file-{i:02d}", mtime=1_000_000 + i), data))
    digests = set()
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "store", create=True)
        try:
            for shuffle in range(3):
                order = list(members)
                random.Random(seed + shuffle).shuffle(order)
                archive = Path(tmp) / f"{shuffle}.tar"
                archive.write_bytes(tar_bytes(order))
                result = import_tar(store, str(archive), ImportOptions(name="example.org/s", version="1"))
                digests.add(result.digest)
        finally:
            store.close()
    assert len(digests) == 1


def test_small_files_share_chunks_and_large_files_are_cut_alone(tmp_path: Path, store: Store) -> None:
    small = {f"s{i:03d}": blake3.blake3(b"%d" % i).digest(length=3000) for i in range(100)}
    big = blake3.blake3(b"big").digest(length=LARGE_FILE)
    archive = tmp_path / "t.tar"
    archive.write_bytes(tar_bytes([(member(n), d) for n, d in small.items()] + [(member("big"), big),
                                                                                 (member("also-big"), big)]))
    result = import_tar(store, str(archive), ImportOptions(name="example.org/c", version="1"))
    entries = {b"/".join(p): e for p, e, _o in walk(store, store.get_fileset(result.digest).root)}
    chunks = {x.digest for n, e in entries.items() if n.startswith(b"s") for x in store.file_extents(e)}
    assert len(chunks) < 10, "300 KB of small files share a handful of stream chunks"
    # Identical large files anywhere have identical extents (no shared stream offsets).
    assert store.file_extents(entries[b"big"]) == store.file_extents(entries[b"also-big"])
    assert store.file_extents(entries[b"big"])[0].offset == 0


@needs_root
def test_tar_member_order_does_not_change_the_synthetic_digest(tmp_path: Path, cli: Cli, synthetic_tree) -> None:
    tree = synthetic_tree()
    ref = digest_of(cli.ok("import", "dir", tree, "--name", "example.org/t", "--version", "1"))
    for seed in (1, 2):
        archive = tmp_path / f"shuffled{seed}.tar"
        archive.write_bytes(tar_of_tree(tree, seed=seed))
        assert digest_of(cli.ok("import", "tar", archive, "--name", "example.org/t", "--version", "1")) == ref
    out = tmp_path / "out"
    cli.ok("export", "dir", ref, out)
    assert_same_tree(snapshot(tree), snapshot(out))
    shutil.rmtree(out)

