"""A tiny pyfuse3 filesystem that counts the requests it receives.

It exists to show, with numbers, which requests the kernel stops sending when
a filesystem uses pyfuse3's kernel cache extensions (our patch in
patches/pyfuse3/). Run as a daemon::

    python hellofs.py MOUNTPOINT --mode noopen --control /tmp/ctl.sock

Modes:

``classic``
    What a read-only pyfuse3 filesystem does today: handles from ``open`` and
    ``opendir``, long timeouts and ``keep_cache``. Works with stock pyfuse3.
``cachedir``
    ``opendir`` returns ``FileInfo(cache_readdir=True)``, symlink targets are
    cached, and handlers receive the inode next to the handle (which they check
    against the handle). Needs the patched pyfuse3.
``buffers``
    classic, but ``read`` returns its data as a list of pieces (memoryview
    slices and bytes of varying sizes), replied by pyfuse3 with one gathered
    write. Needs the patched pyfuse3 (READ_REPLY_BUFFERS, patch 0004). The
    tree has three files more: ``big.bin`` (seeded random bytes, read in a
    few large pieces), ``fine.bin`` (read in 16-byte pieces, more than
    READ_REPLY_BUFFERS_MAX per read) and ``bad.bin`` (its read returns a
    piece that is not a buffer).
``noopen``
    ``open`` and ``opendir`` raise ENOSYS so the kernel opens by itself, symlink
    targets are cached, and ``read``/``readdir`` find their inode in the extra
    argument. Needs the patched pyfuse3.

The mount is read-only unless ``--rw`` is given; then the file ``scratch``
accepts writes, so that ``write`` and ``fsync`` can be exercised.

The control socket speaks one JSON object per line in each direction; see
``Control`` for the commands. Tests and the benchmark drive it through
``HelloMount``.
"""

from __future__ import annotations

import argparse
import collections
import errno
import faulthandler
import itertools
import json
import logging
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

log = logging.getLogger("hellofs")

MODES = ("classic", "cachedir", "noopen", "names", "buffers")
EXTENSION_MODES = ("cachedir", "noopen")
#: "names": classic, but listings carry names only (patch 0003, readdir_reply_name).
#: "buffers": classic, but read replies from a list of pieces (patch 0004, READ_REPLY_BUFFERS).
BIG_SIZE = 3 * 1024 * 1024 + 12345
FINE_SIZE = 200_000
#: The lengths the pieces of a "buffers" reply cycle through (of big.bin).
PIECES = (1, 4096, 17, 65536, 3, 100_000)
TIMEOUT = 300.0
MTIME_NS = 1_700_000_000 * 10**9

ROOT = pyfuse3.ROOT_INODE


def has_reply_name() -> bool:
    """True if the installed pyfuse3 has readdir_reply_name (patch 0003)."""
    return getattr(pyfuse3, "READDIR_REPLY_NAME", 0) >= 1


def has_read_buffers() -> bool:
    """True if the installed pyfuse3 replies reads from a list of buffers (patch 0004)."""
    return getattr(pyfuse3, "READ_REPLY_BUFFERS", 0) >= 1


def big_data() -> bytes:
    """big.bin's content: seeded, so a test process and the daemon agree on it."""
    return random.Random(4).randbytes(BIG_SIZE)


def fine_data() -> bytes:
    return bytes(i * 7 % 251 for i in range(FINE_SIZE))


def has_extensions() -> bool:
    """True if the installed pyfuse3 carries the kernel cache extensions."""
    return getattr(pyfuse3, "KERNEL_CACHE_EXTENSIONS", 0) >= 1


@dataclass
class Node:
    inode: int
    mode: int
    data: bytes = b""
    children: dict[bytes, int] = field(default_factory=dict)
    mtime_ns: int = MTIME_NS


