"""Time warm metadata syscalls on hellofs in each mode, and natively.

    python tests/pyfuse3_ext/bench.py [--modes classic,cachedir,noopen] [--json FILE]

Run it with the interpreter whose pyfuse3 should be measured; modes that need
the kernel cache extensions are skipped on stock pyfuse3. "native" is the same
tree on the local disk, for reference. Every loop runs once untimed first, so
all numbers are warm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import hellofs
import pyfuse3

N_OPEN = 10_000
N_LISTDIR = 100
N_READLINK = 10_000


def make_native_tree(root: Path) -> None:
    """The parts of hellofs's tree that the loops touch."""
    tree = hellofs.Tree()

    def copy(inode: int, path: Path) -> None:
        for name, child in tree.nodes[inode].children.items():
            node = tree.nodes[child]
            target = path / name.decode()
            if node.mode & 0o170000 == 0o040000:
                target.mkdir()
                copy(child, target)
            elif node.mode & 0o170000 == 0o120000:
                target.symlink_to(node.data.decode())
            else:
                target.write_bytes(node.data)

    copy(hellofs.ROOT, root)


def timed(fn: Callable[[], object], n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t0


def run_loops(mp: Path) -> dict[str, float]:
    hello = str(mp / "hello.txt")
    many = str(mp / "many")
    link = str(mp / "link")

    def open_close() -> None:
        os.close(os.open(hello, os.O_RDONLY))

    def open_read_close() -> None:
        fd = os.open(hello, os.O_RDONLY)
        os.read(fd, 4096)
        os.close(fd)

    return {
        f"open+close x{N_OPEN}": timed(open_close, N_OPEN),
        f"open+read+close x{N_OPEN}": timed(open_read_close, N_OPEN),
        f"listdir(100 entries) x{N_LISTDIR}": timed(lambda: os.listdir(many), N_LISTDIR),
        f"readlink x{N_READLINK}": timed(lambda: os.readlink(link), N_READLINK),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--modes", default=",".join((*hellofs.MODES, "native")))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="hellofs-bench-") as tmp:
        work = Path(tmp)
        for mode in args.modes.split(","):
            if mode == "native":
                root = work / "native"
                root.mkdir()
                make_native_tree(root)
                results[mode] = {"times": run_loops(root)}
                continue
            if mode in hellofs.EXTENSION_MODES and not hellofs.has_extensions():
                print(f"skipping {mode}: pyfuse3 {pyfuse3.__version__} has no extensions", file=sys.stderr)
                continue
            with hellofs.HelloMount(work / f"mnt-{mode}", mode, work) as mnt:
                before = mnt.counts()
                times = run_loops(mnt.mountpoint)
                after = mnt.counts()
                after.subtract(before)
                results[mode] = {"times": times, "requests": dict(+after)}

    label = f"pyfuse3 {pyfuse3.__version__}"
    print(f"{label}, kernel {os.uname().release}")
    loops = list(next(iter(results.values()))["times"])  # type: ignore[call-overload]
    print(f"{'loop':32}" + "".join(f"{m:>12}" for m in results))
    for loop in loops:
        row = "".join(f"{results[m]['times'][loop]:>11.3f}s" for m in results)  # type: ignore[index]
        print(f"{loop:32}{row}")
    for mode, res in results.items():
        if "requests" in res:
            print(f"requests seen by {mode}: {res['requests']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"pyfuse3": label, "results": results}, indent=2))


if __name__ == "__main__":
    main()
