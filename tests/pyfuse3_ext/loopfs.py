"""A pyfuse3 filesystem whose handlers suspend on request, to test the session loop.

pyfuse3's ``main(min_tasks, max_tasks)`` promises that a handler that awaits
does not hold up other requests, that at most *max_tasks* handlers run at a
time, and that ``terminate()``, an unmount and an escaping exception end it.
Our session-loop patch (patches/pyfuse3/0002-*) changes how requests reach the
handlers, so these promises are tested through real requests, with stock and
patched pyfuse3 alike. Run as a daemon::

    python loopfs.py MOUNTPOINT [--min-tasks N] [--max-tasks N] [--wait SECONDS]

The tree: files ``w0`` .. ``w9`` (reading one suspends its handler until
released, or for at most ``--wait`` seconds; the read at its end returns at once), ``crash`` (its lookup raises
RuntimeError inline) and ``crash-later`` (raises after suspending). A lookup of
``release`` wakes every suspended read and answers ENOENT. ``statvfs`` reports
the handlers suspended right now in ``f_files`` and the most ever suspended at
once in ``f_ffree``. SIGTERM calls ``pyfuse3.terminate()``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import stat

import pyfuse3
import trio

log = logging.getLogger("loopfs")

ROOT = pyfuse3.ROOT_INODE
FILES = [f"w{i}".encode() for i in range(10)]
DATA = b"data of %d\n"
_CRASH = 100
_CRASH_LATER = 101


class LoopOps(pyfuse3.Operations):
    def __init__(self, wait: float) -> None:
        super().__init__()
        self.wait = wait
        self.gate = trio.Event()
        self.in_flight = 0
        self.max_in_flight = 0

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode == ROOT:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
        else:
            attr.st_mode = stat.S_IFREG | 0o644
            attr.st_nlink = 1
            attr.st_size = len(DATA % inode)
        attr.entry_timeout = attr.attr_timeout = 300.0
        return attr

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if name == b"release":
            self.gate.set()
            self.gate = trio.Event()
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name == b"crash":
            raise RuntimeError("loopfs: crash requested")
        if name == b"crash-later":
            await trio.sleep(0.01)
            raise RuntimeError("loopfs: crash requested after suspending")
        if name not in FILES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(ROOT + 1 + FILES.index(name))

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        # direct_io: every read() reaches read() below, none is served from the page cache
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        data = DATA % fh
        if off >= len(data):
            return b""  # the read that finds the end: at once
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            with trio.move_on_after(self.wait):
                await self.gate.wait()
        finally:
            self.in_flight -= 1
        return data[off : off + size]

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_namemax = 255
        st.f_files = self.in_flight
        st.f_ffree = self.max_in_flight
        return st


async def serve(min_tasks: int, max_tasks: int, terminated: list[bool]) -> None:
    async with trio.open_nursery() as nursery:

        async def on_sigterm() -> None:
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    log.info("SIGTERM: terminating")
                    terminated.append(True)
                    pyfuse3.terminate()

        nursery.start_soon(on_sigterm)
        await pyfuse3.main(min_tasks=min_tasks, max_tasks=max_tasks)
        log.info("main returned")
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("mountpoint")
    parser.add_argument("--min-tasks", type=int, default=1)
    parser.add_argument("--max-tasks", type=int, default=99)
    parser.add_argument("--wait", type=float, default=10.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    options = set(pyfuse3.default_options)
    options.update(("fsname=loopfs", "ro"))
    pyfuse3.init(LoopOps(args.wait), args.mountpoint, options)
    terminated: list[bool] = []
    try:
        trio.run(serve, args.min_tasks, args.max_tasks, terminated)
    except BaseException:
        pyfuse3.close(unmount=True)
        raise
    # After an unmount the kernel ended the session; after terminate() we unmount.
    pyfuse3.close(unmount=bool(terminated))
    log.info("exiting cleanly")


if __name__ == "__main__":
    main()
