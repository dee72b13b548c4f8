"""A directory of 100,000 entries over FUSE: listed completely, in a stable order, with
offsets that can be seeked back to, in both FUSE modes.

The FileSet is built in-process with the importer's TreeBuilder (empty files need no
data), once for the module; each mode mounts it once.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cnpsfs_testlib import Cli
from mountutil import FUSE, FUSE_MODES_STOCK_LONG, Mount, getdents, mount_image

from cnpsfs import format as fmt
from cnpsfs.ingest.tree import ImportOptions, TreeBuilder, write_fileset
from cnpsfs.store import LocalStore

pytestmark = FUSE

COUNT = 100_000
NAMES = [b"entry-%06d-%s" % (i, b"x" * (i % 40)) for i in range(COUNT)]
SUBDIRS = [b"sub-a", b"sub-b"]


class _Empty:
    def read_all(self) -> bytes:
        return b""

    def pieces(self) -> Iterator[bytes]:
        return iter(())


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bigdir") / "store"
    store = LocalStore(path, create=True)
    try:
        builder = TreeBuilder(ImportOptions(name="example.org/bigdir", version="1"), source_name="bigdir")
        builder.set_root(fmt.Entry(b"", fmt.Kind.DIR, 0o755, mtime_ns=1))
        builder.add((b"big",), fmt.Entry(b"", fmt.Kind.DIR, 0o755, mtime_ns=2), what="big")
        empty = _Empty()
        for name in NAMES:
            builder.add((b"big", name), fmt.Entry(b"", fmt.Kind.FILE, 0o644, mtime_ns=3), source=empty, what="f")
        for name in SUBDIRS:
            builder.add((b"big", name), fmt.Entry(b"", fmt.Kind.DIR, 0o755, mtime_ns=4), what="d")
        write_fileset(store, builder)
    finally:
        store.close()
    (path.parent / "image.toml").write_text('name = "example.org/bigdir-image"\nversion = "1"\n'
                                            '[[layers]]\nfileset = "example.org/bigdir@1"\n')
    Cli(path).ok("image", "create", path.parent / "image.toml")
    return path


@pytest.fixture(scope="module", params=FUSE_MODES_STOCK_LONG)
def mnt(big_store: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    fuse_mode = request.param
    with mount_image(big_store, "example.org/bigdir-image@1", tmp_path_factory.mktemp(f"mnt-{fuse_mode}"),
                     mode=fuse_mode) as mount:
        yield mount


EXPECTED = sorted([*NAMES, *SUBDIRS])


def test_scandir_lists_everything_twice_in_the_same_order(mnt: Mount) -> None:
    start = time.monotonic()
    with os.scandir(mnt / b"big") as it:
        first = [(e.name, e.inode(), e.is_dir(follow_symlinks=False)) for e in it]
    cold = time.monotonic() - start
    assert len(first) == COUNT + len(SUBDIRS)
    assert sorted(name for name, _i, _d in first) == EXPECTED
    assert {name for name, _i, is_dir in first if is_dir} == set(SUBDIRS)
    assert len({ino for _n, ino, _d in first}) == len(first)
    with os.scandir(mnt / b"big") as it:
        second = [(e.name, e.inode(), e.is_dir(follow_symlinks=False)) for e in it]
    assert second == first
    assert cold < 20, f"listing 100,000 entries took {cold:.1f}s"


def test_ls_f_counts_every_entry_with_dot_and_dotdot(mnt: Mount) -> None:
    out = subprocess.run(f"ls -f '{mnt / 'big'}' | wc -l", shell=True, capture_output=True, text=True, check=True)
    assert int(out.stdout) == COUNT + len(SUBDIRS) + 2
    head = subprocess.run(["ls", "-f", str(mnt / "big")], capture_output=True, check=True).stdout.split(b"\n")[:2]
    assert head == [b".", b".."]


def test_readdir_offsets_are_stable_and_seekable(mnt: Mount) -> None:
    """getdents64 with a small buffer, then seekdir back to saved offsets: the listing resumes there."""
    fd = os.open(mnt / "big", os.O_RDONLY | os.O_DIRECTORY)
    try:
        entries = []
        while batch := getdents(fd, 8192):
            entries += batch
        assert [e.name for e in entries[:2]] == [b".", b".."]
        assert sorted(e.name for e in entries[2:]) == EXPECTED
        assert len({e.off for e in entries}) == len(entries), "offsets must be unique"
        rng = random.Random(1)
        for k in [0, 1, 2, len(entries) - 2, *rng.sample(range(len(entries) - 1), 40)]:
            os.lseek(fd, entries[k].off, os.SEEK_SET)
            resumed = getdents(fd, 1024)
            assert resumed and resumed[0].name == entries[k + 1].name, (k, entries[k], resumed[:1])
        os.lseek(fd, entries[-1].off, os.SEEK_SET)
        assert getdents(fd, 1024) == []
        os.lseek(fd, 0, os.SEEK_SET)
        assert [e.name for e in getdents(fd, 1024)][:3] == [e.name for e in entries[:3]]
    finally:
        os.close(fd)


def test_warm_stat_of_listed_entries_makes_no_requests(mnt: Mount) -> None:
    # The kernel asks for READDIRPLUS only for the first batch of a listing
    # (FUSE_READDIRPLUS_AUTO), so a first stat of a later entry may still look it up;
    # a second one must not.
    names = random.Random(2).sample(os.listdir(mnt / b"big"), 500)
    for name in names:
        os.lstat(mnt / (b"big/" + name))
    before = mnt.requests()
    for name in names:
        os.lstat(mnt / (b"big/" + name))
    after = mnt.requests()
    after.subtract(before)
    assert +after == {}
    assert os.lstat(mnt / "big").st_nlink == 2 + len(SUBDIRS)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_the_daemon_lets_go_of_what_the_kernel_forgets(mnt: Mount) -> None:
    """A walk composes every entry; when the kernel drops its dentries and inodes it
    FORGETs them, and the daemon lets go of the directories it composed for them (its
    inode table shrinks to what is held, its RSS falls); walking again gives the same tree."""
    drop = Path("/proc/sys/vm/drop_caches")
    if not os.access(drop, os.W_OK):
        if os.environ.get("CI") == "true":
            pytest.fail("cannot write /proc/sys/vm/drop_caches (CI must run as root)")
        pytest.skip("needs root: writes /proc/sys/vm/drop_caches")
    walk = subprocess.run(["find", str(mnt.mountpoint)], capture_output=True, check=True, timeout=120).stdout
    first = sorted(walk.splitlines())
    assert len(first) == 1 + 1 + COUNT + len(SUBDIRS)
    walked = mnt.status()
    rss_walked = _rss(mnt.pid)
    assert walked["inodes"] >= COUNT and walked["inode_table"]["entries"] >= COUNT, walked["inode_table"]
    drop.write_text("2\n")  # dentries and inodes: the kernel sends FORGET for what it held
    deadline = time.monotonic() + 20
    while True:
        status = mnt.status()
        if status["inodes"] < 100 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status["inodes"] < 100 and status["inode_table"]["entries"] < 100, status["inode_table"]
    assert status["inode_table"]["held"] == 0, status["inode_table"]
    rss_dropped = _rss(mnt.pid)
    # The packed listing of 100,000 entries is about 17 MB; most of it goes back to the system.
    assert rss_dropped < rss_walked - 8_000_000, (rss_walked, rss_dropped)
    again = subprocess.run(["find", str(mnt.mountpoint)], capture_output=True, check=True, timeout=120).stdout
    assert sorted(again.splitlines()) == first
    assert mnt.status()["inodes"] >= COUNT
