"""A damaged store: garbage in the SQLite index, packs truncated, replaced or failing to
read under a live mount (issue 15, bugs 1 and 2, and the read side of the fault injection).

Each damage must stay where it is: EIO for the reads that need it, one log line naming the
store file, the daemon serving everything else; ``verify`` names it with a per-pack
summary and says how to repair; ``cnpsfs store repair`` rebuilds the index from the packs
and the tags journal, keeping what verifies and naming what is lost.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cnpsfs_testlib import Cli, Node, build_tree, digest_of
from faultutil import damage_pages, leaf_pages, leftovers, needs_strace, require_strace
from mountutil import FUSE, cat, mount_image, write_manifest

from cnpsfs.store import LocalStore

pytestmark = FUSE

MTIME = 1_600_000_000_000_000_000
IMAGE = "example.org/damage-image@1"
#: Directory objects enough for the objects table to span ~80 leaf pages, so that the
#: page of one chunk's row can be damaged without touching the rows a mount needs.
DIRS = 5000
DAMAGED_INDEX = r"ERROR: .*the store index .*index\.sqlite is damaged \(database disk image is malformed\)"


@dataclass
class DamagedStore:
    path: Path
    victim_chunk: bytes
    healthy: bytes
    pages: list[int]
    lost_dirs: list[str]  # subdirectories whose rows are on a damaged page
    kept_dirs: list[str]


def _victim_tree(root: Path, attempt: int) -> Path:
    nodes = [Node(f"d{i:05d}/l".encode(), "symlink", target=str(i).encode(), mtime_ns=MTIME) for i in range(DIRS)]
    nodes += [Node(f"d{i:05d}".encode(), "dir", mtime_ns=MTIME) for i in range(DIRS)]
    # One small file: the FileSet's whole small-file stream, so its only data chunk.
    nodes.append(Node(b"victim.txt", "file", data=b"victim %d\n" % attempt * 400, mtime_ns=MTIME))
    return build_tree(root, nodes, root_mtime_ns=MTIME)


def _digests(store_path: Path) -> tuple[bytes, set[bytes], dict[str, bytes], bytes]:
    """(victim chunk, digests a mount and the healthy file need, victim subdir objects, healthy chunk)."""
    store = LocalStore(store_path)
    try:
        image = store.get_image(store.resolve(IMAGE))
        spare = {store.resolve(IMAGE)}
        victim = healthy = b""
        subdirs: dict[str, bytes] = {}
        for layer in image.layers:
            fs = store.get_fileset(layer.fileset)
            spare |= {layer.fileset, fs.root.tree}
            for entry in store.get_directory(fs.root.tree).entries:
                if entry.name == b"victim.txt":
                    (ext,) = store.file_extents(entry)
                    victim = ext.digest or b""
                elif entry.name == b"healthy.txt":
                    (ext,) = store.file_extents(entry)
                    healthy = ext.digest or b""
                    spare.add(healthy)
                elif entry.tree is not None:
                    subdirs[entry.name.decode()] = entry.tree
        assert victim and healthy
        return victim, spare, subdirs, healthy
    finally:
        store.close()


def make_damaged_store(tmp_path: Path) -> DamagedStore:
    """A store with an image whose victim chunk's index page is garbage, and nothing else the mount needs."""
    healthy = build_tree(tmp_path / "healthy", [Node(b"healthy.txt", "file", data=b"healthy\n" * 300,
                                                     mtime_ns=MTIME)], root_mtime_ns=MTIME)
    for attempt in range(6):
        store = tmp_path / f"store{attempt}"
        cli = Cli(store)
        cli.ok("import", "dir", _victim_tree(tmp_path / f"victim{attempt}", attempt), "--name", "example.org/victim",
               "--version", "1")
        cli.ok("import", "dir", healthy, "--name", "example.org/healthy", "--version", "1")
        write_manifest(tmp_path / "image.toml", "example.org/damage-image", ["example.org/victim@1",
                                                                             "example.org/healthy@1"])
        cli.ok("image", "create", tmp_path / "image.toml")
        victim, spare, subdirs, healthy_chunk = _digests(store)
        page_size, leaves = leaf_pages(store / "index.sqlite", "objects")
        data = (store / "index.sqlite").read_bytes()
        on_page = [p for p in leaves if victim in data[(p - 1) * page_size : p * page_size]]
        page = data[(on_page[0] - 1) * page_size : on_page[0] * page_size]
        if any(d in page for d in spare):
            continue  # the victim's row shares its page with one the mount needs: other data
        pages = damage_pages(store / "index.sqlite", "objects", [victim], spare)
        lost = sorted(name for name, d in subdirs.items() if d in page)
        kept = sorted(name for name, d in subdirs.items() if d not in page)
        assert lost and kept
        return DamagedStore(store, victim, healthy_chunk, pages, lost, kept)
    pytest.fail("no attempt put the victim chunk's index row on a page of its own")


