"""Bad input and faults around real mounts: corrupt chunks, a killed daemon, unusable
mountpoints and references. Each must fail cleanly: EIO for the damaged bytes only, a
one-line error and no daemon left behind for a refused mount.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cnpsfs_testlib import Cli, wait_until
from mountutil import (
    FUSE,
    FUSE_MODES,
    Mount,
    cat,
    cnpsfs,
    finish_mount,
    is_mounted,
    mount_image,
    pid_alive,
    processes_mentioning,
    start_mount,
    write_manifest,
)

from cnpsfs import format as fmt
from cnpsfs.errors import MountpointBusyError
from cnpsfs.fs.daemon import MountRecord, check_mountpoint
from cnpsfs.image.manifest import compose, load_image
from cnpsfs.store import LocalStore

pytestmark = FUSE

_rng = random.Random(5)
#: Two FileSets, imported separately so their blocks do not mix: incompressible data
#: (blocks stored raw: a flipped byte damages exactly one chunk) and text (zstd blocks).
RANDOM = {
    "victim.bin": _rng.randbytes(900_000),  # several chunks
    "healthy.bin": _rng.randbytes(700_000),
}
TEXT = {
    "text.txt": b"".join(b"compressible line %d\n" % i for i in range(40_000)),
    "etc/small": b"small file\n",
}
FILES = RANDOM | TEXT


@dataclass
class Located:
    digest: bytes
    pack_file: Path
    offset: int  # of the block in the pack
    stored: int
    codec: int
    inner: int
    length: int


def locate(store_path: Path, digest: bytes) -> Located:
    """Where a chunk lives, read straight from the SQLite index (objects, packs)."""
    db = sqlite3.connect(f"file:{store_path / 'index.sqlite'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT o.offset, o.stored, o.codec, o.inner, o.length, p.name FROM objects o "
                         "JOIN packs p ON p.id = o.pack WHERE o.digest = ?", (digest,)).fetchone()
    finally:
        db.close()
    assert row is not None, f"{fmt.format_digest(digest)} is not in the index"
    offset, stored, codec, inner, length, name = row
    return Located(digest, store_path / "packs" / f"{name}.pack", offset, stored, codec, inner, length)


def chunks_of(store_path: Path, image_ref: str, path: str) -> list[fmt.Extent]:
    store = LocalStore(store_path)
    try:
        image, _digest = load_image(store, image_ref)
        gen = compose(store, image)
        return list(gen.extent_map(gen.resolve(path)).extents)
    finally:
        store.close()


def flip(path: Path, offset: int, count: int = 8) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


@pytest.fixture
def fault_store(tmp_path: Path) -> Path:
    cli = Cli(tmp_path / "store")
    for name, files in (("random", RANDOM), ("text", TEXT)):
        tree = tmp_path / name
        for rel, data in files.items():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            (tree / rel).write_bytes(data)
        cli.ok("import", "dir", tree, "--name", f"example.org/{name}", "--version", "1")
    write_manifest(tmp_path / "image.toml", "example.org/faults-image", ["example.org/random@1", "example.org/text@1"])
    cli.ok("image", "create", tmp_path / "image.toml")
    return tmp_path / "store"


def _read_range(path: Path, offset: int, size: int) -> bytes:
    """Read until *size* bytes or EOF: a failing page makes pread return short, then fail."""
    fd = os.open(path, os.O_RDONLY)
    try:
        out = b""
        while len(out) < size:
            part = os.pread(fd, min(size - len(out), 1 << 20), offset + len(out))
            if not part:
                break
            out += part
        return out
    finally:
        os.close(fd)


def _read_errno(path: Path, offset: int = 0, size: int = 1 << 40) -> int:
    try:
        _read_range(path, offset, size)
    except OSError as exc:
        return exc.errno or -1
    return 0


PAGE = 4096


# --------------------------------------------------------------------------- corrupt store


@pytest.mark.parametrize("fuse_mode", FUSE_MODES)
def test_corrupt_chunk_gives_eio_for_that_range_only(fault_store: Path, fuse_mode: str, tmp_path: Path) -> None:
    extents = chunks_of(fault_store, "example.org/faults-image@1", "/victim.bin")
    assert len(extents) >= 3, "the victim must span several chunks"
    target = extents[1]
    assert target.digest is not None
    where = locate(fault_store, target.digest)
    assert where.codec == 0, "random data is stored raw: a flipped byte breaks only this chunk"
    flip(where.pack_file, where.offset + where.inner + where.length // 2)
    start, end = extents[0].length, extents[0].length + extents[1].length  # the damaged chunk's range
    data = FILES["victim.bin"]
    with mount_image(fault_store, "example.org/faults-image@1", tmp_path / "mnt", mode=fuse_mode,
                     allow_log=[r"ERROR: reading /victim\.bin at offset \d+: chunk blake3:[0-9a-f]+ is corrupt"]) as m:
        victim = m / "victim.bin"
        assert os.lstat(victim).st_size == len(data)
        with pytest.raises(OSError) as info:
            cat(victim)
        assert info.value.errno == errno.EIO
        assert _read_errno(victim, start, 1) == errno.EIO, "the first byte of the damaged chunk"
        assert _read_errno(victim, end - 1, 1) == errno.EIO, "its last byte: still EIO (nothing cached)"
        # Pages wholly before or after the damaged chunk read fine (a page that straddles
        # it cannot: the kernel reads whole pages).
        head = start // PAGE * PAGE
        tail = -(-end // PAGE) * PAGE
        assert _read_range(victim, 0, head) == data[:head], "the chunks before are fine"
        assert _read_range(victim, tail, len(data)) == data[tail:], "the chunks after are fine"
        for rel in ("healthy.bin", "text.txt", "etc/small"):
            assert cat(m / rel) == FILES[rel], rel
        m.assert_alive()
        log = m.log()
        assert fmt.format_digest(target.digest) in log, f"the log must name the chunk:\n{log}"
        # ... and where it is stored, once however often it was read.
        errors = [line for line in log.splitlines() if "ERROR:" in line]
        assert len(errors) == 1, errors
        assert f"block at {where.pack_file.stem}.pack offset {where.offset}" in errors[0], errors


@pytest.mark.parametrize("fuse_mode", FUSE_MODES)
def test_corrupt_compressed_block_names_the_block(fault_store: Path, fuse_mode: str, tmp_path: Path) -> None:
    extents = chunks_of(fault_store, "example.org/faults-image@1", "/text.txt")
    assert extents[0].digest is not None
    where = locate(fault_store, extents[0].digest)
    assert where.codec == 1, "text is stored zstd-compressed"
    healthy = chunks_of(fault_store, "example.org/faults-image@1", "/healthy.bin")
    # Imported apart, so in another pack (whose first block may well sit at the same offset).
    assert all((b.pack_file, b.offset) != (where.pack_file, where.offset)
               for b in (locate(fault_store, e.digest) for e in healthy if e.digest))
    flip(where.pack_file, where.offset + where.stored // 2, 16)
    pack = where.pack_file.stem
    block = rf"block at {pack}\.pack offset {where.offset}"
    with mount_image(fault_store, "example.org/faults-image@1", tmp_path / "mnt", mode=fuse_mode,
                     allow_log=[rf"ERROR: reading /text\.txt at offset \d+: ({block}|chunk blake3:)"]) as m:
        assert _read_errno(m / "text.txt") == errno.EIO
        assert cat(m / "healthy.bin") == FILES["healthy.bin"]
        m.assert_alive()
        assert f"{pack}.pack offset {where.offset}" in m.log() or "is corrupt" in m.log(), m.log()


# --------------------------------------------------------------------------- a daemon that dies


@pytest.mark.parametrize("fuse_mode", FUSE_MODES)
def test_kill_9_then_umount_cleans_up(fault_store: Path, fuse_mode: str, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    m = start_mount(fault_store, "example.org/faults-image@1", mountpoint, mode=fuse_mode)
    try:
        assert cat(m / "etc/small") == FILES["etc/small"]
        m.expect_exit = True
        os.kill(m.pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(m.pid), timeout=10, what="the killed daemon to be gone")
        with pytest.raises(OSError) as info:
            os.listdir(mountpoint)
        assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        again = cnpsfs("mount", "example.org/faults-image@1", mountpoint, store=fault_store)
        assert again.returncode != 0 and "dead FUSE mount" in again.stderr, again.stderr
        result = cnpsfs("umount", mountpoint)
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mountpoint)
        status = cnpsfs("status", mountpoint)
        assert status.returncode != 0
        assert not processes_mentioning(mountpoint)
    finally:
        finish_mount(m)
    # The mountpoint is usable again.
    with mount_image(fault_store, "example.org/faults-image@1", mountpoint, mode=fuse_mode) as m2:
        assert cat(m2 / "etc/small") == FILES["etc/small"]


def test_sigterm_unmounts(fault_store: Path, tmp_path: Path) -> None:
    m = start_mount(fault_store, "example.org/faults-image@1", tmp_path / "mnt")
    try:
        m.expect_exit = True
        os.kill(m.pid, signal.SIGTERM)
        wait_until(lambda: not pid_alive(m.pid) and not is_mounted(m.mountpoint), timeout=20,
                   what="SIGTERM to unmount and end the daemon")
        assert cnpsfs("status", m.mountpoint).returncode != 0, "the record went with the daemon"
    finally:
        finish_mount(m)


def test_unmount_leaves_no_runtime_files(fault_store: Path, tmp_path: Path) -> None:
    """An unmounted mountpoint leaves nothing behind in the runtime directory, nor an empty log.

    A log the daemon wrote to is kept (it says why a mount failed), one per mountpoint.
    """
    mountpoint = tmp_path / "mnt"
    m = start_mount(fault_store, "example.org/faults-image@1", mountpoint)
    record = MountRecord.path_for(str(mountpoint))
    leftovers = [record, record.with_suffix(".lock"), record.with_suffix(".log")]
    try:
        assert cat(m / "etc/small") == FILES["etc/small"]
        assert record.exists() and record.with_suffix(".lock").exists()
    finally:
        finish_mount(m)
    logged = record.with_suffix(".log")
    if logged.exists():  # the daemon logged something (a warning on this host): kept, and not empty
        assert logged.stat().st_size > 0
        leftovers.remove(logged)
    assert [p for p in leftovers if p.exists()] == []
    assert not any(p.name.startswith(record.stem) for p in record.parent.iterdir() if p.suffix != ".log")


def test_refused_mount_leaves_no_lock_file(fault_store: Path, tmp_path: Path) -> None:
    """A mount refused after taking the mountpoint's lock removes the lock file it made."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    lock = MountRecord.path_for(str(mountpoint)).with_suffix(".lock")
    result = cnpsfs("mount", "example.org/no-such-image@1", mountpoint, store=fault_store)
    assert result.returncode == 1 and "no-such-image" in result.stderr, result.stderr
    assert not lock.exists()


