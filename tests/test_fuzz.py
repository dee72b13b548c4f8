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

import collections
import dataclasses
import io
import json
import os
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError, FormatError

CORPUS = Path(__file__).parent / "corpus"

#: Examples per smoke test (a few seconds each) and per long test.
SMOKE_EXAMPLES = int(os.environ.get("CNPSFS_FUZZ_SMOKE", "500"))
LONG_EXAMPLES = int(os.environ.get("CNPSFS_FUZZ_LONG", "20000"))
#: No single input may take longer than this to be decoded or refused.
DECODE_DEADLINE = 2.0


def _settings(long: bool) -> settings:
    return settings(max_examples=LONG_EXAMPLES if long else SMOKE_EXAMPLES, deadline=None, database=None,
                    derandomize=not long, suppress_health_check=list(HealthCheck))


class Tally:
    """What the inputs of one fuzz run came to, printed at its end (seen with ``pytest -s``;
    the figures in docs/reliability.md come from it)."""

    current: collections.Counter[str] | None = None


def outcome(name: str) -> None:
    if Tally.current is not None:
        Tally.current[name] += 1


def fuzz(long: bool, inputs: st.SearchStrategy[Any], prop: Callable[[Any], None], label: str,
         examples: int | None = None) -> None:
    """Run *prop* on *inputs* (smoke or long settings; *examples* of them if given) and print
    how the inputs ended."""
    counts: collections.Counter[str] = collections.Counter()
    Tally.current = counts
    started = time.monotonic()
    chosen = _settings(long) if examples is None else settings(_settings(long), max_examples=examples)
    try:
        chosen(given(inputs)(prop))()
    finally:
        Tally.current = None
    n = counts.pop("input", 0)
    print(f"\nfuzz {label}: {n} inputs in {time.monotonic() - started:.0f} s; "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


RUNS = [pytest.param(False, id="smoke"),
        pytest.param(True, id="long", marks=[pytest.mark.long, pytest.mark.timeout(1800)])]


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
    outcome("input")
    accepted = False
    for kind, decode in DECODERS.items():
        started = time.monotonic()
        try:
            value = decode(data)
        except FormatError:
            pass
        else:
            check_decoded(kind, value)
            outcome(f"accepted as {kind}")
            accepted = True
        try:
            refs = fmt.referenced_digests(data)
        except FormatError:
            pass
        else:
            assert all(type(d) is bytes and len(d) == 32 and type(c) is bool for d, c in refs)
        assert time.monotonic() - started < DECODE_DEADLINE, f"{kind}: {len(data)} bytes took too long"
    if not accepted:
        outcome("refused by all")


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
    fuzz(long, OBJECT_INPUTS, decode_any, "objects")


def corpus_files(kind: str) -> list[Path]:
    return sorted((CORPUS / kind).glob("*")) if (CORPUS / kind).is_dir() else []


@pytest.mark.parametrize("path", corpus_files("objects"), ids=lambda p: p.name)
def test_object_corpus(path: Path) -> None:
    """Objects the old decoders accepted or crashed on (docs/reliability.md): every decoder refuses each."""
    data = path.read_bytes()
    decode_any(data)
    for decode in (*DECODERS.values(), fmt.referenced_digests):
        with pytest.raises(FormatError):
            decode(data)


# --------------------------------------------------------------------------- manifests (TOML)

SEED_MANIFESTS = [
    'name = "example.org/app"\nversion = "1.0"\nmode = "union"\n[[layers]]\nfileset = "debian.org/bash@5"\n'
    '[[layers]]\nfileset = "blake3:3f2a"\nat = "/opt//app/"\nunlinked = false\noverride = true\nlabel = "code"\n'
    '[config]\nentrypoint = ["/bin/sh", "-c"]\ncmd = ["echo"]\nenv = ["A=1"]\nworkdir = "/"\nuser = "0:0"\n'
    'labels = { "k" = "v" }\nstop_signal = "SIGTERM"\n[metadata]\nx = [1, "two", { y = true }]\n',
    'name = "example.org/m"\nversion = "1"\n[[layers]]\nfileset = "x"\n',
]
TOML_ATOMS = st.sampled_from([
    '"x"', '""', '"/"', '"/a\\u0000b"', '"/' + "n" * 300 + '"', "1", "-1", "1.5", "nan", "inf", "true",
    "1979-05-27T07:32:00Z", "[]", "[1, 2]", '["a", 1]', "{}", '{ a = 1 }', '"\\ud800"', "0x10", '"layers"',
    '"union"', '"stack"', '"/opt/../etc"', '"relative"', '"NAME=VALUE"', '"novalue"', "9999999999999999999",
])
TOML_KEYS = st.sampled_from(["name", "version", "mode", "layers", "config", "metadata", "fileset", "at",
                             "unlinked", "override", "label", "entrypoint", "cmd", "env", "workdir", "user",
                             "labels", "stop_signal", "colour", "x", '"quoted key"', "a.b"])


@st.composite
def toml_documents(draw: st.DrawFn) -> str:
    """TOML built from the manifest's own keys with odd values, tables and arrays of tables."""
    lines = [f"{draw(TOML_KEYS)} = {draw(TOML_ATOMS)}" for _ in range(draw(st.integers(0, 4)))]
    for _ in range(draw(st.integers(0, 4))):
        header = draw(st.sampled_from(["[[layers]]", "[config]", "[metadata]", "[layers]", "[[config]]", "[x.y]"]))
        lines.append(header)
        lines += [f"{draw(TOML_KEYS)} = {draw(TOML_ATOMS)}" for _ in range(draw(st.integers(0, 4)))]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"


ODD_MANIFEST_VALUES = st.one_of(
    st.sampled_from(["", "/", "/a\x00b", "/" + "n" * 256, "/opt/../x", "rel", "/é" * 200, "/" + "d/" * 2100,
                     "NAME", "A=1", "union", "layers", "blake3:zz", "x@", "@1", "a b", "Example.org/x"]),
    st.text(max_size=12), st.integers(-5, 5), st.booleans(), st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2), st.just(1.5))


