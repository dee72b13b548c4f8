"""Request counts that prove what pyfuse3's kernel cache extensions save.

Each test mounts hellofs (a tiny filesystem that counts requests) in a
subprocess and compares the daemon's counters before and after a warm loop of
syscalls. The ``classic`` tests run with any pyfuse3 and show the cost the
extensions remove; the others need the patched build from
scripts/install-pyfuse3 and skip on stock pyfuse3.
"""

from __future__ import annotations

import collections
import errno
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import hellofs
import pyfuse3
import pytest

REPEAT = 20

_no_fuse = hellofs.fuse_unavailable()
pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(_no_fuse is not None, reason=f"no FUSE: {_no_fuse}"),
]

needs_ext = pytest.mark.skipif(
    not hellofs.has_extensions(),
    reason=(
        f"pyfuse3 {pyfuse3.__version__} has no KERNEL_CACHE_EXTENSIONS (stock build); "
        "install the patched one with scripts/install-pyfuse3"
    ),
)

_BAD_LOG_LINE = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")


def _mount(tmp: Path, mode: str, rw: bool = False) -> Iterator[hellofs.HelloMount]:
    mnt = hellofs.HelloMount(tmp / "mnt", mode, tmp, rw=rw)
    mnt.start()
    try:
        yield mnt
    finally:
        mnt.stop()
    bad = [line for line in mnt.log().splitlines() if _BAD_LOG_LINE.search(line)]
    assert not bad, f"hellofs ({mode}) logged problems:\n{mnt.log()}"


@pytest.fixture(scope="module")
def classic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[hellofs.HelloMount]:
    yield from _mount(tmp_path_factory.mktemp("classic"), "classic")


@pytest.fixture(scope="module")
def cachedir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[hellofs.HelloMount]:
    if not hellofs.has_extensions():
        pytest.skip("needs KERNEL_CACHE_EXTENSIONS")
    yield from _mount(tmp_path_factory.mktemp("cachedir"), "cachedir")


@pytest.fixture(scope="module")
def noopen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[hellofs.HelloMount]:
    if not hellofs.has_extensions():
        pytest.skip("needs KERNEL_CACHE_EXTENSIONS")
    yield from _mount(tmp_path_factory.mktemp("noopen"), "noopen")


@pytest.fixture(params=hellofs.EXTENSION_MODES)
def fresh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[hellofs.HelloMount]:
    """A mount of its own, for tests that change the tree."""
    if not hellofs.has_extensions():
        pytest.skip("needs KERNEL_CACHE_EXTENSIONS")
    yield from _mount(tmp_path, request.param)


def delta(mnt: hellofs.HelloMount, before: collections.Counter[str]) -> collections.Counter[str]:
    after = mnt.counts()
    after.subtract(before)
    return +after