def test_daemon_ended_by_plain_umount_removes_its_lock_file(fault_store: Path, tmp_path: Path) -> None:
    """A daemon whose mount was taken away by umount(8), not cnpsfs, still cleans up as it exits."""
    mountpoint = tmp_path / "mnt"
    m = start_mount(fault_store, "example.org/faults-image@1", mountpoint)
    record = MountRecord.path_for(str(mountpoint))
    try:
        assert record.with_suffix(".lock").exists()
        m.expect_exit = True
        subprocess.run(["umount", str(mountpoint)], check=True, timeout=30)
        wait_until(lambda: not pid_alive(m.pid), timeout=20, what="the daemon to exit after umount(8)")
        assert not record.exists() and not record.with_suffix(".lock").exists()
    finally:
        finish_mount(m)


# --------------------------------------------------------------------------- refused mounts


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("refused")
    (base / "tree").mkdir()
    (base / "tree/one").write_text("one\n")
    (base / "tree2").mkdir()
    (base / "tree2/one").write_text("two\n")
    cli = Cli(base / "store")
    cli.ok("import", "dir", base / "tree", "--name", "example.org/one", "--version", "1")
    cli.ok("import", "dir", base / "tree2", "--name", "example.org/two", "--version", "1")
    write_manifest(base / "image.toml", "example.org/refused", ["example.org/one@1"])
    cli.ok("image", "create", base / "image.toml")
    return base / "store"


