"""Fuzzing every decoder that takes bytes from outside the store (issue 15).

Remote stores will feed these decoders from the network, so every input must end in a
value the format allows or in a clean :class:`CnpsfsError` (FormatError, ImportRejected,
UsageError): never another exception, a hang, unbounded memory, or a write outside the
store. The inputs are hypothesis-driven: raw bytes, mutations (flips, insertions,
deletions, truncations, splices) of valid seed encodings, and structured values of the
right shape with wrong types or ranges in them.

Each decoder has a short smoke here (a few seconds, derandomized so CI is reproducible)
and a long run marked ``long`` (``scripts/test --long`` or ``pytest --long``) with many
more random examples. Inputs that once broke a decoder are kept in ``tests/corpus/`` and
replayed on every run. Figures are in docs/reliability.md.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnpsfs import format as fmt
from cnpsfs.errors import FormatError

CORPUS = Path(__file__).parent / "corpus"

#: Examples per smoke test (a few seconds each) and per long test.
SMOKE_EXAMPLES = int(os.environ.get("CNPSFS_FUZZ_SMOKE", "300"))
LONG_EXAMPLES = int(os.environ.get("CNPSFS_FUZZ_LONG", "20000"))
#: No single input may take longer than this to be decoded or refused.
DECODE_DEADLINE = 2.0


def _settings(long: bool) -> settings:
    return settings(max_examples=LONG_EXAMPLES if long else SMOKE_EXAMPLES, deadline=None, database=None,
                    derandomize=not long, suppress_health_check=list(HealthCheck))


RUNS = [pytest.param(False, id="smoke"), pytest.param(True, id="long", marks=pytest.mark.long)]


# --------------------------------------------------------------------------- seeds: one valid encoding of each object

D1, D2, D3 = (bytes([n]) * 32 for n in (1, 2, 3))


def seed_entries() -> list[fmt.Entry]:
    K = fmt.Kind
    return [
        fmt.Entry(b"file", K.FILE, 0o4755, 1000, 100, -5, {b"user.x": b"1", b"security.capability": b"\x01\x02"},
                  size=10, extents=(fmt.Extent(D1, 3, 4), fmt.Extent(None, 0, 6)), hash=D2, link=(b"a/file", 2)),
        fmt.Entry(b"long", K.FILE, 0o644, size=1 << 40, content=D3, hash=D2),
        fmt.Entry(b"empty", K.FILE, 0o600),
        fmt.Entry(b"dir", K.DIR, 0o755, tree=D1, mtime_ns=1_700_000_000_000_000_001),
        fmt.Entry(b"sym", K.SYMLINK, 0o777, target=b"../etc/passwd"),
        fmt.Entry(b"chr", K.CHARDEV, 0o666, rdev=(1, 3)),
        fmt.Entry(b"blk", K.BLOCKDEV, 0o660, rdev=(8, 0)),
        fmt.Entry(b"fifo", K.FIFO, 0o644),
        fmt.Entry(b"sock", K.SOCKET, 0o755),
        fmt.Entry(b"gone", K.WHITEOUT, 0),
        fmt.Entry(b"\xff\xfe", K.FILE, 0o644, size=1, extents=(fmt.Extent(D1, 0, 1),), hash=D3),
    ]


def seed_objects() -> dict[str, list[bytes]]:
    root = fmt.Entry(b"", fmt.Kind.DIR, 0o755, tree=D1)
    extents = [fmt.Extent(D1, 0, 65536), fmt.Extent(None, 0, 4096)] * 9
    return {
        "directory": [fmt.encode_directory(fmt.Directory(seed_entries())),
                      fmt.encode_directory(fmt.Directory([], opaque=True))],
        "extents": [fmt.encode_extents_object(extents)],
        "fileset": [fmt.encode_fileset(fmt.FileSet("example.org/seed", "1.0", root,
                                                   {"debian": {"control": {"Package": "x"}, "raw": b"\x00"}}))],
        "image": [fmt.encode_image(fmt.Image(
            "example.org/img", "2", "union",
            [fmt.Layer(D1), fmt.Layer(D2, "/opt/app", True, True, "app code")],
            {"cmd": ["/bin/sh"], "env": ["A=1"], "labels": {"k": "v"}}, {"nested": {"a": [1, -2, None, True]}}))],
    }


SEEDS = seed_objects()
ALL_SEEDS = [data for seeds in SEEDS.values() for data in seeds]


# --------------------------------------------------------------------------- what a decoded value must satisfy

DIGEST = (bytes, type(None))


def check_entry_value(entry: fmt.Entry, *, root: bool = False) -> None:
    """A decoded entry has the types and ranges the format allows (and so re-encodes)."""
    assert type(entry.name) is bytes
    if not root:
        fmt.check_name(entry.name)
    assert isinstance(entry.kind, fmt.Kind)
    for value in (entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.size):
        assert type(value) is int
    assert 0 <= entry.mode <= 0o7777 and 0 <= entry.uid < 1 << 32 and 0 <= entry.gid < 1 << 32
    assert -(1 << 63) <= entry.mtime_ns < 1 << 63 and 0 <= entry.size < 1 << 63
    assert isinstance(entry.xattrs, dict)
    assert all(type(k) is bytes and type(v) is bytes for k, v in entry.xattrs.items())
    if entry.extents is not None:
        for extent in entry.extents:
            assert type(extent.digest) in DIGEST and (extent.digest is None or len(extent.digest) == 32)
            assert type(extent.offset) is int and type(extent.length) is int
            assert extent.offset >= 0 and extent.length > 0
    for digest in (entry.content, entry.tree, entry.hash):
        assert digest is None or (type(digest) is bytes and len(digest) == 32)
    assert type(entry.target) is bytes
    assert type(entry.rdev) is tuple and all(type(n) is int and 0 <= n < 1 << 32 for n in entry.rdev)
    if entry.link is not None:
        assert type(entry.link[0]) is bytes and type(entry.link[1]) is int and entry.link[1] >= 2
    if entry.kind is fmt.Kind.DIR:
        assert entry.tree is not None
    fmt.check_entry(entry)


def check_metadata_value(value: Any) -> None:
    assert isinstance(value, dict) and all(type(k) is str for k in value)
    fmt.encode_canonical(value)  # the subset: no floats, tags, undefined, bad keys


def check_decoded(kind: str, value: Any) -> None:
    if kind == "directory":
        assert isinstance(value, fmt.Directory) and type(value.opaque) is bool
        assert len(value.entries) <= fmt.MAX_DIR_ENTRIES
        for entry in value.entries:
            check_entry_value(entry)
        fmt.encode_directory(value)
    elif kind == "extents":
        assert type(value) is tuple and len(value) <= fmt.MAX_EXTENTS
        entry = fmt.Entry(b"x", fmt.Kind.FILE, size=sum(e.length for e in value), extents=value, hash=D1)
        check_entry_value(dataclasses.replace(entry, extents=None, content=D1))
        for extent in value:
            assert type(extent.digest) in DIGEST and (extent.digest is None or len(extent.digest) == 32)
            assert type(extent.offset) is int and type(extent.length) is int
            assert extent.offset >= 0 and extent.length > 0
        fmt.encode_extents_object(value)
    elif kind == "fileset":
        assert isinstance(value, fmt.FileSet) and type(value.name) is str and type(value.version) is str
        check_entry_value(value.root, root=True)
        check_metadata_value(value.metadata)
        fmt.encode_fileset(value)
    elif kind == "image":
        assert isinstance(value, fmt.Image) and type(value.name) is str and type(value.version) is str
        assert value.mode in ("layers", "union") and len(value.layers) <= fmt.MAX_LAYERS
        for layer in value.layers:
            assert type(layer.fileset) is bytes and len(layer.fileset) == 32
            assert fmt.normalize_at(layer.at) == layer.at
            assert type(layer.unlinked) is bool and type(layer.override) is bool and type(layer.label) is str
        check_metadata_value(value.config)
        check_metadata_value(value.metadata)
        fmt.encode_image(value)


DECODERS: dict[str, Callable[[bytes], Any]] = {
    "directory": fmt.decode_directory,
    "extents": fmt.decode_extents_object,
    "fileset": fmt.decode_fileset,
    "image": fmt.decode_image,
}


def decode_any(data: bytes) -> None:
    """Feed *data* to every object decoder; each must return a valid value or raise FormatError."""
    for kind, decode in DECODERS.items():
        started = time.monotonic()
        try:
            value = decode(data)
        except FormatError:
            pass
        else:
            check_decoded(kind, value)
        try:
            refs = fmt.referenced_digests(data)
        except FormatError:
            pass
        else:
            assert all(type(d) is bytes and len(d) == 32 and type(c) is bool for d, c in refs)
        assert time.monotonic() - started < DECODE_DEADLINE, f"{kind}: {len(data)} bytes took too long"


# --------------------------------------------------------------------------- input strategies


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with a few random edits: byte flips, insertions, deletions, truncation, splices."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "splice", "dup"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0x00, 0x17, 0x18, 0x1b, 0x5b, 0x7f, 0x9f, 0xbf, 0xc2, 0xd8, 0xf7,
                                              0xf9, 0xfb, 0xff, draw(st.integers(0, 255))]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=9))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        elif op == "splice":
            other = draw(st.sampled_from(seeds))
            start = draw(st.integers(0, len(other)))
            data[pos:pos] = other[start : start + draw(st.integers(1, 64))]
        elif op == "dup" and data:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 32))]
    return bytes(data)


#: CBOR values outside the format's subset, and values of the wrong type for a field.
ODD_VALUES = st.sampled_from([
    1.5, float("nan"), -0.0, cbor2.undefined, cbor2.CBORSimpleValue(99), cbor2.CBORTag(1, 0),
    cbor2.CBORTag(99, b"x"), -1, 1 << 63, -(1 << 64), 1 << 70, "", "x", b"", b"\x00", b"/", b"..", b"a/b",
    b"n" * 256, [], {}, [None] * 3, [b"\x01" * 32, -1, 5], [b"\x01" * 32, 0, 0], [b"\x01" * 31, 0, 1],
    {b"k": 1}, {"k": 1.0}, {1: 2}, True, False, None,
])

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 64), (1 << 64) - 1), st.binary(max_size=40),
                    st.text(max_size=20), ODD_VALUES)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.integers(0, 15), st.text(max_size=4),
                                                           st.binary(max_size=4)), inner, max_size=4)),
    max_leaves=12)


@st.composite
def entry_maps(draw: st.DrawFn) -> dict[int, Any]:
    """An entry-shaped map: mostly valid fields with a few of the wrong type or range."""
    valid = fmt.entry_to_cbor(draw(st.sampled_from(seed_entries())))
    for key in draw(st.lists(st.integers(0, 15), max_size=4)):
        if draw(st.booleans()):
            valid.pop(key, None)
        else:
            valid[key] = draw(st.one_of(ODD_VALUES, VALUES))
    return valid


@st.composite
def structured(draw: st.DrawFn) -> bytes:
    """An object-shaped map (right type name and version) with odd contents."""
    kind = draw(st.sampled_from([fmt.TYPE_DIR, fmt.TYPE_EXTENTS, fmt.TYPE_FILESET, fmt.TYPE_IMAGE]))
    obj = cbor2.loads(draw(st.sampled_from(SEEDS[{fmt.TYPE_DIR: "directory", fmt.TYPE_EXTENTS: "extents",
                                                   fmt.TYPE_FILESET: "fileset", fmt.TYPE_IMAGE: "image"}[kind]])))
    if kind == fmt.TYPE_DIR:
        obj[2] = draw(st.lists(entry_maps(), max_size=4))
    elif kind == fmt.TYPE_FILESET:
        obj[4] = draw(entry_maps())
    for key in draw(st.lists(st.integers(0, 9), max_size=3)):
        if draw(st.booleans()):
            obj.pop(key, None)
        else:
            obj[key] = draw(st.one_of(ODD_VALUES, VALUES, st.lists(entry_maps(), max_size=2),
                                      st.lists(st.dictionaries(st.integers(0, 5), VALUES, max_size=5), max_size=3)))
    try:
        return cbor2.dumps(obj)
    except (cbor2.CBOREncodeError, TypeError, ValueError):
        return cbor2.dumps({0: kind, 1: 1})


OBJECT_INPUTS = st.one_of(st.binary(max_size=512), mutated(ALL_SEEDS), structured())


# --------------------------------------------------------------------------- the CBOR object decoders


def test_seeds_decode() -> None:
    """The seeds are valid: every decoder accepts its own and the checks above pass."""
    for kind, seeds in SEEDS.items():
        for data in seeds:
            check_decoded(kind, DECODERS[kind](data))


@pytest.mark.parametrize("long", RUNS)
def test_fuzz_objects(long: bool) -> None:
    """Directories, extents objects, FileSets and images: any bytes end in a value or FormatError."""
    _settings(long)(given(OBJECT_INPUTS)(decode_any))()


def corpus_files(kind: str) -> list[Path]:
    return sorted((CORPUS / kind).glob("*")) if (CORPUS / kind).is_dir() else []


@pytest.mark.parametrize("path", corpus_files("objects"), ids=lambda p: p.name)
def test_object_corpus(path: Path) -> None:
    """Inputs that once broke an object decoder (kept as regression tests)."""
    decode_any(path.read_bytes())