class Tree:
    """The in-memory content; inodes are never reused, entries may change."""

    def __init__(self, n_many: int = 100) -> None:
        self.nodes: dict[int, Node] = {}
        self._next = ROOT
        root = self._new(stat.S_IFDIR | 0o755)
        d = self.add(root.inode, b"d", stat.S_IFDIR | 0o755)
        self.add(d.inode, b"a.txt", stat.S_IFREG | 0o644, b"content of a\n")
        self.add(d.inode, b"b.txt", stat.S_IFREG | 0o644, b"B" * 10000)
        self.add(root.inode, b"hello.txt", stat.S_IFREG | 0o644, b"hello world\n")
        self.add(root.inode, b"link", stat.S_IFLNK | 0o777, b"hello.txt")
        # The one writable file, so that write/fsync handlers are exercised too
        self.add(root.inode, b"scratch", stat.S_IFREG | 0o666)
        many = self.add(root.inode, b"many", stat.S_IFDIR | 0o755)
        for i in range(n_many):
            self.add(many.inode, b"file%03d" % i, stat.S_IFREG | 0o644, b"%d\n" % i)

    def _new(self, mode: int, data: bytes = b"") -> Node:
        node = Node(self._next, mode, data)
        self.nodes[node.inode] = node
        self._next += 1
        return node

    def add(self, parent: int, name: bytes, mode: int, data: bytes = b"") -> Node:
        node = self._new(mode, data)
        dir_ = self.nodes[parent]
        dir_.children[name] = node.inode
        dir_.mtime_ns += 1
        return node

    def remove(self, parent: int, name: bytes) -> None:
        dir_ = self.nodes[parent]
        del dir_.children[name]
        dir_.mtime_ns += 1

    def resolve(self, path: str) -> int:
        inode = ROOT
        for part in path.strip("/").split("/"):
            if part:
                inode = self.nodes[inode].children[part.encode()]
        return inode


