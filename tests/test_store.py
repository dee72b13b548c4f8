"""The content store: on-disk layout, atomic commits, concurrent writers, gc, verify, dedup.

Crash and concurrency tests run the real CLI in subprocesses and kill them with SIGKILL;
the layout test parses packs and the index with nothing but the spec (docs/format.md,
"Store layout"), so it fails when the code and the document drift apart.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import struct
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import pytest
import zstandard
from cnpsfs_testlib import (
    Cli,
    Node,
    assert_same_tree,
    build_tree,
    digest_of,
    index_counts,
    lock_waiters,
    snapshot,
    wait_until,
)

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError, CorruptObjectError, NotFoundError
from cnpsfs.ingest.directory import import_directory
from cnpsfs.ingest.tree import ImportOptions
from cnpsfs.store import BLOCK_TARGET, META_BLOCK_TARGET, T_CHUNK, LocalStore, Store
from cnpsfs.store.maintenance import gc, verify

MiB = 1 << 20


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    return root


def rand(seed: str, n: int) -> bytes:
    return blake3.blake3(seed.encode()).digest(length=n)


def tmp_packs(store_path: Path) -> list[Path]:
    return sorted((store_path / "tmp").glob("*.pack"))


# --------------------------------------------------------------------------- layout, read with the spec only


def parse_pack(path: Path) -> Iterator[dict[str, object]]:
    """Every member of every block record of a pack file, as docs/format.md describes them."""
    data = path.read_bytes()
    assert data[:8] == b"CNPSPK01"
    pos = 8
    dctx = zstandard.ZstdDecompressor()
    while pos < len(data):
        magic, codec, stored, raw_len, count = struct.unpack_from("<4sBIII", data, pos)
        assert magic == b"BLK1", f"bad record magic at {pos}"
        header = pos
        pos += 17
        members = []
        for _ in range(count):
            members.append(struct.unpack_from("<32sBI", data, pos))
            pos += 37
        payload = data[pos : pos + stored]
        assert len(payload) == stored
        raw = dctx.decompress(payload, max_output_size=raw_len) if codec == 1 else payload
        assert codec in (0, 1) and len(raw) == raw_len
        inner = 0
        for digest, type_code, length in members:
            yield {"digest": digest, "type": type_code, "offset": pos, "stored": stored, "raw": raw_len,
                   "codec": codec, "inner": inner, "length": length, "header": header,
                   "data": raw[inner : inner + length]}
            inner += length
        assert inner == raw_len, "members fill the block exactly"
        pos += stored


def test_layout_matches_the_spec(tmp_path: Path, cli: Cli) -> None:
    files = {f"small/{i:03d}": rand(f"s{i}", 100 + i * 37) for i in range(200)}
    files["text"] = b"compressible line\n" * 50_000
    files["random"] = rand("random", 3 * MiB)
    cli.ok("import", "dir", write_files(tmp_path / "tree", files), "--name", "example.org/layout", "--version", "1")
    store = cli.store_path
    assert (store / "cnpsfs-store").read_text() == "cnpsfs store layout 2\n"
    assert {p.name for p in store.iterdir()} >= {"cnpsfs-store", "index.sqlite", "packs", "tmp", "run", "lock"}
    db = sqlite3.connect(store / "index.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    packs = dict(db.execute("SELECT name, id FROM packs").fetchall())
    rows = {r[0]: r[1:] for r in db.execute(
        "SELECT digest, type, pack, offset, stored, raw, codec, inner, length, header FROM objects")}
    seen = 0
    codecs = set()
    types = set()
    for pack_file in (store / "packs").iterdir():
        assert pack_file.suffix == ".pack" and len(pack_file.stem) == 32
        assert int(db.execute("SELECT size FROM packs WHERE name=?", (pack_file.stem,)).fetchone()[0]) == \
            pack_file.stat().st_size
        for m in parse_pack(pack_file):
            assert blake3.blake3(m["data"]).digest() == m["digest"]  # type: ignore[arg-type]
            assert rows[m["digest"]] == (m["type"], packs[pack_file.stem], m["offset"], m["stored"], m["raw"],
                                         m["codec"], m["inner"], m["length"], m["header"])
            if m["type"] != T_CHUNK:
                type_name = fmt.object_type(m["data"])  # type: ignore[arg-type]
                assert m["type"] == {"cnpsfs/dir": 1, "cnpsfs/extents": 2, "cnpsfs/fileset": 3}[type_name]
            codecs.add(m["codec"])
            types.add(m["type"])
            seen += 1
    assert seen == len(rows)
    assert codecs == {0, 1}, "random data is stored raw, text compressed"
    assert types == {0, 1, 2, 3}  # the 3 MiB file has more than 16 extents
    # Blocks close once they reach BLOCK_TARGET raw bytes: no block is much larger.
    assert max(r[4] for r in rows.values()) < BLOCK_TARGET + 256 * 1024
    # Objects sit in blocks of their own (no file data beside a directory), and small ones.
    blocks: dict[tuple[int, int], set[bool]] = {}
    for type_code, pack, offset, *_rest in rows.values():
        blocks.setdefault((pack, offset), set()).add(type_code == T_CHUNK)
    assert all(len(kinds) == 1 for kinds in blocks.values()), "a block mixes chunks and objects"
    assert max(r[4] for r in rows.values() if r[0] != T_CHUNK) < META_BLOCK_TARGET + 64 * 1024
    tag = db.execute("SELECT name, version, type, digest FROM tags").fetchall()
    assert len(tag) == 1 and tag[0][:3] == ("example.org/layout", "1", 3)
    assert rows[tag[0][3]][0] == 3


def test_layout_1_store_is_migrated_and_reads_the_same(tmp_path: Path, cli: Cli) -> None:
    """A store written before the header column (layout 1) is migrated on open; nothing else changes."""
    files = {f"f{i:03d}": rand(f"m{i}", 500 + i * 301) for i in range(120)}
    files["big"] = rand("big", 2 * MiB)
    tree = write_files(tmp_path / "tree", files)
    ref = cli.ok("import", "dir", tree, "--name", "example.org/migrate", "--version", "1").stdout.split()[-1]
    store = cli.store_path
    # Make it a layout 1 store as the previous release wrote it: no header column.
    db = sqlite3.connect(store / "index.sqlite")
    want = dict(db.execute("SELECT digest, header FROM objects").fetchall())
    db.execute("ALTER TABLE objects DROP COLUMN header")
    db.commit()
    db.close()
    (store / "cnpsfs-store").write_text("cnpsfs store layout 1\n")
    out = tmp_path / "out"
    cli.ok("export", "dir", ref, str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert (store / "cnpsfs-store").read_text() == "cnpsfs store layout 2\n"
    db = sqlite3.connect(store / "index.sqlite")
    assert dict(db.execute("SELECT digest, header FROM objects").fetchall()) == want
    assert "no problems" in cli.ok("verify").stderr


# --------------------------------------------------------------------------- atomic commit


def stalled_tar_import(cli: Cli, name: str, *, data: bytes, send: int) -> subprocess.Popen[bytes]:
    """Start ``import tar -`` and feed one large member only up to *send* bytes of its data."""
    proc = cli.popen("import", "tar", "-", "--name", name, "--version", "1", stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    info = tarfile.TarInfo("big.bin")
    info.size = len(data)
    assert proc.stdin is not None
    proc.stdin.write(info.tobuf(format=tarfile.PAX_FORMAT))
    proc.stdin.write(data[:send])
    proc.stdin.flush()
    return proc


def test_killed_import_leaves_nothing_visible(tmp_path: Path, cli: Cli) -> None:
    # The writer pipelines (cutting, hashing, compressing) about 16 MiB behind what it has read.
    data = rand("killed", 48 * MiB)
    proc = stalled_tar_import(cli, "example.org/killed", data=data, send=32 * MiB)
    try:
        # Half-way: the writer has sealed and written blocks into its private temporary pack.
        wait_until(lambda: any(p.stat().st_size > 2 * MiB for p in tmp_packs(cli.store_path)), what="a tmp pack")
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert index_counts(cli.store_path) == {"objects": 0, "packs": 0, "tags": 0}
    assert json.loads(cli.ok("tag", "list", "--json").stdout) == []
    assert list((cli.store_path / "packs").iterdir()) == []
    assert len(tmp_packs(cli.store_path)) == 1
    report = json.loads(cli.ok("gc", "--json").stdout)
    assert report["removed_tmp"] == 1
    assert list((cli.store_path / "tmp").iterdir()) == []
    cli.ok("verify")
    # The store works normally afterwards.
    ref = digest_of(cli.ok("import", "dir", write_files(tmp_path / "again", {"big.bin": data}),
                           "--name", "example.org/again"))
    assert cli.ok("cat", ref, "big.bin").stdout_bytes == data


#: Where the import is killed: its first temporary pack exists; a pack has data in it; a
#: pack was published (renamed into packs/), so the kill lands in or after the commit.
KILL_POINTS: dict[str, Callable[[Path], bool]] = {
    "first-pack": lambda store: bool(tmp_packs(store)),
    "mid-write": lambda store: any(p.stat().st_size > 8 * MiB for p in tmp_packs(store)),
    "publishing": lambda store: any(store.glob("packs/*.pack")),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_at_any_point_is_all_or_nothing(tmp_path: Path, cli: Cli, point: str) -> None:
    """SIGKILL a directory import at a point of its progress: either the import committed
    completely (tag, every object, verify clean) or nothing of it is visible."""
    tree = write_files(tmp_path / "tree", {f"d{i % 4}/f{i:02d}": rand(f"k{i}", MiB + i) for i in range(40)}
                       | {f"small/{i}": rand(f"ks{i}", 3000) for i in range(300)})
    proc = cli.popen("import", "dir", tree, "--name", "example.org/kill", "--version", "1",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reached = KILL_POINTS[point]
    try:
        wait_until(lambda: proc.poll() is not None or reached(cli.store_path), what=f"the import to reach {point}")
    finally:
        proc.kill()
        proc.wait()
    counts = index_counts(cli.store_path)
    if counts["tags"]:
        assert counts["objects"] > 0
        cli.ok("verify")
        assert cli.ok("cat", "example.org/kill", "d1/f05").stdout_bytes == rand("k5", MiB + 5)
    else:
        assert counts == {"objects": 0, "packs": 0, "tags": 0}
        # Killed between renaming its packs and the index transaction ("publishing"), an
        # import leaves packs no index row names: invisible, and gc's to remove (below).
        assert point == "publishing" or list((cli.store_path / "packs").iterdir()) == []
    cli.ok("gc")
    assert list((cli.store_path / "tmp").iterdir()) == []
    indexed = {name for (name,) in sqlite3.connect(cli.store_path / "index.sqlite").execute("SELECT name FROM packs")}
    assert {p.stem for p in (cli.store_path / "packs").iterdir()} == indexed
    cli.ok("verify")


def test_gc_removes_a_pack_left_between_rename_and_index_commit(tmp_path: Path, cli: Cli) -> None:
    """A writer killed after publishing its pack file but before its index transaction."""
    cli.ok("import", "dir", write_files(tmp_path / "t", {"a": b"kept"}), "--name", "example.org/a")
    orphan = cli.store_path / "packs" / ("ab" * 16 + ".pack")
    orphan.write_bytes(b"CNPSPK01")
    report = json.loads(cli.ok("gc", "--json").stdout)
    assert report["removed_tmp"] == 1
    assert not orphan.exists()
    assert cli.ok("cat", "example.org/a", "a").stdout_bytes == b"kept"


def test_writer_objects_are_invisible_until_commit(store: Store) -> None:
    data = b"not yet"
    digest = fmt.digest_bytes(data)
    with pytest.raises(RuntimeError), store.writer() as w:
        w.add(data, T_CHUNK)
        w.flush()
        assert not store.contains(digest)
        assert len(list(store.tmp_dir.iterdir())) == 1
        raise RuntimeError("abandon")
    assert not store.contains(digest)
    assert list(store.tmp_dir.iterdir()) == []
    with store.writer() as w:
        w.add(data, T_CHUNK)
        w.commit()
    assert store.get(digest) == data
    assert list(store.tmp_dir.iterdir()) == []


def test_gc_waits_for_a_running_import(tmp_path: Path, cli: Cli) -> None:
    data = rand("waiting", 40 * MiB)
    cli.ok("import", "dir", write_files(tmp_path / "seed", {"x": b"seed"}), "--name", "example.org/seed")
    proc = stalled_tar_import(cli, "example.org/slow", data=data, send=32 * MiB)
    wait_until(lambda: bool(tmp_packs(cli.store_path)), what="a tmp pack")
    gc_proc = cli.popen("gc", "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # gc blocks on the store lock the import holds shared (or exits, which is the failure).
    wait_until(lambda: gc_proc.poll() is not None or gc_proc.pid in lock_waiters(), what="gc to wait for the lock")
    assert gc_proc.poll() is None, "gc must wait while an import holds the store lock"
    assert tmp_packs(cli.store_path), "gc must not sweep a live writer's pack"
    assert proc.stdin is not None
    proc.stdin.write(data[32 * MiB :])
    proc.stdin.write(b"\0" * (512 - len(data) % 512 if len(data) % 512 else 0) + b"\0" * 1024)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    gc_out, gc_err = gc_proc.communicate(timeout=60)
    assert gc_proc.returncode == 0, gc_err
    assert json.loads(gc_out)["removed_objects"] == 0
    assert cli.ok("cat", "example.org/slow", "big.bin").stdout_bytes == data
    cli.ok("verify")


# --------------------------------------------------------------------------- concurrent writers


def test_concurrent_imports_of_overlapping_trees(tmp_path: Path, cli: Cli) -> None:
    shared = {f"lib/{i:03d}.so": rand(f"lib{i}", 2000 + 50 * i) for i in range(150)}
    shared |= {f"big/{i}": rand(f"big{i}", 2 * MiB + i) for i in range(3)}
    tree_a = write_files(tmp_path / "a", shared | {"only-a": rand("a", 3 * MiB), "etc/a.conf": b"a\n"})
    tree_b = write_files(tmp_path / "b", shared | {"only-b": rand("b", 3 * MiB), "etc/b.conf": b"b\n"})
    cli.ok("import", "dir", write_files(tmp_path / "c", {"c": b"c"}), "--name", "example.org/c")  # store exists
    procs = [cli.popen("import", "dir", tree, "--name", f"example.org/{tree.name}", "--version", "1",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE) for tree in (tree_a, tree_b)]
    for proc in procs:
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    tags = {t["name"] for t in json.loads(cli.ok("tag", "list", "--json").stdout)}
    assert tags == {"example.org/a", "example.org/b", "example.org/c"}
    assert cli("verify").rc == 0
    for tree in (tree_a, tree_b):
        cli.ok("export", "dir", f"example.org/{tree.name}", tmp_path / f"out-{tree.name}")
        assert_same_tree(snapshot(tree), snapshot(tmp_path / f"out-{tree.name}"))
    # Each chunk has one index row even if both writers stored a copy.
    db = sqlite3.connect(cli.store_path / "index.sqlite")
    assert db.execute("SELECT count(*) FROM objects").fetchone()[0] == \
        db.execute("SELECT count(DISTINCT digest) FROM objects").fetchone()[0]
    cli.ok("gc")
    cli.ok("verify")


def test_same_chunk_from_two_writers(store: Store) -> None:
    data = b"shared by two writers"
    with store.writer() as w1, store.writer() as w2:
        d1 = w1.add(data, T_CHUNK)
        d2 = w2.add(data, T_CHUNK)
        w1.commit()
        w2.commit()
    assert d1 == d2 and store.get(d1) == data
    assert sum(store.counts()[:2]) == 1


# --------------------------------------------------------------------------- gc


def test_gc_collects_unreachable_and_repacks(tmp_path: Path, cli: Cli) -> None:
    small = {f"lib/{i:03d}": rand(f"shared{i}", 5000) for i in range(120)}
    tree_a = write_files(tmp_path / "a", small | {"big-a": rand("big-a", 4 * MiB)})
    tree_b = write_files(tmp_path / "b", small | {"big-b": rand("big-b", 4 * MiB)})
    cli.ok("import", "dir", tree_a, "--name", "example.org/a", "--version", "1")
    pack_a = {p.name for p in (cli.store_path / "packs").iterdir()}
    ref_b = digest_of(cli.ok("import", "dir", tree_b, "--name", "example.org/b", "--version", "1"))
    ref_a = cli.ok("tag", "list", "--json")
    a_digest = next(t["digest"] for t in json.loads(ref_a.stdout) if t["name"] == "example.org/a")

    dry = json.loads(cli.ok("gc", "--dry-run", "--json").stdout)
    assert dry["removed_objects"] == 0 and dry["repacked"] == 0

    cli.ok("tag", "rm", "example.org/a@1")
    before = index_counts(cli.store_path)
    report = json.loads(cli.ok("gc", "--json").stdout)
    after = index_counts(cli.store_path)
    # A's big file chunks, its root directory and its FileSet went; the shared small files stayed.
    assert report["removed_objects"] >= 4 * MiB // (256 * 1024) + 2
    assert after["objects"] == before["objects"] - report["removed_objects"]
    # A's pack held 4 MiB of garbage and a few hundred KiB of live small-file chunks: repacked.
    assert report["repacked"] == 1
    assert not pack_a & {p.name for p in (cli.store_path / "packs").iterdir()}
    assert report["bytes_after"] < report["bytes_before"] - 3 * MiB
    assert cli("ls", a_digest).rc != 0
    cli.ok("verify")
    cli.ok("export", "dir", ref_b, tmp_path / "out-b")
    assert_same_tree(snapshot(tree_b), snapshot(tmp_path / "out-b"))
    # A second gc finds nothing to do.
    again = json.loads(cli.ok("gc", "--json").stdout)
    assert (again["removed_objects"], again["removed_packs"], again["repacked"]) == (0, 0, 0)


def test_gc_keeps_what_live_mounts_registered(tmp_path: Path, store: Store) -> None:
    from cnpsfs.store.maintenance import register_roots, unregister_roots

    tree = write_files(tmp_path / "t", {"f": rand("live", 400_000)})
    result = import_directory(store, str(tree), ImportOptions(name="example.org/live", version="1"))
    store.remove_tag("example.org/live", "1")
    register_roots(store, [result.digest])
    try:
        assert gc(store).removed_objects == 0
        assert store.get_fileset(result.digest).name == "example.org/live"
    finally:
        unregister_roots(store)
    # A roots file of a dead process does not count.
    (store.run_dir / "999999999.roots").write_text(fmt.format_digest(result.digest) + "\n")
    assert gc(store).removed_objects > 0
    assert not (store.run_dir / "999999999.roots").exists()
    assert not store.contains(result.digest)


# --------------------------------------------------------------------------- verify


def _chunk_rows(store_path: Path, codec: int) -> list[tuple[bytes, str, int, int]]:
    db = sqlite3.connect(store_path / "index.sqlite")
    return db.execute("SELECT o.digest, p.name, o.offset, o.inner FROM objects o JOIN packs p ON p.id = o.pack "
                      "WHERE o.type = 0 AND o.codec = ? ORDER BY o.offset", (codec,)).fetchall()


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_verify_names_a_corrupt_chunk_in_a_raw_block(tmp_path: Path, cli: Cli) -> None:
    ref = digest_of(cli.ok("import", "dir", write_files(tmp_path / "t", {"r": rand("raw", 2 * MiB)}),
                           "--name", "example.org/v"))
    cli.ok("verify")
    digest, pack, offset, inner = _chunk_rows(cli.store_path, 0)[1]
    _flip(cli.store_path / "packs" / f"{pack}.pack", offset + inner + 100)
    result = cli("verify")
    assert result.rc == 1
    assert f"chunk {fmt.format_digest(digest)} is corrupt" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1, "only the damaged chunk is reported"
    assert "1 problem" in result.stderr
    # Readers refuse the bad bytes rather than serve them.
    cat = cli("cat", ref, "r")
    assert cat.rc == 1 and "corrupt" in cat.stderr and "Traceback" not in cat.stderr
    as_json = json.loads(cli("verify", "--json").stdout)
    assert as_json["problems"] and as_json["checked"] > 1


def test_verify_names_the_chunks_of_a_damaged_zstd_block(tmp_path: Path, cli: Cli) -> None:
    text = b"".join(b"line %d of a compressible file\n" % i for i in range(60_000))
    cli.ok("import", "dir", write_files(tmp_path / "t", {"log": text}), "--name", "example.org/z")
    rows = _chunk_rows(cli.store_path, 1)
    assert rows
    _digest, pack, offset, _inner = rows[0]
    members = [r[0] for r in rows if r[2] == offset]
    db = sqlite3.connect(cli.store_path / "index.sqlite")
    stored = db.execute("SELECT stored FROM objects WHERE digest=?", (members[0],)).fetchone()[0]
    _flip(cli.store_path / "packs" / f"{pack}.pack", offset + stored // 2)
    result = cli("verify")
    assert result.rc == 1
    named = [m for m in members if fmt.format_digest(m) in result.stdout]
    assert named, result.stdout


def test_verify_reports_missing_index_rows(tmp_path: Path, cli: Cli) -> None:
    ref = digest_of(cli.ok("import", "dir", write_files(tmp_path / "t", {"sub/f": rand("m", 600_000)}),
                           "--name", "example.org/m"))
    db = sqlite3.connect(cli.store_path / "index.sqlite")
    chunk = db.execute("SELECT digest FROM objects WHERE type=0 LIMIT 1").fetchone()[0]
    subdir = db.execute("SELECT digest FROM objects WHERE type=1").fetchall()
    with db:
        db.execute("DELETE FROM objects WHERE digest=?", (chunk,))
    result = cli("verify")
    assert result.rc == 1
    assert f"missing chunk {fmt.format_digest(chunk)} (named by blake3:" in result.stdout
    # A missing directory object: everything below it is unreachable and it is named.
    fs = LocalStore(cli.store_path).get_fileset(fmt.parse_digest(ref))
    sub = next(d for (d,) in subdir if d != fs.root.tree)
    with db:
        db.execute("DELETE FROM objects WHERE digest=?", (sub,))
    result = cli("verify", ref)
    assert result.rc == 1
    assert f"missing object {fmt.format_digest(sub)} (named by {fmt.format_digest(fs.root.tree)})" \
        in result.stdout  # type: ignore[arg-type]


def test_get_refuses_corrupt_bytes(tmp_path: Path, store: Store) -> None:
    tree = write_files(tmp_path / "t", {"f": rand("get", 300_000)})
    result = import_directory(store, str(tree), ImportOptions(name="example.org/g", version="1"))
    fs = store.get_fileset(result.digest)
    entry = store.get_directory(fs.root.tree).entries[0]  # type: ignore[arg-type]
    first = store.file_extents(entry)[0].digest
    assert first is not None
    loc = store.locate(first)
    assert loc is not None and loc.codec == 0
    _flip(store.packs_dir / f"{store.pack_files()[loc.pack]}.pack", loc.offset + loc.inner)
    store.blocks.drop((loc.pack, loc.offset))
    with pytest.raises(CorruptObjectError, match=fmt.format_digest(first)):
        store.get(first)
    report = verify(store, None)
    assert len(report.problems) == 1 and fmt.format_digest(first) in report.problems[0]


# --------------------------------------------------------------------------- dedup and df


def test_importing_the_same_tree_twice_stores_nothing_new(tmp_path: Path, cli: Cli) -> None:
    tree = write_files(tmp_path / "t", {"big": rand("dd", 4 * MiB), **{f"s/{i}": rand(f"dd{i}", 999) for i in
                                                                        range(50)}})
    first = json.loads(cli.ok("import", "dir", tree, "--name", "example.org/d", "--version", "1", "--json").stdout)
    counts = index_counts(cli.store_path)
    packs = sorted(p.name for p in (cli.store_path / "packs").iterdir())
    again = json.loads(cli.ok("import", "dir", tree, "--name", "example.org/d", "--version", "1", "--json").stdout)
    assert again["digest"] == first["digest"]
    assert again["new_bytes"] == 0
    assert index_counts(cli.store_path) == counts
    assert sorted(p.name for p in (cli.store_path / "packs").iterdir()) == packs
    # Another version of the same tree adds its FileSet object and nothing else.
    v2 = json.loads(cli.ok("import", "dir", tree, "--name", "example.org/d", "--version", "2", "--json").stdout)
    assert v2["digest"] != first["digest"]
    assert 0 < v2["new_bytes"] < 1000
    assert index_counts(cli.store_path)["objects"] == counts["objects"] + 1
    df = json.loads(cli.ok("df", "--json").stdout)
    assert df["filesets"] == 2
    assert df["logical_bytes"] == 2 * (4 * MiB + 50 * 999)
    assert 1.6 < df["dedup_ratio"] <= 2.0
    assert df["dedup_ratio"] == pytest.approx(df["logical_bytes"] / df["stored_bytes"], abs=0.001)
    text = cli.ok("df").stdout
    assert "dedup ratio" in text and "filesets     2" in text


def test_identical_files_share_chunks_across_filesets(tmp_path: Path, cli: Cli) -> None:
    big = rand("shared-big", 3 * MiB)
    cli.ok("import", "dir", write_files(tmp_path / "a", {"x/one": big}), "--name", "example.org/a")
    r = json.loads(cli.ok("import", "dir", write_files(tmp_path / "b", {"elsewhere/two": big, "n": b"new"}),
                          "--name", "example.org/b", "--json").stdout)
    assert r["new_bytes"] < 4096, "a large file is cut on its own, so its chunks are shared"


# --------------------------------------------------------------------------- opening stores


def test_store_open_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no cnpsfs store"):
        LocalStore(tmp_path / "absent")
    assert not (tmp_path / "absent").exists()
    s = LocalStore(tmp_path / "s", create=True)
    s.close()
    (tmp_path / "s" / "cnpsfs-store").write_text("cnpsfs store layout 99\n")
    with pytest.raises(CnpsfsError, match="unsupported store layout"):
        LocalStore(tmp_path / "s")
    (tmp_path / "file").write_text("")
    with pytest.raises(CnpsfsError, match="cannot create store"):
        LocalStore(tmp_path / "file" / "s", create=True)


@pytest.mark.parametrize("kind", ["file", "fifo"])
def test_hard_links_to_special_files_dedup_in_store(tmp_path: Path, store: Store, kind: str) -> None:
    nodes = [Node(b"a/x", kind, 0o640, data=b"linked" if kind == "file" else b""),
             Node(b"b/y", "hardlink", target=b"a/x")]
    tree = build_tree(tmp_path / "t", nodes, root_mtime_ns=0)
    result = import_directory(store, str(tree), ImportOptions(name="example.org/h", version="1"))
    root = store.get_fileset(result.digest).root
    from cnpsfs.image.walk import lookup

    assert lookup(store, root, "a/x").link == (b"a/x", 2)
    assert lookup(store, root, "b/y").link == (b"a/x", 2)


# --------------------------------------------------------------------------- partial block decoding


def _one_block(store: Store, count: int = 24, size: int = 40_000) -> tuple[list[bytes], list[bytes]]:
    """*count* compressible chunks written into one block; (digests, contents) in block order."""
    contents = [(rand(f"member {i}", 200) * (size // 200 + 1))[:size] for i in range(count)]
    with store.writer() as w:
        digests = [w.add(data, T_CHUNK) for data in contents]
        w.commit()
    locs = [store.locate(d) for d in digests]
    assert len({(loc.pack, loc.offset) for loc in locs if loc}) == 1
    return digests, contents


def test_block_stream_decodes_only_as_far_as_asked_and_continues(store: Store) -> None:
    digests, contents = _one_block(store)
    expected = dict(zip(digests, contents, strict=True))
    loc = store.locate(digests[2])
    assert loc is not None
    stream = store.open_block(loc)
    first = stream.advance(loc.inner + loc.length)
    # Through the wanted member plus the slack, and no further: not the whole block.
    assert digests[2] in first and stream.decoded < loc.raw
    assert list(first) == digests[: len(first)]
    rest = stream.advance(loc.raw)
    assert stream.done
    assert list(first) + list(rest) == digests  # every member exactly once, in order
    assert {**first, **rest} == expected  # verified bytes, never anything else


def test_a_continued_block_stream_decodes_to_the_end(store: Store) -> None:
    """A second miss in a block means a front-to-back reader: one more load, not one per file."""
    digests, contents = _one_block(store)
    first_loc = store.locate(digests[0])
    assert first_loc is not None
    stream = store.open_block(first_loc)
    first = stream.advance(first_loc.inner + first_loc.length)
    assert not stream.done
    following = store.locate(digests[len(first)])
    assert following is not None
    rest = stream.advance(following.inner + following.length)
    assert stream.done and {**first, **rest} == dict(zip(digests, contents, strict=True))


def test_prefetch_asks_the_kernel_to_read_the_records_ahead(store: LocalStore,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-ahead's blocks are advised (POSIX_FADV_WILLNEED), neighbours in one range."""
    digests = []
    for n in range(3):  # three blocks, written one after the other into one pack
        digests += _one_block(store, count=4, size=300_000 + n)[0]
    locs = list({loc.block: loc for loc in store.locate_many(digests).values()}.values())
    assert len(locs) == 3
    store.open_block(locs[0])  # the pack is open now, as it is once a mount has read it
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append((off, n, advice)))
    store.prefetch(locs)
    first = min(loc.header or 0 for loc in locs)
    last = max(loc.offset + loc.stored for loc in locs)
    assert calls == [(first, last - first, os.POSIX_FADV_WILLNEED)]


