"""Block layout (docs/format.md 2.1): which chunks share a block, and that digests never depend on it.

A writer keeps three open data blocks: large files' chunks, hot small-file chunks (sealed
small, SMALL_BLOCK_TARGET) and cold chunks (sources beside their compiled forms,
documentation: COLD_BLOCK_TARGET). These tests import real trees through the real
importers and read the layout back from the pack files with the spec's parser
(tests/test_store.py), so they fail when the rule, its two implementations (the streaming
directory import and the tree builder) or the document drift apart.
"""

from __future__ import annotations

import os
import sqlite3
import tarfile
from pathlib import Path

import blake3
import pytest
from test_store import parse_pack, write_files

from cnpsfs import format as fmt
from cnpsfs.image.reader import FileReader
from cnpsfs.image.walk import walk
from cnpsfs.ingest import directory as directory_import
from cnpsfs.ingest import tree as tree_import
from cnpsfs.ingest.directory import import_directory
from cnpsfs.ingest.layout import compiled_stems, in_cold_tree, is_cold
from cnpsfs.ingest.tar import import_tar
from cnpsfs.ingest.tree import ImportOptions
from cnpsfs.store import BLOCK_TARGET, COLD_BLOCK_TARGET, SMALL_BLOCK_TARGET, T_CHUNK, LocalStore
from cnpsfs.store.maintenance import gc, verify

KiB = 1 << 10
PYC = "cpython-311"


def rand(seed: str, n: int) -> bytes:
    return blake3.blake3(seed.encode()).digest(length=n)


def test_the_rule_on_names() -> None:
    stems = compiled_stems([b"a.py", b"b.py", b"old.pyc", b"__pycache__", b"x.pyc.bak"],
                           [b"a.cpython-311.pyc", b"b.cpython-311.opt-1.pyc", b"dotted.name.cpython-311.pyc",
                            b"README", b".pyc"])
    assert {b"a", b"b", b"old", b"dotted", b"dotted.name"} <= stems
    assert b"x" not in stems and b"x.pyc" not in stems and b"" not in stems
    assert is_cold((b"usr", b"lib", b"a.py"), stems)
    assert is_cold((b"usr", b"lib", b"dotted.name.py"), stems)
    assert not is_cold((b"usr", b"lib", b"c.py"), stems), "a source with no compiled form is read"
    assert not is_cold((b"usr", b"lib", b"a.cpython-311.pyc"), stems), "the compiled form is what is read"
    assert not is_cold((b"usr", b"lib", b"a.pyx"), stems)
    for tree in (b"doc", b"man", b"info", b"locale"):
        assert in_cold_tree((b"usr", b"share", tree, b"x"))
        assert is_cold((b"usr", b"share", tree, b"pkg", b"any"))
    assert not in_cold_tree((b"usr", b"share", b"doc"))  # the directory itself is no file below it
    assert not is_cold((b"usr", b"share", b"python3", b"x"))
    assert not is_cold((b"opt", b"usr", b"share", b"doc", b"x")), "only at the FileSet's root"


def _tree(root: Path) -> Path:
    """Small files, hot and cold, big enough that the small-file stream makes many blocks."""
    files: dict[str, bytes] = {}
    for p in range(6):
        pkg = f"usr/lib/python3/dist-packages/pkg{p}"
        for m in range(8):
            files[f"{pkg}/mod{m}.py"] = rand(f"src{p}.{m}", 20 * KiB + 997 * m)  # cold: compiled beside it
            files[f"{pkg}/__pycache__/mod{m}.{PYC}.pyc"] = rand(f"pyc{p}.{m}", 14 * KiB + 331 * m)
        files[f"{pkg}/uncompiled.py"] = rand(f"plain{p}", 9 * KiB)  # hot: nothing compiled
        files[f"{pkg}/legacy.py"] = rand(f"legacy{p}", 11 * KiB)
        files[f"{pkg}/legacy.pyc"] = rand(f"legacyc{p}", 7 * KiB)  # makes legacy.py cold
    for d in range(12):
        files[f"usr/share/doc/pkg{d}/copyright"] = rand(f"doc{d}", 18 * KiB)
        files[f"usr/share/man/man1/tool{d}.1.gz"] = rand(f"man{d}", 6 * KiB)
        files[f"usr/share/locale/de/LC_MESSAGES/pkg{d}.mo"] = rand(f"mo{d}", 12 * KiB)
        files[f"etc/conf{d}"] = rand(f"etc{d}", 3 * KiB)
    files["usr/share/doc/big/changelog"] = rand("bigdoc", 600 * KiB)  # a large cold file
    files["usr/bin/tool"] = rand("bin", 700 * KiB)  # a large hot one
    return write_files(root, files)


def _layout(store_path: Path) -> tuple[list[tuple[int, tuple[bytes, ...]]], dict[bytes, tuple[int, int]]]:
    """Every data block in pack order: (raw length, member digests); and each chunk's block."""
    blocks: list[tuple[int, tuple[bytes, ...]]] = []
    where: dict[bytes, tuple[int, int]] = {}
    db = sqlite3.connect(store_path / "index.sqlite")
    order = [name for (name,) in db.execute("SELECT name FROM packs ORDER BY id")]
    for name in order:
        current: tuple[int, int] | None = None
        for m in parse_pack(store_path / "packs" / f"{name}.pack"):
            if m["type"] != T_CHUNK:
                continue
            key = (order.index(name), m["header"])
            if key != current:
                blocks.append((m["raw"], ()))  # type: ignore[arg-type]
                current = key
            raw, members = blocks[-1]
            blocks[-1] = (raw, (*members, m["digest"]))  # type: ignore[arg-type]
            where[m["digest"]] = key  # type: ignore[index]
    return blocks, where


