"""A mounted image against its source tree: every entry type, every lstat field, and
the read-only rules (EROFS, statfs), in both FUSE modes (kernel-cache extensions and
stock). One image, mounted once per mode for the whole module.
"""

from __future__ import annotations

import collections
import errno
import os
import random
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pyfuse3
import pytest
from cnpsfs_testlib import CAP_NET_RAW_EP, LONG_NAME, NON_UTF8, Cli, Node, build_tree, synthetic_nodes
from mountutil import FUSE, FUSE_MODES, Mount, cat, compare_mount, mount_image, needs_root, read_dir_raw, walk_lstat

pytestmark = [*FUSE, needs_root]

GIB = 1 << 30
# One sparse file just over 4 GiB (holes cost the importer ~0.7 s per GiB): data at the
# start, across the 4 GiB boundary (32-bit offsets) and at the very end.
SPARSE = b"var/sparse.img"
SPARSE_SIZE = 4 * GIB + 200_000
ACROSS = 4 * GIB - 50_000
LONG_DIR = b"names/" + b"d" * 255

_rng = random.Random(3)
EXTRA = [
    Node(LONG_DIR, "dir", 0o755, mtime_ns=1_700_000_000_000_000_001),
    Node(LONG_DIR + b"/" + b"f" * 255, "file", 0o644, mtime_ns=1_700_000_000_000_000_002, data=b"deep\n"),
    Node(b"names/" + b"s" * 255, "symlink", target=b"t" * 1000, mtime_ns=1_700_000_000_000_000_003),
    Node(b"usr/share/text", "file", 0o644, mtime_ns=1_700_000_000_000_000_004,
         data=b"".join(b"line %d of a compressible file\n" % i for i in range(20_000))),
    Node(b"usr/bin/suid-link", "hardlink", target=b"usr/bin/tool"),
    Node(b"srv/setgid-dir", "dir", 0o2775, 0, 50, 1_700_000_000_000_000_005),
    Node(b"srv/sticky-dir", "dir", 0o1770, mtime_ns=1_700_000_000_000_000_006),
    Node(b"run/sock", "socket", 0o755, mtime_ns=1_700_000_000_000_000_007),
    Node(SPARSE, "sparse", 0o640, 2, 3, 1_700_000_000_000_000_008, size=SPARSE_SIZE,
         pieces=[(0, b"head"), (ACROSS, _rng.randbytes(100_000)), (SPARSE_SIZE - 5, b"tail!")]),
]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The synthetic tree (with sparse files) and a store holding it as an image."""
    base = tmp_path_factory.mktemp("synthetic")
    tree = build_tree(base / "tree", synthetic_nodes() + EXTRA, root_mode=0o755,
                      root_mtime_ns=1_600_000_000_000_000_001)
    cli = Cli(base / "store")
    cli.ok("import", "dir", tree, "--name", "example.org/synthetic", "--version", "1")
    (base / "image.toml").write_text('name = "example.org/synthetic-image"\nversion = "1"\n'
                                     '[[layers]]\nfileset = "example.org/synthetic@1"\n')
    cli.ok("image", "create", base / "image.toml")
    return tree, base / "store"


@pytest.fixture(scope="module", params=FUSE_MODES)
def mnt(source: tuple[Path, Path], request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    _tree, store = source
    fuse_mode = request.param
    with mount_image(store, "example.org/synthetic-image@1", tmp_path_factory.mktemp(f"mnt-{fuse_mode}"),
                     mode=fuse_mode) as mount:
        yield mount


def not_sparse(rel: bytes) -> bool:
    return rel != SPARSE  # hashing 4 GiB of holes twice per mode costs seconds: read at offsets instead


# --------------------------------------------------------------------------- the tree


def test_every_path_matches_source(source: tuple[Path, Path], mnt: Mount) -> None:
    tree, _store = source
    problems = compare_mount(tree, mnt.mountpoint, content=not_sparse)
    assert not problems, "\n".join(problems[:40])


def test_status_names_the_fuse_mode(mnt: Mount) -> None:
    status = mnt.status()
    if mnt.mode == "auto":
        lean = "+lean-listings" if getattr(pyfuse3, "READDIR_REPLY_NAME", 0) else ""  # patch 0003
        buffers = "+read-buffers" if getattr(pyfuse3, "READ_REPLY_BUFFERS", 0) else ""  # patch 0004
        assert status["fuse_mode"] == "kernel-cache+no-open+no-opendir" + lean + buffers, status["fuse_mode"]
    else:
        assert status["fuse_mode"] == "stock"
    assert status["image"]["name"] == "example.org/synthetic-image"
    assert status["pid"] == mnt.pid


def test_hard_links_share_an_inode(source: tuple[Path, Path], mnt: Mount) -> None:
    links = [b"usr/bin/hl-a", b"usr/lib/hl-b", b"usr/lib/sub/hl-c"]
    stats = [os.lstat(mnt / rel) for rel in links]
    assert len({st.st_ino for st in stats}) == 1
    assert [st.st_nlink for st in stats] == [3, 3, 3]
    suid = [os.lstat(mnt / rel) for rel in (b"usr/bin/tool", b"usr/bin/suid-link")]
    assert suid[0].st_ino == suid[1].st_ino and suid[0].st_nlink == 2
    assert stat.S_IMODE(suid[1].st_mode) == 0o4755
    # Equal content in two unlinked files is still two inodes.
    assert os.lstat(mnt / "usr/lib/big.bin").st_ino != os.lstat(mnt / "usr/lib/big-copy.bin").st_ino


def test_inode_numbers_are_stable(mnt: Mount) -> None:
    first = {rel: st.st_ino for rel, st in walk_lstat(mnt.mountpoint).items()}
    assert first == {rel: st.st_ino for rel, st in walk_lstat(mnt.mountpoint).items()}
    assert first[b""] == 1


def test_security_capability_and_other_xattrs(mnt: Mount) -> None:
    assert os.getxattr(mnt / "usr/bin/ping", "security.capability") == CAP_NET_RAW_EP
    assert os.getxattr(mnt / "etc/owned", "user.binary") == bytes(range(256))
    assert sorted(os.listxattr(mnt / "etc/owned")) == ["user.binary", "user.comment"]
    assert os.getxattr(mnt / "usr/bin", "user.dir") == b"yes"
    assert os.listxattr(mnt / "etc/hello.txt") == []
    with pytest.raises(OSError) as info:
        os.getxattr(mnt / "etc/hello.txt", "user.missing")
    assert info.value.errno == errno.ENODATA


def test_special_bits_and_types(mnt: Mount) -> None:
    def mode(rel: str) -> int:
        return os.lstat(mnt / rel).st_mode

    assert stat.S_IMODE(mode("usr/bin/tool")) == 0o4755
    assert stat.S_IMODE(mode("usr/bin/sgid")) == 0o2755
    assert stat.S_IMODE(mode("tmp")) == 0o1777
    assert stat.S_IMODE(mode("sticky-file")) == 0o1644
    assert stat.S_IMODE(mode("srv/setgid-dir")) == 0o2775
    assert stat.S_ISFIFO(mode("run/fifo"))
    assert stat.S_ISSOCK(mode("run/sock"))
    assert stat.S_ISCHR(mode("dev/null")) and stat.S_ISBLK(mode("dev/sda1"))
    big = os.lstat(mnt / "dev/big-minor").st_rdev
    assert (os.major(big), os.minor(big)) == (4095, 1048575)


def test_names_non_utf8_and_255_bytes(mnt: Mount) -> None:
    names = set(os.listdir(mnt / b"names"))
    assert {NON_UTF8, LONG_NAME, b"d" * 255, b"s" * 255, "ünïcödé ✓".encode()} <= names
    assert cat(mnt / (b"names/" + NON_UTF8)) == b"latin-1 name\n"
    assert cat(mnt / (LONG_DIR + b"/" + b"f" * 255)) == b"deep\n"
    assert os.readlink(mnt / (b"names/" + b"s" * 255)) == b"t" * 1000
    with pytest.raises(OSError) as info:
        os.lstat(mnt / (b"names/" + b"x" * 256))
    assert info.value.errno == errno.ENAMETOOLONG


def test_dot_and_dotdot(mnt: Mount) -> None:
    entries = read_dir_raw(mnt / "usr/lib")
    names = [e.name for e in entries]
    assert names[:2] == [b".", b".."]
    assert sorted(names[2:]) == sorted(os.listdir(mnt / b"usr/lib"))
    by_name = {e.name: e.ino for e in entries}
    assert by_name[b"."] == os.lstat(mnt / "usr/lib").st_ino
    assert by_name[b".."] == os.lstat(mnt / "usr").st_ino
    assert os.path.samefile(mnt / "usr/lib/sub/..", mnt / "usr/lib")
    assert os.lstat(mnt / "usr/lib").st_nlink == 3  # ., .. and sub/..


# --------------------------------------------------------------------------- reading


def test_large_file_random_reads(source: tuple[Path, Path], mnt: Mount) -> None:
    tree, _ = source
    rng = random.Random(7)
    for rel in ("usr/lib/big.bin", "usr/share/text"):
        want = (tree / rel).read_bytes()
        fd = os.open(mnt / rel, os.O_RDONLY)
        try:
            for _ in range(200):
                off = rng.randrange(len(want) + 10)
                n = rng.choice([1, 17, 4096, 65536, 300_000])
                assert os.pread(fd, n, off) == want[off : off + n], (rel, off, n)
        finally:
            os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a mount's read-ahead needs root (sysfs)")
def test_sequential_reads_come_in_large_requests(source: tuple[Path, Path], mnt: Mount) -> None:
    """The daemon raises the mount's read-ahead: a cold sequential read costs a request per
    MiB or so, not one per 128 KiB (the kernel's default for a FUSE mount)."""
    tree, _ = source
    rel = "usr/lib/big-copy.bin"
    want = (tree / rel).read_bytes()
    dev = os.stat(mnt.mountpoint).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    assert int(bdi.read_text()) >= 1024
    fd = os.open(mnt / rel, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # cold, whatever other tests read
        before = mnt.requests()
        got = b"".join(iter(lambda: os.read(fd, 1 << 16), b""))
    finally:
        os.close(fd)
    assert got == want
    reads = _delta(mnt, before)["read"]
    assert 1 <= reads <= len(want) // (512 << 10) + 2, reads


def _pread(path: bytes, n: int, off: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def test_sparse_file_over_4gib(source: tuple[Path, Path], mnt: Mount) -> None:
    tree, _ = source
    src = os.path.join(os.fsencode(tree), SPARSE)
    st = os.lstat(mnt / SPARSE)
    assert st.st_size == SPARSE_SIZE
    assert st.st_blocks * 512 < 1 << 20, "holes must not count as blocks"
    offsets = [0, 1, GIB, 2 * GIB + 3, ACROSS - 100, ACROSS, 4 * GIB - 4096, 4 * GIB - 1, 4 * GIB, 4 * GIB + 49_990,
               SPARSE_SIZE - 4096, SPARSE_SIZE - 5, SPARSE_SIZE - 1, SPARSE_SIZE, SPARSE_SIZE + 100]
    for off in offsets:
        for n in (1, 4096, 200_000):
            assert _pread(mnt / SPARSE, n, off) == _pread(src, n, off), (off, n)
    assert _pread(mnt / SPARSE, 8, SPARSE_SIZE - 5) == b"tail!"


def test_empty_and_unreadable_modes(mnt: Mount) -> None:
    assert cat(mnt / "etc/empty") == b""
    assert cat(mnt / b"names/dir-\xff\xfe/x") == b"mode 000\n"  # root ignores mode 000


# --------------------------------------------------------------------------- read-only


def _open_flags(flags: int) -> Callable[[Path], object]:
    return lambda p: os.close(os.open(p / "etc/hello.txt", flags))


WRITES: dict[str, Callable[[Path], object]] = {
    "open-wronly": _open_flags(os.O_WRONLY),
    "open-rdwr": _open_flags(os.O_RDWR),
    "open-append": _open_flags(os.O_WRONLY | os.O_APPEND),
    "open-trunc": _open_flags(os.O_RDONLY | os.O_TRUNC),
    "create": lambda p: os.close(os.open(p / "etc/new", os.O_WRONLY | os.O_CREAT, 0o644)),
    "mkdir": lambda p: os.mkdir(p / "etc/newdir"),
    "rmdir": lambda p: os.rmdir(p / "usr/lib/sub"),
    "unlink": lambda p: os.unlink(p / "etc/hello.txt"),
    "rename": lambda p: os.rename(p / "etc/hello.txt", p / "etc/moved"),
    "chmod": lambda p: os.chmod(p / "etc/hello.txt", 0o600),
    "chown": lambda p: os.chown(p / "etc/hello.txt", 1, 1),
    "utime": lambda p: os.utime(p / "etc/hello.txt", (0, 0)),
    "truncate": lambda p: os.truncate(p / "etc/hello.txt", 0),
    "setxattr": lambda p: os.setxattr(p / "etc/hello.txt", "user.new", b"x"),
    "removexattr": lambda p: os.removexattr(p / "etc/owned", "user.comment"),
    "symlink": lambda p: os.symlink("x", p / "etc/newlink"),
    "link": lambda p: os.link(p / "etc/hello.txt", p / "etc/hardlink"),
    "mknod": lambda p: os.mkfifo(p / "etc/newfifo"),
}


@pytest.mark.parametrize("op", sorted(WRITES))
def test_writes_are_refused_with_erofs(mnt: Mount, op: str) -> None:
    before = os.lstat(mnt / "etc/hello.txt")
    with pytest.raises(OSError) as info:
        WRITES[op](mnt.mountpoint)
    assert info.value.errno == errno.EROFS, f"{op}: {info.value}"
    assert os.lstat(mnt / "etc/hello.txt") == before
    assert cat(mnt / "etc/hello.txt") == b"hello, world\n"


def test_statfs(mnt: Mount) -> None:
    st = os.statvfs(mnt.mountpoint)
    assert st.f_flag & os.ST_RDONLY
    assert st.f_bsize == 4096
    assert st.f_namemax == 255
    assert st.f_bfree == st.f_bavail == 0
    assert st.f_files > 0
    df = subprocess.run(["df", "-T", str(mnt.mountpoint)], capture_output=True, text=True)
    assert df.returncode == 0 and "fuse.cnpsfs" in df.stdout, df


# --------------------------------------------------------------------------- what the kernel caches


def _delta(mnt: Mount, before: collections.Counter[str]) -> collections.Counter[str]:
    after = mnt.requests()
    after.subtract(before)
    return +after


def test_warm_stat_makes_no_requests(mnt: Mount) -> None:
    """Entries and attributes never time out: repeated stats stay in the kernel, in both modes."""
    paths = [mnt / "etc/hello.txt", mnt / "usr/bin/ping", mnt / "usr/lib/sub", mnt / "etc/passwd-link"]
    for p in paths:
        os.lstat(p)
    before = mnt.requests()
    for _ in range(50):
        for p in paths:
            os.lstat(p)
            os.stat(mnt / "etc/hello.txt")
    assert _delta(mnt, before) == {}


def test_warm_read_makes_no_requests(mnt: Mount) -> None:
    path = mnt / "usr/share/passwd"
    want = cat(path)
    before = mnt.requests()
    for _ in range(20):
        with open(path, "rb") as f:
            assert f.read() == want
    delta = _delta(mnt, before)
    if mnt.mode == "auto":
        assert delta == {}, "no-open mode: the kernel opens, reads from its page cache and closes alone"
    else:
        # Stock pyfuse3: every open and close still goes to the daemon; keep_cache spares the reads.
        assert delta == {"open": 20, "release": 20}, delta


def test_warm_readlink_makes_no_requests(mnt: Mount) -> None:
    link = mnt / "etc/passwd-link"
    assert os.readlink(link) == "../usr/share/passwd"
    before = mnt.requests()
    for _ in range(20):
        assert os.readlink(link) == "../usr/share/passwd"
    delta = _delta(mnt, before)
    assert delta == ({} if mnt.mode == "auto" else {"readlink": 20}), delta


def test_warm_listdir_does_not_read_again(mnt: Mount) -> None:
    path = mnt / "usr/lib"
    want = os.listdir(path)
    before = mnt.requests()
    for _ in range(20):
        assert os.listdir(path) == want
    delta = _delta(mnt, before)
    # A cache drop by another process (drop_caches) makes the kernel look the path itself
    # (usr, lib) up again: that is the path walk, not the listing, which would be an entry each.
    assert delta.pop("lookup", 0) <= 2, delta
    if mnt.mode == "auto":
        assert delta == {}, "cache_readdir + no-opendir: listings come from the kernel's cache"
    else:
        # Stock: each listing is opendir + readdir (a full one, then an empty one at the end)
        # + releasedir; never a lookup or getattr (readdirplus refreshed nothing).
        assert delta == {"opendir": 20, "readdir": 40, "releasedir": 20}, delta