@st.composite
def manifest_dicts(draw: st.DrawFn) -> str:
    """A valid manifest with a few fields replaced by odd values, rendered as TOML."""
    doc: dict[str, Any] = {"name": "example.org/app", "version": "1.0", "mode": "layers"}
    layers = [{"fileset": "example.org/base@1", "at": draw(st.sampled_from(["/", "/opt/app", "//x//y/"])),
               "unlinked": False, "override": draw(st.booleans()), "label": "l"}
              for _ in range(draw(st.integers(1, 3)))]
    config: dict[str, Any] = {"cmd": ["/bin/sh"], "env": ["A=1"], "workdir": "/", "labels": {"k": "v"}}
    metadata: dict[str, Any] = {"m": [1, "two", {"three": True}]}
    for _ in range(draw(st.integers(0, 3))):
        table = draw(st.sampled_from([doc, config, metadata, *layers]))
        key = draw(st.sampled_from([*table.keys(), "extra"])) if table else "extra"
        table[key] = draw(ODD_MANIFEST_VALUES)
    lines = [f"{k} = {_toml(v)}" for k, v in doc.items()]
    for layer in layers:
        lines += ["[[layers]]", *(f"{k} = {_toml(v)}" for k, v in layer.items())]
    lines += ["[config]", *(f"{json.dumps(k)} = {_toml(v)}" for k, v in config.items())]
    lines += ["[metadata]", *(f"{json.dumps(k)} = {_toml(v)}" for k, v in metadata.items())]
    return "\n".join(lines) + "\n"


MANIFEST_INPUTS = st.one_of(
    st.text(max_size=300),
    toml_documents(),
    manifest_dicts(),
    mutated([m.encode() for m in SEED_MANIFESTS]).map(lambda b: b.decode("utf-8", "replace")),
    st.sampled_from(SEED_MANIFESTS).flatmap(lambda m: toml_documents().map(lambda extra: m + extra)),
)


def parse_any_manifest(text: str) -> None:
    from cnpsfs.image.manifest import parse_manifest

    outcome("input")
    started = time.monotonic()
    try:
        spec = parse_manifest(text, "fuzz.toml")
    except CnpsfsError as exc:
        assert "\n" not in str(exc), f"a multi-line error: {exc!r}"
        outcome("refused")
    else:
        outcome("accepted")
        # What the parser accepts, the image encoder must accept too (with the references resolved).
        layers = [fmt.Layer(D1, layer["at"], layer["unlinked"], layer["override"], layer["label"])
                  for layer in spec["layers"]]
        fmt.encode_image(fmt.Image(spec["name"], spec["version"], spec["mode"], layers, spec["config"],
                                   spec["metadata"]))
    assert time.monotonic() - started < DECODE_DEADLINE


def test_manifest_seeds_parse() -> None:
    for text in SEED_MANIFESTS:
        parse_any_manifest(text)


@pytest.mark.parametrize("long", RUNS)
def test_fuzz_manifests(long: bool) -> None:
    """Any text ends in a manifest the image encoder accepts, or a one-line UsageError."""
    fuzz(long, MANIFEST_INPUTS, parse_any_manifest, "manifests")


