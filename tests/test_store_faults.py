"""Writes that fail, a gc that is killed, a store on read-only media (issue 15, bugs 3, 4, 13
and the write side of the fault injection).

Faults are real: a small tmpfs that fills up, a read-only bind mount, and system calls made
to fail or to kill by strace at a chosen call (tests/faultutil.py). After each: a one-line
error naming the store and the cause, exit 1, nothing left behind (no temporary pack, no
pack without an index row), ``verify`` clean and the previous content intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
from pathlib import Path

import pytest
from cnpsfs_testlib import Cli, Node, build_tree, digest_of
from faultutil import WRITE_CALLS, Point, fill, inject, leftovers, needs_strace, points, read_only_view, small_fs, trace
from mountutil import cat, mount_image, write_manifest

from cnpsfs import format as fmt
from cnpsfs.store import LocalStore
from cnpsfs.store.journal import TagJournal
from cnpsfs.store.maintenance import gc, verify

MiB = 1 << 20
MTIME = 1_600_000_000_000_000_000


def files_tree(root: Path, files: dict[str, bytes]) -> Path:
    return build_tree(root, [Node(name.encode(), "file", data=data, mtime_ns=MTIME) for name, data in files.items()],
                      root_mtime_ns=MTIME)


def state(store: Path) -> dict[str, object]:
    """What a failed write must not change: tags, rows, pack names; and that the journal agrees."""
    s = LocalStore(store)
    try:
        tags = {t.ref: (t.digest, t.created_ns) for t in s.tags()}
        replay = TagJournal(store / "tags.log").replay()
        journal = {t.ref: (t.digest, t.created_ns) for t in replay.tags.values()} if replay else None
        return {"tags": tags, "journal_agrees": journal in (None, tags), "counts": s.counts(),
                "packs": sorted(s.pack_files().values())}
    finally:
        s.close()


def settle(store: Path) -> None:
    s = LocalStore(store)
    try:
        gc(s)
    finally:
        s.close()


def assert_clean(store: Path) -> None:
    assert leftovers(store) == []
    s = LocalStore(store)
    try:
        report = verify(s, None)
    finally:
        s.close()
    assert report.problems == [], report.problems


def assert_one_line_error(result: object, *must: str) -> None:
    rc, stderr = result.rc, result.stderr  # type: ignore[attr-defined]
    assert rc == 1, result
    assert "internal error" not in stderr and "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnpsfs: error: "), stderr
    for text in must:
        assert text in stderr, f"{text!r} not in {stderr!r}"


# --------------------------------------------------------------------------- bug 3: a killed gc


def _gc_scene(tmp_path: Path, cli: Cli) -> str:
    """A's pack mostly garbage once its tag goes (B shares only A's small files): gc must repack it."""
    small = {f"lib{i:03d}": random.Random(i).randbytes(5000) for i in range(120)}
    cli.ok("import", "dir", files_tree(tmp_path / "a", small | {"big-a": random.Random(1).randbytes(6 * MiB)}),
           "--name", "example.org/a", "--version", "1")
    ref_b = digest_of(cli.ok("import", "dir", files_tree(tmp_path / "b", small | {"big-b": b"b" * 300_000}),
                             "--name", "example.org/b", "--version", "1"))
    cli.ok("tag", "rm", "example.org/a@1")
    return ref_b


@needs_strace
def test_a_killed_gc_is_finished_by_the_next(tmp_path: Path, cli: Cli) -> None:
    """Bug 3: gc killed after deleting dead rows left a pack that every later gc took for live."""
    ref_b = _gc_scene(tmp_path, cli)
    rehearsal = tmp_path / "rehearsal"
    shutil.copytree(cli.store_path, rehearsal)
    proc, calls = trace(Cli(rehearsal).argv("gc"), ["write"])
    assert proc.returncode == 0, proc.stderr
    # Killed at the first write of the repacked pack: the dead rows are already gone.
    first = next(c for c in calls if "/tmp/" in c.path and c.path.endswith(".pack"))
    assert len({c.tid for c in calls}) == 1, "one thread writes: the point is exact"
    killed = inject(cli.argv("gc"), Point("write", first.nth), "signal=KILL", store=cli.store_path)
    assert killed.returncode == -9, killed
    before = cli.store_path.joinpath("packs")
    size_before = sum(p.stat().st_size for p in before.iterdir())
    report = json.loads(cli.ok("gc", "--json").stdout)
    assert report["repacked"] == 1, f"the interrupted repack is done again: {report}"
    size_after = sum(p.stat().st_size for p in before.iterdir())
    assert size_after < size_before - 5 * MiB, (size_before, size_after)
    assert_clean(cli.store_path)
    again = json.loads(cli.ok("gc", "--json").stdout)
    assert (again["removed_objects"], again["removed_packs"], again["repacked"], again["removed_tmp"]) == (0, 0, 0, 0)
    cli.ok("export", "dir", ref_b, tmp_path / "out")
    assert (tmp_path / "out" / "big-b").read_bytes() == b"b" * 300_000


def test_gc_sees_dead_blocks_whose_rows_are_gone(tmp_path: Path, cli: Cli) -> None:
    """The accounting half of bug 3, without strace: the rows a killed gc deleted, deleted by hand."""
    _gc_scene(tmp_path, cli)
    s = LocalStore(cli.store_path)
    try:
        from cnpsfs.store.maintenance import reachable, tag_roots

        keep = reachable(s, tag_roots(s))
    finally:
        s.close()
    db = sqlite3.connect(cli.store_path / "index.sqlite")
    with db:
        dead = [d for (d,) in db.execute("SELECT digest FROM objects") if d not in keep]
        db.executemany("DELETE FROM objects WHERE digest=?", ((d,) for d in dead))
    db.close()
    assert dead
    report = json.loads(cli.ok("gc", "--json").stdout)
    assert report["removed_objects"] == 0 and report["repacked"] == 1, report
    assert_clean(cli.store_path)


# --------------------------------------------------------------------------- bug 4: a full disk


def test_full_disk_during_pack_writes(tmp_path: Path) -> None:
    """Bug 4: ENOSPC was `internal error`, exit 70. Now one line, exit 1, nothing left."""
    with small_fs("24m") as fs:
        store = fs / "store"
        cli = Cli(store)
        ref = digest_of(cli.ok("import", "dir", files_tree(tmp_path / "small", {"f": b"first\n" * 100}),
                               "--name", "example.org/first", "--version", "1"))
        before = state(store)
        filler = fill(fs, leave=512 << 10)
        result = cli("import", "dir", files_tree(tmp_path / "big", {"r": os.urandom(4 * MiB)}),
                     "--name", "example.org/big", "--version", "1")
        assert_one_line_error(result, str(store), "No space left on device")
        assert state(store) == before
        assert_clean(store)
        assert cli.ok("cat", ref, "f").stdout_bytes == b"first\n" * 100
        filler.unlink()
        cli.ok("import", "dir", tmp_path / "big", "--name", "example.org/big", "--version", "1")
        assert_clean(store)


@needs_strace
def test_full_disk_at_the_index_commit_removes_the_renamed_pack(tmp_path: Path, cli: Cli) -> None:
    """Bug 4, second half: the commit failing after the pack was renamed into packs/ left it there."""
    cli.ok("import", "dir", files_tree(tmp_path / "a", {"a": b"a" * 1000}), "--name", "example.org/a")
    before = state(cli.store_path)
    tree = files_tree(tmp_path / "b", {"b": os.urandom(400_000)})
    argv = cli.argv("import", "dir", tree, "--name", "example.org/b")
    rehearsal = tmp_path / "rehearsal"
    shutil.copytree(cli.store_path, rehearsal)
    proc, calls = trace(Cli(rehearsal).argv("import", "dir", tree, "--name", "example.org/b"),
                        ["rename", "pwrite64"])
    assert proc.returncode == 0
    renamed = next(i for i, c in enumerate(calls) if c.name == "rename" and "/tmp/" in c.path)
    wal = next(c for c in calls[renamed:] if c.name == "pwrite64" and c.path.endswith("index.sqlite-wal"))
    point = Point("pwrite64", wal.nth_on_path, "{store}/index.sqlite-wal")
    result = subprocess_result(inject(argv, point, "error=ENOSPC", store=cli.store_path))
    assert_one_line_error(result, str(cli.store_path / "index.sqlite"), "No space left on device")
    assert state(cli.store_path) == before
    assert_clean(cli.store_path)


class _Result:
    def __init__(self, proc: object) -> None:
        self.rc = proc.returncode  # type: ignore[attr-defined]
        self.stderr = proc.stderr.decode(errors="replace")  # type: ignore[attr-defined]
        self.stdout = proc.stdout.decode(errors="replace")  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"rc {self.rc}\nstdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-2000:]}"


def subprocess_result(proc: object) -> _Result:
    return _Result(proc)


# --------------------------------------------------------------------------- every write and fsync fails once


#: Injection points per operation and error in the default run; ``--long`` tries up to 50.
SMOKE_POINTS = 1
LONG_POINTS = 50


def _operation(tmp_path: Path, name: str) -> list[str]:
    """The cnpsfs arguments of operation *name*, on a store holding example.org/base@1."""
    if name == "import dir":
        tree = files_tree(tmp_path / "new", {"n": os.urandom(300_000), "m": b"text\n" * 5000})
        return ["import", "dir", str(tree), "--name", "example.org/new", "--version", "1"]
    if name == "image create":
        write_manifest(tmp_path / "image.toml", "example.org/img", ["example.org/base@1"])
        return ["image", "create", str(tmp_path / "image.toml")]
    if name == "tag set":
        return ["tag", "set", "example.org/alias@1", "example.org/base@1"]
    if name == "gc":
        # A pack mostly garbage (repacked) and one all garbage (removed) once their tags go.
        cli = Cli(tmp_path / "store")
        cli.ok("import", "dir", files_tree(tmp_path / "sparse", {"dead": os.urandom(3 * MiB), "c": b"base\n" * 100}),
               "--name", "example.org/sparse", "--version", "1")
        cli.ok("import", "dir", files_tree(tmp_path / "gone", {"g": os.urandom(500_000)}), "--name",
               "example.org/gone", "--version", "1")
        cli.ok("tag", "rm", "example.org/sparse@1")
        cli.ok("tag", "rm", "example.org/gone@1")
        return ["gc"]
    assert name == "tag rm"
    return ["tag", "rm", "example.org/base@1"]


def _fault_points(calls: list, store: Path, seed: str, count: int) -> list[Point]:
    """Up to *count* seeded points per system call among the store writes of a rehearsal."""
    chosen: list[Point] = []
    every = points(calls, store)
    for name in WRITE_CALLS:
        mine = [p for p in every if p.call == name]
        rng = random.Random(f"{seed}/{name}")
        chosen += rng.sample(mine, min(count, len(mine)))
    return chosen


@needs_strace
@pytest.mark.parametrize("operation", ["import dir", "image create", "tag set", "tag rm", "gc"])
def test_a_write_or_fsync_that_fails(tmp_path: Path, cli: Cli, operation: str) -> None:
    """The smoke: one seeded point per system call, ENOSPC or EIO (seeded too)."""
    _fault_matrix(tmp_path, cli, operation, random.Random(operation).choice(["ENOSPC", "EIO"]), SMOKE_POINTS)


@pytest.mark.long
@needs_strace
@pytest.mark.parametrize("error", ["ENOSPC", "EIO"])
@pytest.mark.parametrize("operation", ["import dir", "image create", "tag set", "tag rm", "gc"])
def test_a_write_or_fsync_that_fails_long(tmp_path: Path, cli: Cli, operation: str, error: str) -> None:
    _fault_matrix(tmp_path, cli, operation, error, LONG_POINTS)


def _fault_matrix(tmp_path: Path, cli: Cli, operation: str, error: str, count: int) -> None:
    """Each chosen write, pwrite64, fsync and fdatasync on a store file fails once with *error*."""
    base = files_tree(tmp_path / "base", {"b": os.urandom(200_000), "c": b"base\n" * 100})
    cli.ok("import", "dir", base, "--name", "example.org/base", "--version", "1")
    args = _operation(tmp_path, operation)
    pristine = tmp_path / "pristine"
    shutil.copytree(cli.store_path, pristine)
    rehearsal = tmp_path / "rehearsal"
    shutil.copytree(pristine, rehearsal)
    proc, calls = trace(Cli(rehearsal).argv(*args), list(WRITE_CALLS))
    assert proc.returncode == 0, proc.stderr
    expected = state(rehearsal)
    chosen = _fault_points(calls, rehearsal, f"{operation}/{error}", count)
    assert chosen, "the operation writes the store"
    failures = []
    completed = 0
    for point in chosen:
        shutil.rmtree(cli.store_path)
        shutil.copytree(pristine, cli.store_path)
        before = state(cli.store_path)
        result = subprocess_result(inject(cli.argv(*args), point, f"error={error}", store=cli.store_path))
        where = f"{operation}: {error} at {point}"
        try:
            if result.rc == 0:
                # The failure landed where it does not matter (SQLite retries, a checkpoint at
                # exit): the operation must then be complete.
                completed += 1
                after = state(cli.store_path)
                assert after["tags"].keys() == expected["tags"].keys(), after
            else:
                assert_one_line_error(result)
                assert str(cli.store_path) in result.stderr or "store" in result.stderr, result
                after = state(cli.store_path)
                if operation == "gc":
                    # A gc stopped half-way is a gc killed half-way: tags untouched, the next gc finishes.
                    assert after["tags"] == before["tags"]
                    settle(cli.store_path)
                    assert state(cli.store_path)["counts"] == expected["counts"], "the next gc finishes it"
                else:
                    assert after == before, f"{after} != {before}"
            assert after["journal_agrees"], "tags.log and the index agree"
            assert_clean(cli.store_path)
        except AssertionError as exc:
            failures.append(f"{where}: {exc}\n{result}")
    # For docs/reliability.md (pytest -s shows it).
    print(f"\nfault injection: {operation}, {error}: {len(chosen)} points of {len(points(calls, rehearsal))};"
          f" {len(chosen) - completed} failed with one line and left nothing, {completed} completed anyway;"
          f" {len(failures)} broke")
    assert not failures, "\n\n".join(failures)


# --------------------------------------------------------------------------- bug 13: read-only media


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture
def ro_store(tmp_path: Path, cli: Cli) -> tuple[Path, str]:
    tree = files_tree(tmp_path / "t", {"hello.txt": b"hello from a read-only store\n", "big": os.urandom(700_000)})
    cli.ok("import", "dir", tree, "--name", "example.org/ro", "--version", "1")
    write_manifest(tmp_path / "image.toml", "example.org/ro-image", ["example.org/ro@1"])
    cli.ok("image", "create", tmp_path / "image.toml")
    return cli.store_path, "example.org/ro-image@1"


@pytest.mark.parametrize("args", [
    ["ls", "-l", "example.org/ro@1"], ["cat", "example.org/ro@1", "hello.txt"], ["verify"], ["tag", "list"],
    ["df"], ["inspect", "example.org/ro-image@1"], ["verify", "example.org/ro@1"],
], ids=lambda a: " ".join(a[:2]))
def test_reading_commands_work_on_read_only_media(tmp_path: Path, ro_store: tuple[Path, str], args: list[str]) -> None:
    """Bug 13: `unable to open database file` on a read-only bind mount of a healthy store."""
    store, _image = ro_store
    listing = _listing(store)
    with read_only_view(store, tmp_path / "ro") as ro:
        result = Cli(ro)(*args)
        assert result.rc == 0, result
        assert "internal error" not in result.stderr
    assert _listing(store) == listing, "nothing was written into the store (no -wal, -shm, lock or run files)"


@pytest.mark.parametrize("args", [
    ["import", "dir", "{tree}", "--name", "example.org/x"], ["tag", "set", "example.org/x@1", "example.org/ro@1"],
    ["tag", "rm", "example.org/ro@1"], ["gc"], ["store", "repair"], ["image", "create", "{manifest}"],
], ids=lambda a: " ".join(a[:2]))
def test_writing_commands_say_the_store_is_read_only(tmp_path: Path, ro_store: tuple[Path, str],
                                                     args: list[str]) -> None:
    store, _image = ro_store
    tree = files_tree(tmp_path / "x", {"x": b"x"})
    args = [a.replace("{tree}", str(tree)).replace("{manifest}", str(tmp_path / "image.toml")) for a in args]
    listing = _listing(store)
    with read_only_view(store, tmp_path / "ro") as ro:
        result = Cli(ro)(*args)
        assert_one_line_error(result, "read-only", str(ro))
    assert _listing(store) == listing


@pytest.mark.fuse
def test_mount_from_read_only_media_and_gc_through_the_writable_path(tmp_path: Path, ro_store: tuple[Path, str]
                                                                     ) -> None:
    """A mount through the read-only view registers its roots in the runtime directory; gc run
    on the writable path of the same store finds them and keeps what the mount serves."""
    from cnpsfs.fs.daemon import runtime_dir

    store, image = ro_store
    st = store.stat()
    roots = runtime_dir() / "roots" / f"{st.st_dev:x}-{st.st_ino:x}"
    with read_only_view(store, tmp_path / "ro") as ro, mount_image(ro, image, tmp_path / "mnt") as m:
        assert cat(m / "hello.txt") == b"hello from a read-only store\n"
        assert (roots / f"{m.pid}.roots").exists(), "the roots are kept outside the read-only store"
        assert not list((store / "run").glob("*.roots"))
        Cli(store).ok("tag", "rm", "example.org/ro@1")
        Cli(store).ok("tag", "rm", "example.org/ro-image@1")
        report = json.loads(Cli(store).ok("gc", "--json").stdout)
        assert report["removed_objects"] == 0, "the mount's roots kept its image"
        assert len(cat(m / "big")) == 700_000
        assert m.status()["store"] == str(ro)
    assert not (roots / f"{m.pid}.roots").exists() and not roots.exists(), "nothing left in the runtime dir"
    assert json.loads(Cli(store).ok("gc", "--json").stdout)["removed_objects"] > 0, "unmounted: collected"


def test_read_only_store_with_a_live_writer_reads_its_wal(tmp_path: Path, ro_store: tuple[Path, str]) -> None:
    """A writer on the writable side keeps index.sqlite-wal and -shm: readers of the read-only
    view open with mode=ro (not immutable, which would not see the WAL's transactions)."""
    store, _image = ro_store
    from cnpsfs.ingest.directory import import_directory
    from cnpsfs.ingest.tree import ImportOptions

    writer = LocalStore(store)
    try:
        result = import_directory(writer, str(files_tree(tmp_path / "w", {"w": b"in the wal\n"})),
                                  ImportOptions(name="example.org/wal", version="1"))
        assert (store / "index.sqlite-wal").stat().st_size > 0, "the commit is still in the WAL"
        with read_only_view(store, tmp_path / "ro") as ro:
            got = Cli(ro)("cat", fmt.format_digest(result.digest), "w")
            assert got.rc == 0 and got.stdout_bytes == b"in the wal\n", got
    finally:
        writer.close()


def test_read_only_store_whose_wal_lost_its_shm(tmp_path: Path, ro_store: tuple[Path, str]) -> None:
    """A -wal without its -shm cannot be read without writing: a one-line error that says so."""
    store, _image = ro_store
    copy = tmp_path / "copy"
    writer = LocalStore(store)
    try:
        writer.set_tag("example.org/late", "1", 3, writer.resolve("example.org/ro@1"))
        shutil.copytree(store, copy, ignore=shutil.ignore_patterns("*-shm"))
    finally:
        writer.close()
    assert (copy / "index.sqlite-wal").stat().st_size > 0
    with read_only_view(copy, tmp_path / "ro") as ro:
        result = Cli(ro)("tag", "list")
        assert_one_line_error(result, "index.sqlite-wal", "writable")


def test_index_opened_read_only_never_creates_files(tmp_path: Path, ro_store: tuple[Path, str]) -> None:
    store, _image = ro_store
    db = sqlite3.connect(store / "index.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert not (store / "index.sqlite-wal").exists() and not (store / "index.sqlite-shm").exists(), \
        "a cleanly closed store has no WAL: immutable=1 reads all of it"
