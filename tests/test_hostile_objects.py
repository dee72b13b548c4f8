"""Objects whose digests are right but whose contents are hostile (issue 15, fuzzing).

A remote store can serve any bytes under a digest it names itself, so "the digest
matches" proves nothing about an object's shape. These are the cases fuzzing the
decoders turned up that a decoder alone cannot refuse: they are caught where the bytes
are used, as a clean error (one line from the CLI, EIO from the mount), never wrong or
short data and never a dead daemon.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from cnpsfs_testlib import Cli
from mountutil import FUSE_MODES, mount_image

from cnpsfs import format as fmt
from cnpsfs.format import objects
from cnpsfs.ingest.directory import import_directory
from cnpsfs.ingest.tree import ImportOptions
from cnpsfs.store import T_CHUNK, T_FILESET, Store

CHUNK = b"0123456789"


def store_tree(store: Store, entries: list[fmt.Entry], name: str = "example.org/hostile") -> str:
    """A FileSet whose root holds *entries* (and the 10-byte chunk CHUNK), tagged NAME@1."""
    with store.writer() as writer:
        writer.add(CHUNK, T_CHUNK)
        tree = writer.add_object(fmt.encode_directory(fmt.Directory(entries)))
        root = fmt.Entry(b"", fmt.Kind.DIR, 0o755, tree=tree)
        digest = writer.add_object(fmt.encode_fileset(fmt.FileSet(name, "1", root)))
        writer.commit([(name, "1", T_FILESET, digest)])
    return f"{name}@1"


def past_the_end() -> list[fmt.Entry]:
    """``short`` claims 100 bytes at offset 5 of a 10-byte chunk; ``fine`` reads it properly."""
    chunk = fmt.digest_bytes(CHUNK)
    return [
        fmt.Entry(b"short", fmt.Kind.FILE, 0o644, size=100, extents=(fmt.Extent(chunk, 5, 100),), hash=b"\x07" * 32),
        fmt.Entry(b"fine", fmt.Kind.FILE, 0o644, size=4, extents=(fmt.Extent(chunk, 2, 4),),
                  hash=fmt.digest_bytes(CHUNK[2:6])),
    ]


def test_extent_past_the_end_of_its_chunk_is_an_error_not_short_data(store: Store, cli: Cli, tmp_path: Path) -> None:
    ref = store_tree(store, past_the_end())
    store.close()
    assert cli.ok("cat", ref, "fine").stdout_bytes == b"2345"
    result = cli("cat", ref, "short")
    assert result.rc == 1 and result.stdout_bytes == b"", result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "past the end of chunk" in result.stderr and fmt.format_digest(fmt.digest_bytes(CHUNK)) in result.stderr
    export = cli("export", "tar", ref, "-")
    assert export.rc == 1 and "past the end of chunk" in export.stderr, export
    export = cli("export", "dir", ref, tmp_path / "out")
    assert export.rc == 1 and "past the end of chunk" in export.stderr, export


@pytest.mark.parametrize("fuse_mode", FUSE_MODES)
@pytest.mark.fuse
def test_mount_gives_eio_for_an_extent_past_the_end(store: Store, tmp_path: Path, fuse_mode: str) -> None:
    ref = store_tree(store, past_the_end())
    store.close()
    mnt = tmp_path / "mnt"
    with mount_image(store.path, ref, mnt, mode=fuse_mode, allow_log=["past the end of chunk"]) as m:
        assert (mnt / "fine").read_bytes() == b"2345"
        with pytest.raises(OSError) as info:
            (mnt / "short").read_bytes()
        assert info.value.errno == errno.EIO
        assert "past the end of chunk" in m.log()
        assert (mnt / "fine").read_bytes() == b"2345"  # the daemon still serves
        m.assert_alive()


def test_file_past_the_extents_limit_is_refused_naming_it(store: Store, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A file needing more extents than an extents object may hold is refused at import, by name.

    (A real one is ≥ 8 GiB of data; the limit is lowered for the test.)
    """
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big.bin").write_bytes(os.urandom(3 << 20))  # about 48 chunks
    monkeypatch.setattr(objects, "MAX_EXTENTS", 20)
    from cnpsfs.errors import ImportRejected

    with pytest.raises(ImportRejected, match=r"'big\.bin': \d+ extents exceed the limit of 20"):
        import_directory(store, str(tree), ImportOptions(name="example.org/big", version="1"))
    assert store.tags() == []