def _errno_of(func: object, *args: object) -> int:
    try:
        func(*args)  # type: ignore[operator]
    except OSError as exc:
        return exc.errno or -1
    return 0


def test_damaged_index_gives_eio_for_the_request_and_the_mount_goes_on(tmp_path: Path) -> None:
    """Bug 1: garbage in the objects table killed the daemon on the first read (ENOTCONN for all)."""
    damaged = make_damaged_store(tmp_path)
    with mount_image(damaged.path, IMAGE, tmp_path / "mnt", allow_log=[DAMAGED_INDEX]) as m:
        assert cat(m / "healthy.txt") == b"healthy\n" * 300
        assert _errno_of(cat, m / "victim.txt") == errno.EIO
        assert _errno_of(cat, m / "victim.txt") == errno.EIO, "still EIO, and still no crash"
        m.assert_alive()
        # Everything else is served (directories whose rows are on the damaged page too, when
        # their metadata block is known from a neighbour's read: no index lookup then).
        for name in damaged.kept_dirs[:50] + damaged.lost_dirs[:5]:
            assert os.readlink(m / name / "l") == str(int(name[1:]))
        assert cat(m / "healthy.txt") == b"healthy\n" * 300
        m.assert_alive()
        errors = [line for line in m.log().splitlines() if "ERROR" in line]
        assert errors and all(str(damaged.path / "index.sqlite") in line for line in errors), errors
        victim_lines = [line for line in errors if "victim.txt" in line]
        assert len(victim_lines) == 1, f"one line for the file, however often it was read: {victim_lines}"
        assert "cnpsfs store repair" in victim_lines[0]


def test_verify_reports_a_damaged_index_and_repair_rebuilds_it(tmp_path: Path) -> None:
    """Bug 2: verify passed a damaged index; repair rebuilds it, tags included, and the mount works."""
    damaged = make_damaged_store(tmp_path)
    cli = Cli(damaged.path)
    result = cli("verify")
    assert result.rc == 1, result
    assert "integrity check" in result.stdout and "index.sqlite" in result.stdout, result
    assert "cnpsfs store repair" in result.stderr and "internal error" not in result.stderr, result
    before = (damaged.path / "index.sqlite").read_bytes()
    dry = cli("store", "repair", "--dry-run", "--json")
    assert dry.rc == 0, dry
    assert json.loads(dry.stdout)["lost"] == []
    assert (damaged.path / "index.sqlite").read_bytes() == before, "a dry run changes nothing"
    repaired = cli("store", "repair", "--json")
    assert repaired.rc == 0, repaired
    report = json.loads(repaired.stdout)
    assert report["lost"] == [] and report["lost_members"] == 0 and report["incomplete"] == []
    assert report["tag_source"] == "tags.log"
    assert sorted(report["tags_restored"]) == ["example.org/damage-image@1", "example.org/healthy@1",
                                               "example.org/victim@1"]
    assert report["backup"] and Path(report["backup"]).exists(), "the damaged index is kept"
    cli.ok("verify")
    assert leftovers(damaged.path) == []
    with mount_image(damaged.path, IMAGE, tmp_path / "mnt") as m:
        assert cat(m / "victim.txt") == b"victim %d\n" % int(damaged.path.name[-1]) * 400
        assert os.readlink(m / damaged.lost_dirs[0] / "l") == str(int(damaged.lost_dirs[0][1:]))


def _tags(store: Path) -> dict[str, str]:
    return {f"{t['name']}@{t['version']}": t["digest"] for t in json.loads(Cli(store).ok("tag", "list", "--json")
                                                                             .stdout)}


