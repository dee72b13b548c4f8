"""The FUSE operations and swap preparation in-process: no root, no FUSE, no mount.

An :class:`Operations` is built over a real :class:`LocalStore` and :class:`Generation`
in a temporary directory, and its async handlers are called under ``trio.run`` the way
pyfuse3 calls them, with pyfuse3's own argument objects. The few pyfuse3 calls that need
a live session (``readdir_reply``, ``invalidate_*``) go through the class's
:class:`Kernel` seam, which these tests fill with recorders. Results are checked against
the source tree on disk. ``image/swap.py``'s ``prepare`` is tested directly too: what it
shares, what it reads, what it lists for the kernel, and what makes it fail.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import sqlite3
import stat
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError, ConflictError, MissingObjectError
from cnpsfs.fs.operations import Kernel, Operations
from cnpsfs.image.manifest import compose
from cnpsfs.image.swap import SwapPlan, prepare
from cnpsfs.image.view import ROOT_INODE, Generation, InodeTable, Node
from cnpsfs.ingest.directory import import_directory
from cnpsfs.ingest.tree import ImportOptions
from cnpsfs.store import LocalStore

MTIME = 1_700_000_000
CTX = pyfuse3.RequestContext()


# --------------------------------------------------------------------------- source trees and images


def write_tree(root: Path, files: dict[str, bytes | str | tuple[str, str]]) -> Path:
    """Files (bytes), symlinks (str targets) and hard links (("link", to)) under *root*,
    with fixed mtimes so two trees built alike import alike."""
    for rel, value in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, bytes):
            path.write_bytes(value)
            path.chmod(0o644)
        elif isinstance(value, str):
            path.symlink_to(value)
        else:
            os.link(root / value[1], path)
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            os.utime(os.path.join(dirpath, name), (MTIME, MTIME), follow_symlinks=False)
    for dirpath, _dirs, _names in sorted(os.walk(root), reverse=True):
        os.utime(dirpath, (MTIME, MTIME))
    return root


def big(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def base_files() -> dict[str, bytes | str | tuple[str, str]]:
    """The layer every version shares: most of a small root filesystem."""
    files: dict[str, bytes | str | tuple[str, str]] = {
        "etc/hostname": b"inprocess\n",
        "usr/bin/tool": big(1, 1_300_000),  # several chunks, cut alone
        "usr/bin/tool-again": ("link", "usr/bin/tool"),
        "usr/share/empty": b"",
        "srv/unchanged/deep/er/file": b"deep\n",
    }
    return files | {f"usr/share/doc/pkg{i}/README": f"package {i}\n".encode() * (i + 1) for i in range(30)}


def lib_files(version: int) -> dict[str, bytes | str | tuple[str, str]]:
    """The layer an upgrade replaces: version 2 changes a library, adds and removes a directory."""
    return {
        "etc/os-release": f"VERSION={version}\n".encode(),
        "usr/lib/libx.so.1.2": big(1 + version, 40_000),
        "usr/lib/libx.so.1": "libx.so.1.2",
        "usr/lib/libbig.so": big(10 + version, 300_000),  # large: chunks of its own
        f"opt/only-v{version}/file": f"only in v{version}\n".encode(),
    }


def with_extras(root: Path) -> Path:
    """What write_tree does not make: an xattr, a sparse file, an empty directory."""
    os.setxattr(root / "etc/hostname", "user.comment", b"set by the test")
    with open(root / "usr/share/sparse", "wb") as f:
        f.write(b"head")
        f.seek(3 << 20)
        f.write(b"tail")
    (root / "var/empty").mkdir(parents=True)
    for path in (root / "etc/hostname", root / "usr/share/sparse"):
        os.utime(path, (MTIME, MTIME))
    for path in (root / "var/empty", root / "var", root / "usr/share", root / "etc", root):
        os.utime(path, (MTIME, MTIME))
    return root


def import_tree(store: LocalStore, root: Path, name: str) -> bytes:
    return import_directory(store, str(root), ImportOptions(name=name, version="1")).digest


def image_of(*layers: bytes, version: str = "1", mode: str = "layers") -> fmt.Image:
    return fmt.Image("example.org/inprocess", version, mode, [fmt.Layer(d) for d in layers])


@dataclass
class World:
    store: LocalStore
    src: Path  # what image v1 shows (both its layers in one directory)
    v1: fmt.Image  # base + lib v1
    v2: fmt.Image  # base + lib v2


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    store = LocalStore(tmp_path / "store", create=True)
    base = import_tree(store, with_extras(write_tree(tmp_path / "base", base_files())), "example.org/base")
    libs = [import_tree(store, write_tree(tmp_path / f"lib{v}", lib_files(v)), f"example.org/lib{v}") for v in (1, 2)]
    src = with_extras(write_tree(tmp_path / "v1", base_files() | lib_files(1)))
    try:
        yield World(store, src, image_of(base, libs[0]), image_of(base, libs[1], version="2"))
    finally:
        store.close()


# --------------------------------------------------------------------------- the kernel's side


@dataclass
class Listing:
    """A READDIR reply buffer: room for *room* entries, as the kernel's page would have."""

    room: int = 1 << 30
    entries: list[tuple[bytes, int, int]] = field(default_factory=list)  # name, st_ino, next offset
    pid: int = 0  # the reading process, as ReaddirToken.pid
    names_only: set[bytes] = field(default_factory=set)  # entries replied without attributes
    modes: dict[bytes, int] = field(default_factory=dict)  # their file types, as the reply gave them