@pytest.fixture(scope="module")
def busy(shared_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mount_image(shared_store, "example.org/refused@1", tmp_path_factory.mktemp("busy") / "mnt") as m:
        yield m


def _refused(store: Path, ref: str | Path, mountpoint: Path, *, mode: str = "auto") -> str:
    before = set(processes_mentioning(mountpoint))
    result = cnpsfs("mount", "--fuse-mode", mode, ref, mountpoint, store=store)
    assert result.returncode != 0, f"mount should have failed: {result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnpsfs: error: "), result.stderr
    assert "Traceback" not in result.stderr
    # No wait: a mount that fails reaps the daemon it forked before it reports.
    assert set(processes_mentioning(mountpoint)) <= before, "a daemon was left behind"
    return lines[0]


def test_missing_mountpoint(shared_store: Path, tmp_path: Path) -> None:
    message = _refused(shared_store, "example.org/refused@1", tmp_path / "nowhere")
    assert "mountpoint" in message and "nowhere" in message and "does not exist" in message
    assert not (tmp_path / "nowhere").exists()


def test_mountpoint_is_a_file(shared_store: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    message = _refused(shared_store, "example.org/refused@1", tmp_path / "file")
    assert "not a directory" in message


def test_busy_mountpoint(shared_store: Path, busy: Mount) -> None:
    message = _refused(shared_store, "example.org/refused@1", busy.mountpoint)
    assert "busy" in message and str(busy.pid) in message, message
    with pytest.raises(MountpointBusyError) as info:  # the type callers catch, not the message
        check_mountpoint(str(busy.mountpoint))
    assert info.value.path == os.path.realpath(busy.mountpoint)
    busy.assert_alive()
    assert sorted(os.listdir(busy.mountpoint)) == ["one"]


@pytest.mark.parametrize("ref", ["example.org/missing@1", "example.org/missing", "blake3:00000000",
                                 "not a reference"])
def test_unknown_reference(shared_store: Path, tmp_path: Path, ref: str) -> None:
    (tmp_path / "mnt").mkdir()
    message = _refused(shared_store, ref, tmp_path / "mnt")
    assert ref in message or ref.split("@")[0] in message, message
    assert not is_mounted(tmp_path / "mnt")


def test_missing_manifest_and_bad_manifest(shared_store: Path, tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    message = _refused(shared_store, tmp_path / "absent.toml", tmp_path / "mnt")
    assert "absent.toml" in message
    bad = write_manifest(tmp_path / "bad.toml", "example.org/bad", ["example.org/one@1", "example.org/nope@2"])
    message = _refused(shared_store, bad, tmp_path / "mnt")
    assert "layers[2].fileset" in message and "example.org/nope@2" in message, message


def test_union_conflict_refuses_the_mount(shared_store: Path, tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    manifest = write_manifest(tmp_path / "union.toml", "example.org/union", ["example.org/one@1", "example.org/two@1"],
                              mode="union")
    message = _refused(shared_store, manifest, tmp_path / "mnt")
    assert "union conflict at /one: example.org/one@1 and example.org/two@1 provide different content" in message
    assert not is_mounted(tmp_path / "mnt")
    ok = write_manifest(tmp_path / "ok.toml", "example.org/union", [
        "example.org/one@1", {"fileset": "example.org/two@1", "override": True}], mode="union")
    with mount_image(shared_store, ok, tmp_path / "mnt") as m:
        assert cat(m / "one") == b"two\n"


def test_umount_of_something_not_mounted(tmp_path: Path) -> None:
    result = cnpsfs("umount", tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"cnpsfs: error: {tmp_path} is not mounted"]