def test_damaged_packs_table_fails_verify_and_imports_leave_nothing(tmp_path: Path, cli: Cli) -> None:
    """Bug 2 as found: garbage on the packs table's page; verify passed, the next import failed
    and left an orphan pack."""
    tree = build_tree(tmp_path / "t", [Node(b"f", "file", data=os.urandom(300_000), mtime_ns=MTIME)])
    cli.ok("import", "dir", tree, "--name", "example.org/p", "--version", "1")
    tags = _tags(cli.store_path)
    index = cli.store_path / "index.sqlite"
    pages = damage_pages(index, "packs", [b"\x00"]) or leaf_pages(index, "packs")[1]
    assert pages
    result = cli("verify")
    assert result.rc == 1 and "integrity check" in result.stdout, result
    packs_before = sorted(p.name for p in (cli.store_path / "packs").iterdir())
    other = build_tree(tmp_path / "u", [Node(b"g", "file", data=os.urandom(300_000), mtime_ns=MTIME)])
    failed = cli("import", "dir", other, "--name", "example.org/q", "--version", "1")
    assert failed.rc == 1, failed
    assert "index.sqlite" in failed.stderr and "repair" in failed.stderr and "internal error" not in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert sorted(p.name for p in (cli.store_path / "packs").iterdir()) == packs_before, "no orphan pack"
    assert list((cli.store_path / "tmp").iterdir()) == []
    cli.ok("store", "repair")
    cli.ok("verify")
    assert _tags(cli.store_path) == tags
    cli.ok("import", "dir", other, "--name", "example.org/q", "--version", "1")
    cli.ok("verify")


def test_verify_summarises_a_missing_pack_and_an_unindexed_one(tmp_path: Path, cli: Cli) -> None:
    """One line per pack, not one per object; repair names the tags whose content went with it."""
    files = {f"f{i}": os.urandom(200_000) for i in range(20)}
    tree = build_tree(tmp_path / "a", [Node(n.encode(), "file", data=d, mtime_ns=MTIME) for n, d in files.items()])
    ref_a = digest_of(cli.ok("import", "dir", tree, "--name", "example.org/a", "--version", "1"))
    packs_a = set((cli.store_path / "packs").iterdir())
    tree_b = build_tree(tmp_path / "b", [Node(b"g", "file", data=os.urandom(50_000), mtime_ns=MTIME)])
    cli.ok("import", "dir", tree_b, "--name", "example.org/b", "--version", "1")
    (pack_a,) = packs_a
    # A pack gone, and a stray one nobody indexed.
    moved = tmp_path / pack_a.name
    shutil.move(pack_a, moved)
    stray = cli.store_path / "packs" / ("ab" * 16 + ".pack")
    shutil.copy(moved, stray)
    result = cli("verify")
    assert result.rc == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"pack {pack_a.name} is missing:" in lines[0] and "chunks" in lines[0] and "lost" in lines[0], lines
    # The stray pack is what a killed writer leaves: a note, for gc (or repair) to deal with.
    assert f"note: pack {stray.name}" in result.stderr and "not in the index" in result.stderr
    assert "cnpsfs store repair" in result.stderr
    stray.unlink()
    repaired = cli("store", "repair", "--json")
    assert repaired.rc == 1, "something was lost: exit 1"
    report = json.loads(repaired.stdout)
    assert any(line.startswith("example.org/a@1: its fileset") and "is in no pack" in line
               for line in report["tags_dropped"]), report
    assert "example.org/b@1" in report["tags_restored"]
    cli.ok("verify")
    assert cli("ls", ref_a).rc == 1
    # The pack comes back: a second repair finds everything again, tags included (tags.log).
    shutil.move(moved, pack_a)
    assert cli("store", "repair").rc == 0
    assert set(_tags(cli.store_path)) == {"example.org/a@1", "example.org/b@1"}
    cli.ok("verify")