def test_manifest_file_bytes_that_are_not_text(tmp_path: Path, store: Any) -> None:
    from cnpsfs.errors import UsageError
    from cnpsfs.image.manifest import load_manifest_file

    path = tmp_path / "m.toml"
    path.write_bytes(SEED_MANIFESTS[1].encode() + b"\xff\xfe#\n")
    with pytest.raises(UsageError, match="not UTF-8"):
        load_manifest_file(store, path)


# --------------------------------------------------------------------------- Debian control files

SEED_CONTROLS = [
    b"Package: hello\nVersion: 2.10-3\nArchitecture: amd64\nMaintainer: Santiago <s@d.org>\n"
    b"Installed-Size: 280\nDepends: libc6 (>= 2.34)\nSection: devel\nPriority: optional\n"
    b"Description: example package\n long text\n .\n more\n",
    b"\n\nPackage: x\nVersion: 1\nArchitecture: all\nDescription:\n first line empty\n\n",
    b"Package: latin\nVersion: 1\nArchitecture: all\nMaintainer: J\xe9r\xf4me\n",
]


def parse_any_control(data: bytes) -> None:
    from cnpsfs.debian.control import ControlError, parse_control

    outcome("input")
    try:
        fields = parse_control(data)
    except ControlError as exc:  # the importer turns it into ImportRejected naming the package
        assert "\n" not in str(exc)
        outcome("refused")
    else:
        outcome("accepted")
        names = [name.lower() for name, _value in fields]
        assert len(names) == len(set(names)) and all(isinstance(v, (str, bytes)) for _n, v in fields)


@pytest.mark.parametrize("long", RUNS)
def test_fuzz_control_files(long: bool) -> None:
    """deb822 control files: fields, or a ControlError (ImportRejected once in the importer)."""
    inputs = st.one_of(st.binary(max_size=300), mutated(SEED_CONTROLS),
                       st.lists(st.sampled_from([b"Package: x", b" cont", b"\t", b"", b"#c", b"-x: y", b":", b"A:B",
                                                 b"package: dup", b"\r", b"Version: 1\r"]),
                                max_size=8).map(lambda ls: b"\n".join(ls) + b"\n"))
    fuzz(long, inputs, parse_any_control, "control files")


# --------------------------------------------------------------------------- .deb files: ar members and control.tar


def ar_archive(members: list[tuple[bytes, bytes]]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += b"%-16s%-12d%-6d%-6d%-8s%-10d`\n" % (name, 0, 0, 0, b"100644", len(data))
        out += data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def tar_of(files: dict[str, bytes], *, compress: str = "gz") -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode=f"w:{compress}" if compress else "w", format=tarfile.GNU_FORMAT) as tf:
        dot = tarfile.TarInfo("./")
        dot.type = tarfile.DIRTYPE
        dot.mode = 0o755
        tf.addfile(dot)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def seed_debs() -> list[bytes]:
    control = tar_of({"./control": SEED_CONTROLS[0], "./md5sums": b"0" * 32 + b"  usr/bin/hello\n",
                      "./postinst": b"#!/bin/sh\nexit 0\n"})
    data = tar_of({"./usr/bin/hello": b"\x7fELF", "./usr/share/doc/hello/copyright": b"c"}, compress="xz")
    plain = tar_of({"./control": SEED_CONTROLS[1]}, compress="")
    return [
        ar_archive([(b"debian-binary", b"2.0\n"), (b"control.tar.gz", control), (b"data.tar.xz", data)]),
        ar_archive([(b"debian-binary/", b"2.0\n"), (b"control.tar/", plain), (b"data.tar/", tar_of({}, compress=""))]),
    ]


SEED_DEBS = seed_debs()


def open_any_deb(data: bytes, where: Path) -> None:
    """The whole front of a .deb (ar headers, debian-binary, control.tar, control fields)."""
    from cnpsfs.debian.ar import ArError, read_members
    from cnpsfs.debian.deb import open_deb

    outcome("input")
    path = where / "fuzz.deb"
    path.write_bytes(data)
    started = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        members = read_members(fd, len(data))
    except ArError as exc:
        assert "\n" not in str(exc)
        outcome("ar refused")
    else:
        outcome("ar accepted")
        assert all(m.offset + m.size <= len(data) for m in members)
    finally:
        os.close(fd)
    try:
        with open_deb(path) as deb:
            assert deb.package and deb.version and deb.architecture
            fmt.encode_canonical(deb.metadata())  # what becomes the FileSet's metadata is in the subset
        outcome(".deb accepted")
    except CnpsfsError as exc:
        assert "\n" not in str(exc).strip(), repr(exc)
        outcome(".deb refused")
    assert time.monotonic() - started < DECODE_DEADLINE