class HelloOps(pyfuse3.Operations):
    """Protocol adapter over ``Tree`` that counts every request by name."""

    def __init__(self, tree: Tree, mode: str) -> None:
        super().__init__()
        self.tree = tree
        self.mode = mode
        self.counts: collections.Counter[str] = collections.Counter()
        # (fh, inode) pairs seen by the handlers that get a handle, and the
        # inodes readdir was called for
        self.read_calls: list[tuple[int, int]] = []
        self.fh_calls: collections.defaultdict[str, list[tuple[int, int]]] = collections.defaultdict(list)
        self.readdir_inodes: list[int] = []
        self.readdir_pids: list[int] = []
        self.inode_mismatches = 0
        self.handles: dict[int, int] = {}
        self._next_fh = 1
        self.capabilities = 0
        self.no_open = False
        self.no_opendir = False
        # Instance attributes shadow the class defaults of the patched pyfuse3
        # (and are simply unused by stock pyfuse3, which does not know them).
        self.enable_cache_symlinks = mode in EXTENSION_MODES
        self.pass_inode_to_fh_handlers = mode in EXTENSION_MODES
        self.buffer_replies = 0  # reads answered with a list of pieces ("buffers")
        self.buffer_pieces = 0
        if mode == "buffers":
            tree.add(ROOT, b"big.bin", stat.S_IFREG | 0o644, big_data())
            tree.add(ROOT, b"fine.bin", stat.S_IFREG | 0o644, fine_data())
            tree.add(ROOT, b"bad.bin", stat.S_IFREG | 0o644, b"x" * 100)

    def init(self) -> None:
        if self.mode in EXTENSION_MODES:
            self.capabilities = pyfuse3.kernel_capabilities()
        if self.mode == "noopen":
            # ENOSYS from opendir on a kernel without FUSE_NO_OPENDIR_SUPPORT
            # fails opendir(3), so only answer that way when it is offered.
            self.no_open = bool(self.capabilities & pyfuse3.FUSE_CAP_NO_OPEN_SUPPORT)
            self.no_opendir = bool(self.capabilities & pyfuse3.FUSE_CAP_NO_OPENDIR_SUPPORT)

    def _node(self, inode: int) -> Node:
        try:
            return self.tree.nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.st_mode = node.mode
        attr.st_nlink = 2 if stat.S_ISDIR(node.mode) else 1
        attr.st_size = len(node.data)
        attr.st_uid = os.getuid()
        attr.st_gid = os.getgid()
        attr.st_atime_ns = attr.st_ctime_ns = attr.st_mtime_ns = node.mtime_ns
        attr.entry_timeout = TIMEOUT
        attr.attr_timeout = TIMEOUT
        return attr

    def _new_handle(self, inode: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = inode
        return fh

    def _check_inode(self, fh: int, inode: int) -> int:
        """The inode a request is about: from the handle, checked against *inode*."""
        if fh == 0:
            return inode
        expected = self.handles[fh]
        if self.pass_inode_to_fh_handlers and inode != expected:
            log.error("handle %d is for inode %d, pyfuse3 passed %d", fh, expected, inode)
            self.inode_mismatches += 1
        return expected

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.counts["lookup"] += 1
        parent = self._node(parent_inode)
        if name == b".":
            return self._attr(parent)
        if name == b"..":
            raise pyfuse3.FUSEError(errno.ENOENT)
        try:
            return self._attr(self.tree.nodes[parent.children[name]])
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.counts["getattr"] += 1
        return self._attr(self._node(inode))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        self.counts["readlink"] += 1
        return self._node(inode).data

    def _writable(self, inode: int) -> bool:
        return self._node(inode).mode & 0o222 == 0o222

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self.counts["open"] += 1
        if flags & (os.O_WRONLY | os.O_RDWR) and not self._writable(inode):
            raise pyfuse3.FUSEError(errno.EROFS)
        if self.no_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return pyfuse3.FileInfo(fh=self._new_handle(inode), keep_cache=True)

    async def read(self, fh: int, off: int, size: int, inode: int = 0) -> Any:
        self.counts["read"] += 1
        self.read_calls.append((fh, inode))
        node = self._node(self._check_inode(fh, inode))
        if self.mode != "buffers":
            return node.data[off : off + size]
        return self._pieces(node, off, size)

    def _pieces(self, node: Node, off: int, size: int) -> list[Any]:
        """The data in pieces: memoryview slices of the file and bytes copies, alternating."""
        view = memoryview(node.data)[off : off + size]
        name = next(k for k, v in self.tree.nodes[ROOT].children.items() if v == node.inode) \
            if node.inode in self.tree.nodes[ROOT].children.values() else b""
        if name == b"bad.bin":
            return [view[:10], 42]
        lengths = itertools.repeat(16) if name == b"fine.bin" else itertools.cycle(PIECES)
        out: list[Any] = []
        pos = 0
        for i, length in enumerate(lengths):
            if pos >= len(view):
                break
            piece = view[pos : pos + length]
            out.append(piece if i % 2 == 0 else bytes(piece))
            pos += length
        self.buffer_replies += 1
        self.buffer_pieces += len(out)
        return out

    async def write(self, fh: int, off: int, buf: bytes, inode: int = 0) -> int:
        self.counts["write"] += 1
        self.fh_calls["write"].append((fh, inode))
        inode = self._check_inode(fh, inode)
        if not self._writable(inode):
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self._node(inode)
        node.data = node.data[:off].ljust(off, b"\0") + buf + node.data[off + len(buf) :]
        return len(buf)

    async def fsync(self, fh: int, datasync: bool, inode: int = 0) -> None:
        self.counts["fsync"] += 1
        self.fh_calls["fsync"].append((fh, inode))
        self._check_inode(fh, inode)

    async def fsyncdir(self, fh: int, datasync: bool, inode: int = 0) -> None:
        self.counts["fsyncdir"] += 1
        self.fh_calls["fsyncdir"].append((fh, inode))
        self._check_inode(fh, inode)

    async def flush(self, fh: int, inode: int = 0) -> None:
        # Nothing to flush on a read-only filesystem: ENOSYS makes the kernel
        # stop sending FLUSH on close() for the rest of the mount.
        self.counts["flush"] += 1
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh: int, inode: int = 0) -> None:
        self.counts["release"] += 1
        self._check_inode(fh, inode)
        self.handles.pop(fh, None)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int | pyfuse3.FileInfo:
        self.counts["opendir"] += 1
        if self.no_opendir:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        fh = self._new_handle(inode)
        if self.mode == "cachedir":
            return pyfuse3.FileInfo(fh=fh, cache_readdir=True, keep_cache=True)
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken, inode: int = 0) -> None:
        self.counts["readdir"] += 1
        inode = self._check_inode(fh, inode)
        self.readdir_inodes.append(inode)
        entries = sorted(self._node(inode).children.items())
        if self.mode == "names":
            self.readdir_pids.append(token.pid)
            for i, (name, child) in enumerate(entries[start_id:], start_id):
                if not pyfuse3.readdir_reply_name(token, name, child, self.tree.nodes[child].mode, i + 1):
                    break
            return
        for i, (name, child) in enumerate(entries[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, name, self._attr(self.tree.nodes[child]), i + 1):
                break

    async def releasedir(self, fh: int, inode: int = 0) -> None:
        self.counts["releasedir"] += 1
        self._check_inode(fh, inode)
        self.handles.pop(fh, None)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        self.counts["statfs"] += 1
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_namemax = 255
        return st


class Control:
    """Commands on the control socket, run in the filesystem's event loop.

    ``stats``; ``add`` (path, name, data: create a file); ``remove`` (path,
    name); ``set_link`` (path, target); ``invalidate_inode`` (path) and
    ``invalidate_entry`` (path, name): call pyfuse3's function in a worker
    thread, as its docs ask, because the kernel may need this loop to answer
    requests before the call returns.
    """

    def __init__(self, ops: HelloOps) -> None:
        self.ops = ops
        self.tree = ops.tree

    async def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "stats":
            return {
                "counts": dict(self.ops.counts),
                "read_calls": self.ops.read_calls[-1000:],
                "fh_calls": {k: v[-1000:] for k, v in self.ops.fh_calls.items()},
                "readdir_inodes": self.ops.readdir_inodes[-1000:],
                "readdir_pids": self.ops.readdir_pids[-1000:],
                "inode_mismatches": self.ops.inode_mismatches,
                "open_handles": len(self.ops.handles),
                "capabilities": self.ops.capabilities,
                "no_open": self.ops.no_open,
                "no_opendir": self.ops.no_opendir,
                "extensions": has_extensions(),
                "buffer_replies": self.ops.buffer_replies,
                "buffer_pieces": self.ops.buffer_pieces,
            }
        if op == "inode":
            return {"inode": self.tree.resolve(cmd["path"])}
        if op == "data":
            return {"data": self.tree.nodes[self.tree.resolve(cmd["path"])].data.decode()}
        if op == "add":
            node = self.tree.add(
                self.tree.resolve(cmd["path"]),
                cmd["name"].encode(),
                stat.S_IFREG | 0o644,
                cmd.get("data", "").encode(),
            )
            return {"inode": node.inode}
        if op == "remove":
            self.tree.remove(self.tree.resolve(cmd["path"]), cmd["name"].encode())
            return {}
        if op == "set_link":
            self.tree.nodes[self.tree.resolve(cmd["path"])].data = cmd["target"].encode()
            return {}
        if op == "invalidate_inode":
            inode = self.tree.resolve(cmd["path"])
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode)
            return {}
        if op == "invalidate_entry":
            inode = self.tree.resolve(cmd["path"])
            await trio.to_thread.run_sync(pyfuse3.invalidate_entry, inode, cmd["name"].encode())
            return {}
        raise ValueError(f"unknown op {op!r}")

    async def serve(self, path: str, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with listener:
            await listener.bind(path)
            listener.listen()
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(self._handle, trio.SocketStream(conn))

    async def _handle(self, stream: trio.SocketStream) -> None:
        buf = b""
        async with stream:
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        reply = {"ok": True, **await self.run(json.loads(line))}
                    except OSError as exc:
                        # e.g. ENOENT from invalidate_entry: the caller's business
                        log.info("control command %s: %s", line, exc)
                        reply = {"ok": False, "error": repr(exc)}
                    except Exception as exc:
                        log.exception("control command failed: %s", line)
                        reply = {"ok": False, "error": repr(exc)}
                    await stream.send_all(json.dumps(reply).encode() + b"\n")


async def serve(ops: HelloOps, control_path: str) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(Control(ops).serve, control_path)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("mountpoint")
    parser.add_argument("--mode", choices=MODES, default="classic")
    parser.add_argument("--control", required=True, help="path of the control socket")
    parser.add_argument("--rw", action="store_true", help="mount read-write (for 'scratch')")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    faulthandler.register(signal.SIGUSR1)
    if args.mode in EXTENSION_MODES and not has_extensions():
        sys.exit(f"hellofs: mode {args.mode} needs pyfuse3 with KERNEL_CACHE_EXTENSIONS")
    if args.mode == "names" and not has_reply_name():
        sys.exit("hellofs: mode names needs pyfuse3 with READDIR_REPLY_NAME")
    if args.mode == "buffers" and not has_read_buffers():
        sys.exit("hellofs: mode buffers needs pyfuse3 with READ_REPLY_BUFFERS")

    ops = HelloOps(Tree(), args.mode)
    options = set(pyfuse3.default_options)
    options.add("fsname=hellofs")
    if not args.rw:
        # Besides refusing writes, "ro" stops the kernel from invalidating atime
        # after every read and readdir, which costs a GETATTR now and then and,
        # if the directory's mtime moved, drops its cached listing.
        options.add("ro")
    pyfuse3.init(ops, args.mountpoint, options)
    try:
        trio.run(serve, ops, args.control)
    except BaseException:
        pyfuse3.close(unmount=True)
        raise
    pyfuse3.close(unmount=False)


# ---------------------------------------------------------------- client side


def fuse_unavailable() -> str | None:
    """Why real FUSE mounts cannot run here, or None if they can."""
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not on PATH (apt-get install fuse3)"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        return f"/dev/fuse cannot be opened: {exc}"
    os.close(fd)
    return None


class HelloMount:
    """A hellofs daemon in a subprocess, mounted on *mountpoint*."""

    def __init__(self, mountpoint: Path, mode: str, workdir: Path, rw: bool = False) -> None:
        self.mountpoint = mountpoint
        self.mode = mode
        self.rw = rw
        self.control_path = str(workdir / f"hellofs-{mode}.sock")
        self.log_path = workdir / f"hellofs-{mode}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._rfile: Any = None

    def start(self, timeout: float = 20.0) -> HelloMount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if os.path.exists(self.control_path):
            os.unlink(self.control_path)
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    str(self.mountpoint),
                    "--mode",
                    self.mode,
                    "--control",
                    self.control_path,
                    *(["--rw"] if self.rw else []),
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not (os.path.ismount(self.mountpoint) and os.path.exists(self.control_path)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"hellofs exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"hellofs did not mount within {timeout}s:\n{self.log()}")
            time.sleep(0.02)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(self.control_path)
        self._rfile = self._sock.makefile("rb")
        return self

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert self._sock is not None
        self._sock.sendall(json.dumps({"op": op, **kwargs}).encode() + b"\n")
        reply = json.loads(self._rfile.readline())
        if not reply.pop("ok"):
            raise RuntimeError(f"hellofs {op} failed: {reply['error']}")
        return reply

    def counts(self, timeout: float = 5.0) -> collections.Counter[str]:
        """Request counts, once the kernel released every handle.

        RELEASE and RELEASEDIR are sent asynchronously after close(), so they
        may still be on their way when the syscall returns.
        """
        deadline = time.monotonic() + timeout
        while True:
            stats = self.call("stats")
            if stats["open_handles"] == 0 or time.monotonic() > deadline:
                return collections.Counter(stats["counts"])
            time.sleep(0.005)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Unmount and end the daemon, whatever state it is in."""
        if self._sock is not None:
            self._rfile.close()
            self._sock.close()
            self._sock = None
        subprocess.run(
            ["fusermount3", "-u", "-z", str(self.mountpoint)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> HelloMount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