@dataclass
class FakeKernel:
    """Records what the operations would have told the kernel."""

    entries: list[tuple[int, bytes]] = field(default_factory=list)
    inodes: list[int] = field(default_factory=list)

    def readdir_reply(self, token: Listing, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if len(token.entries) >= token.room:
            return False
        token.entries.append((name, attr.st_ino, next_id))
        return True

    def readdir_reply_name(self, token: Listing, name: bytes, ino: int, mode: int, next_id: int) -> bool:
        if len(token.entries) >= token.room:
            return False
        token.entries.append((name, ino, next_id))
        token.names_only.add(name)
        token.modes[name] = mode
        return True

    def seam(self) -> Kernel:
        return Kernel(readdir_reply=self.readdir_reply,  # type: ignore[arg-type]
                      readdir_reply_name=self.readdir_reply_name,  # type: ignore[arg-type]
                      invalidate_entry=lambda parent, name: self.entries.append((parent, name)),
                      invalidate_inode=self.inodes.append)


def run(ops_factory: Callable[[], Operations], test: Callable[[Operations], Awaitable[None]]) -> None:
    """Build the operations inside trio (its events and limiter belong to a run) and test them."""
    async def main() -> None:
        ops = ops_factory()
        async with trio.open_nursery() as nursery:
            ops.readahead_nursery = nursery  # read-ahead runs as in the daemon
            await test(ops)
            nursery.cancel_scope.cancel()

    trio.run(main)


def operations(generation: Generation, kernel: FakeKernel | None = None) -> Callable[[], Operations]:
    return lambda: Operations(generation, cache_bytes=8 << 20, threads=2, kernel=(kernel or FakeKernel()).seam())


async def fuse_errno(call: Awaitable[Any]) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await call
    return info.value.errno


async def lookup_path(ops: Operations, path: str) -> pyfuse3.EntryAttributes:
    ino = ROOT_INODE
    attr = await ops.getattr(ino, CTX)
    for part in path.split("/"):
        attr = await ops.lookup(ino, part.encode(), CTX)
        ino = attr.st_ino
    return attr


async def read(ops: Operations, fh: int, off: int, size: int) -> bytes:
    """What the kernel gets for a READ: the reply's pieces joined (a list where the
    operations reply from buffers, patch 0004)."""
    reply = await ops.read(fh, off, size)
    return reply if isinstance(reply, bytes) else b"".join(reply)


async def read_all(ops: Operations, ino: int, size: int, piece: int = 128 * 1024) -> bytes:
    info = await ops.open(ino, os.O_RDONLY, CTX)
    out = []
    for off in range(0, size + 1, piece):
        out.append(await read(ops, info.fh, off, piece))
    await ops.release(info.fh)
    return b"".join(out)


async def list_dir(ops: Operations, ino: int, room: int = 1 << 30) -> list[tuple[bytes, int, int]]:
    """READDIR until the listing ends, resuming at the offset of the last entry returned."""
    fh = await ops.opendir(ino, CTX)
    fh = fh.fh if isinstance(fh, pyfuse3.FileInfo) else fh
    out: list[tuple[bytes, int, int]] = []
    start = 0
    while True:
        token = Listing(room)
        await ops.readdir(fh, start, token)
        if not token.entries:
            break
        out += token.entries
        start = token.entries[-1][2]
    await ops.releasedir(fh)
    return out


# --------------------------------------------------------------------------- the handlers against the source tree


def test_every_path_answers_as_the_source_tree(world: World) -> None:
    """lookup, getattr, readdir, open/read, readlink, listxattr and getxattr for every path."""
    src = world.src
    generation = compose(world.store, world.v1)

    async def check(ops: Operations) -> None:
        seen: dict[int, int] = {}  # source inode -> mount inode: hard links share one, nothing else does
        stack: list[tuple[str, int]] = [("", ROOT_INODE)]
        checked = Counter[str]()
        while stack:
            rel, ino = stack.pop()
            listing = await list_dir(ops, ino)
            names = [name for name, _ino, _off in listing]
            assert names[:2] == [b".", b".."]
            assert names[2:] == sorted(os.fsencode(n) for n in os.listdir(src / rel)), rel
            assert [off for _n, _i, off in listing] == list(range(1, len(listing) + 1))
            for name, listed_ino, _off in listing[2:]:
                path = os.path.join(rel, os.fsdecode(name))
                st = os.lstat(src / path)
                attr = await ops.lookup(ino, name, CTX)
                assert attr.st_ino == listed_ino
                assert seen.setdefault(st.st_ino, attr.st_ino) == attr.st_ino, path
                assert (await ops.getattr(attr.st_ino, CTX)).st_mode == attr.st_mode
                for key in ("st_mode", "st_uid", "st_gid", "st_mtime_ns", "st_nlink"):
                    assert getattr(attr, key) == getattr(st, key), (path, key)
                if stat.S_ISDIR(st.st_mode):
                    assert attr.st_size == 4096
                    stack.append((path, attr.st_ino))
                    checked["dirs"] += 1
                    continue
                assert attr.st_size == st.st_size, path
                if stat.S_ISLNK(st.st_mode):
                    assert await ops.readlink(attr.st_ino, CTX) == os.fsencode(os.readlink(src / path))
                    checked["symlinks"] += 1
                elif stat.S_ISREG(st.st_mode):
                    assert await read_all(ops, attr.st_ino, st.st_size) == (src / path).read_bytes(), path
                    checked["files"] += 1
                xattrs = {os.fsencode(k): os.getxattr(src / path, k, follow_symlinks=False)
                          for k in os.listxattr(src / path, follow_symlinks=False) if k.startswith("user.")}
                assert await ops.listxattr(attr.st_ino, CTX) == sorted(xattrs)
                for key, value in xattrs.items():
                    assert await ops.getxattr(attr.st_ino, key, CTX) == value
                    checked["xattrs"] += 1
        assert checked["files"] > 30 and checked["symlinks"] == 1 and checked["xattrs"] == 1 and checked["dirs"] > 10
        assert len(set(seen.values())) == len(seen)
        # A sparse file reads its hole as zeros and counts only its data in st_blocks.
        sparse = await lookup_path(ops, "usr/share/sparse")
        assert sparse.st_blocks * 512 < sparse.st_size / 4
        assert await read(ops, sparse.st_ino, (1 << 20) - 2, 4) == bytes(4)
        statfs = await ops.statfs(CTX)
        assert statfs.f_namemax == 255 and statfs.f_files == generation.entries + 1

    run(operations(generation), check)


@pytest.mark.parametrize("buffers", [True, False], ids=["buffers", "joined"])
def test_a_read_replies_views_of_its_chunks_or_one_joined_buffer(world: World, buffers: bool) -> None:
    """With replies from buffers (patch 0004) a READ returns its pieces as they are: the
    cached chunk itself or a memoryview of it, never a copy; without, one bytes object.
    Either way the bytes, across chunk boundaries and holes, are the file's."""
    generation = compose(world.store, world.v1)
    data = big(1, 1_300_000)

    async def check(ops: Operations) -> None:
        ops.read_buffers = buffers  # what a patched pyfuse3 (and auto mode) turns on
        tool = await lookup_path(ops, "usr/bin/tool")
        for off, size in ((0, 1 << 20), (100_000, 300_000), (len(data) - 5, 4096), (len(data), 10)):
            reply = await ops.read(tool.st_ino, off, size)
            if buffers:
                assert isinstance(reply, list)
                assert all(isinstance(p, bytes | memoryview) for p in reply)
                got = b"".join(reply)
            else:
                assert isinstance(reply, bytes)
                got = reply
            assert got == data[off : off + size], (off, size)
        if buffers:
            reply = await ops.read(tool.st_ino, 0, 1 << 20)
            assert isinstance(reply, list) and len(reply) > 1  # several chunks, not joined
            cached = [ops.fetcher.cache.get(e.digest) for e, _i, _n in
                      ops._emaps[tool.st_ino].pieces(0, 1 << 20)]
            for piece, chunk in zip(reply, cached, strict=True):
                base = piece.obj if isinstance(piece, memoryview) else piece
                assert base is chunk or (isinstance(chunk, memoryview) and base is chunk.obj)
        sparse = await lookup_path(ops, "usr/share/sparse")
        assert await read(ops, sparse.st_ino, (1 << 20) - 2, 4) == bytes(4)
        assert ops.mode.endswith("+read-buffers") == (buffers and ops.extensions)

    run(operations(generation), check)


def test_refusals_and_errors(world: World) -> None:
    async def check(ops: Operations) -> None:
        hostname = await lookup_path(ops, "etc/hostname")
        etc = await lookup_path(ops, "etc")
        missing = await ops.lookup(etc.st_ino, b"nothing-here", CTX)
        assert missing.st_ino == 0 and missing.entry_timeout > 0  # a negative entry the kernel may cache
        assert await fuse_errno(ops.lookup(hostname.st_ino, b"x", CTX)) == errno.ENOTDIR
        assert await fuse_errno(ops.lookup(etc.st_ino, b"n" * 256, CTX)) == errno.ENAMETOOLONG
        assert await fuse_errno(ops.getattr(1 << 40, CTX)) == errno.ENOENT
        assert await fuse_errno(ops.readlink(hostname.st_ino, CTX)) == errno.EINVAL
        assert await fuse_errno(ops.getxattr(hostname.st_ino, b"user.nothing", CTX)) == pyfuse3.ENOATTR
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
            assert await fuse_errno(ops.open(hostname.st_ino, flags, CTX)) == errno.EROFS
        assert await fuse_errno(ops.open(etc.st_ino, os.O_RDONLY, CTX)) == errno.EISDIR
        assert await fuse_errno(ops.read(etc.st_ino, 0, 10)) == errno.EISDIR
        assert await fuse_errno(ops.opendir(hostname.st_ino, CTX)) == errno.ENOTDIR
        assert await ops.access(hostname.st_ino, os.R_OK, CTX) is True
        assert await ops.access(hostname.st_ino, os.W_OK, CTX) is False
        assert await fuse_errno(ops.flush(0, hostname.st_ino)) == errno.ENOSYS
        # "." and ".." (NFS-style lookups) answer the directory and its parent.
        assert (await ops.lookup(etc.st_ino, b".", CTX)).st_ino == etc.st_ino
        assert (await ops.lookup(etc.st_ino, b"..", CTX)).st_ino == ROOT_INODE

    run(operations(compose(world.store, world.v1)), check)


def test_a_missing_chunk_is_eio_for_the_reads_that_need_it(world: World) -> None:
    generation = compose(world.store, world.v1)
    extents = world.store.file_extents(generation.resolve("/usr/bin/tool").entry)
    assert len(extents) > 2 and len({e.digest for e in extents}) == len(extents)
    lost = extents[1]
    drop_rows(world.store, [lost.digest])  # type: ignore[list-item]
    start = extents[0].length

    async def check(ops: Operations) -> None:
        tool = await lookup_path(ops, "usr/bin/tool")
        assert await fuse_errno(ops.read(tool.st_ino, start + 10, 4096)) == errno.EIO
        assert await read(ops, tool.st_ino, 0, 4096) == big(1, 1_300_000)[:4096]  # the chunk before is fine
        hostname = await lookup_path(ops, "etc/hostname")
        assert await read(ops, hostname.st_ino, 0, 100) == b"inprocess\n"

    run(operations(generation), check)


def test_readdir_counts_only_the_entries_the_kernel_took(world: World) -> None:
    """pyfuse3's rule: a readdirplus entry the kernel accepted is a lookup, "." and ".." are not."""
    async def check(ops: Operations) -> None:
        doc = await lookup_path(ops, "usr/share/doc")
        assert ops.lookup_count(doc.st_ino) == 1
        listing = await list_dir(ops, doc.st_ino, room=4)  # four entries per READDIR: resumed 8 times
        children = listing[2:]
        assert [n for n, _i, _o in children] == sorted(f"pkg{i}".encode() for i in range(30))
        assert all(ops.lookup_count(ino) == 1 for _n, ino, _o in children)
        assert ops.lookup_count(doc.st_ino) == 1  # "." did not count
        assert all(ops.node(ino).path[-1] == name for name, ino, _o in children)
        # A reply the kernel refused (no room) counts nothing.
        token = Listing(room=0)
        await ops.readdir(doc.st_ino, 5, token)
        assert token.entries == [] and all(ops.lookup_count(ino) == 1 for _n, ino, _o in children)

    run(operations(compose(world.store, world.v1)), check)


def test_forget_releases_what_the_kernel_held(world: World) -> None:
    async def check(ops: Operations) -> None:
        readme = await lookup_path(ops, "usr/share/doc/pkg3/README")
        await ops.lookup((await lookup_path(ops, "usr/share/doc/pkg3")).st_ino, b"README", CTX)
        ino = readme.st_ino
        assert ops.lookup_count(ino) == 2
        await ops.forget([(ino, 1)])
        assert ops.lookup_count(ino) == 1
        await ops.forget([(ino, 1)])
        assert ops.lookup_count(ino) == 0
        # Still in the current tree, so still answerable (the kernel may look it up again).
        assert (await ops.getattr(ino, CTX)).st_size == len(b"package 3\n") * 4
        # forget never raises, even for inodes it does not know.
        await ops.forget([(1 << 40, 1)])

    run(operations(compose(world.store, world.v1)), check)


def test_a_forgotten_directory_is_let_go_of_and_comes_back_with_the_same_numbers(world: World) -> None:
    """FORGET of a directory and all it held: its composed children go (the inode table no
    longer knows their numbers); looked up again, every file has the number it had, and
    after a swap the unchanged ones still do."""
    async def check(ops: Operations) -> None:
        gen = ops.generation
        doc = await lookup_path(ops, "usr/share/doc")
        listing = await list_dir(ops, doc.st_ino)
        files = {name: ino for name, ino, _o in listing[2:]}
        readme = await lookup_path(ops, "usr/share/doc/pkg3/README")
        pkg3 = files[b"pkg3"]
        # The kernel forgets what it held below doc (its pkgN directories are let go of),
        # then doc itself (children before parents).
        await ops.forget([(readme.st_ino, ops.lookup_count(readme.st_ino))])
        await ops.forget([(ino, ops.lookup_count(ino)) for ino in files.values()])
        assert ops.node(pkg3).children is None and ops.node(doc.st_ino).children is not None
        loaded = gen.entries
        await ops.forget([(doc.st_ino, ops.lookup_count(doc.st_ino))])
        assert ops.node(doc.st_ino).children is None and gen.entries == loaded - len(files)
        assert gen.inodes.locate(readme.st_ino) is None  # its block went with its directory
        assert await fuse_errno(ops.getattr(readme.st_ino, CTX)) == errno.ENOENT
        again = await lookup_path(ops, "usr/share/doc/pkg3/README")
        assert again.st_ino == readme.st_ino and (await lookup_path(ops, "usr/share/doc/pkg3")).st_ino == pkg3
        await ops.forget([(again.st_ino, 1)])
        # Let go of again, then a swap: the changed directories are composed anew from the
        # numbers they had, so what did not change keeps its number.
        hostname = await lookup_path(ops, "etc/hostname")
        etc = await lookup_path(ops, "etc")
        await ops.forget([(hostname.st_ino, ops.lookup_count(hostname.st_ino))])
        await ops.forget([(etc.st_ino, ops.lookup_count(etc.st_ino))])
        await ops.swap(swapper(world, world.v2, ops))
        assert (await lookup_path(ops, "etc/hostname")).st_ino == hostname.st_ino

    run(operations(compose(world.store, world.v1)), check)


# --------------------------------------------------------------------------- swaps through the operations


def swapper(world: World, image: fmt.Image, ops: Operations) -> Callable[[Generation], tuple[Generation, SwapPlan]]:
    """What MountService.swap_to hands Operations.swap: compose beside the old, then prepare."""
    held = frozenset(ops.lookups)

    def build(old: Generation) -> tuple[Generation, SwapPlan]:
        new = compose(world.store, image, old.inodes, number=old.number + 1, previous=old)
        return new, prepare(old, new, held=held)

    return build


def test_swap_keeps_what_the_kernel_holds_until_forget(world: World) -> None:
    kernel = FakeKernel()

    async def check(ops: Operations) -> None:
        old_lib = await lookup_path(ops, "usr/lib/libx.so.1.2")
        old_dir = await lookup_path(ops, "opt/only-v1")
        old_file = await lookup_path(ops, "opt/only-v1/file")
        hostname = await lookup_path(ops, "etc/hostname")
        lib_dir = await lookup_path(ops, "usr/lib")
        old_generation = ops.generation
        generation, plan = await ops.swap(swapper(world, world.v2, ops))
        assert ops.generation is generation and generation.number == 2
        assert generation.previous is None, "the new generation must not keep the old one alive"
        # What the kernel was told: the changed name, the vanished and the new directory, and
        # the listings of the directories that changed.
        opt = await lookup_path(ops, "opt")
        assert (lib_dir.st_ino, b"libx.so.1.2") in kernel.entries
        assert (opt.st_ino, b"only-v1") in kernel.entries and (opt.st_ino, b"only-v2") in kernel.entries
        assert {lib_dir.st_ino, opt.st_ino, ROOT_INODE} <= set(kernel.inodes)
        assert (await ops.lookup(ROOT_INODE, b"srv", CTX)).st_ino not in kernel.inodes  # srv did not change
        assert plan.changed_dirs < plan.changed_dirs + plan.shared_dirs
        # The old inodes stay answerable with their old content...
        assert await read_all(ops, old_lib.st_ino, 40_000) == big(2, 40_000)
        assert [n for n, _i, _o in await list_dir(ops, old_dir.st_ino)][2:] == [b"file"]
        assert await read_all(ops, old_file.st_ino, 100) == b"only in v1\n"
        # ...while new lookups see the new tree; unchanged entries keep their numbers.
        new_lib = await lookup_path(ops, "usr/lib/libx.so.1.2")
        assert new_lib.st_ino != old_lib.st_ino
        assert await read_all(ops, new_lib.st_ino, 40_000) == big(3, 40_000)
        assert (await lookup_path(ops, "etc/hostname")).st_ino == hostname.st_ino
        assert await fuse_errno(lookup_path(ops, "opt/only-v1/file")) == errno.ENOENT
        # The changed directory is held in its new form, not the old one with its old children.
        assert ops.held[lib_dir.st_ino] is generation.nodes[lib_dir.st_ino]
        # Once the kernel forgets them, the old inodes are gone, and so is every node of the old tree.
        for attr in (old_lib, old_dir, old_file):
            await ops.forget([(attr.st_ino, ops.lookup_count(attr.st_ino))])
            assert await fuse_errno(ops.getattr(attr.st_ino, CTX)) == errno.ENOENT
        assert not any(node is old_generation.root for node in ops.held.values())

    run(operations(compose(world.store, world.v1), kernel), check)


def test_a_failed_swap_changes_nothing(world: World, tmp_path: Path) -> None:
    kernel = FakeKernel()
    a = import_tree(world.store, write_tree(tmp_path / "ca", {"etc/conf": b"a\n"}), "example.org/ca")
    b = import_tree(world.store, write_tree(tmp_path / "cb", {"etc/conf": b"b\n"}), "example.org/cb")
    conflicting = image_of(a, b, mode="union", version="c")

    async def check(ops: Operations) -> None:
        before = ops.generation
        hostname = await lookup_path(ops, "etc/hostname")
        with pytest.raises(ConflictError, match="union conflict at /etc/conf"):
            await ops.swap(swapper(world, conflicting, ops))
        assert ops.generation is before and kernel.entries == [] and kernel.inodes == []
        assert (await lookup_path(ops, "etc/hostname")).st_ino == hostname.st_ino
        generation, _plan = await ops.swap(swapper(world, world.v2, ops))  # and the next swap works
        assert ops.generation is generation and generation.number == 2

    run(operations(compose(world.store, world.v1), kernel), check)


# --------------------------------------------------------------------------- swap preparation, alone


class ReadCountingStore:
    """A real store that records the directory objects read through it."""

    def __init__(self, inner: LocalStore) -> None:
        self.inner = inner
        self.directories: list[bytes] = []

    def get_directory(self, digest: bytes) -> fmt.Directory:
        self.directories.append(digest)
        return self.inner.get_directory(digest)

    def get_directory_items(self, digest: bytes) -> tuple[list[Any], bool]:
        self.directories.append(digest)
        return self.inner.get_directory_items(digest)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def tree_digest(generation: Generation, path: str) -> bytes:
    node = generation.resolve(path)
    assert node.entry.tree is not None
    return node.entry.tree


def drop_rows(store: LocalStore, digests: list[bytes]) -> None:
    """Make objects missing: remove their index rows (their bytes stay in the pack)."""
    with contextlib.closing(sqlite3.connect(store.path / "index.sqlite")) as db:
        db.executemany("DELETE FROM objects WHERE digest=?", [(d,) for d in digests])
        db.commit()


def test_prepare_shares_unchanged_directories_without_reading_them(world: World) -> None:
    old = compose(world.store, world.v1)
    old.check()  # the whole old tree loaded, as after a `find`
    counting = ReadCountingStore(world.store)
    new = compose(counting, world.v2, old.inodes, number=2, previous=old)  # type: ignore[arg-type]
    counting.directories.clear()
    plan = prepare(old, new)
    # Read: the directory objects the changed directories are composed from, each at most
    # once; those of merged directories the old generation had read come decoded from the
    # cache the generations share: the base layer's /usr, unchanged under a changed /usr, is not read.
    changed = ["/", "/etc", "/opt", "/opt/only-v2", "/usr", "/usr/lib"]
    sources = [s.entry.tree for p in changed for s in new.resolve(p).sources if s.entry.tree is not None]
    assert len(counting.directories) == len(set(counting.directories))
    assert set(sources) - set(counting.directories) <= set(new.directories._items)
    base_usr = next(s.entry.tree for s in old.resolve("/usr").sources if s.layer.fileset == new.layers[0].fileset)
    assert base_usr in sources and base_usr not in counting.directories
    assert new.directories is old.directories
    assert plan.changed_dirs == len(changed)
    shared = ["/srv", "/usr/share", "/usr/bin", "/var"]
    assert not {tree_digest(new, p) for p in shared} & set(counting.directories)
    # Shared: the old nodes themselves, loaded parts included.
    for path in shared:
        assert new.resolve(path) is old.resolve(path), path
    assert plan.shared_dirs >= len(shared)
    assert new.resolve("/srv/unchanged/deep/er").children is not None
    assert new.resolve("/usr/lib") is not old.resolve("/usr/lib")
    assert new.previous is None
    # The invalidations: only names whose inode changed, and directories whose listing did.
    names = {(ino, name) for ino, name in plan.entries}
    lib, opt, etc = old.resolve("/usr/lib").ino, old.resolve("/opt").ino, old.resolve("/etc").ino
    assert names == {(lib, b"libx.so.1.2"), (lib, b"libbig.so"), (opt, b"only-v1"), (opt, b"only-v2"),
                     (etc, b"os-release")}
    assert set(plan.dirs) >= {ROOT_INODE, lib, opt, etc}


def test_prepare_lists_for_the_kernel_only_what_the_old_generation_had_loaded(world: World) -> None:
    old = compose(world.store, world.v1)
    old.resolve("/etc")  # the kernel has seen / and /etc, nothing under /usr or /opt
    new = compose(world.store, world.v2, old.inodes, number=2, previous=old)
    plan = prepare(old, new)
    assert plan.entries == [(old.resolve("/etc").ino, b"os-release")]  # /usr and /opt changed, unseen
    # Listings and attributes: of what was loaded, and of the root's subdirectories (their st_nlink).
    assert set(plan.dirs) == {ROOT_INODE, old.resolve("/etc").ino, old.resolve("/usr").ino, old.resolve("/opt").ino}
    # Every changed directory was still composed and checked, loaded or not.
    assert new.resolve("/usr/lib").children is not None and new.resolve("/opt/only-v2").children is not None


def test_prepare_fails_on_a_union_conflict_before_anything_switches(world: World, tmp_path: Path) -> None:
    a = import_tree(world.store, write_tree(tmp_path / "a", {"deep/in/side/conf": b"a\n", "a-only": b"a"}),
                    "example.org/a")
    b_ok = import_tree(world.store, write_tree(tmp_path / "b", {"deep/in/side/other": b"b\n"}), "example.org/b")
    b_bad = import_tree(world.store, write_tree(tmp_path / "b2", {"deep/in/side/conf": b"b\n"}), "example.org/b2")
    old = compose(world.store, image_of(a, b_ok, mode="union"))
    old.resolve("/deep")  # loaded only down to /deep: the conflict is below what was loaded
    new = compose(world.store, image_of(a, b_bad, mode="union", version="2"), old.inodes, previous=old)
    with pytest.raises(ConflictError) as info:
        prepare(old, new)
    message = str(info.value)
    assert "/deep/in/side/conf" in message and "example.org/a@1" in message and "example.org/b2@1" in message


def test_prepare_fails_on_a_missing_chunk_of_a_changed_file(world: World) -> None:
    old = compose(world.store, world.v1)
    old.check()
    new = compose(world.store, world.v2, old.inodes, number=2, previous=old)
    node = compose(world.store, world.v2).resolve("/usr/lib/libbig.so")
    drop_rows(world.store, [e.digest for e in world.store.file_extents(node.entry) if e.digest is not None])
    with pytest.raises(CnpsfsError, match=r"^/usr/lib/libbig\.so: \d chunk\(s\) missing from the store"):
        prepare(old, new)


def test_prepare_fails_on_a_missing_directory_object(world: World) -> None:
    old = compose(world.store, world.v1)
    old.check()
    probe = compose(world.store, world.v2)
    lost = tree_digest(probe, "/opt/only-v2")
    drop_rows(world.store, [lost])
    new = compose(world.store, world.v2, old.inodes, number=2, previous=old)
    with pytest.raises(MissingObjectError, match=fmt.format_digest(lost)):
        prepare(old, new)


def test_many_swaps_keep_the_inode_table_the_size_of_the_trees(tmp_path: Path) -> None:
    """40 versions, each changing files all over the tree: the inode table keeps the keys
    and blocks of what the current tree shows, numbers never repeat, and unchanged files
    keep theirs through every swap."""
    store = LocalStore(tmp_path / "store", create=True)
    try:
        images = []
        for version in range(40):
            files: dict[str, bytes | str | tuple[str, str]] = {
                f"d{i}/f{j}": f"{version if (i + j) % 5 == 0 else 0} {i} {j}\n".encode()
                for i in range(20) for j in range(10)}
            root = write_tree(tmp_path / f"t{version}", files)
            images.append(image_of(import_tree(store, root, f"example.org/t{version}"), version=str(version)))
        slack = 100  # the daemon's default waits for 4096 more keys: this tree is too small for that
        generation = compose(store, images[0], InodeTable(slack=slack))
        generation.check()
        paths = 1 + 20 + 200
        sizes = []
        numbers: set[int] = set()
        steady = generation.resolve("/d0/f1").ino  # (0 + 1) % 5: never changes
        for number, image in enumerate(images[1:], 2):
            new = compose(store, image, generation.inodes, number=number, previous=generation)
            prepare(generation, new, held=set())
            new.install(generation)
            generation = new
            generation.check()  # a `find` after every swap
            numbers |= {node.ino for _path, node in generation.walk() if not node.is_dir}
            sizes.append((len(generation.inodes), generation.inodes.stats()["blocks"]))
            assert generation.resolve("/d0/f1").ino == steady
        # Directory keys only (21), and one block per directory shown: nothing accumulates.
        assert max(keys for keys, _blocks in sizes) <= 21 + slack, sizes
        assert all(blocks == 21 for _keys, blocks in sizes), sizes
        assert generation.entries + 1 == paths
        assert len(numbers) > 40 * 20  # changed files got new numbers each time (none reused)
        assert generation.inodes.number(("never", "seen")) > max(numbers)
    finally:
        store.close()


def test_a_generation_holds_only_its_own_nodes(world: World) -> None:
    old = compose(world.store, world.v1)
    old.check()
    new = compose(world.store, world.v2, old.inodes, number=2, previous=old)
    prepare(old, new)
    new.check()
    live = {node.ino for _path, node in new.walk()}
    assert set(new.nodes) <= live, "nodes of the old generation were copied forward"
    gone = old.resolve("/opt/only-v1/file")
    assert gone.ino not in new.nodes
    assert isinstance(new.nodes[ROOT_INODE], Node) and new.nodes[ROOT_INODE] is new.root
