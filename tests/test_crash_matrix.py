"""kill -9 at seeded points of every writing operation (issue 15's crash matrix).

For each operation a rehearsal on a copy of the store lists every system call it makes on
a store file (write, pwrite64, fsync, fdatasync, rename, unlink, link, ftruncate); a
seeded sample of those calls becomes kill points, and at each the operation runs again on
a fresh copy with strace killing it (SIGKILL) on entering that call (tests/faultutil.py).
After each kill:

* ``verify`` is clean (what a killed writer leaves are notes for gc, never problems);
* nothing partial is visible: every tag is exactly as before the operation or exactly as
  after it, and each names a complete DAG;
* running the operation again converges on the rehearsal's tags and digests;
* a gc then reclaims every leftover: no temporary file, no pack without a row, no row
  nothing reaches, and the store holds what the rehearsal's store holds after its gc.

The default run kills each operation at ``SMOKE`` points; ``--long`` (scripts/test --long)
at ``LONG``. docs/reliability.md has the figures.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cnpsfs_testlib import Cli, Node, build_tree
from faultutil import KILL_CALLS, Point, inject, leftovers, needs_strace, points, trace
from mountutil import write_manifest

from cnpsfs.store import LocalStore
from cnpsfs.store.maintenance import gc, verify

SMOKE = 3
LONG = 50
MTIME = 1_600_000_000_000_000_000

pytestmark = needs_strace


@dataclass
class Operation:
    args: list[str]
    setup: Callable[[Cli], None]


def _tree(root: Path, seed: int) -> Path:
    rng = random.Random(seed)
    nodes = [Node(f"small/{i:02d}".encode(), "file", data=rng.randbytes(rng.randrange(10, 3000)), mtime_ns=MTIME)
             for i in range(30)]
    nodes += [Node(b"large", "file", data=rng.randbytes(700_000), mtime_ns=MTIME),
              Node(b"text", "file", data=b"line of text\n" * 20_000, mtime_ns=MTIME),
              Node(b"link", "symlink", target=b"large", mtime_ns=MTIME),
              Node(b"hard", "hardlink", target=b"text")]
    return build_tree(root, nodes, root_mtime_ns=MTIME)


def _base(cli: Cli, tmp: Path) -> None:
    cli.ok("import", "dir", _tree(tmp / "base", 1), "--name", "example.org/base", "--version", "1")


def _deb(tmp: Path) -> Path:
    root = tmp / "debroot"
    _tree(root / "usr/share/crash", 3)
    (root / "DEBIAN").mkdir(parents=True, exist_ok=True)
    (root / "DEBIAN" / "control").write_text("Package: crash\nVersion: 1.0\nArchitecture: all\n"
                                             "Maintainer: Nobody <nobody@example.org>\nDescription: a test\n")
    deb = tmp / "crash_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(deb)], check=True,
                   capture_output=True)
    return deb


def operations(tmp: Path) -> dict[str, Operation]:
    new = _tree(tmp / "new", 2)
    tarball = tmp / "new.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(new, arcname=".")
    write_manifest(tmp / "image.toml", "example.org/img", ["example.org/base@1"])
    upper = tmp / "upperdir"  # what `mount --writable UPPERDIR` leaves: the changes in UPPERDIR/upper
    build_tree(upper / "upper", [Node(b"etc/added", "file", data=b"added\n" * 100, mtime_ns=MTIME),
                                 Node(b"large", "file", data=b"replaced\n" * 1000, mtime_ns=MTIME)],
               root_mtime_ns=MTIME)

    def with_image(cli: Cli) -> None:
        _base(cli, tmp)
        cli.ok("image", "create", tmp / "image.toml")

    def with_garbage(cli: Cli) -> None:
        _base(cli, tmp)
        cli.ok("import", "dir", new, "--name", "example.org/gone", "--version", "1")
        cli.ok("tag", "rm", "example.org/gone@1")

    def with_sparse_pack(cli: Cli) -> None:
        big = build_tree(tmp / "sparse", [Node(b"dead", "file", data=random.Random(9).randbytes(3 << 20),
                                               mtime_ns=MTIME),
                                          Node(b"live", "file", data=random.Random(8).randbytes(400_000),
                                               mtime_ns=MTIME)], root_mtime_ns=MTIME)
        cli.ok("import", "dir", big, "--name", "example.org/sparse", "--version", "1")
        keep = build_tree(tmp / "keep", [Node(b"live", "file", data=random.Random(8).randbytes(400_000),
                                              mtime_ns=MTIME)], root_mtime_ns=MTIME)
        cli.ok("import", "dir", keep, "--name", "example.org/keep", "--version", "1")
        cli.ok("tag", "rm", "example.org/sparse@1")

    return {
        "import dir": Operation(["import", "dir", str(new), "--name", "example.org/new", "--version", "1"],
                                lambda cli: _base(cli, tmp)),
        "import tar": Operation(["import", "tar", str(tarball), "--name", "example.org/new", "--version", "1"],
                                lambda cli: _base(cli, tmp)),
        "import deb": Operation(["import", "deb", str(_deb(tmp))], lambda cli: _base(cli, tmp)),
        "commit": Operation(["commit", str(upper), "--onto", "example.org/img@1", "--name", "example.org/img",
                             "--version", "2"], with_image),
        "image create": Operation(["image", "create", str(tmp / "image.toml")], lambda cli: _base(cli, tmp)),
        "tag set": Operation(["tag", "set", "example.org/alias@1", "example.org/base@1"], lambda cli: _base(cli, tmp)),
        "tag rm": Operation(["tag", "rm", "example.org/base@1"], with_image),
        "gc": Operation(["gc"], with_garbage),
        "repack": Operation(["gc"], with_sparse_pack),
    }


def tags(store: Path) -> dict[str, bytes]:
    s = LocalStore(store)
    try:
        return {t.ref: t.digest for t in s.tags()}
    finally:
        s.close()


def settle(store: Path) -> tuple[int, int, int]:
    """gc in-process; returns the index's (chunks, objects, packs) after it."""
    s = LocalStore(store)
    try:
        gc(s)
        return s.counts()
    finally:
        s.close()


