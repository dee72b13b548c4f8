"""The cold path without a profile (issue 14): what makes a first walk cheap, held to account.

In-process (no FUSE): the fast decoder of directory entries accepts and refuses exactly
what the field-by-field one does; a READDIR of a listed directory answers from memory,
the whole listing in one reply and the request past its end with nothing and no work;
the attributes built for the kernel are those the entry describes; a mount daemon's
store serves an object from a block it has read without the index, while every other
store asks the index. On a real mount: a cold listing is two READDIRs, whatever the
directory holds, and the attributes it returns are the source tree's.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mountutil import cnpsfs, mount_image, require_fuse
from test_compose import WH, L, generation, make_fileset, names, read, tree
from test_ops_inprocess import (
    FakeKernel,
    Listing,
    drop_rows,
    lookup_path,
    operations,
    run,
)
from test_ops_inprocess import World as World
from test_ops_inprocess import world as world  # the fixture

from cnpsfs import format as fmt
from cnpsfs.errors import FormatError, MissingObjectError
from cnpsfs.format.objects import _entry_fields
from cnpsfs.fs.operations import Operations
from cnpsfs.image.manifest import compose
from cnpsfs.image.view import Generation
from cnpsfs.store import LocalStore, Store
from cnpsfs.store.protocol import T_DIR, T_FILESET

# --------------------------------------------------------------------------- decoding

DIGEST = bytes(range(32))
#: Values of every type and at every edge the checks draw a line at.
_VALUES = st.sampled_from([
    None, 0, 1, 2, -1, 0o644, 0o7777, 0o10000, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, -(1 << 63),
    True, False, b"", b"x", b"a\0b", DIGEST, DIGEST[:31], "text", [], {}, {b"user.a": b"v"}, {"k": b"v"},
    [DIGEST, 0, 10], [[DIGEST, 0, 10]], [[None, 0, 10]], [[None, 1, 10]], [[DIGEST, -1, 10]],
    [[DIGEST, 0, 0]], [[DIGEST, 0, 5], [None, 0, 5]], [[DIGEST, fmt.CHUNK_MAX - 5, 10]], [[DIGEST, 0]],
    [[b"short", 0, 10]], [b"/abs/path", 2], [b"first", 1], [1, 2], b"target",
])
_KINDS = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 0, 9, True, None])
_NAMES = st.sampled_from([b"name", b"", b".", b"..", b"a/b", b"a\0b", b"x" * 255, b"x" * 256, "text", None])


@st.composite
def raw_entries(draw: st.DrawFn) -> dict[int, Any]:
    """Directory entry maps: mostly a common shape, with some fields replaced or dropped."""
    kind = draw(_KINDS) if draw(st.integers(0, 4)) == 0 else draw(st.sampled_from([1, 1, 1, 2, 3]))
    name = draw(_NAMES) if draw(st.integers(0, 4)) == 0 else b"name"
    raw: dict[int, Any] = {0: name, 1: kind, 2: 0o755, 5: 1_700_000_000_000_000_000}
    if kind == 1:
        raw |= {7: 10, 8: [[DIGEST, 0, 10]], 14: DIGEST}
    elif kind == 2:
        raw[12] = DIGEST
    elif kind == 3:
        raw[10] = b"target"
    for key in draw(st.lists(st.integers(2, 15), max_size=3)):
        if draw(st.booleans()):
            raw.pop(key, None)
        else:
            raw[key] = draw(_VALUES)
    return raw


@settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(raw_entries())
def test_the_fast_entry_decoder_agrees_with_the_field_by_field_one(raw: dict[int, Any]) -> None:
    """What entry_from_cbor builds in one go, _entry_fields builds (or refuses) the same."""
    try:
        fast: fmt.Entry | None = fmt.entry_from_cbor(raw)
    except FormatError:
        fast = None
    name, kind = raw.get(0), raw.get(1)
    try:
        if type(name) is not bytes or type(kind) is not int or kind not in {k.value for k in fmt.Kind}:
            raise FormatError("name or kind")
        fmt.check_name(name)
        if b"/" in name or b"\0" in name:
            raise FormatError("name")
        slow: fmt.Entry | None = _entry_fields(raw, name, fmt.Kind(kind))
    except FormatError:
        slow = None
    assert fast == slow, raw
    # The packing decoder's fields (plain_file_fields): only for what the field-by-field
    # decoder accepts as a file of one chunk range, and exactly its fields.
    plain = fmt.plain_file_fields(raw)
    if plain is not None:
        assert slow is not None and slow.kind is fmt.Kind.FILE and slow.extents is not None, raw
        assert (slow.uid, slow.gid, slow.xattrs, slow.link, slow.content) == (0, 0, {}, None, None), raw
        assert plain == (slow.name, slow.mode, slow.mtime_ns, slow.size, *slow.extents[0], slow.hash), raw
    # The packed composition's decoder (pack_directory), on a directory of this one entry.
    try:
        packed: list[fmt.Entry] | None = _unpacked_entries([raw])
    except FormatError:
        packed = None
    assert packed == (None if slow is None else [slow]), raw
    if slow is not None:  # a valid entry: the trusting packer (checked=True) packs it the same
        assert fmt.pack_directory([raw], _RECORD, 7, checked=True) == fmt.pack_directory([raw], _RECORD, 7), raw


def test_a_directory_of_every_common_shape_decodes_as_encoded() -> None:
    entries = [
        fmt.Entry(b"a-dir", fmt.Kind.DIR, 0o755, 1, 2, 3, tree=DIGEST),
        fmt.Entry(b"b-empty", fmt.Kind.FILE, 0o600, mtime_ns=-5),
        fmt.Entry(b"c-one", fmt.Kind.FILE, size=10, extents=(fmt.Extent(DIGEST, 7, 10),), hash=DIGEST),
        fmt.Entry(b"d-many", fmt.Kind.FILE, size=30, hash=DIGEST,
                  extents=(fmt.Extent(DIGEST, 0, 10), fmt.Extent(None, 0, 10), fmt.Extent(DIGEST, 10, 10))),
        fmt.Entry(b"e-link", fmt.Kind.SYMLINK, 0o777, target=b"../somewhere"),
        fmt.Entry(b"f-xattr", fmt.Kind.FILE, xattrs={b"user.k": b"v"}),
        fmt.Entry(b"g-hard", fmt.Kind.FILE, size=10, extents=(fmt.Extent(DIGEST, 0, 10),), hash=DIGEST,
                  link=(b"g-hard", 2)),
    ]
    decoded = fmt.decode_directory(fmt.encode_directory(fmt.Directory(entries)))
    assert decoded.entries == entries
    assert all(type(e) is fmt.Extent for entry in decoded.entries for e in entry.extents or ())



def _reference_directory(data: bytes) -> fmt.Directory:
    """decode_directory as plainly as the format says it (§1.4): every entry field by
    field, the order by sorting a set; what the fast path must agree with."""
    obj = fmt.decode_object(data)
    if obj[0] != fmt.TYPE_DIR or type(obj.get(2)) is not list or len(obj[2]) > fmt.MAX_DIR_ENTRIES:
        raise FormatError("not a directory")
    opaque = obj.get(3, False)
    if type(opaque) is not bool:
        raise FormatError("opaque")
    entries = []
    for raw in obj[2]:
        if type(raw) is not dict:
            raise FormatError("entry")
        name, kind = raw.get(0), raw.get(1)
        if type(name) is not bytes or type(kind) is not int or kind not in {k.value for k in fmt.Kind}:
            raise FormatError("name or kind")
        fmt.check_name(name)
        entries.append(_entry_fields(raw, name, fmt.Kind(kind)))
    names = [e.name for e in entries]
    if names != sorted(set(names)):
        raise FormatError("order")
    return fmt.Directory(entries, opaque)


def _directory_cases() -> tuple[list[bytes], list[bytes]]:
    """Whole directory objects, valid (the first list) and then, in the second, those
    damaged byte by byte (flipped, dropped, duplicated, truncated) or value by value (one
    field swapped for an edge value, two entries swapped), the valid ones first."""
    import random

    rng = random.Random(14)
    hashed = bytes(range(100, 132))
    shapes = [
        fmt.Entry(b"", fmt.Kind.DIR, 0o755, mtime_ns=1_700_000_000_123_456_789, tree=DIGEST),
        fmt.Entry(b"", fmt.Kind.FILE, 0o644, mtime_ns=1_700_000_000_000_000_001, size=300,
                  extents=(fmt.Extent(DIGEST, 70_000, 300),), hash=hashed),
        fmt.Entry(b"", fmt.Kind.FILE, 0o600, size=20, extents=(fmt.Extent(DIGEST, 0, 10), fmt.Extent(None, 0, 10)),
                  hash=hashed),
        fmt.Entry(b"", fmt.Kind.SYMLINK, 0o777, mtime_ns=-3, target=b"../lib/x"),
        fmt.Entry(b"", fmt.Kind.FILE, 0o4755, uid=5, gid=6),
        fmt.Entry(b"", fmt.Kind.WHITEOUT, 0),
        fmt.Entry(b"", fmt.Kind.CHARDEV, 0o600, rdev=(1, 3)),
        fmt.Entry(b"", fmt.Kind.FILE, size=10, extents=(fmt.Extent(DIGEST, 0, 10),), hash=hashed, link=(b"a/b", 2)),
        fmt.Entry(b"", fmt.Kind.FILE, size=1 << 40, content=DIGEST, hash=hashed, xattrs={b"user.k": b"v"}),
    ]
    objects = []
    for n in (1, 3, 12, 40):
        names = sorted(rng.sample([bytes([97 + i % 26]) * (1 + i // 26) + b".x" * (i % 3) for i in range(200)], n))
        entries = [dataclasses.replace(rng.choice(shapes), name=name) for name in names]
        objects.append(fmt.encode_directory(fmt.Directory(entries, opaque=n == 12)))
    edges: list[Any] = [None, -1, 0, 1, 0o10000, 1 << 32, 1 << 63, -(1 << 63) - 1, True, b"", b"a/b", b".", b"..",
                        b"x" * 256, DIGEST[:31], DIGEST, "text", [], {}, [[DIGEST, 0, 301]], [[None, 0, 300]],
                        [[DIGEST, 65_000_000, 300]], [[DIGEST, -1, 300]], [[DIGEST, 0]], [DIGEST, 0, 300]]
    cases = list(objects)
    for data in objects:
        for _ in range(60):
            at = rng.randrange(len(data))
            cases.append(data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1:])
            cases.append(data[:at] + data[at + 1:])
            cases.append(data[:at] + data[at:at + 1] + data[at:])
            cases.append(data[:at])
        raw = cbor2.loads(data)
        for _ in range(60):
            mutated = cbor2.loads(data)
            entries = mutated[2]
            i = rng.randrange(len(entries))
            if rng.random() < 0.1 and len(entries) > 1:
                j = rng.randrange(len(entries))
                entries[i], entries[j] = entries[j], entries[i]
            else:
                entries[i][rng.choice([0, 1, 2, 5, 7, 8, 10, 12, 14])] = rng.choice(edges)
            if mutated != raw:
                cases.append(cbor2.dumps(mutated, canonical=True))
    return objects, cases


def test_the_directory_decoder_agrees_with_the_reference_on_valid_and_mutated_objects() -> None:
    """On valid and damaged directory objects (_directory_cases) the decoder builds what
    the reference builds, or both refuse."""
    objects, cases = _directory_cases()
    accepted = 0
    for data in cases:
        try:
            fast: fmt.Directory | None = fmt.decode_directory(data)
        except FormatError:
            fast = None
        try:
            slow: fmt.Directory | None = _reference_directory(data)
        except FormatError:
            slow = None
        assert fast == slow, data.hex()
        accepted += fast is not None
    assert len(objects) <= accepted < len(cases) // 2  # both outcomes exercised


_RECORD = struct.Struct("<BHIIqqII32s32s")  # the packed composition's record (image.view)


def _unpacked(data: bytes) -> list[fmt.Entry]:
    """A directory object's entries as fmt.pack_directory gives them: the packed files
    unpacked from their records, the others as it decoded them."""
    return _unpacked_entries(fmt.directory_items(data)[0])


def _unpacked_entries(raw_entries: list[Any]) -> list[fmt.Entry]:
    names, recs, others = fmt.pack_directory(raw_entries, _RECORD, 7)
    assert len(names) == len(raw_entries) and len(recs) == _RECORD.size * len(names)
    decoded = dict(others)
    entries = []
    for i, name in enumerate(names):
        record = _RECORD.unpack_from(recs, i * _RECORD.size)
        if i in decoded:
            assert decoded[i].name == name and record == _RECORD.unpack(bytes(_RECORD.size))  # nothing packed
            entries.append(decoded[i])
            continue
        flags, mode, uid, gid, mtime, size, offset, length, digest, content_hash = record
        assert (flags, uid, gid) == (7, 0, 0)
        entries.append(fmt.Entry(name, fmt.Kind.FILE, mode, 0, 0, mtime, {}, size,
                                 (fmt.Extent(digest, offset, length),), None, b"", (0, 0), None, None, content_hash))
    return entries


def test_the_packing_decoder_agrees_with_the_reference_on_valid_and_mutated_objects() -> None:
    """fmt.pack_directory (the packed composition's decoder) accepts exactly the
    directory objects decode_directory accepts, with the same entries, and packs every
    file of one chunk range whose map has the seven keys of the common shape (owner root,
    an mtime, no xattrs or link)."""
    objects, cases = _directory_cases()
    accepted = packed = 0
    for data in cases:
        try:
            fast: list[fmt.Entry] | None = _unpacked(data)
        except FormatError:
            fast = None
        try:
            slow: list[fmt.Entry] | None = _reference_directory(data).entries
        except FormatError:
            slow = None
        assert fast == slow, data.hex()
        if fast is not None:
            accepted += 1
            raw_entries = fmt.directory_items(data)[0]
            _names, _recs, others = fmt.pack_directory(raw_entries, _RECORD, 7)
            kept = {i for i, _entry in others}
            for i, (raw, entry) in enumerate(zip(raw_entries, fast, strict=True)):
                plain = (sorted(raw) == [0, 1, 2, 5, 7, 8, 14] and entry.kind is fmt.Kind.FILE
                         and entry.extents is not None and len(entry.extents) == 1
                         and entry.extents[0].digest is not None)
                assert plain == (i not in kept), (data.hex(), entry)
                packed += plain
    assert len(objects) <= accepted < len(cases) // 2 and packed  # both outcomes exercised


def test_the_packing_decoder_names_what_is_wrong() -> None:
    """A damaged entry is refused with the message decode_directory gives, whether it
    looked like a packable file or not; bad names are named even when only the whole-list
    check over every name sees them."""
    good = {0: b"a", 1: 1, 2: 0o644, 5: 1, 7: 10, 8: [[DIGEST, 0, 10]], 14: DIGEST}
    cases: list[tuple[list[Any], str]] = [
        ([good | {2: True}], "mode is not a permission value"),
        ([good | {8: [[DIGEST, fmt.CHUNK_MAX - 5, 10]]}], "runs past the largest possible chunk"),
        ([good | {0: b"a/b"}], "contains '/' or NUL"),
        ([good | {0: b"."}], "invalid entry name"),
        ([good | {0: b"x" * 256}], "longer than 255 bytes"),
        ([good | {0: "text"}], "name is not a byte string"),
        ([good, good], "not sorted by name, or a name appears twice"),
        ([good | {0: b"b"}, good], "not sorted by name"),
        ([good, 5], "not a map"),
    ]
    for raw_entries, message in cases:
        with pytest.raises(FormatError, match=re.escape(message)):
            fmt.pack_directory(raw_entries, _RECORD, 1)
        try:
            fmt.decode_directory(cbor2.dumps({0: fmt.TYPE_DIR, 1: 1, 2: raw_entries}, canonical=True))
        except FormatError as exc:
            assert message in str(exc)
        else:
            raise AssertionError(f"decode_directory accepted {raw_entries!r}")
    with pytest.raises(FormatError, match="not a byte string"):
        fmt.check_names([b"a", 3])  # type: ignore[list-item]
    fmt.check_names([])


def test_the_trusting_packer_gives_what_the_checking_one_gives_and_never_crashes() -> None:
    """pack_directory(checked=True) skips the checks of the common entries: on every valid
    object it returns exactly what the checked path returns; on damaged objects (which a
    store never records as checked, but a damaged index might) it returns or raises a
    FormatError, nothing else."""
    objects, cases = _directory_cases()
    valid = 0
    for data in cases:
        try:
            raw_entries = fmt.directory_items(data)[0]
        except FormatError:
            continue
        try:
            expected: Any = fmt.pack_directory(raw_entries, _RECORD, 3)
        except FormatError:
            expected = None
        try:
            trusted: Any = fmt.pack_directory(raw_entries, _RECORD, 3, checked=True)
        except FormatError:
            trusted = None
        if expected is not None:
            valid += 1
            assert trusted == expected, data.hex()
    assert valid >= len(objects)


def test_a_writer_records_the_directory_objects_it_checked(store: Store) -> None:
    """What add_object found valid is recorded at commit under the current rules; what it
    did not check (bytes added as a pull adds them), what failed the checks, marks under
    other rules and reads on a cache-only thread are not trusted."""
    assert isinstance(store, LocalStore)
    ref = make_fileset(store, "marks", {"etc/a": "a", "etc/sub/b": "b", "etc/link": L("a")})
    gen = generation(store, [ref])
    trees = [node.entry.tree for _path, node in gen.walk() if node.is_dir]
    assert len(trees) == 3 and all(tree is not None and store.directory_checked(tree) for tree in trees)
    with store.cache_only():
        assert not store.directory_checked(trees[0])
    good = fmt.encode_directory(fmt.Directory([fmt.Entry(b"x", fmt.Kind.FILE, 0o600)]))
    bad = cbor2.dumps({0: fmt.TYPE_DIR, 1: 1, 2: [{0: b"x", 1: 1, 2: 0o20000}]}, canonical=True)
    with store.writer() as writer:
        unchecked = writer.add(good, T_DIR)  # as a pull copies an object: not decoded
        refused = writer.add_object(bad)
        writer.commit()
    assert not store.directory_checked(unchecked) and not store.directory_checked(refused)
    store.index.publish([], [], [], replace=False, retire_packs=(), checked=[(unchecked, fmt.DIRECTORY_RULES - 1)])
    assert not store.directory_checked(unchecked)  # checked under other rules
    with store.writer() as writer:
        assert writer.add_object(good) == unchecked  # already stored: decoded now, and recorded
        writer.commit()
    assert store.directory_checked(unchecked)


def test_a_store_without_the_table_checks_everything(tmp_path: Path) -> None:
    fresh = LocalStore(tmp_path / "fresh", create=True)
    try:
        with fresh.index.transaction() as db:
            db.execute("DROP TABLE IF EXISTS checked")  # as a store written before it existed
        assert not fresh.directory_checked(DIGEST)
    finally:
        fresh.close()


def test_composition_trusts_what_the_store_checked_and_checks_the_rest(world: World,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An imported image composes through the trusting packer (its directories were
    checked when written); once the marks are gone, through the checking one, to the same
    children."""
    seen: list[bool] = []
    pack = fmt.pack_directory

    def spy(entries: list[Any], record: struct.Struct, flags: int, *, checked: bool = False) -> Any:
        seen.append(checked)
        return pack(entries, record, flags, checked=checked)

    monkeypatch.setattr(fmt, "pack_directory", spy)
    trusted = compose(world.store, world.v1)
    trusted_walk = [(path, node.ino, node.entry) for path, node in trusted.walk()]
    assert seen and all(seen)
    with world.store.index.transaction() as db:
        db.execute("DELETE FROM checked")
    seen.clear()
    checked = compose(world.store, world.v1)
    assert [(path, node.ino, node.entry) for path, node in checked.walk()] == trusted_walk
    assert seen and not any(seen)
    for path, node in trusted.walk():
        if node.is_dir:
            a, b = node.children, checked.resolve(b"/" + b"/".join(path)).children
            assert a is not None and b is not None
            assert [a.packed_at(i) for i in range(len(a))] == [b.packed_at(i) for i in range(len(b))], path


def test_a_damaged_index_mark_never_crashes_a_composition(store: Store) -> None:
    """A directory object recorded as checked that is not valid (only a damaged index can
    say so) still composes without an exception other than a FormatError."""
    assert isinstance(store, LocalStore)
    entries = [{0: b"a", 1: 1, 2: 0o644, 5: 1, 7: 1, 8: [[DIGEST, 0, 1]], 14: DIGEST},
               {0: b"b", 1: True, 2: "mode", 5: None, 7: [], 8: 5, 14: 7}, 3, {0: b"c"}]
    bad = cbor2.dumps({0: fmt.TYPE_DIR, 1: 1, 2: entries}, canonical=True)
    with store.writer() as writer:
        tree_digest = writer.add_object(bad)
        root = fmt.Entry(b"", fmt.Kind.DIR, 0o755, tree=tree_digest)
        fileset = writer.add_object(fmt.encode_fileset(fmt.FileSet("example.org/lying", "1", root)))
        writer.commit([("example.org/lying", "1", T_FILESET, fileset)])
    store.index.publish([], [], [], replace=False, retire_packs=(), checked=[(tree_digest, fmt.DIRECTORY_RULES)])
    assert store.directory_checked(tree_digest)
    gen = generation(store, ["example.org/lying@1"])
    with pytest.raises(FormatError):
        gen.load_children(gen.node(1))


def test_a_single_layer_directory_with_whiteouts_composes_as_the_merge_does(store: Store,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Whiteouts in a layer with nothing below hide nothing and are not shown; the packed
    composition drops them and renumbers the rest as the merge does."""
    ref = make_fileset(store, "wh", {"etc/a": "a", "etc/b": WH, "etc/c": "cc", "etc/d": L("c"), "etc/e": WH,
                                     "etc/f/g": "g", "etc/h": "", "etc/i": WH})
    fast = generation(store, [ref])
    assert names(fast, "/etc") == ["a", "c", "d", "f", "h"]
    fast_tree = tree(fast)
    etc = fast.resolve("/etc").children
    monkeypatch.setattr(Generation, "_single_source", lambda self, node: None)
    slow = generation(store, [ref])
    assert tree(slow) == fast_tree
    other = slow.resolve("/etc").children
    assert (etc.names, list(etc.inos), etc.extras, sorted(etc.dirs)) == (
        other.names, list(other.inos), other.extras, sorted(other.dirs))
    assert [etc.packed_at(i) for i in range(len(etc))] == [other.packed_at(i) for i in range(len(other))]
    assert read(fast, "/etc/c") == b"cc" and read(fast, "/etc/f/g") == b"g"


def test_a_damaged_directory_object_fails_its_composition_with_a_format_error(store: Store) -> None:
    """A directory object that decodes as CBOR but breaks a rule (here a packable file's
    mode) is refused by the packed composition, naming the entry; nothing is published."""
    entries = [{0: b"a", 1: 1, 2: 0o644, 5: 1, 7: 1, 8: [[DIGEST, 0, 1]], 14: DIGEST},
               {0: b"b", 1: 1, 2: 0o20000, 5: 1, 7: 1, 8: [[DIGEST, 0, 1]], 14: DIGEST}]
    bad = cbor2.dumps({0: fmt.TYPE_DIR, 1: 1, 2: entries}, canonical=True)
    with store.writer() as writer:
        tree_digest = writer.add_object(bad)
        root = fmt.Entry(b"", fmt.Kind.DIR, 0o755, tree=tree_digest)
        fileset = writer.add_object(fmt.encode_fileset(fmt.FileSet("example.org/bad", "1", root)))
        writer.commit([("example.org/bad", "1", T_FILESET, fileset)])
    gen = generation(store, ["example.org/bad@1"])
    with pytest.raises(FormatError, match=r"malformed directory entry b'b': mode"):
        gen.load_children(gen.node(1))
    assert gen.node(1).children is None


def test_a_directory_of_one_layer_composes_as_the_general_merge_does(world: World,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The packed composition of single-source directories (entries packed straight from
    their CBOR maps) gives the same children, numbers, records and entries as the merge."""
    fast = compose(world.store, world.v1)
    fast_walk = [(path, node.ino, node.entry) for path, node in fast.walk()]
    monkeypatch.setattr(Generation, "_single_source", lambda self, node: None)
    slow = compose(world.store, world.v1)
    slow_walk = [(path, node.ino, node.entry) for path, node in slow.walk()]
    assert fast_walk == slow_walk
    kinds = set()
    for (path, _ino, entry), (_p, _i, _e) in zip(fast_walk, slow_walk, strict=True):
        if entry.kind is not fmt.Kind.DIR:
            continue
        a, b = fast.resolve(b"/" + b"/".join(path)).children, slow.resolve(b"/" + b"/".join(path)).children
        assert (a.names, list(a.inos), a.base, a.extras, sorted(a.dirs)) == (
            b.names, list(b.inos), b.base, b.extras, sorted(b.dirs)), path
        assert [a.packed_at(i) for i in range(len(a))] == [b.packed_at(i) for i in range(len(b))], path
        assert [a.entry_at(i) for i in range(len(a))] == [b.entry_at(i) for i in range(len(b))], path
        kinds.update(a.entry_at(i).kind for i in range(len(a)))
        kinds.update("link" for i in range(len(a)) if a.entry_at(i).link)
    assert {fmt.Kind.FILE, fmt.Kind.DIR, fmt.Kind.SYMLINK, "link"} <= kinds  # every path of the packing taken


# --------------------------------------------------------------------------- READDIR and attributes


def test_one_readdir_reply_holds_a_listing_and_the_request_past_its_end_does_nothing(world: World) -> None:
    generation = compose(world.store, world.v1)

    async def check(ops: Operations) -> None:
        doc = await lookup_path(ops, "usr/share/doc")
        first = Listing()
        await ops.readdir(doc.st_ino, 0, first)
        names = [name for name, _ino, _off in first.entries]
        assert names == [b".", b"..", *sorted(f"pkg{i}".encode() for i in range(30))]
        # The kernel's next request starts past the last offset: it must cost no composing,
        # no worker and no store read, and reply nothing (that empty reply is its EOF).
        def forbidden(*_args: Any, **_kwargs: Any) -> Any:
            raise AssertionError("the request past the end did work")

        ops.generation.listing = forbidden  # type: ignore[method-assign]
        ops._worker = forbidden  # type: ignore[method-assign]
        store_get, world.store.get = world.store.get, forbidden  # type: ignore[method-assign]
        try:
            end = Listing()
            await ops.readdir(doc.st_ino, first.entries[-1][2], end)
            again = Listing()
            await ops.readdir(doc.st_ino, 0, again)  # a listing read again comes from memory too
        finally:
            world.store.get = store_get  # type: ignore[method-assign]
        assert end.entries == []
        assert again.entries == first.entries
        assert ops.requests["readdir"] == 3

    run(operations(generation, FakeKernel()), check)


def test_a_listing_is_names_only_until_its_reader_looks_a_name_up(world: World) -> None:
    """Lean listings, decided per process: names only (but subdirectories) and no lookup
    counted, until the reader looks up a name from such a listing; then attributes, and
    the kernel is told to drop the lean listings it caches. Other readers stay lean."""
    generation = compose(world.store, world.v1)
    kernel = FakeKernel()

    async def check(ops: Operations) -> None:
        if not ops.lean_listings:
            pytest.skip("pyfuse3 without patch 0003: listings always carry attributes")
        usr = await lookup_path(ops, "usr")
        bin_ = await ops.lookup(usr.st_ino, b"share", SimpleNamespace(pid=1))  # files and a subdirectory
        node = ops.node(bin_.st_ino)
        files = {name for name, child in node.children.pairs() if not child.is_dir}
        subdirs = {name for name, child in node.children.pairs() if child.is_dir}
        assert files and subdirs
        name_walk = Listing(pid=100)
        await ops.readdir(bin_.st_ino, 0, name_walk)
        assert name_walk.names_only == files
        assert {name for name, _ino, _off in name_walk.entries} == files | subdirs | {b".", b".."}
        assert all(ops.lookup_count(node.children.node_at(i).ino) == 0
                   for i in range(len(node.children)) if node.children.names[i] in files)
        assert {ino for name, ino, _off in name_walk.entries if name in files} == {
            node.children.node_at(node.children.index(name)).ino for name in files}  # d_ino as stat says
        first = min(files)
        await ops.lookup(bin_.st_ino, first, SimpleNamespace(pid=100))
        assert 100 in ops.attribute_readers
        assert bin_.st_ino in kernel.inodes  # its cached lean listing dropped
        stat_walk = Listing(pid=100)
        await ops.readdir(bin_.st_ino, 0, stat_walk)
        assert stat_walk.names_only == set()
        other = Listing(pid=200)
        await ops.readdir(bin_.st_ino, 0, other)
        assert other.names_only == files

    run(operations(generation, kernel), check)


def test_a_lean_listing_of_plain_files_only_gives_names_numbers_and_offsets(store: Store) -> None:
    """A directory of packed plain files alone (a leaf of a large tree) is listed by its
    own short loop: every name with its number and S_IFREG, offsets one past each other,
    continued where a full reply buffer stopped, and no lookup counted."""
    ref = make_fileset(store, "leaf", {f"leaf/f{i:02}": f"file {i}\n" * (i + 1) for i in range(7)})
    generation_ = generation(store, [ref])

    async def check(ops: Operations) -> None:
        if not ops.lean_listings:
            pytest.skip("pyfuse3 without patch 0003: listings always carry attributes")
        leaf = generation_.resolve("/leaf")
        assert not generation_.load_children(leaf).dirs and not leaf.children.extras  # type: ignore[union-attr]
        attr = ops.attributes(leaf)
        await ops.lookup(leaf.parent, leaf.path[-1], SimpleNamespace(pid=100))
        children = leaf.children
        assert children is not None
        entries: list[tuple[bytes, int, int]] = []
        modes: dict[bytes, int] = {}
        offset = 0
        while True:
            part = Listing(room=2, pid=100)
            await ops.readdir(attr.st_ino, offset, part)
            if not part.entries:
                break
            entries.extend(part.entries)
            modes.update(part.modes)
            offset = part.entries[-1][2]
        files = entries[2:]  # after . and ..
        assert [name for name, _ino, _off in files] == children.names
        assert [ino for _name, ino, _off in files] == [children.node_at(i).ino for i in range(len(children))]
        assert [off for _name, _ino, off in entries] == list(range(1, len(children) + 3))
        assert set(modes) == set(children.names) and set(modes.values()) == {stat.S_IFREG}
        assert all(ops.lookup_count(children.inos[i]) == 0 for i in range(len(children)))

    run(operations(generation_, FakeKernel()), check)


def test_attributes_are_what_the_entries_say(world: World) -> None:
    """Built without the Node properties: the same numbers as a stat of the source."""
    generation = compose(world.store, world.v1)
    generation.check()

    async def check(ops: Operations) -> None:
        for path, node in generation.walk():
            rel = b"/".join(path).decode()
            if rel == "":
                continue
            st_src = os.lstat(world.src / rel)
            attr = ops.attributes(node)
            assert attr.st_ino == node.ino and attr.generation == 0
            assert (attr.st_mode, attr.st_uid, attr.st_gid) == (st_src.st_mode, st_src.st_uid, st_src.st_gid), rel
            assert attr.st_mtime_ns == attr.st_ctime_ns == attr.st_atime_ns == st_src.st_mtime_ns, rel
            assert attr.st_blksize == 4096 and attr.st_rdev == 0
            if stat.S_ISDIR(st_src.st_mode):
                subdirs = sum(1 for child in node.children.values() if child.is_dir)
                assert (attr.st_size, attr.st_blocks, attr.st_nlink) == (4096, 8, 2 + subdirs), rel
            else:
                assert (attr.st_size, attr.st_nlink) == (st_src.st_size, st_src.st_nlink), rel
                assert attr.st_blocks == node.blocks, rel
        sparse = generation.resolve("/usr/share/sparse")
        assert ops.attributes(sparse).st_blocks < (3 << 20) // 512  # holes cost no blocks

    run(operations(generation), check)


# --------------------------------------------------------------------------- index queries


def test_only_a_mount_serves_objects_from_blocks_it_has_read_without_the_index(world: World) -> None:
    """A daemon's store skips the index for neighbours of what it read; verify, gc and
    every other store ask the index, which stays the authority."""
    generation = compose(world.store, world.v1)
    node = generation.resolve("/usr/share/doc/pkg3")
    tree = node.entry.tree
    assert tree is not None
    other = compose(world.store, world.v1).resolve("/usr/share/doc/pkg4").entry.tree  # same block, read
    assert other is not None
    want = world.store.get(tree)
    drop_rows(world.store, [tree])
    with pytest.raises(MissingObjectError):
        world.store.get(tree)  # the default: the index says it is gone
    world.store.serve_remembered = True
    try:
        assert world.store.get(tree) == want  # the block's record says where it is; verified
    finally:
        world.store.serve_remembered = False
    fresh = LocalStore(world.store.path)
    fresh.serve_remembered = True
    try:
        with pytest.raises(MissingObjectError):
            fresh.get(tree)  # nothing read yet: the index is asked, and has no row
    finally:
        fresh.close()


# --------------------------------------------------------------------------- a real mount


@pytest.fixture
def wide(tmp_path: Path) -> tuple[Path, str, Path]:
    require_fuse()
    src = tmp_path / "src"
    for d in range(4):
        for f in range(100 if d == 0 else 3):
            path = src / f"d{d}" / f"a-rather-long-file-name-to-fill-the-reply-{f:04d}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"{d} {f}\n".encode())
    store = tmp_path / "store"
    ref = cnpsfs("import", "dir", src, "--name", "example.org/wide", "--version", "1", store=store).stdout
    return store, ref.strip().splitlines()[-1], src


def test_a_cold_listing_is_two_readdirs_however_wide(wide: tuple[Path, str, Path], tmp_path: Path) -> None:
    store, ref, src = wide
    with mount_image(store, ref, tmp_path / "mnt") as mount:
        cached = mount.status()["fuse_mode"].startswith("kernel-cache")
        for d in range(4):
            before = mount.requests()
            names = sorted(os.listdir(mount / f"d{d}"))
            after = mount.requests()
            delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
            assert names == sorted(os.listdir(src / f"d{d}"))
            # One reply with every entry (d0: 100 entries of 200 bytes, more than a page: the
            # kernel asks for as much as getdents has room for, 32 KiB from glibc), one empty
            # reply that tells the kernel the listing ends; besides, the lookup of the
            # directory and (once per mount) the opendir that tells the kernel to open
            # directories itself.
            assert delta.pop("readdir", 0) == 2, (d, delta)
            assert delta.pop("lookup", 0) == 1, (d, delta)
            if cached:
                assert delta.pop("opendir", 0) <= (1 if d == 0 else 0)
                assert delta == {}, (d, delta)
        st_mnt = os.lstat(mount / "d0/a-rather-long-file-name-to-fill-the-reply-0042")
        st_src = os.lstat(src / "d0/a-rather-long-file-name-to-fill-the-reply-0042")
        assert (st_mnt.st_size, st_mnt.st_mode, st_mnt.st_mtime_ns) == (st_src.st_size, st_src.st_mode,
                                                                          st_src.st_mtime_ns)


@pytest.fixture
def many_dirs(tmp_path: Path) -> tuple[Path, str, Path]:
    """40 directories of 10 files each, a symlink and a subdirectory in each."""
    require_fuse()
    src = tmp_path / "src"
    for d in range(40):
        sub = src / f"dir{d:02d}"
        (sub / "sub").mkdir(parents=True)
        for f in range(10):
            (sub / f"file{f}").write_bytes(b"x" * (d * 10 + f))
        (sub / "link").symlink_to("file0")
    store = tmp_path / "store"
    ref = cnpsfs("import", "dir", src, "--name", "example.org/many", "--version", "1", store=store).stdout
    return store, ref.strip().splitlines()[-1], src


def _find(root: Path, *args: str) -> list[str]:
    out = subprocess.run(["find", str(root), *args], check=True, capture_output=True, text=True, timeout=60).stdout
    return sorted(line.replace(str(root), "", 1) for line in out.splitlines())


def test_a_name_walk_links_no_files_and_a_stat_walk_gets_attributes(many_dirs: tuple[Path, str, Path],
                                                                      tmp_path: Path) -> None:
    """Lean listings (patch 0003): ``find`` without predicates is listed names only, and
    the kernel takes no file inode; a walker that stats what it lists is recognised by its
    first lookup in such a listing and gets attributes from then on, so it costs about one
    directory's lookups, not one per file; every name, type and size is the source's."""
    store, ref, src = many_dirs
    with mount_image(store, ref, tmp_path / "mnt") as mount:
        if "lean-listings" not in mount.status()["fuse_mode"]:
            pytest.skip("pyfuse3 without patch 0003 (readdir_reply_name): listings carry attributes")
        assert _find(mount.mountpoint, "-printf", "%y %P\n") == _find(src, "-printf", "%y %P\n")
        status = mount.status()
        assert status["inode_table"]["held"] == 0, status["inode_table"]  # no file was linked
        assert status["kernel_inodes"] == 40 * 2  # the directories (the root is not counted)
        before = mount.requests()
        sizes = _find(mount.mountpoint, "-printf", "%s %y %P\n")  # stats every entry
        lookups = mount.requests().get("lookup", 0) - before.get("lookup", 0)
        assert sizes == _find(src, "-printf", "%s %y %P\n")
        assert 1 <= lookups <= 2 * 12, lookups  # 440 files and links: the first directory's, not each
        assert mount.status()["inode_table"]["held"] > 400
    # A cold stat walk on a fresh mount: the same, from the first listing on.
    with mount_image(store, ref, tmp_path / "mnt2") as mount:
        before = mount.requests()
        assert _find(mount.mountpoint, "-printf", "%s %m %y %P\n") == _find(src, "-printf", "%s %m %y %P\n")
        lookups = mount.requests().get("lookup", 0) - before.get("lookup", 0)
        assert lookups <= 2 * 12, lookups
