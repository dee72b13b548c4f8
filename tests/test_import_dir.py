"""Directory import and export: every entry type survives a round trip exactly.

The synthetic tree (conftest) has one of everything: files of every size class, holes,
setuid/setgid/sticky modes, owners, nanosecond and pre-1970 mtimes, xattrs including a
binary security.capability, hard links across directories, devices, FIFOs, non-UTF-8 and
255-byte names. The slow tests do the same with a real Debian root filesystem.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cnpsfs_testlib import (
    CAP_NET_RAW_EP,
    IS_ROOT,
    LONG_NAME,
    Cli,
    CliResult,
    Node,
    assert_same_tree,
    build_tree,
    digest_of,
    index_counts,
    listing,
    snapshot,
)

from cnpsfs import format as fmt
from cnpsfs.image.walk import lookup, walk
from cnpsfs.ingest.directory import import_directory
from cnpsfs.ingest.tree import ImportOptions
from cnpsfs.store import Store

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="round trips need root (owners, devices, capabilities)")
GiB = 1 << 30


def ls_json(cli: Cli, ref: str, path: str = "/") -> dict[str, dict[str, object]]:
    return {e["name"]: e for e in json.loads(cli.ok("ls", "--json", ref, path).stdout)}


# --------------------------------------------------------------------------- round trips


def test_synthetic_tree_roundtrip_through_a_directory(tmp_path: Path, cli: Cli, synthetic_tree) -> None:
    tree = synthetic_tree()
    ref = digest_of(cli.ok("import", "dir", tree, "--name", "example.org/synthetic", "--version", "1"))
    cli.ok("export", "dir", ref, tmp_path / "out")
    expected = snapshot(tree)
    assert_same_tree(expected, snapshot(tmp_path / "out"))
    # Spot checks of what the comparison covers, so a broken snapshot cannot hide a loss.
    ping = expected[b"usr/bin/ping"]
    assert (b"security.capability", CAP_NET_RAW_EP) in ping.xattrs
    assert expected[b"usr/bin/tool"].mode == 0o4755 and expected[b"tmp"].mode == 0o1777
    assert expected[b"usr/lib/sub/hl-c"].links == (b"usr/bin/hl-a", b"usr/lib/hl-b", b"usr/lib/sub/hl-c")
    assert expected[b"ro/inside"].mtime_ns == -1_000_000_001
    assert expected[b"dev/big-minor"].rdev == (4095, 1048575)
    # The exported tree imports to the same digest.
    again = digest_of(cli.ok("import", "dir", tmp_path / "out", "--name", "example.org/synthetic", "--version", "1"))
    assert again == ref


def test_synthetic_tree_roundtrip_through_tar(tmp_path: Path, cli: Cli, synthetic_tree) -> None:
    tree = synthetic_tree()
    ref = digest_of(cli.ok("import", "dir", tree, "--name", "example.org/synthetic", "--version", "1"))
    cli.ok("export", "tar", ref, tmp_path / "out.tar")
    via_tar = digest_of(cli.ok("import", "tar", tmp_path / "out.tar", "--name", "example.org/synthetic",
                               "--version", "1"))
    assert via_tar == ref
    cli.ok("export", "dir", via_tar, tmp_path / "out")
    assert_same_tree(snapshot(tree), snapshot(tmp_path / "out"))
    # Streaming to stdout gives the same archive.
    streamed = cli.ok("export", "tar", ref, "-").stdout_bytes
    assert streamed == (tmp_path / "out.tar").read_bytes()


def test_ls_shows_every_kind(cli: Cli, synthetic_tree) -> None:
    ref = digest_of(cli.ok("import", "dir", synthetic_tree(), "--name", "example.org/kinds"))
    dev = ls_json(cli, ref, "/dev")
    assert dev["null"]["type"] == "chardev" and dev["null"]["rdev"] == [1, 3]
    assert dev["sda1"]["type"] == "blockdev" and dev["sda1"]["gid"] == 6
    assert ls_json(cli, ref, "/run")["fifo"]["type"] == "fifo"
    etc = ls_json(cli, ref, "/etc")
    assert etc["absolute"] == {**etc["absolute"], "type": "symlink", "target": "/usr/bin/tool"}
    assert etc["empty"]["size"] == 0 and etc["empty"]["uid"] == 1000
    assert etc["owned"]["xattrs"] == ["user.binary", "user.comment"]
    lib = ls_json(cli, ref, "/usr/lib")
    assert lib["hl-b"]["nlink"] == 3
    assert ls_json(cli, ref, "/usr/lib/sub")["hl-c"]["nlink"] == 3
    names = cli.ok("ls", ref, "/names").stdout_bytes.splitlines()
    assert LONG_NAME in names and "ünïcödé ✓".encode() in names
    assert b"caf\\xe9-latin1" in names  # shown escaped, never as mojibake
    assert cli.ok("cat", ref, "/usr/share/passwd").stdout_bytes.startswith(b"root:x:0:0")


def test_hard_links_keep_one_copy_and_the_first_canonical_path(tmp_path: Path, store: Store, synthetic_tree) -> None:
    tree = synthetic_tree(large=False, devices=False)
    result = import_directory(store, str(tree), ImportOptions(name="example.org/links", version="1"))
    root = store.get_fileset(result.digest).root
    entries = [lookup(store, root, p) for p in ("usr/bin/hl-a", "usr/lib/hl-b", "usr/lib/sub/hl-c")]
    assert {e.link for e in entries} == {(b"usr/bin/hl-a", 3)}
    assert len({(e.extents, e.hash) for e in entries}) == 1
    # Linked data is cut once: the file's bytes appear once in the small-file stream.
    assert result.logical_bytes == sum(
        e.size for parts, e, _o in walk(store, root)
        if e.kind is fmt.Kind.FILE and (e.link is None or e.link[0] == b"/".join(parts)))


def test_sparse_file_over_4_gib(tmp_path: Path, cli: Cli) -> None:
    size = 5 * GiB + 12345
    head, middle, tail = b"head", os.urandom(100_000), b"tail!"
    tree = build_tree(tmp_path / "tree", [
        Node(b"sparse.img", "sparse", 0o640, mtime_ns=1_700_000_000_000_000_123, size=size,
             pieces=[(0, head), (GiB + 7, middle), (size - len(tail), tail)]),
        Node(b"small", "file", data=b"x"),
    ], root_mtime_ns=0)
    start = time.monotonic()
    ref = digest_of(cli.ok("import", "dir", tree, "--name", "example.org/sparse"))
    elapsed = time.monotonic() - start
    assert elapsed < 30, f"importing a sparse 5 GiB file took {elapsed:.1f}s: holes must not be read"
    assert sum(p.stat().st_size for p in (cli.store_path / "packs").iterdir()) < 2 << 20
    assert ls_json(cli, ref)["sparse.img"]["size"] == size
    out = tmp_path / "out"
    cli.ok("export", "dir", ref, out)
    st = (out / "sparse.img").stat()
    assert st.st_size == size
    assert st.st_blocks * 512 < 16 << 20, "export must leave the holes as holes"
    with open(out / "sparse.img", "rb") as f:
        assert f.read(4) == head
        f.seek(GiB + 7)
        assert f.read(len(middle)) == middle
        f.seek(GiB + 7 - 10)
        assert f.read(10) == bytes(10)
        f.seek(size - len(tail))
        assert f.read() == tail
    assert_same_tree(snapshot(tree, content=False), snapshot(out, content=False))


def test_a_large_file_that_changed_size_is_rejected(tmp_path: Path, store: Store) -> None:
    from cnpsfs.errors import ImportRejected
    from cnpsfs.ingest.directory import scan_directory
    from cnpsfs.ingest.tree import TreeBuilder, write_fileset

    tree = build_tree(tmp_path / "t", [Node(b"grows", "file", data=b"a" * 300_000)])
    builder = TreeBuilder(ImportOptions(name="example.org/x", version="1"), source_name=str(tree))
    scan_directory(os.fsencode(tree), builder)
    with open(tree / "grows", "ab") as f:
        f.truncate(100_000)
    with pytest.raises(ImportRejected, match="grows"):
        write_fileset(store, builder)
    assert sum(store.counts()[:2]) == 0


def test_sockets_are_kept_in_the_fileset(tmp_path: Path, cli: Cli) -> None:
    tree = build_tree(tmp_path / "t", [Node(b"run/sock", "socket", 0o755, mtime_ns=5)])
    ref = digest_of(cli.ok("import", "dir", tree, "--name", "example.org/sock"))
    assert ls_json(cli, ref, "/run")["sock"]["type"] == "socket"
    result = cli("export", "dir", ref, tmp_path / "out")
    assert result.rc == 0 and "skipping socket" in result.stderr
    assert not (tmp_path / "out" / "run" / "sock").exists()


# --------------------------------------------------------------------------- options


def test_source_date_epoch_clamps_mtimes(tmp_path: Path, cli: Cli) -> None:
    tree = build_tree(tmp_path / "t", [Node(b"new", "file", mtime_ns=2_000_000_000_123_000_000, data=b"n"),
                                       Node(b"old", "file", mtime_ns=1_000_000_000_000_000_000, data=b"o")],
                      root_mtime_ns=2_000_000_000_000_000_000)
    ref = digest_of(cli.ok("import", "dir", tree, "--name", "example.org/sde", "--source-date-epoch",
                           "1500000000"))
    entries = ls_json(cli, ref)
    assert entries["new"]["mtime_ns"] == 1_500_000_000_000_000_000
    assert entries["old"]["mtime_ns"] == 1_000_000_000_000_000_000
    env_ref = digest_of(cli.ok("import", "dir", tree, "--name", "example.org/sde",
                               env={"SOURCE_DATE_EPOCH": "1500000000"}))
    assert env_ref == ref


def test_strip_volatile(tmp_path: Path, cli: Cli) -> None:
    nodes = [Node(p, "file", data=b"v", mtime_ns=1) for p in
             (b"etc/machine-id", b"var/log/dpkg.log", b"var/log/apt/history.log", b"var/cache/apt/pkgcache.bin",
              b"usr/lib/python3/x/__pycache__/m.cpython-311.pyc", b"etc/ssh/ssh_host_rsa_key", b"etc/hostname",
              b"var/log/deep/er/x.log")]
    tree = build_tree(tmp_path / "t", nodes, root_mtime_ns=1)
    ref = digest_of(cli.ok("import", "dir", tree, "--name", "example.org/vol", "--strip-volatile"))
    assert set(ls_json(cli, ref, "/etc")) == {"hostname", "ssh"}
    assert ls_json(cli, ref, "/etc/ssh") == {}
    assert set(ls_json(cli, ref, "/var/log")) == {"apt", "deep"}
    assert ls_json(cli, ref, "/usr/lib/python3/x/__pycache__") == {}
    # Volatile paths only matter with the flag.
    full = digest_of(cli.ok("import", "dir", tree, "--name", "example.org/vol"))
    assert "machine-id" in ls_json(cli, full, "/etc")


def test_strip_volatile_keeps_what_a_package_owns(tmp_path: Path, cli: Cli) -> None:
    """Issue 15 bug 12: stripping never removes a path a dpkg file list in the same tree
    lists, so ``dpkg --verify`` in the image stays silent. Directory and tar imports agree."""
    lists = {b"var/lib/dpkg/info/logger.list": b"/.\n/var\n/var/log\n/var/log/logger.log\n",
             b"var/lib/dpkg/info/py:amd64.list": b"/usr\n/usr/lib/x/__pycache__/shipped.cpython-311.pyc\n"}
    nodes = [Node(p, "file", data=b"v", mtime_ns=1) for p in
             (b"var/log/logger.log", b"var/log/dpkg.log", b"usr/lib/x/__pycache__/shipped.cpython-311.pyc",
              b"usr/lib/x/__pycache__/built.cpython-311.pyc", b"etc/machine-id")]
    nodes += [Node(p, "file", data=d, mtime_ns=1) for p, d in lists.items()]
    tree = build_tree(tmp_path / "t", nodes, root_mtime_ns=1)
    ref = digest_of(cli.ok("import", "dir", tree, "--name", "example.org/owned", "--strip-volatile"))
    assert set(ls_json(cli, ref, "/var/log")) == {"logger.log"}
    assert set(ls_json(cli, ref, "/usr/lib/x/__pycache__")) == {"shipped.cpython-311.pyc"}
    assert "machine-id" not in ls_json(cli, ref, "/etc")
    archive = tmp_path / "t.tar"
    subprocess.run(["tar", "--xattrs", "-C", tree, "-cf", archive, "."], check=True)
    from_tar = digest_of(cli.ok("import", "tar", archive, "--name", "example.org/owned", "--strip-volatile"))
    assert from_tar == ref


def test_other_filesystems_are_not_crossed(tmp_path: Path, cli: Cli) -> None:
    tree = build_tree(tmp_path / "t", [Node(b"proc", "dir", 0o555, mtime_ns=1), Node(b"f", "file", data=b"f")])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "cnpsfs-test", tree / "proc"], check=True)
    try:
        (tree / "proc" / "inside").write_text("from another filesystem")
        ref = digest_of(cli.ok("import", "dir", tree, "--name", "example.org/mnt"))
    finally:
        subprocess.run(["umount", tree / "proc"], check=True)
    assert ls_json(cli, ref, "/proc") == {}
    assert ls_json(cli, ref)["proc"]["type"] == "dir"


# --------------------------------------------------------------------------- bad input


def assert_rejected(cli: Cli, result, *needles: str, before: dict[str, int] | None = None) -> None:  # type: ignore[no-untyped-def]
    assert result.rc != 0, str(result)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr:\n{result.stderr}"
    for needle in needles:
        assert needle in lines[0], lines[0]
    if before is not None:
        assert index_counts(cli.store_path) == before
        assert list((cli.store_path / "tmp").iterdir()) == []


def _store_with_something(cli: Cli, tmp_path: Path) -> dict[str, int]:
    cli.ok("import", "dir", build_tree(tmp_path / "seed", [Node(b"s", "file", data=b"s")]),
           "--name", "example.org/seed")
    return index_counts(cli.store_path)


def test_unreadable_file_rejects_the_import(tmp_path: Path, cli: Cli) -> None:
    """Root reads everything, so run the CLI without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH."""
    before = _store_with_something(cli, tmp_path)
    tree = build_tree(tmp_path / "t", [Node(b"ok", "file", data=b"fine"),
                                       Node(b"sub/secret", "file", 0o000, data=b"secret " * 100)])
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    outside = listing(tmp_path, exclude=["store"])
    proc = subprocess.run([*drop, *cli.argv("import", "dir", tree, "--name", "example.org/unreadable")],
                          capture_output=True, text=True)
    result = CliResult([], proc.returncode, proc.stdout.encode(), proc.stderr)
    assert_rejected(cli, result, "cannot read", str(tree / "sub" / "secret"), "Permission denied", before=before)
    (tree / "sub" / "secret").chmod(0o644)
    (tree / "sub").chmod(0o000)
    proc = subprocess.run([*drop, *cli.argv("import", "dir", tree, "--name", "example.org/unreadable")],
                          capture_output=True, text=True)
    result = CliResult([], proc.returncode, proc.stdout.encode(), proc.stderr)
    assert_rejected(cli, result, "cannot list", str(tree / "sub"), before=before)
    (tree / "sub").chmod(0o755)
    assert listing(tmp_path, exclude=["store"]) == outside


def test_missing_and_dangling_paths(tmp_path: Path, cli: Cli) -> None:
    before = _store_with_something(cli, tmp_path)
    outside = listing(tmp_path, exclude=["store"])
    for path in (tmp_path / "absent", tmp_path / "dangling"):
        if path.name == "dangling":
            path.symlink_to(tmp_path / "nowhere")
            outside.add("dangling")
        result = cli("import", "dir", path, "--name", "example.org/x")
        assert result.rc == 2, str(result)
        assert "Traceback" not in result.stderr and str(path) in result.stderr
    (tmp_path / "file").write_text("not a directory")
    outside.add("file")
    assert cli("import", "dir", tmp_path / "file").rc == 2
    assert index_counts(cli.store_path) == before
    assert listing(tmp_path, exclude=["store"]) == outside


def test_import_through_a_symlink_to_a_directory(tmp_path: Path, cli: Cli) -> None:
    """The path given on the command line may be a symlink; links inside the tree stay links."""
    tree = build_tree(tmp_path / "t", [Node(b"f", "file", data=b"f"), Node(b"l", "symlink", target=b"/etc")],
                      root_mtime_ns=1)
    (tmp_path / "via").symlink_to(tree)
    direct = digest_of(cli.ok("import", "dir", tree, "--name", "example.org/t"))
    assert ls_json(cli, direct)["l"]["type"] == "symlink"
    assert digest_of(cli.ok("import", "dir", tmp_path / "via", "--name", "example.org/t")) == direct


# --------------------------------------------------------------------------- a real Debian root filesystem


@pytest.mark.slow
def test_debian_rootfs_roundtrip_through_a_directory(tmp_path: Path, cli: Cli, debian_rootfs: Path) -> None:
    ref = digest_of(cli.ok("import", "dir", debian_rootfs, "--name", "debian.org/rootfs", "--version", "bookworm"))
    out = tmp_path / "out"
    cli.ok("export", "dir", ref, out)
    expected = snapshot(debian_rootfs)
    assert len(expected) > 4000
    assert_same_tree(expected, snapshot(out))
    assert any(m.type == "chardev" for m in expected.values())
    assert any(m.links for m in expected.values())
    cli.ok("verify")


@pytest.mark.slow
def test_debian_rootfs_roundtrip_through_tar(tmp_path: Path, cli: Cli, debian_rootfs: Path) -> None:
    ref = digest_of(cli.ok("import", "dir", debian_rootfs, "--name", "debian.org/rootfs", "--version", "bookworm"))
    tar = tmp_path / "rootfs.tar"
    cli.ok("export", "tar", ref, tar)
    again = digest_of(cli.ok("import", "tar", tar, "--name", "debian.org/rootfs", "--version", "bookworm"))
    assert again == ref
    # Deterministic: a second store gets the same digest from the same tree.
    other = digest_of(cli.ok("import", "dir", debian_rootfs, "--name", "debian.org/rootfs", "--version",
                             "bookworm", store=tmp_path / "store2"))
    assert other == ref
    # What GNU tar sees in our archive is what is on disk.
    listed = subprocess.run(["tar", "-tf", tar], capture_output=True, check=True).stdout.splitlines()
    on_disk = {os.fsencode(p) for p in listing(debian_rootfs)}
    assert {n.rstrip(b"/") for n in listed} - {b"."} == on_disk


def test_snapshot_helper_sees_differences(tmp_path: Path) -> None:
    """The comparison the round trips rely on does notice each kind of loss."""
    nodes = [Node(b"f", "file", 0o644, mtime_ns=5, data=b"x", xattrs={b"user.a": b"1"}),
             Node(b"h", "hardlink", target=b"f")]
    a = snapshot(build_tree(tmp_path / "a", nodes, root_mtime_ns=1))
    for change in ("mode", "mtime", "xattr", "link", "data"):
        b_root = build_tree(tmp_path / change, nodes, root_mtime_ns=1)
        f = b_root / "f"
        if change == "mode":
            f.chmod(0o600)
        elif change == "mtime":
            os.utime(f, ns=(6, 6))
        elif change == "xattr":
            os.setxattr(f, "user.a", b"2")
            os.utime(f, ns=(5, 5))
        elif change == "link":
            (b_root / "h").unlink()
            (b_root / "h").write_bytes(b"x")
            os.utime(b_root / "h", ns=(5, 5))
            os.setxattr(b_root / "h", "user.a", b"1")
            os.utime(b_root, ns=(1, 1))
        else:
            f.write_bytes(b"y")
            os.utime(f, ns=(5, 5))
        with pytest.raises(AssertionError):
            assert_same_tree(a, snapshot(b_root))
    assert stat.S_IMODE(os.lstat(tmp_path / "a").st_mode) == 0o755