def read_file(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def listdir(path: Path) -> list[str]:
    return sorted(os.listdir(path))


EXPECTED = {
    "d/a.txt": b"content of a\n",
    "d/b.txt": b"B" * 10000,
    "hello.txt": b"hello world\n",
}


# ---------------------------------------------------------------- stock behaviour


def test_classic_listdir_asks_every_time(classic: hellofs.HelloMount) -> None:
    listdir(classic.mountpoint / "d")
    before = classic.counts()
    for _ in range(REPEAT):
        assert listdir(classic.mountpoint / "d") == ["a.txt", "b.txt"]
    d = delta(classic, before)
    assert d["opendir"] == REPEAT
    assert d["readdir"] >= REPEAT
    assert d["releasedir"] == REPEAT


def test_classic_open_asks_every_time(classic: hellofs.HelloMount) -> None:
    read_file(classic.mountpoint / "d/a.txt")
    before = classic.counts()
    for _ in range(REPEAT):
        assert read_file(classic.mountpoint / "d/a.txt") == EXPECTED["d/a.txt"]
    d = delta(classic, before)
    assert d["open"] == REPEAT
    assert d["release"] == REPEAT
    assert d["read"] == 0, "keep_cache serves the data, but not the open"


def test_classic_readlink_asks_every_time(classic: hellofs.HelloMount) -> None:
    os.readlink(classic.mountpoint / "link")
    before = classic.counts()
    for _ in range(REPEAT):
        assert os.readlink(classic.mountpoint / "link") == "hello.txt"
    assert delta(classic, before)["readlink"] == REPEAT


# ---------------------------------------------------------------- the extensions


@needs_ext
def test_api_surface() -> None:
    assert pyfuse3.KERNEL_CACHE_EXTENSIONS >= 1
    assert pyfuse3.FileInfo().cache_readdir is False
    fi = pyfuse3.FileInfo(fh=7, cache_readdir=True)
    assert (fi.fh, fi.cache_readdir, fi.keep_cache) == (7, True, True)
    assert pyfuse3.Operations.enable_cache_symlinks is False
    assert pyfuse3.Operations.pass_inode_to_fh_handlers is False
    assert pyfuse3.kernel_capabilities() == 0, "no INIT in this process"
    for name in ("FUSE_CAP_NO_OPEN_SUPPORT", "FUSE_CAP_NO_OPENDIR_SUPPORT", "FUSE_CAP_CACHE_SYMLINKS"):
        assert getattr(pyfuse3, name) > 0, f"{name} is 0: built against libfuse < 3.5?"


@needs_ext
def test_kernel_offers_no_open_modes(noopen: hellofs.HelloMount) -> None:
    stats = noopen.call("stats")
    caps = stats["capabilities"]
    assert caps & pyfuse3.FUSE_CAP_NO_OPEN_SUPPORT
    assert caps & pyfuse3.FUSE_CAP_NO_OPENDIR_SUPPORT, "kernel older than 5.1?"
    assert caps & pyfuse3.FUSE_CAP_CACHE_SYMLINKS, "kernel older than 4.20?"
    assert stats["no_open"] and stats["no_opendir"]


@needs_ext
def test_enosys_from_open_and_opendir_reaches_kernel(noopen: hellofs.HelloMount) -> None:
    """After the first ENOSYS the kernel never sends OPEN or OPENDIR again."""
    mp = noopen.mountpoint
    for _ in range(3):
        for name, data in EXPECTED.items():
            assert read_file(mp / name) == data
        assert listdir(mp) == ["d", "hello.txt", "link", "many", "scratch"]
        assert listdir(mp / "d") == ["a.txt", "b.txt"]
        assert len(listdir(mp / "many")) == 100
    counts = noopen.counts()
    assert counts["open"] == 1
    assert counts["opendir"] == 1
    assert counts["release"] == 0
    assert counts["releasedir"] == 0


@needs_ext
def test_noopen_listdir_is_served_by_kernel(noopen: hellofs.HelloMount) -> None:
    listdir(noopen.mountpoint / "many")
    before = noopen.counts()
    for _ in range(REPEAT):
        assert len(listdir(noopen.mountpoint / "many")) == 100
    d = delta(noopen, before)
    assert (d["opendir"], d["readdir"], d["releasedir"]) == (0, 0, 0), d


@needs_ext
def test_noopen_readdir_gets_directory_inode(noopen: hellofs.HelloMount) -> None:
    listdir(noopen.mountpoint / "d")
    inode = noopen.call("inode", path="d")["inode"]
    assert inode in noopen.call("stats")["readdir_inodes"]


@needs_ext
def test_noopen_open_read_is_served_by_kernel(noopen: hellofs.HelloMount) -> None:
    mp = noopen.mountpoint
    for name, data in EXPECTED.items():
        assert read_file(mp / name) == data
    before = noopen.counts()
    for _ in range(REPEAT):
        for name, data in EXPECTED.items():
            assert read_file(mp / name) == data
    d = delta(noopen, before)
    assert (d["open"], d["read"], d["flush"], d["release"]) == (0, 0, 0, 0), d


@needs_ext
def test_noopen_read_gets_file_inode(noopen: hellofs.HelloMount) -> None:
    """With handle 0 for every file, only the inode tells the files apart."""
    mp = noopen.mountpoint
    for name, data in EXPECTED.items():
        assert read_file(mp / name) == data
    calls = {tuple(c) for c in noopen.call("stats")["read_calls"]}
    for name in EXPECTED:
        inode = noopen.call("inode", path=name)["inode"]
        assert (0, inode) in calls, (name, inode, calls)
    assert noopen.call("stats")["inode_mismatches"] == 0


@needs_ext
def test_noopen_readlink_is_served_by_kernel(noopen: hellofs.HelloMount) -> None:
    os.readlink(noopen.mountpoint / "link")
    before = noopen.counts()
    for _ in range(REPEAT):
        assert os.readlink(noopen.mountpoint / "link") == "hello.txt"
        assert read_file(noopen.mountpoint / "link") == EXPECTED["hello.txt"]
    assert delta(noopen, before)["readlink"] == 0


@needs_ext
def test_cachedir_opendir_fileinfo_caches_listing(cachedir: hellofs.HelloMount) -> None:
    listdir(cachedir.mountpoint / "many")
    before = cachedir.counts()
    for _ in range(REPEAT):
        assert len(listdir(cachedir.mountpoint / "many")) == 100
    d = delta(cachedir, before)
    assert d["opendir"] == REPEAT, "opendir still runs: it is what returns cache_readdir"
    assert d["releasedir"] == REPEAT
    assert d["readdir"] == 0, d


@needs_ext
def test_cachedir_handlers_get_handle_and_inode(cachedir: hellofs.HelloMount) -> None:
    """With real handles, the extra inode argument matches the handle's inode."""
    mp = cachedir.mountpoint
    for name, data in EXPECTED.items():
        assert read_file(mp / name) == data
    listdir(mp / "d")
    cachedir.counts()  # waits for the asynchronous RELEASE/RELEASEDIR
    stats = cachedir.call("stats")
    assert stats["read_calls"], "no reads reached the filesystem"
    assert all(fh != 0 and inode != 0 for fh, inode in stats["read_calls"])
    assert stats["inode_mismatches"] == 0
    assert stats["open_handles"] == 0, "every open/opendir handle was released"


@needs_ext
def test_cachedir_symlinks_cached(cachedir: hellofs.HelloMount) -> None:
    os.readlink(cachedir.mountpoint / "link")
    before = cachedir.counts()
    for _ in range(REPEAT):
        assert os.readlink(cachedir.mountpoint / "link") == "hello.txt"
    assert delta(cachedir, before)["readlink"] == 0


@pytest.fixture(params=hellofs.EXTENSION_MODES)
def writable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[hellofs.HelloMount]:
    if not hellofs.has_extensions():
        pytest.skip("needs KERNEL_CACHE_EXTENSIONS")
    yield from _mount(tmp_path, request.param, rw=True)


@needs_ext
def test_write_fsync_fsyncdir_get_inode(writable: hellofs.HelloMount) -> None:
    """The other handlers that get a handle receive the inode as well."""
    mnt = writable
    mp = mnt.mountpoint
    fd = os.open(mp / "scratch", os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"written", 0) == 7
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(mp / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    mnt.counts()  # waits for the asynchronous RELEASE/RELEASEDIR
    stats = mnt.call("stats")
    assert mnt.call("data", path="scratch")["data"].startswith("written")
    scratch = mnt.call("inode", path="scratch")["inode"]
    d = mnt.call("inode", path="d")["inode"]
    calls = stats["fh_calls"]
    assert [c[1] for c in calls["write"]][-1:] == [scratch]
    assert [c[1] for c in calls["fsync"]][-1:] == [scratch]
    assert [c[1] for c in calls["fsyncdir"]][-1:] == [d]
    if mnt.mode == "noopen":
        assert {c[0] for c in calls["write"] + calls["fsync"] + calls["fsyncdir"]} == {0}
    assert stats["inode_mismatches"] == 0


# ---------------------------------------------------------------- invalidation


@needs_ext
def test_invalidate_inode_refreshes_cached_listing(fresh: hellofs.HelloMount) -> None:
    d = fresh.mountpoint / "d"
    assert listdir(d) == ["a.txt", "b.txt"]
    fresh.call("add", path="d", name="new.txt", data="new\n")
    assert listdir(d) == ["a.txt", "b.txt"], "listing should come from the kernel cache"
    before = fresh.counts()
    fresh.call("invalidate_inode", path="d")
    assert listdir(d) == ["a.txt", "b.txt", "new.txt"]
    assert delta(fresh, before)["readdir"] >= 1
    assert read_file(d / "new.txt") == b"new\n"


@needs_ext
def test_invalidate_entry_refreshes_cached_listing(fresh: hellofs.HelloMount) -> None:
    d = fresh.mountpoint / "d"
    assert listdir(d) == ["a.txt", "b.txt"]
    assert read_file(d / "b.txt") == EXPECTED["d/b.txt"]
    fresh.call("remove", path="d", name="b.txt")
    assert listdir(d) == ["a.txt", "b.txt"], "listing should come from the kernel cache"
    fresh.call("invalidate_entry", path="d", name="b.txt")
    assert listdir(d) == ["a.txt"]
    assert not (d / "b.txt").exists()


@needs_ext
def test_invalidate_entry_needs_a_known_name(fresh: hellofs.HelloMount) -> None:
    """A name the kernel never looked up has no dentry to invalidate: ENOENT,
    and the cached listing stays; invalidate_inode on the directory is the way
    to publish new names."""
    d = fresh.mountpoint / "d"
    listdir(d)
    fresh.call("add", path="d", name="unseen.txt")
    with pytest.raises(RuntimeError, match="FileNotFoundError"):
        fresh.call("invalidate_entry", path="d", name="unseen.txt")
    assert listdir(d) == ["a.txt", "b.txt"]


@needs_ext
def test_invalidate_inode_refreshes_cached_symlink(fresh: hellofs.HelloMount) -> None:
    link = fresh.mountpoint / "link"
    assert os.readlink(link) == "hello.txt"
    fresh.call("set_link", path="link", target="d/a.txt")
    assert os.readlink(link) == "hello.txt", "target should come from the kernel cache"
    before = fresh.counts()
    fresh.call("invalidate_inode", path="link")
    assert os.readlink(link) == "d/a.txt"
    assert read_file(link) == EXPECTED["d/a.txt"]
    assert delta(fresh, before)["readlink"] >= 1


# ---------------------------------------------------------------- listings without attributes (0003)


@pytest.fixture(scope="module")
def names(tmp_path_factory: pytest.TempPathFactory) -> Iterator[hellofs.HelloMount]:
    if not hellofs.has_reply_name():
        pytest.skip("needs READDIR_REPLY_NAME (patch 0003)")
    yield from _mount(tmp_path_factory.mktemp("names"), "names")


def test_names_only_listing_gives_names_types_and_inodes_without_lookups(names: hellofs.HelloMount) -> None:
    """readdir_reply_name: getdents sees the name, d_ino and d_type; the kernel links
    nothing, so a stat afterwards is a LOOKUP; ReaddirToken.pid is the reader's."""
    before = names.counts()
    with os.scandir(names.mountpoint / "d") as it:
        seen = {entry.name: (entry.inode(), entry.is_dir(follow_symlinks=False),
                             entry.is_file(follow_symlinks=False)) for entry in it}
    after = delta(names, before)
    assert sorted(seen) == ["a.txt", "b.txt"]
    assert all(is_file and not is_dir and ino > 0 for ino, is_dir, is_file in seen.values())
    assert after["lookup"] == 1  # d itself; none for the entries listed
    assert names.call("stats")["readdir_pids"][-1] == threading.get_native_id()
    st = os.stat(names.mountpoint / "d" / "a.txt")
    assert st.st_ino == seen["a.txt"][0] and st.st_size == len(EXPECTED["d/a.txt"])
    assert delta(names, before)["lookup"] == 2  # the stat asked: the listing linked nothing


# ---------------------------------------------------------------- read replies from buffers (0004)


@pytest.fixture(scope="module")
def buffers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[hellofs.HelloMount]:
    if not hellofs.has_read_buffers():
        pytest.skip("needs READ_REPLY_BUFFERS (patch 0004)")
    yield from _mount(tmp_path_factory.mktemp("buffers"), "buffers")


def test_read_replied_from_a_list_of_buffers_gives_the_bytes_in_order(buffers: hellofs.HelloMount) -> None:
    """A read returning memoryview slices and bytes of mixed sizes reaches the reader whole
    and in order, at every offset the kernel asks (fuse_reply_iov)."""
    before = buffers.call("stats")
    big = hellofs.big_data()
    assert read_file(buffers.mountpoint / "big.bin") == big
    with open(buffers.mountpoint / "big.bin", "rb", buffering=0) as fh:
        for off, size in ((1, 5), (65535, 70000), (len(big) - 3, 100), (len(big), 10)):
            assert os.pread(fh.fileno(), size, off) == big[off : off + size], (off, size)
    assert read_file(buffers.mountpoint / "d" / "b.txt") == EXPECTED["d/b.txt"]
    after = buffers.call("stats")
    assert after["buffer_replies"] > before["buffer_replies"]
    assert after["buffer_pieces"] - before["buffer_pieces"] > after["buffer_replies"] - before["buffer_replies"]


def test_read_from_more_buffers_than_one_write_takes_is_joined(buffers: hellofs.HelloMount) -> None:
    """More than READ_REPLY_BUFFERS_MAX pieces in one reply (16-byte pieces) still arrive."""
    before = buffers.call("stats")
    assert read_file(buffers.mountpoint / "fine.bin") == hellofs.fine_data()
    after = buffers.call("stats")
    replies = after["buffer_replies"] - before["buffer_replies"]
    assert replies >= 1
    assert (after["buffer_pieces"] - before["buffer_pieces"]) / replies > pyfuse3.READ_REPLY_BUFFERS_MAX


def test_read_reply_with_a_piece_that_is_no_buffer_is_eio(tmp_path: Path) -> None:
    """The reader gets an error at once (the kernel is not left waiting for a reply): EIO,
    or ENOTCONN where the kernel retried the failed read-ahead as a smaller READ after the
    TypeError had ended the daemon's main loop (as a read returning a non-buffer does in
    stock pyfuse3)."""
    if not hellofs.has_read_buffers():
        pytest.skip("needs READ_REPLY_BUFFERS (patch 0004)")
    mnt = hellofs.HelloMount(tmp_path / "mnt", "buffers", tmp_path)
    mnt.start()
    try:
        with pytest.raises(OSError) as info:
            read_file(mnt.mountpoint / "bad.bin")
        assert info.value.errno in (errno.EIO, errno.ENOTCONN)
        assert mnt.proc is not None
        mnt.proc.wait(timeout=20)
    finally:
        mnt.stop()
    assert "TypeError" in mnt.log()