CONTROL_LINES = st.lists(st.sampled_from([
    b"Package: x", b"Package: hello", b"Version: 1.0-1", b"Version: 1:2.3~rc1+b2", b"Version: -1", b"Version: a b",
    b"Architecture: amd64", b"Architecture: all", b"Architecture: AMD64", b"Description: d", b" more", b" .",
    b"package: dup", b"#comment", b"-x: y", b"Depends: libc6 (>= 2)", b"Maintainer: \xe9", b"", b"Package: x\x00",
    b"Version:", b"Package: ../evil", b"Package: " + b"p" * 300]), max_size=8).map(lambda ls: b"\n".join(ls) + b"\n")


@st.composite
def deb_archives(draw: st.DrawFn) -> bytes:
    """ar framing that holds, around members of every kind dpkg meets or refuses."""
    control_files = {"./control": draw(st.one_of(st.sampled_from(SEED_CONTROLS), CONTROL_LINES))}
    for name in draw(st.lists(st.sampled_from(["./md5sums", "./postinst", "../evil", "./sub/f", "./control",
                                                "./conffiles", "./" + "c" * 200]), max_size=3)):
        control_files.setdefault(name, draw(st.binary(max_size=40)))
    if draw(st.booleans()):  # dpkg's member order, so the control fields are reached
        control = draw(st.sampled_from(["gz", "xz", ""]))
        return ar_archive([(b"debian-binary", b"2.0\n"),
                           (b"control.tar" + (b"." + control.encode() if control else b""),
                            tar_of(control_files, compress=control)),
                           (b"data.tar.xz", tar_of({"./usr/bin/x": b"x"}, compress="xz")),
                           *[(b"_extra", b"x")] * draw(st.integers(0, 1))])
    members = [(draw(st.sampled_from([b"debian-binary", b"debian-binary/", b"control.tar.gz"])),
                draw(st.sampled_from([b"2.0\n", b"2.9\n", b"3.0\n", b"2.0", b"", b"2.0\n" * 300])))]
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from([b"control.tar.gz", b"control.tar.xz", b"control.tar.zst", b"control.tar",
                                     b"control.tar.bz2", b"data.tar.xz", b"data.tar", b"data.tar.lzma", b"data.tar.zst",
                                     b"_gpgbuilder", b"junk", b"/", b"//", b"#1/long", b"debian-binary"]))
        compress = draw(st.sampled_from(["gz", "xz", "", "bz2"]))
        body = draw(st.one_of(st.just(tar_of(control_files, compress=compress)),
                              st.just(tar_of({"./usr/bin/x": b"x"}, compress=compress)), st.binary(max_size=80)))
        members.append((name, body))
    return ar_archive(members)


@pytest.mark.parametrize("long", RUNS)
def test_fuzz_deb_front(long: bool, tmp_path: Path) -> None:
    """ar members, debian-binary, control.tar (gz/xz/plain) and control fields: a value or ImportRejected."""
    inputs = st.one_of(st.binary(max_size=600), mutated(SEED_DEBS), deb_archives())
    fuzz(long, inputs, lambda data: open_any_deb(data, tmp_path), ".deb front")


def test_deb_seeds_open(tmp_path: Path) -> None:
    from cnpsfs.debian.deb import open_deb

    for data in SEED_DEBS:
        (tmp_path / "s.deb").write_bytes(data)
        with open_deb(tmp_path / "s.deb") as deb:
            assert deb.package in ("hello", "x")


# --------------------------------------------------------------------------- tar members, through a real import