def test_repair_skips_damaged_records_and_names_incomplete_tags(tmp_path: Path, cli: Cli) -> None:
    """A record header overwritten mid-pack: the scan resynchronises at the next record,
    keeps every member that verifies, and names the tag whose file lost a chunk."""
    data = os.urandom(3 << 20)
    tree = build_tree(tmp_path / "t", [Node(b"big", "file", data=data, mtime_ns=MTIME),
                                       Node(b"small", "file", data=b"small\n", mtime_ns=MTIME)])
    ref = digest_of(cli.ok("import", "dir", tree, "--name", "example.org/r", "--version", "1"))
    db = sqlite3.connect(cli.store_path / "index.sqlite")
    (name,) = db.execute("SELECT name FROM packs").fetchone()
    headers = sorted({h for (h,) in db.execute("SELECT DISTINCT header FROM objects WHERE type=0")})
    total = db.execute("SELECT count(*) FROM objects").fetchone()[0]
    db.close()
    assert len(headers) >= 3
    with open(cli.store_path / "packs" / f"{name}.pack", "r+b") as f:
        f.seek(headers[1])
        f.write(b"\0" * 40)  # the second data block's magic and member headers
    result = cli("store", "repair", "--json")
    assert result.rc == 1, result
    report = json.loads(result.stdout)
    assert any("are not a block record" in line for line in report["lost"]), report
    assert 0 < report["objects"] < total
    assert report["tags_restored"] == ["example.org/r@1"]
    assert len(report["incomplete"]) == 1 and report["incomplete"][0].startswith("example.org/r@1: ")
    # What is left verifies; the lost chunks are named as missing, and the other file reads.
    verify = cli("verify")
    assert verify.rc == 1 and "missing chunk" in verify.stdout and "corrupt" not in verify.stdout
    assert cli.ok("cat", ref, "small").stdout_bytes == b"small\n"
    assert cli("cat", ref, "big").rc == 1


def test_repair_without_a_journal_takes_the_old_index_tags(tmp_path: Path, cli: Cli) -> None:
    """A store written before tags.log existed: the tags still in the old index are kept."""
    tree = build_tree(tmp_path / "t", [Node(b"f", "file", data=b"x" * 1000, mtime_ns=MTIME)])
    cli.ok("import", "dir", tree, "--name", "example.org/j", "--version", "1")
    cli.ok("tag", "set", "example.org/j@2", "example.org/j@1")
    (cli.store_path / "tags.log").unlink()
    report = json.loads(cli.ok("store", "repair", "--json").stdout)
    assert report["tag_source"] == "the old index"
    assert sorted(report["tags_restored"]) == ["example.org/j@1", "example.org/j@2"]
    # The journal is rewritten from what was restored, and kept from then on.
    cli.ok("tag", "rm", "example.org/j@2")
    lines = [json.loads(line) for line in (cli.store_path / "tags.log").read_text().splitlines()]
    assert [(e["op"], e["version"]) for e in lines] == [("set", "1"), ("set", "2"), ("rm", "2")]


# --------------------------------------------------------------------------- packs failing under a live mount