def _files_by_chunk(store: LocalStore, digest: bytes) -> dict[bytes, set[tuple[bytes, ...]]]:
    """Chunk digest -> the paths of the files whose bytes it holds."""
    out: dict[bytes, set[tuple[bytes, ...]]] = {}
    root = store.get_fileset(digest).root
    for parts, entry, _opaque in walk(store, root):
        if entry.kind is fmt.Kind.FILE:
            for ext in store.file_extents(entry):
                if ext.digest is not None:
                    out.setdefault(ext.digest, set()).add(parts)
    return out


def _check_streams(store_path: Path, digest: bytes) -> None:
    """A chunk with a byte of a hot file never shares a block with a chunk of cold files only."""
    store = LocalStore(store_path)
    try:
        files = _files_by_chunk(store, digest)
        compiled: dict[tuple[bytes, ...], frozenset[bytes]] = {}
        for parts, entry, _opaque in walk(store, store.get_fileset(digest).root):
            if entry.kind is fmt.Kind.DIR and entry.tree is not None:
                names_here = [e.name for e in store.get_directory(entry.tree).entries]
                cache = next((e for e in store.get_directory(entry.tree).entries if e.name == b"__pycache__"), None)
                inner = [e.name for e in store.get_directory(cache.tree).entries] \
                    if cache is not None and cache.tree is not None else []
                compiled[parts] = compiled_stems(names_here, inner)
    finally:
        store.close()
    cold_only = {d: all(is_cold(p, compiled.get(p[:-1], frozenset())) for p in paths) for d, paths in files.items()}
    blocks, _where = _layout(store_path)
    assert any(all(cold_only[d] for d in members) for _raw, members in blocks), "no cold block"
    assert any(not any(cold_only[d] for d in members) for _raw, members in blocks), "no hot block"
    for raw, members in blocks:
        kinds = {cold_only[d] for d in members}
        assert len(kinds) == 1, "a block mixes hot chunks with chunks of cold files only"
        if kinds == {True}:
            assert raw < COLD_BLOCK_TARGET + 256 * KiB
        small = not any(any(len(p) >= 3 and p[:2] == (b"usr", b"bin") for p in files[d]) for d in members)
        if kinds == {False} and small:
            assert raw < SMALL_BLOCK_TARGET + 256 * KiB, "hot small-file blocks are sealed small"
        assert raw < max(BLOCK_TARGET, COLD_BLOCK_TARGET) + 256 * KiB


def test_hot_and_cold_chunks_keep_apart_and_digests_do_not_move(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    tree = _tree(tmp_path / "tree")
    options = ImportOptions(name="example.org/layout", version="1")
    a = LocalStore(tmp_path / "a", create=True)
    streamed = import_directory(a, str(tree), options).digest
    # The tree builder's implementation of the rule (volatile stripping, tar) gives the
    # same blocks as the streaming walk's, byte for byte. (Stripping would drop the
    # __pycache__ files, volatile by §1.10, and then the sources are hot: not here.)
    monkeypatch.setattr(tree_import, "is_volatile", lambda path: False)
    b = LocalStore(tmp_path / "b", create=True)
    built = import_directory(b, str(tree), ImportOptions(name="example.org/layout", version="1",
                                                         strip_volatile=True)).digest
    assert built == streamed
    a.close()
    b.close()
    _check_streams(tmp_path / "a", streamed)
    assert _layout(tmp_path / "a")[0] == _layout(tmp_path / "b")[0], "the layout depends only on the tree"
    # Every file cold or hot: other blocks, the same digest.
    for module in (directory_import, tree_import):
        monkeypatch.setattr(module, "is_cold", lambda parts, compiled=frozenset(): False)
    c = LocalStore(tmp_path / "c", create=True)
    assert import_directory(c, str(tree), options).digest == streamed
    c.close()
    assert _layout(tmp_path / "c")[0] != _layout(tmp_path / "a")[0]


def test_tar_import_keeps_cold_data_apart(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree")
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tf:
        for path in sorted(tree.rglob("*"), key=lambda p: p.relative_to(tree).parts):  # canonical order
            tf.add(path, arcname=str(path.relative_to(tree)), recursive=False)
    store = LocalStore(tmp_path / "s", create=True)
    digest = import_tar(store, str(archive), ImportOptions(name="example.org/tar", version="1")).digest
    store.close()
    _check_streams(tmp_path / "s", digest)


def test_reads_verify_gc_and_repack_over_the_layout(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree")
    store = LocalStore(tmp_path / "s", create=True)
    # The tree plus 8 MiB of documentation first, then the tree alone (deduplicated against
    # the first pack) and the first dropped: that pack is mostly dead, and gc repacks it.
    extra = tree / "usr/share/doc/extra/changelog"
    extra.parent.mkdir(parents=True)
    extra.write_bytes(rand("gone", 8 << 20))
    import_directory(store, str(tree), ImportOptions(name="example.org/gone", version="1"))
    extra.unlink()
    extra.parent.rmdir()
    keep = import_directory(store, str(tree), ImportOptions(name="example.org/keep", version="1")).digest
    store.remove_tag("example.org/gone", "1")
    report = gc(store)
    assert report.removed_objects > 0 and report.repacked == 1
    check = verify(store, None)
    assert not check.problems and check.checked > 0
    reader = FileReader(store)
    seen = 0
    for parts, entry, _opaque in walk(store, store.get_fileset(keep).root):
        if entry.kind is fmt.Kind.FILE:
            assert reader.read(entry) == (tree / os.fsdecode(b"/".join(parts))).read_bytes()
            seen += 1
    assert seen > 100
    store.close()