@st.composite
def tar_members(draw: st.DrawFn) -> bytes:
    """A tar archive with valid checksums whose members are hostile or odd in every field."""
    raw = io.BytesIO()
    fmt_ = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    names = st.one_of(st.sampled_from(["a", "./a", "a/b", "a/../b", "/abs", ".", "./", "d/", "n" * 256,
                                       ".wh.a", "d/.wh..wh..opq", ".wh.", "a//b", "x" * 100 + "/" + "y" * 100,
                                       "\udcff", "é"]), st.text(min_size=1, max_size=20))
    with tarfile.open(fileobj=raw, mode="w", format=fmt_, encoding="utf-8", errors="surrogateescape") as tf:
        for _ in range(draw(st.integers(1, 6))):
            info = tarfile.TarInfo(draw(names))
            info.type = draw(st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                                              tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, b"V", b"Q"]))
            info.mode = draw(st.integers(0, 0o7777))
            info.mtime = draw(st.integers(-(1 << 33), (1 << 33)))
            if fmt_ != tarfile.USTAR_FORMAT:
                info.uid = draw(st.sampled_from([0, 1000, (1 << 21) - 1, 1 << 32, 1 << 40]))
            info.linkname = draw(st.one_of(names, st.just("")))
            if info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                info.devmajor, info.devminor = draw(st.integers(0, 4095)), draw(st.integers(0, 1 << 20))
            if fmt_ == tarfile.PAX_FORMAT:
                info.pax_headers = draw(st.dictionaries(st.sampled_from(
                    ["mtime", "SCHILY.xattr.user.x", "SCHILY.xattr.", "LIBARCHIVE.xattr.user%00y",
                     "LIBARCHIVE.xattr.user.z", "uid", "path", "linkpath", "size"]),
                    st.sampled_from(["1.5", "-1.000000001", "abc", "", "!!", "AAAA", "1e30", "99999999999999999999",
                                     "a\x00b", "/etc/passwd", "0"]), max_size=3))
            data = draw(st.binary(max_size=64)) if info.type == tarfile.REGTYPE else None
            if data is not None:
                info.size = len(data)
            try:
                tf.addfile(info, io.BytesIO(data) if data is not None else None)
            except (ValueError, OverflowError, UnicodeError, tarfile.TarError):
                continue  # tarfile cannot write it: not an input an archive can hold
    return raw.getvalue()


def seed_tars() -> list[bytes]:
    import gzip

    plain = tar_of({"./etc/hostname": b"h\n", "./usr/bin/x": b"\x00" * 100}, compress="")
    return [plain, gzip.compress(plain, mtime=0), tar_of({"./a": b"a"}, compress="xz")]


SEED_TARS = seed_tars()


def import_any_tar(data: bytes, store: Any, outside: Path) -> None:
    """A real import into *store*: a FileSet that reads back whole, or ImportRejected; nothing leaks."""
    from cnpsfs.image.reader import ExtentMap, read_range
    from cnpsfs.image.walk import walk
    from cnpsfs.ingest.tar import import_tar_stream
    from cnpsfs.ingest.tree import ImportOptions

    outcome("input")
    before = sorted(p.name for p in outside.iterdir())
    started = time.monotonic()
    try:
        result = import_tar_stream(store, io.BufferedReader(io.BytesIO(data)),
                                   ImportOptions(name="example.org/fuzz", version="1"),
                                   "fuzz.tar")
    except CnpsfsError as exc:
        assert "\n" not in str(exc).strip(), repr(exc)
        outcome("refused")
    else:
        outcome("imported")
        fileset = store.get_fileset(result.digest)  # what was committed decodes again
        for _parts, entry, _opaque in walk(store, fileset.root):
            if entry.kind is fmt.Kind.FILE:
                emap = ExtentMap(store.file_extents(entry))
                assert len(read_range(emap, 0, emap.size, store.get)) == entry.size
    assert time.monotonic() - started < 10 * DECODE_DEADLINE
    assert list(store.tmp_dir.iterdir()) == [], "an import left temporary files behind"
    assert sorted(p.name for p in outside.iterdir()) == before, "an import wrote outside the store"


@pytest.mark.parametrize("long", RUNS)
def test_fuzz_tar_members(long: bool, tmp_path: Path) -> None:
    """Tar archives (plain, gzip, xz) through a real import: a FileSet that reads back, or ImportRejected."""
    from cnpsfs.store import LocalStore

    store = LocalStore(tmp_path / "store", create=True)
    try:
        inputs = st.one_of(tar_members(), mutated(SEED_TARS), st.binary(max_size=1200))
        fuzz(long, inputs, lambda data: import_any_tar(data, store, tmp_path), "tar members")
    finally:
        store.close()


@pytest.mark.parametrize("path", corpus_files("tar"), ids=lambda p: p.name)
def test_tar_corpus(path: Path, tmp_path: Path) -> None:
    """Archives that once imported into an unreadable FileSet: each is refused now."""
    from cnpsfs.errors import ImportRejected
    from cnpsfs.ingest.tar import import_tar_stream
    from cnpsfs.ingest.tree import ImportOptions
    from cnpsfs.store import LocalStore

    store = LocalStore(tmp_path / "store", create=True)
    try:
        import_any_tar(path.read_bytes(), store, tmp_path)
        with pytest.raises(ImportRejected), path.open("rb") as f:
            import_tar_stream(store, f, ImportOptions(name="example.org/c", version="1"), path.name)
        assert store.tags() == []
    finally:
        store.close()
