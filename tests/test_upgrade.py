"""Live upgrades on real mounts: upgrade, link, unlink and rollback while the tree is in use.

Every swap must be atomic for its users: programs exec'd during swaps load a complete
set of libraries, open files keep their content, walkers never see a torn file, and a
refused request changes nothing. Most cases run in both FUSE modes: ``auto`` (the
kernel caches listings, opens and symlink targets, so a swap must invalidate them) and
``stock``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cnpsfs_testlib import Cli, digest_of, wait_until
from conftest import build_debian_rootfs
from mountutil import (
    FUSE,
    FUSE_MODES_STOCK_LONG,
    Mount,
    PathMeta,
    file_digest,
    mount_image,
    needs_root,
    overlay_meta,
    tree_meta,
    write_manifest,
)

from cnpsfs.errors import CnpsfsError
from cnpsfs.image.manifest import compose, load_image
from cnpsfs.store import T_CHUNK, LocalStore, Store

pytestmark = FUSE

LIBDIR = "usr/lib/x86_64-linux-gnu"
LIBACL = "libacl.so.1.1.2301"  # cp needs it; few other programs of a minbase do
EXEC_LOOP = 2000
EXEC_SWAPS = 50
WALK_SWAPS = 100
MTIME = 1_700_000_000


# --------------------------------------------------------------------------- the small data images


def import_dir(cli: Cli, src: Path, name: str, version: str) -> str:
    """Import *src* as NAME@VERSION; returns the reference ``NAME@VERSION``."""
    digest_of(cli.ok("import", "dir", src, "--name", name, "--version", version))
    return f"{name}@{version}"


def create_image(cli: Cli, manifest: Path, ref: str) -> str:
    """``cnpsfs image create`` of *manifest*, which tags *ref*; returns *ref*."""
    cli.ok("image", "create", manifest)
    return ref


@dataclass
class Data:
    cli: Cli
    common: Path
    va: Path
    vb: Path
    extra: Path
    image_a: str
    image_b: str
    image_c: str  # like A, but a changed file's chunks are gone from the store
    union_conflict: Path  # a union manifest whose two layers provide /etc/conf differently


def _tree(root: Path, files: dict[str, bytes], links: dict[str, str] = {}) -> Path:  # noqa: B006
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o644)
        os.utime(path, (MTIME, MTIME))
    for rel, target in links.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)
        os.utime(path, (MTIME, MTIME), follow_symlinks=False)
    for dirpath, _dirs, _files in os.walk(root):
        os.chmod(dirpath, 0o755)
        os.utime(dirpath, (MTIME, MTIME))
    return root


def _versioned_files(tag: bytes, seed: int) -> dict[str, bytes]:
    """Half the files differ between versions; some are large enough for several chunks."""
    rng = random.Random(seed)
    files = {}
    for i in range(120):
        size = rng.choice([0, 13, 900, 5000, 70_000, 400_000]) if i % 10 else 1_500_000
        body = random.Random(i).randbytes(size)
        if i % 2:  # changed in the other version
            body = tag + body[len(tag):] if size > len(tag) else tag
        files[f"usr/share/pkg{i % 7}/file{i}"] = body
    return files


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    top = tmp_path_factory.mktemp("data")
    cli = Cli(top / "store")
    common = _tree(top / "common", {f"usr/share/common/doc{i}": f"common {i}\n".encode() * (i + 1)
                                    for i in range(40)} | {"etc/os": b"common\n"})
    va = _tree(top / "va", _versioned_files(b"AAAA", 1) | {"opt/only-a/file": b"only in A\n", "etc/conf": b"a\n"},
               {"usr/bin/tool": "tool-a", "opt/app/current": "../only-a/file"})
    vb = _tree(top / "vb", _versioned_files(b"BBBB", 2) | {"opt/only-b/sub/file": b"only in B\n", "etc/conf": b"b\n"},
               {"usr/bin/tool": "tool-b", "opt/app/current": "../only-b/sub/file"})
    vc = _tree(top / "vc", {**_versioned_files(b"AAAA", 1), "usr/share/pkg0/unique": random.randbytes(300_000)})
    extra = _tree(top / "extra", {"usr/share/common/extra-doc": b"extra\n", "opt/extra/tool": b"#!/bin/sh\n"})
    refs = {name: import_dir(cli, path, f"test.example/{name}", "1")
            for name, path in [("common", common), ("va", va), ("vb", vb), ("extra", extra)]}

    def image(version: str, middle: str) -> str:
        layers = [{"fileset": refs["common"]}, {"fileset": refs[middle]},
                  {"fileset": refs["extra"], "label": "extra"}]
        manifest = write_manifest(top / f"{version}.toml", "test.example/data", layers, version=version)
        return create_image(cli, manifest, f"test.example/data@{version}")

    image_a, image_b = image("A", "va"), image("B", "vb")
    with sqlite3.connect(top / "store" / "index.sqlite") as db:
        before = {row[0] for row in db.execute("SELECT digest FROM objects WHERE type=?", (T_CHUNK,))}
    refs["vc"] = import_dir(cli, vc, "test.example/vc", "1")
    image_c = image("C", "vc")
    db = sqlite3.connect(top / "store" / "index.sqlite")
    try:
        new = [row[0] for row in db.execute("SELECT digest FROM objects WHERE type=?", (T_CHUNK,))
               if row[0] not in before]
        assert new, "the unique file added no chunk"
        db.executemany("DELETE FROM objects WHERE digest=?", [(d,) for d in new])
        db.commit()
    finally:
        db.close()
    conflict = write_manifest(top / "conflict.toml", "test.example/conflict",
                              [{"fileset": refs["va"]}, {"fileset": refs["vb"]}], mode="union")
    return Data(cli, common, va, vb, extra, image_a, image_b, image_c, conflict)


_EXPECTED: dict[tuple[int, str, bool], dict[str, PathMeta]] = {}


def expected(data: Data, version: str, *, extra: bool = True) -> dict[str, PathMeta]:
    """The tree image A or B must show (hashed once per module)."""
    key = (id(data), version, extra)
    if key not in _EXPECTED:
        middle = data.va if version == "A" else data.vb
        _EXPECTED[key] = overlay_meta(data.common, middle, *([data.extra] if extra else []))
    return _EXPECTED[key]


@pytest.fixture(params=FUSE_MODES_STOCK_LONG)
def fuse_mode(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def data_mount(data: Data, tmp_path: Path, fuse_mode: str) -> Iterator[Mount]:
    with mount_image(data.cli.store_path, data.image_a, tmp_path / "mnt", mode=fuse_mode) as m:
        yield m


# --------------------------------------------------------------------------- 1. exec loop


@pytest.fixture(scope="module")
def exec_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cli, str, str]:
    """A tiny Debian root without libacl, and two FileSets that each provide it.

    Both provide the same bytes, but under different file names behind the
    ``libacl.so.1`` symlink (and with different mtimes): a mixed view, the symlink of one
    generation and the directory of the other, cannot load the library.
    """
    rootfs = build_debian_rootfs()
    top = tmp_path_factory.mktemp("exec")
    cli = Cli(top / "store")
    base = top / "base"
    base.mkdir()
    wanted = ["bin", "lib", "lib64", "sbin", "etc/ld.so.cache", "usr/bin/dash", "usr/bin/sh", "usr/bin/cp",
              "usr/lib64", f"{LIBDIR}/ld-linux-x86-64.so.2", f"{LIBDIR}/libc.so.6", f"{LIBDIR}/libselinux.so.1",
              f"{LIBDIR}/libpcre2-8.so.0", f"{LIBDIR}/libpcre2-8.so.0.11.2", f"{LIBDIR}/libattr.so.1",
              f"{LIBDIR}/libattr.so.1.1.2501"]
    subprocess.run(["cp", "-a", "--parents", *wanted, str(base)], cwd=rootfs, check=True)
    lib = rootfs / LIBDIR / LIBACL
    for version, target, mtime in [("a", LIBACL, None), ("b", "libacl.so.1.gen-b", MTIME)]:
        root = top / f"lib-{version}"
        (root / LIBDIR).mkdir(parents=True)
        shutil.copy2(lib, root / LIBDIR / target)
        if mtime is not None:
            os.utime(root / LIBDIR / target, (mtime, mtime))
        (root / LIBDIR / "libacl.so.1").symlink_to(target)
        (root / "opt/gen").mkdir(parents=True)
        (root / "opt/gen/marker").write_text(version)
        import_dir(cli, root, f"test.example/libacl-{version}", "1")
    import_dir(cli, base, "test.example/base", "1")
    images = [create_image(cli, write_manifest(top / f"{v}.toml", "test.example/exec",
                                               [{"fileset": "test.example/base@1"},
                                                {"fileset": f"test.example/libacl-{v}@1"}], version=v.upper()),
                           f"test.example/exec@{v.upper()}")
              for v in "ab"]
    return cli, images[0], images[1]


@needs_root  # chroot
def test_exec_loop_during_swaps(exec_images: tuple[Cli, str, str], tmp_path: Path, fuse_mode: str) -> None:
    cli, image_a, image_b = exec_images
    with mount_image(cli.store_path, image_a, tmp_path / "mnt", mode=fuse_mode) as m:
        # The image has no /dev/null: cp's version text goes to the pipe, the loader's errors to stderr.
        loop = "i=0; while [ $i -lt 500 ]; do cp --version || echo FAIL; i=$((i+1)); done"
        swaps: list[int] = []
        failure: list[BaseException] = []
        stop = threading.Event()

        def swapper() -> None:
            try:
                while len(swaps) < EXEC_SWAPS or not stop.is_set():
                    result = m.upgrade(image_b if len(swaps) % 2 == 0 else image_a)
                    swaps.append(result["generation"])
            except BaseException as exc:  # reported by the test thread
                failure.append(exc)

        thread = threading.Thread(target=swapper)
        thread.start()
        runs, output = 0, []
        chroot = shutil.which("chroot") or "/usr/sbin/chroot"
        try:
            while (runs < EXEC_LOOP or len(swaps) < EXEC_SWAPS) and not failure:
                proc = subprocess.run([chroot, str(m.mountpoint), "/bin/sh", "-c", loop], capture_output=True,
                                      text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "LANG": "C"})
                assert proc.returncode == 0, proc.stderr
                runs += 500
                output += [ln for ln in proc.stdout.splitlines() if ln == "FAIL"]
                output += proc.stderr.splitlines()
                assert proc.stdout.count("(GNU coreutils)") == 500 - proc.stdout.count("FAIL")
        finally:
            stop.set()
            thread.join()
        assert not failure, failure
        assert not output, f"{output.count('FAIL')} failed exec(s) of {runs}: {output[:10]}"
        assert len(swaps) >= EXEC_SWAPS
        assert swaps == sorted(swaps)
        assert m.status()["generation"] == 1 + len(swaps)


# --------------------------------------------------------------------------- 2. open files


def test_open_file_keeps_old_content(data: Data, data_mount: Mount) -> None:
    m = data_mount
    changed = [r for r, meta in expected(data, "A").items()
               if meta.kind == "f" and expected(data, "B").get(r, meta) != meta]
    rel = max(changed, key=lambda r: expected(data, "A")[r].size)
    old = (data.va / rel).read_bytes()
    new = (data.vb / rel).read_bytes()
    assert old != new and len(old) > 300_000
    fd = os.open(m.mountpoint / rel, os.O_RDONLY)
    try:
        assert os.pread(fd, len(old) + 1, 0) == old
        for target, now in [(data.image_b, new), (data.image_a, old), (data.image_b, new)]:
            m.upgrade(target)
            assert _read_fd(fd) == old  # the same fd: the content it was opened with
            assert (m.mountpoint / rel).read_bytes() == now  # a new open: the current generation
    finally:
        os.close(fd)


def _read_fd(fd: int) -> bytes:
    parts, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


# --------------------------------------------------------------------------- 3. link, unlink, symlinks, rollback


def test_unlink_and_link_hide_and_show_a_layer(data: Data, data_mount: Mount) -> None:
    m = data_mount
    share = m.mountpoint / "usr/share/common"
    assert "extra-doc" in os.listdir(share)  # listed (and cached, in auto mode) before the swap
    assert (m.mountpoint / "opt/extra/tool").read_bytes() == b"#!/bin/sh\n"
    assert "extra" in os.listdir(m.mountpoint / "opt")

    assert m.cnpsfs("unlink", m.mountpoint, "extra").returncode == 0
    assert "extra-doc" not in os.listdir(share)
    assert not (m.mountpoint / "opt/extra/tool").exists()
    assert not (share / "extra-doc").exists()
    assert "extra" not in os.listdir(m.mountpoint / "opt")
    assert [layer["unlinked"] for layer in m.status()["layers"]] == [False, False, True]
    assert tree_meta(m.mountpoint) == expected(data, "A", extra=False)

    assert m.cnpsfs("link", m.mountpoint, "3").returncode == 0
    assert "extra-doc" in os.listdir(share)
    assert (m.mountpoint / "opt/extra/tool").read_bytes() == b"#!/bin/sh\n"
    assert [layer["unlinked"] for layer in m.status()["layers"]] == [False, False, False]
    assert tree_meta(m.mountpoint) == expected(data, "A")


def test_symlink_target_changes_with_upgrade(data: Data, data_mount: Mount) -> None:
    m = data_mount
    assert os.readlink(m.mountpoint / "usr/bin/tool") == "tool-a"
    assert (m.mountpoint / "opt/app/current").read_bytes() == b"only in A\n"
    m.upgrade(data.image_b)
    assert os.readlink(m.mountpoint / "usr/bin/tool") == "tool-b"
    assert (m.mountpoint / "opt/app/current").read_bytes() == b"only in B\n"
    assert sorted(os.listdir(m.mountpoint / "opt")) == ["app", "extra", "only-b"]


def test_rollback_restores_the_previous_tree(data: Data, data_mount: Mount) -> None:
    m = data_mount
    before = tree_meta(m.mountpoint)  # loads (and in auto mode caches) the whole A tree
    assert before == expected(data, "A")
    m.upgrade(data.image_b)
    assert tree_meta(m.mountpoint) == expected(data, "B")
    result = m.cnpsfs("rollback", m.mountpoint)
    assert result.returncode == 0, result.stderr
    assert "generation 3" in result.stdout
    assert tree_meta(m.mountpoint) == before
    status = m.status()
    assert status["image"]["version"] == "A"
    assert [h["reason"] for h in status["history"]][-1] == "rollback"


# --------------------------------------------------------------------------- 4. walkers during swaps


def test_walkers_see_whole_files_during_swaps(data: Data, data_mount: Mount) -> None:
    m = data_mount
    versions: dict[str, set[str]] = {}
    for version in "AB":
        for rel, meta in expected(data, version).items():
            if meta.kind == "f":
                versions.setdefault(rel, set()).add(meta.content)
    links = {rel for version in "AB" for rel, meta in expected(data, version).items() if meta.kind == "l"}
    in_both = {rel for rel in versions if (data.va / rel).exists() == (data.vb / rel).exists()}
    stop = threading.Event()
    problems: list[str] = []
    checked = [0]

    def walker() -> None:
        while not stop.is_set():
            for dirpath, _dirs, files in os.walk(m.mountpoint):
                for name in files:
                    path = os.path.join(dirpath, name)
                    rel = os.path.relpath(path, m.mountpoint)
                    if rel in links:
                        continue
                    try:
                        digest = file_digest(path)
                    except OSError as exc:
                        # A name only one version has may vanish between listing and opening.
                        if exc.errno != errno.ENOENT or rel in in_both:
                            problems.append(f"{rel}: {exc}")
                        continue
                    checked[0] += 1
                    if digest not in versions.get(rel, set()):
                        problems.append(f"{rel}: content of neither version")

    threads = [threading.Thread(target=walker) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(WALK_SWAPS):
            m.request({"op": "upgrade", "ref": data.image_b if i % 2 == 0 else data.image_a})
            # Every generation is read from before the next swap: the walkers hash a file more.
            done = checked[0]
            wait_until(lambda done=done: checked[0] > done or problems or not all(t.is_alive() for t in threads),
                       what=f"a walker to read a file of generation {i + 2}")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not problems, problems[:20]
    assert checked[0] > len(versions)
    assert m.status()["generation"] == 1 + WALK_SWAPS


# --------------------------------------------------------------------------- 5. refused requests


@pytest.mark.parametrize("fuse_mode", ["auto"])
def test_bad_requests_change_nothing(data: Data, data_mount: Mount) -> None:
    m = data_mount
    before = tree_meta(m.mountpoint)
    cases = [
        (("unlink", m.mountpoint, "9"), "unknown layer 9"),
        (("link", m.mountpoint, "nosuch"), "unknown layer 'nosuch'"),
        (("upgrade", m.mountpoint, "test.example/nosuch@1"), "unknown reference"),
        (("upgrade", m.mountpoint, data.union_conflict), "union conflict at /"),
        (("upgrade", m.mountpoint, data.image_c), "missing from the store"),
    ]
    for args, why in cases:
        result = m.cnpsfs(*args)
        assert result.returncode != 0, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and why in lines[0], result
        status = m.status()
        assert status["generation"] == 1, (args, status["history"])
        assert status["image"]["version"] == "A"
    assert tree_meta(m.mountpoint) == before
    with pytest.raises(CnpsfsError, match="no previous generation"):
        m.request({"op": "rollback"})


# --------------------------------------------------------------------------- 6. inode numbers


def test_unchanged_entries_keep_their_inode_numbers(data: Data, data_mount: Mount) -> None:
    m = data_mount
    same = [rel for rel, meta in expected(data, "A").items() if expected(data, "B").get(rel) == meta]
    changed = [rel for rel, meta in expected(data, "A").items()
               if meta.kind == "f" and rel in expected(data, "B") and expected(data, "B")[rel] != meta]
    assert len(same) > 40 and changed
    before = {rel: os.lstat(m.mountpoint / rel).st_ino for rel in same + changed}
    m.upgrade(data.image_b)
    after = {rel: os.lstat(m.mountpoint / rel).st_ino for rel in same + changed}
    assert {rel: after[rel] for rel in same} == {rel: before[rel] for rel in same}
    assert all(after[rel] != before[rel] for rel in changed)


# --------------------------------------------------------------------------- 7. what a long-lived mount keeps

MEMORY_SWAPS = 200
MEMORY_BASELINE = 10


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_daemon_memory_does_not_grow_with_swaps(data: Data, data_mount: Mount) -> None:
    """200 upgrades A→B→A… with a full walk between swaps: the daemon keeps the tree it
    serves and what the kernel holds, not every generation it ever served."""
    m = data_mount
    paths = {version: len(expected(data, version)) + 1 for version in "AB"}  # + the root
    seen: dict[int, dict[str, int]] = {}
    for i in range(1, MEMORY_SWAPS + 1):
        version = "B" if i % 2 else "A"
        m.request({"op": "upgrade", "ref": data.image_b if version == "B" else data.image_a})
        walk = subprocess.run(["find", str(m.mountpoint)], capture_output=True, text=True, timeout=60)
        assert walk.returncode == 0, walk.stderr
        assert len(walk.stdout.splitlines()) == paths[version]
        if i in (MEMORY_BASELINE, MEMORY_BASELINE + 1, MEMORY_SWAPS - 1, MEMORY_SWAPS):
            status = m.request({"op": "status"})
            assert status["generation"] == i + 1
            # Only this generation's nodes: a copy of every earlier one's would be A ∪ B.
            assert status["inodes"] <= paths[version], status
            seen[i] = {"rss": _rss_kib(m.pid), "keys": status["inode_keys"], "held": status["kernel_inodes"],
                       "history": len(status["history"])}
    base, last = seen[MEMORY_BASELINE], seen[MEMORY_SWAPS]
    assert last["rss"] <= base["rss"] * 1.10, seen
    # The structures that used to grow, counted: the inode table, the kernel-held nodes
    # (bounded by both trees: the kernel forgets what a swap invalidated), the history.
    both = len(set(expected(data, "A").items()) | set(expected(data, "B").items())) + 1  # (path, object) pairs
    assert last["keys"] <= both and last["held"] <= both, seen
    assert last["history"] == seen[MEMORY_SWAPS - 1]["history"] < MEMORY_SWAPS, seen
    roots = (m.store / "run" / f"{m.pid}.roots").read_text().split()
    status = m.status()
    pinned = {layer["fileset"] for layer in status["layers"]}  # A's layers, B's are the rollback target
    assert pinned <= set(roots) and len(roots) == len(pinned) + 1 + 2, roots  # + vb, + both image digests


def _unique_chunks(store: Store, ref: str, path: str) -> set[bytes]:
    """The chunks of *path* in the image *ref*."""
    image, _digest = load_image(store, ref)
    node = compose(store, image).resolve(path)
    return {e.digest for e in store.file_extents(node.entry) if e.digest is not None}


def test_gc_reclaims_an_image_the_mount_no_longer_serves(cli: Cli, tmp_path: Path) -> None:
    """Served v1, then v2, then v3: the mount pins v3 and its rollback target v2, not v1."""
    for n in (1, 2, 3):
        _tree(tmp_path / f"v{n}", {"etc/version": f"{n}\n".encode(), "srv/blob": random.Random(n).randbytes(600_000),
                                   "srv/common": b"common\n" * 1000})
        import_dir(cli, tmp_path / f"v{n}", f"test.example/gc-v{n}", "1")
        manifest = write_manifest(tmp_path / f"v{n}.toml", "test.example/gc", [f"test.example/gc-v{n}@1"],
                                  version=f"v{n}")
        create_image(cli, manifest, f"test.example/gc@v{n}")
    with contextlib.closing(LocalStore(cli.store_path)) as store:
        blobs = {n: _unique_chunks(store, f"test.example/gc@v{n}", "/srv/blob") for n in (1, 2, 3)}
    assert all(blobs[n] and not blobs[n] & blobs[n + 1] for n in (1, 2))
    with mount_image(cli.store_path, "test.example/gc@v1", tmp_path / "mnt") as m:
        for n in (2, 3):
            m.upgrade(f"test.example/gc@v{n}")
            assert (m.mountpoint / "etc/version").read_text() == f"{n}\n"
        for n in (1, 2):  # no tag reaches v1 or v2 any more; only the mount's rollback target pins v2
            cli.ok("tag", "rm", f"test.example/gc@v{n}")
            cli.ok("tag", "rm", f"test.example/gc-v{n}@1")
        cli.ok("gc")
        with contextlib.closing(LocalStore(cli.store_path)) as store:
            assert not store.existing(blobs[1]), "gc kept the chunks of an image the mount no longer serves"
            assert store.existing(blobs[2]) == blobs[2], "gc removed the rollback target's chunks"
            assert store.existing(blobs[3]) == blobs[3]
        assert (m.mountpoint / "srv/blob").read_bytes() == random.Random(3).randbytes(600_000)
        result = m.cnpsfs("rollback", m.mountpoint)
        assert result.returncode == 0, result.stderr
        assert (m.mountpoint / "etc/version").read_text() == "2\n"
        assert (m.mountpoint / "srv/blob").read_bytes() == random.Random(2).randbytes(600_000)