def test_block_stream_never_hands_out_wrong_bytes(tmp_path: Path, store: Store) -> None:
    digests, _contents = _one_block(store)
    loc = store.locate(digests[0])
    assert loc is not None
    (pack,) = store.packs_dir.glob("*.pack")
    _flip(pack, loc.offset + loc.stored // 2)  # inside the compressed payload
    handed: dict[bytes, bytes | None] = {}
    failed = None
    stream = store.open_block(loc)
    try:
        for member in digests:
            member_loc = store.locate(member)
            assert member_loc is not None
            handed.update(stream.advance(member_loc.inner + member_loc.length))
    except CorruptObjectError as exc:
        failed = str(exc)
    # zstd frames here carry no checksum: damage shows either as a decode error or as
    # members that fail their BLAKE3 check, and no member is ever handed out wrong.
    assert failed is not None or None in handed.values()
    assert failed is None or "does not decompress" in failed
    for digest, data in handed.items():
        assert data is None or fmt.digest_bytes(data) == digest


def test_block_stream_decodes_a_mostly_wanted_block_whole(tmp_path: Path, store: Store) -> None:
    """A first advance past half the block decodes it in one call; damage is still caught."""
    digests, contents = _one_block(store)
    last = store.locate(digests[-1])
    assert last is not None
    stream = store.open_block(last)
    got = stream.advance(last.raw // 2 + 1)
    assert stream.done and got == dict(zip(digests, contents, strict=True))
    (pack,) = store.packs_dir.glob("*.pack")
    _flip(pack, last.offset + last.stored // 2)
    stream = store.open_block(last)
    try:
        handed = stream.advance(last.raw)
    except CorruptObjectError as exc:
        assert "does not decompress" in str(exc) or "wrong size" in str(exc)
    else:
        assert None in handed.values()
        assert all(data is None or fmt.digest_bytes(data) == d for d, data in handed.items())


def test_live_roots_forget_a_zombie_daemon(tmp_path: Path) -> None:
    """A killed daemon nobody reaped is a zombie: its gc roots must not keep anything alive."""
    from cnpsfs.store.maintenance import live_roots

    store = LocalStore(tmp_path / "s", create=True)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        wait_until(lambda: Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z",
                   timeout=10, what="the child to become a zombie")
        store.run_dir.mkdir(exist_ok=True)
        roots = store.run_dir / f"{pid}.roots"
        roots.write_text(fmt.format_digest(b"\x07" * 32) + "\n")
        assert live_roots(store) == set()
        assert not roots.exists(), "the zombie's roots file was kept"
    finally:
        os.waitpid(pid, 0)
