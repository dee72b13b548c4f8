"""Issue 15 bug 14: what docs/format.md now states, checked against the code.

An independent reader implemented the format from the document alone and asked about six
points it did not settle. Each is stated now; each test here pins the statement to what
the reference implementation does, so the two cannot drift apart silently.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
from pathlib import Path

import cbor2
import pytest
import zstandard
from cnpsfs_testlib import IS_ROOT, Cli, digest_of

from cnpsfs import format as fmt
from cnpsfs.store import LocalStore, Store

D = b"\x01" * 32


def test_whiteouts_decode_with_zero_mode_owner_and_mtime() -> None:
    """§1.4: a whiteout is keys 0 and 1; anything else in it is ignored, not decoded."""
    raw = {0: fmt.TYPE_DIR, 1: 1, 2: [{0: b"gone", 1: 8, 2: 0o644, 3: 1000, 4: 1000, 5: 77, 6: {b"user.x": b"1"}}]}
    entry = fmt.decode_directory(cbor2.dumps(raw, canonical=True)).entries[0]
    assert (entry.kind, entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.xattrs) == (
        fmt.Kind.WHITEOUT, 0, 0, 0, 0, {})
    assert fmt.entry_to_cbor(entry) == {0: b"gone", 1: 8}


def test_unknown_keys_are_ignored_everywhere() -> None:
    """§1.2: keys the document does not list, in objects, entries and layers, are read as absent."""
    entry = {0: b"f", 1: 1, 2: 0o644, 7: 1, 8: [[D, 0, 1]], 14: D, 15: "future", 99: [1, 2]}
    data = cbor2.dumps({0: fmt.TYPE_DIR, 1: 1, 2: [entry], 9: {"later": True}}, canonical=True)
    decoded = fmt.decode_directory(data)
    plain = {k: v for k, v in entry.items() if k < 15}
    assert fmt.encode_directory(decoded) == cbor2.dumps({0: fmt.TYPE_DIR, 1: 1, 2: [plain]}, canonical=True)
    image = cbor2.dumps({0: fmt.TYPE_IMAGE, 1: 1, 2: "n", 3: "v", 4: "layers", 5: [{0: D, 7: "x"}], 20: 1},
                        canonical=True)
    assert fmt.decode_image(image).layers == [fmt.Layer(D)]


def test_reference_split_and_created_ns_ties(tmp_path: Path, cli: Cli) -> None:
    """§2.5: split at the first @; NAME@ is NAME; equal created_ns: the greatest version wins."""
    digests = {}
    for version in ("1", "2", "10"):
        tree = tmp_path / version
        tree.mkdir()
        (tree / "v").write_text(version)
        digests[version] = digest_of(cli.ok("import", "dir", tree, "--name", "example.org/t", "--version", version))
    store = LocalStore(cli.store_path)
    try:
        assert fmt.format_digest(store.resolve("example.org/t")) == digests["10"]  # most recent, not highest
        assert store.resolve("example.org/t@") == store.resolve("example.org/t")
    finally:
        store.close()
    with sqlite3.connect(cli.store_path / "index.sqlite") as db:
        db.execute("UPDATE tags SET created_ns = 5 WHERE name = 'example.org/t'")
    store = LocalStore(cli.store_path)
    try:
        assert fmt.format_digest(store.resolve("example.org/t")) == digests["2"]  # "2" > "10" bytewise
    finally:
        store.close()


def test_zstd_payloads_record_their_size_and_no_checksum(store: Store) -> None:
    """§2.5: one frame, content size = raw length, no checksum; it decodes to exactly raw bytes."""
    with store.writer() as writer:
        digest = writer.add(b"compressible " * 10_000, 0)
        writer.commit()
    loc = store.locate(digest)
    assert loc is not None and loc.codec == 1
    payload = store.read_block(loc)
    params = zstandard.get_frame_parameters(payload)
    assert (params.content_size, params.has_checksum, params.dict_id) == (loc.raw, False, 0)
    assert zstandard.frame_content_size(payload) == loc.raw
    dctx = zstandard.ZstdDecompressor().decompressobj()
    assert len(dctx.decompress(payload)) == loc.raw and dctx.unused_data == b""


@pytest.mark.skipif(not IS_ROOT, reason="a read-only bind mount needs root")
def test_index_opens_read_only_on_read_only_media(tmp_path: Path, cli: Cli) -> None:
    """§2.5: immutable=1 reads a store on read-only media and creates nothing in it."""
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "f").write_text("f")
    cli.ok("import", "dir", tree, "--name", "example.org/ro", "--version", "1")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", cli.store_path, ro], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", ro], check=True)
        before = sorted(os.listdir(ro))
        db = sqlite3.connect(f"file:{ro}/index.sqlite?immutable=1", uri=True)
        try:
            assert db.execute("SELECT name, version FROM tags").fetchall() == [("example.org/ro", "1")]
        finally:
            db.close()
        assert sorted(os.listdir(ro)) == before
        with pytest.raises(OSError):
            (ro / "probe").write_text("x")  # really read-only
    finally:
        subprocess.run(["umount", ro], check=True)
    db = sqlite3.connect(f"file:{cli.store_path}/index.sqlite?mode=ro", uri=True)
    try:
        assert db.execute("SELECT count(*) FROM tags").fetchone() == (1,)
        with pytest.raises(sqlite3.OperationalError):
            db.execute("DELETE FROM tags")
    finally:
        db.close()


#: security.capability v2 (VFS_CAP_REVISION_2, effective) granting cap_net_raw.
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")


@pytest.mark.skipif(not IS_ROOT or shutil.which("getcap") is None,
                    reason="owners and security.capability need root (and getcap to read them back)")
def test_extraction_order_keeps_setuid_and_capabilities(tmp_path: Path, cli: Cli) -> None:
    """§1.12: chown before setxattr and chmod, or the kernel drops setuid and the capability."""
    tree = tmp_path / "t"
    tree.mkdir()
    ping = tree / "ping"
    ping.write_bytes(b"\x7fELF")
    os.chown(ping, 1000, 1000)
    os.setxattr(ping, "security.capability", CAP_NET_RAW)
    os.chmod(ping, 0o4755)
    ref = digest_of(cli.ok("import", "dir", tree, "--name", "example.org/caps", "--version", "1"))
    out = tmp_path / "out"
    cli.ok("export", "dir", ref, out)
    st = os.lstat(out / "ping")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4755, 1000, 1000)
    assert os.getxattr(out / "ping", "security.capability") == CAP_NET_RAW
    assert "cap_net_raw" in subprocess.run(["getcap", out / "ping"], capture_output=True, text=True).stdout