def kill_after(argv: list[str], delay: float) -> int:
    """Run *argv*, SIGKILL it after *delay* seconds; its exit status (0 if it finished first)."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=60)


def counts(store: Path) -> tuple[int, int, int]:
    s = LocalStore(store)
    try:
        return s.counts()
    finally:
        s.close()


def problems(store: Path) -> list[str]:
    s = LocalStore(store)
    try:
        return verify(s, None).problems
    finally:
        s.close()


def _crash_matrix(tmp_path: Path, name: str, count: int) -> None:
    op = operations(tmp_path)[name]
    pristine = tmp_path / "pristine"
    op.setup(Cli(pristine))
    before = tags(pristine)
    rehearsal = tmp_path / "rehearsal"
    shutil.copytree(pristine, rehearsal)
    proc, calls = trace(Cli(rehearsal).argv(*op.args), list(KILL_CALLS))
    assert proc.returncode == 0, proc.stderr
    after = tags(rehearsal)
    expected = settle(rehearsal)
    every = points(calls, rehearsal)
    rng = random.Random(f"crash/{name}")
    chosen: list[Point | float] = list(rng.sample(every, min(count, len(every))))
    assert chosen, f"{name} writes nothing?"
    if len(chosen) < count:
        # Fewer calls than kills asked for: every call is a point, and the rest are kills
        # after a seeded delay, which also land between calls (in computation).
        timed = tmp_path / "timed"
        shutil.copytree(pristine, timed)
        started = time.monotonic()
        Cli(timed).ok(*op.args)
        duration = time.monotonic() - started
        chosen += [rng.uniform(0, duration) for _ in range(count - len(chosen))]
    store = tmp_path / "store"
    cli = Cli(store)
    failures = []
    outcome = {"before": 0, "after": 0, "finished": 0}
    for point in chosen:
        if store.exists():
            shutil.rmtree(store)
        shutil.copytree(pristine, store)
        if isinstance(point, Point):
            killed = inject(cli.argv(*op.args), point, "signal=KILL", store=store).returncode
            where = f"{name} killed at {point} (of {len(every)} points)"
        else:
            killed = kill_after(cli.argv(*op.args), point)
            where = f"{name} killed after {point:.3f} s"
        try:
            if killed == 0 and not isinstance(point, Point):
                outcome["finished"] += 1  # it was done before the signal came
            else:
                assert killed == -9, f"not killed: rc {killed}"
            found = problems(store)
            assert found == [], found
            now = tags(store)
            assert now in (before, after), f"partial tags: {now}"
            if before != after:
                outcome["before" if now == before else "after"] += 1
            else:  # gc: did the killed run finish its work, or is it left for the next?
                outcome["after" if counts(store) == expected and not leftovers(store) else "before"] += 1
            if now != after:
                again = cli(*op.args)
                assert again.rc == 0, again
            assert tags(store) == after, "a re-run converges on the same digests"
            assert settle(store) == expected, "gc leaves what the rehearsal's store holds"
            assert leftovers(store) == [], leftovers(store)
            assert problems(store) == []
        except AssertionError as exc:
            failures.append(f"{where}: {exc}")
    # For docs/reliability.md (pytest -s shows it): how many points there were and how the kills ended.
    left, done = ("left work for the next gc", "had finished") if before == after else ("left the store as before",
                                                                                       "as after")
    timed_kills = sum(1 for p in chosen if not isinstance(p, Point))
    print(f"\ncrash matrix: {name}: {len(chosen) - timed_kills} kills of {len(every)} points and {timed_kills}"
          f" after a delay ({outcome['finished']} finished first); {outcome['before']} {left},"
          f" {outcome['after']} {done}; {len(failures)} failed")
    assert not failures, "\n".join(failures)


NAMES = ["import dir", "import tar", "import deb", "commit", "image create", "tag set", "tag rm", "gc", "repack"]


@pytest.mark.parametrize("name", NAMES)
def test_kill_9_smoke(tmp_path: Path, name: str) -> None:
    if name == "import deb" and shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    _crash_matrix(tmp_path, name, SMOKE)


@pytest.mark.long
@pytest.mark.parametrize("name", NAMES)
def test_kill_9_long(tmp_path: Path, name: str) -> None:
    if name == "import deb" and shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    _crash_matrix(tmp_path, name, LONG)


def test_points_cover_the_commit_window(tmp_path: Path) -> None:
    """The kill points of an import include the calls between the rename and the index
    commit, where a killed writer leaves a pack that no row names."""
    op = operations(tmp_path)["import dir"]
    store = tmp_path / "s"
    op.setup(Cli(store))
    _proc, calls = trace(Cli(store).argv(*op.args), list(KILL_CALLS))
    names = [c.name for c in calls if c.path.startswith(os.path.realpath(store))]
    assert "rename" in names and "fsync" in names and "pwrite64" in names
    assert names.index("rename") < len(names) - 1 - names[::-1].index("pwrite64")