def _pack_store(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """Two FileSets in two packs, so one pack can fail while the other serves."""
    files = {"a/one.bin": os.urandom(600_000), "b/two.bin": os.urandom(600_000)}
    cli = Cli(tmp_path / "store")
    for rel, data in files.items():
        tree = build_tree(tmp_path / rel.split("/")[0], [Node(rel.split("/")[1].encode(), "file", data=data,
                                                               mtime_ns=MTIME)])
        cli.ok("import", "dir", tree, "--name", f"example.org/{rel[0]}", "--version", "1")
    write_manifest(tmp_path / "image.toml", "example.org/packs-image", ["example.org/a@1", "example.org/b@1"])
    cli.ok("image", "create", tmp_path / "image.toml")
    return tmp_path / "store", {rel.split("/")[1]: data for rel, data in files.items()}


def _pack_of(store_path: Path, image: str, name: str) -> Path:
    store = LocalStore(store_path)
    try:
        for layer in store.get_image(store.resolve(image)).layers:
            root = store.get_directory(store.get_fileset(layer.fileset).root.tree)
            for entry in root.entries:
                if entry.name == name.encode():
                    loc = store.locate(store.file_extents(entry)[0].digest or b"")
                    assert loc is not None
                    return store.packs_dir / f"{store.pack_files()[loc.pack]}.pack"
    finally:
        store.close()
    raise AssertionError(name)


def test_pack_truncated_or_replaced_under_a_live_mount(tmp_path: Path) -> None:
    store, files = _pack_store(tmp_path)
    one = _pack_of(store, "example.org/packs-image@1", "one.bin")
    two = _pack_of(store, "example.org/packs-image@1", "two.bin")
    with mount_image(store, "example.org/packs-image@1", tmp_path / "mnt",
                     allow_log=[r"ERROR: reading /(one|two)\.bin at offset \d+: .*(truncated|record header|corrupt)"]
                     ) as m:
        os.listdir(m.mountpoint)
        # Truncated before the daemon opened it: EIO for its data, the other pack serves.
        os.truncate(one, 1000)
        assert _errno_of(cat, m / "one.bin") == errno.EIO
        assert cat(m / "two.bin") == files["two.bin"]
        m.assert_alive()
        # Replaced (renamed over) by other bytes: the daemon keeps reading the file it opened,
        # so what it already serves stays right; a fresh reader of the new file gets EIO.
        replacement = tmp_path / "replacement"
        replacement.write_bytes(os.urandom(two.stat().st_size))
        os.rename(replacement, two)
        assert cat(m / "two.bin") == files["two.bin"], "page cache or the open pack: never wrong bytes"
        m.assert_alive()
        assert "truncated" in m.log(), m.log()
    assert Cli(store)("verify").rc == 1, "the replaced pack is named by verify"


@needs_strace
def test_read_errors_on_packs_are_eio_and_pass(tmp_path: Path) -> None:
    """EIO from the disk under a live mount (strace attached to the daemon): EIO for those
    reads only; once the disk is good again the same file reads, nothing poisoned."""
    strace = require_strace()
    store, files = _pack_store(tmp_path)
    with mount_image(store, "example.org/packs-image@1", tmp_path / "mnt",
                     allow_log=[r"ERROR: reading /one\.bin at offset \d+: .*(Input/output error|disk I/O error"
                                r"|index\.sqlite is damaged)"]
                     ) as m:
        os.listdir(m.mountpoint)
        tracer = subprocess.Popen([strace, "-f", "-qq", "-o", "/dev/null", "-p", str(m.pid), "-e", "trace=pread64",
                                   "-e", "inject=pread64:error=EIO"], stderr=subprocess.PIPE)
        try:
            time.sleep(1.0)  # strace attaches to every thread
            assert _errno_of(cat, m / "one.bin") == errno.EIO
            m.assert_alive()
        finally:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=30)
        assert cat(m / "one.bin") == files["one.bin"], "a failed read is not remembered as the file's content"
        assert cat(m / "two.bin") == files["two.bin"]
        m.assert_alive()
        # Whichever pread the injected EIO hits first: a pack's (EIO) or the index's (SQLite
        # reports a read error, or a page it could not read as a malformed image).
        assert any(text in m.log() for text in ("Input/output error", "disk I/O error", "is damaged")), m.log()


def test_repair_files_signatures_under_their_subjects_again(tmp_path: Path, cli: Cli) -> None:
    """Attachments live only in the index; a signature names its subject, so repair refiles it."""
    tree = build_tree(tmp_path / "t", [Node(b"f", "file", data=b"signed\n", mtime_ns=MTIME)])
    ref = digest_of(cli.ok("import", "dir", tree, "--name", "example.org/signed", "--version", "1"))
    cli.ok("key", "generate", tmp_path / "k")
    signature = cli.ok("sign", "--key", tmp_path / "k.key", "example.org/signed@1").last_line
    (cli.store_path / "index.sqlite").write_bytes(b"\0" * 8192)  # nothing of the old index reads
    result = cli("store", "repair", "--json")
    report = json.loads(result.stdout)
    assert "example.org/signed@1" in report["tags_restored"], report
    assert any("revisions table does not read" in line for line in report["unread"]), report
    assert result.rc == 0, "nothing was lost: every pack read"
    s = LocalStore(cli.store_path)
    try:
        from cnpsfs import format as fmt

        assert s.attachments(fmt.parse_digest(ref)) == [(fmt.parse_digest(ref), fmt.parse_digest(signature))]
    finally:
        s.close()
    cli.ok("verify")
