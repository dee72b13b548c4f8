"""The canonical object format (docs/format.md): golden vectors, hand-checked encodings,
invariants the encoder enforces, and hypothesis properties of the codec.

The golden vectors pin every digest a conforming implementation must produce for the
tree described in golden/tree.json. If a change to the code moves them, the format
changed: that needs a new format version, not new vectors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import blake3
import cbor2
import pytest
from cnpsfs_testlib import IS_ROOT, Node, build_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnpsfs import format as fmt
from cnpsfs.errors import FormatError
from cnpsfs.format import CDC_MAX
from cnpsfs.image.reader import ExtentMap, read_range
from cnpsfs.image.walk import walk
from cnpsfs.ingest.directory import import_directory
from cnpsfs.ingest.tree import ImportOptions
from cnpsfs.store import Store

GOLDEN = Path(__file__).parent / "golden"


# --------------------------------------------------------------------------- golden vectors


def golden_data(segments: list[dict[str, Any]]) -> bytes:
    out = bytearray()
    for seg in segments:
        if "text" in seg:
            out += seg["text"].encode()
        elif "zeros" in seg:
            out += bytes(seg["zeros"])
        else:
            out += blake3.blake3(seg["xof"].encode()).digest(length=seg["length"])
    return bytes(out)


def golden_nodes(desc: dict[str, Any]) -> list[Node]:
    nodes = []
    for raw in desc["nodes"]:
        path = bytes.fromhex(raw["path_hex"]) if "path_hex" in raw else raw["path"].encode()
        nodes.append(Node(
            path, raw["type"], int(raw["mode"], 8) if "mode" in raw else None, raw.get("uid", 0), raw.get("gid", 0),
            raw.get("mtime_ns"), golden_data(raw.get("data", [])), raw.get("target", "").encode(),
            tuple(raw.get("rdev", (0, 0))), {k.encode(): bytes.fromhex(v) for k, v in raw.get("xattrs", {}).items()},
        ))
    return nodes


def build_golden_tree(dest: Path) -> dict[str, Any]:
    desc = json.loads((GOLDEN / "tree.json").read_text())
    root = desc["root"]
    build_tree(dest, golden_nodes(desc), root_mode=int(root["mode"], 8), root_mtime_ns=root["mtime_ns"],
               root_owner=(root["uid"], root["gid"]))
    return desc


def golden_values(store: Store, digest: bytes) -> dict[str, Any]:
    """Everything expected.json pins, computed from a stored FileSet."""
    show = fmt.format_digest
    fileset = store.get_fileset(digest)
    directories: dict[str, str] = {}
    extents_objects: dict[str, str] = {}
    files: dict[str, Any] = {}
    for parts, entry, _opaque in walk(store, fileset.root):
        path = b"/".join(parts).decode("utf-8", "backslashreplace")
        if entry.kind is fmt.Kind.DIR:
            assert entry.tree is not None
            directories[path] = show(entry.tree)
        elif entry.kind is fmt.Kind.FILE and entry.size:
            if entry.content is not None:
                extents_objects[path] = show(entry.content)
            files[path] = {
                "hash": show(entry.hash) if entry.hash else None,
                "extents": [[show(e.digest) if e.digest else None, e.offset, e.length]
                            for e in store.file_extents(entry)],
            }
    assert fileset.root.tree is not None
    return {
        "fileset": show(digest),
        "fileset_cbor_hex": store.get(digest).hex(),
        "root_directory_cbor_hex": store.get(fileset.root.tree).hex(),
        "directories": directories,
        "extents_objects": extents_objects,
        "files": files,
    }


@pytest.mark.skipif(not IS_ROOT, reason="the golden tree has owners, a device node and security.capability")
def test_golden_vectors(tmp_path: Path, store: Store) -> None:
    desc = build_golden_tree(tmp_path / "tree")
    options = ImportOptions(name=desc["name"], version=desc["version"])
    result = import_directory(store, str(tmp_path / "tree"), options)
    actual = golden_values(store, result.digest)
    expected = json.loads((GOLDEN / "expected.json").read_text())
    # Compare piecewise so a failure says which object moved.
    for key in ("root_directory_cbor_hex", "directories", "extents_objects", "files", "fileset_cbor_hex",
                "fileset"):
        assert actual[key] == expected[key], f"golden {key} changed:\n{json.dumps(actual[key], indent=1)}"


def test_golden_expected_is_self_consistent() -> None:
    """The committed hex objects hash to the committed digests and decode to the described tree."""
    expected = json.loads((GOLDEN / "expected.json").read_text())
    desc = json.loads((GOLDEN / "tree.json").read_text())
    root_bytes = bytes.fromhex(expected["root_directory_cbor_hex"])
    fs_bytes = bytes.fromhex(expected["fileset_cbor_hex"])
    assert fmt.format_digest(blake3.blake3(root_bytes).digest()) == expected["directories"][""]
    assert fmt.format_digest(blake3.blake3(fs_bytes).digest()) == expected["fileset"]
    # Re-encoding the decoded objects gives back the same bytes: the encoding is canonical.
    assert fmt.encode_directory(fmt.decode_directory(root_bytes)) == root_bytes
    assert fmt.encode_fileset(fmt.decode_fileset(fs_bytes)) == fs_bytes
    fileset = fmt.decode_fileset(fs_bytes)
    assert (fileset.name, fileset.version) == (desc["name"], desc["version"])
    assert fileset.root.mode == int(desc["root"]["mode"], 8)
    assert fileset.root.tree is not None
    assert fmt.format_digest(fileset.root.tree) == expected["directories"][""]
    root = {e.name: e for e in fmt.decode_directory(root_bytes).entries}
    assert sorted(root) == [b"alias", b"big.bin", b"caf\xe9", b"dev", b"empty", b"hello.txt", b"link",
                            b"medium.bin", b"sub"]
    # The hard link names the first of its paths in canonical order, not the one made first.
    assert root[b"alias"].link == (b"alias", 2)
    assert root[b"caf\xe9"].mode == 0o4755
    assert root[b"link"].target == b"hello.txt"
    assert root[b"big.bin"].content is not None  # more than 16 extents: an extents object
    assert root[b"medium.bin"].extents is not None and len(root[b"medium.bin"].extents) <= fmt.INLINE_EXTENTS_MAX
    # Holes: the 800000 zero bytes of big.bin hold at least one all-zero chunk.
    assert any(e[0] is None for e in expected["files"]["big.bin"]["extents"])
    for path, info in expected["files"].items():
        assert sum(e[2] for e in info["extents"]) > 0, path
    # Small files share one chunk of the per-FileSet stream, in canonical path order.
    small = ["alias", "caf\\xe9", "hello.txt", "sub/attr"]
    first = [expected["files"][p]["extents"] for p in small]
    assert all(len(x) == 1 for x in first)
    assert len({x[0][0] for x in first}) == 1
    offsets = [x[0][1] for x in first]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_golden_file_hashes_match_described_content() -> None:
    expected = json.loads((GOLDEN / "expected.json").read_text())
    desc = json.loads((GOLDEN / "tree.json").read_text())
    for raw in desc["nodes"]:
        path = raw.get("path") or bytes.fromhex(raw["path_hex"]).decode("utf-8", "backslashreplace")
        data = golden_data(raw.get("data", []))
        if raw["type"] == "file" and data and path in expected["files"]:
            assert expected["files"][path]["hash"] == fmt.format_digest(blake3.blake3(data).digest()), path
            assert sum(e[2] for e in expected["files"][path]["extents"]) == len(data)


# --------------------------------------------------------------------------- chunking, from the spec alone

SPEC_MIN, SPEC_AVG, SPEC_MAX = 16384, 65536, 262144
SPEC_MASK_S, SPEC_MASK_L = 0x0000D90703537000, 0x0000D90F03530000
SPEC_LARGE_FILE = 262144
M64 = (1 << 64) - 1


def spec_gear() -> list[int]:
    from pyfastcdc.py.constants import GEAR

    table = list(GEAR)
    packed = b"".join(x.to_bytes(8, "little") for x in table)
    assert blake3.blake3(packed).hexdigest() == "9af822d1e10df25d0157a43ccd0a73b56d1c1d0a5d77acb4e6e979522d0fe149"
    return table


def spec_cut(buf: memoryview, gear: list[int]) -> int:
    """docs/format.md section 1.9, transcribed."""
    n = len(buf)
    if n <= SPEC_MIN:
        return n
    center = SPEC_AVG
    if n > SPEC_MAX:
        n = SPEC_MAX
    elif n < center:
        center = n
    h = 0
    i = SPEC_MIN
    mid = center - center % 2
    end = n - n % 2
    while i < end:
        mask = SPEC_MASK_S if i < mid else SPEC_MASK_L
        h = ((h << 1) + gear[buf[i]]) & M64
        if h & mask == 0:
            return i
        h = ((h << 1) + gear[buf[i + 1]]) & M64
        if h & mask == 0:
            return i + 1
        i += 2
    return n


def spec_chunks(data: bytes, gear: list[int]) -> list[tuple[int, int]]:
    view = memoryview(data)
    out, pos = [], 0
    while pos < len(data):
        n = spec_cut(view[pos:], gear)
        out.append((pos, n))
        pos += n
    return out


def spec_extents(stream: bytes, start: int, size: int, gear: list[int],
                 cuts: list[tuple[int, int]] | None = None) -> list[list[Any]]:
    out: list[list[Any]] = []
    for c, length in cuts if cuts is not None else spec_chunks(stream, gear):
        lo, hi = max(start, c), min(start + size, c + length)
        if lo >= hi:
            continue
        chunk = stream[c : c + length]
        if chunk.count(0) == len(chunk):
            if out and out[-1][0] is None:
                out[-1][2] += hi - lo
            else:
                out.append([None, 0, hi - lo])
        else:
            out.append([fmt.format_digest(blake3.blake3(chunk).digest()), lo - c, hi - lo])
    return out


@pytest.mark.parametrize("shape", ["random", "zero-runs", "text", "short", "odd-tail"])
def test_spec_chunker_matches_pyfastcdc(shape: str) -> None:
    from cnpsfs.format.chunker import new_chunker

    rnd = blake3.blake3(shape.encode()).digest(length=700_000)
    data = {
        "random": rnd,
        "zero-runs": rnd[:100_000] + bytes(600_001) + rnd[:5] + bytes(17) + rnd[200_000:400_000],
        "text": b"".join(b"%d: the quick brown fox\n" % i for i in range(30_000)),
        "short": rnd[: SPEC_MIN + 1],
        "odd-tail": rnd[: SPEC_MAX * 2 + 12_345],
    }[shape]
    expected = [(c.offset, c.length) for c in new_chunker().cut_buf(data)]
    assert spec_chunks(data, spec_gear()) == expected


def test_golden_extents_follow_the_spec() -> None:
    """Rebuild every file's extents of the golden tree from the spec's stream rules."""
    expected = json.loads((GOLDEN / "expected.json").read_text())
    desc = json.loads((GOLDEN / "tree.json").read_text())
    gear = spec_gear()
    files: dict[tuple[bytes, ...], bytes] = {}
    links: dict[tuple[bytes, ...], tuple[bytes, ...]] = {}
    for raw in desc["nodes"]:
        path = bytes.fromhex(raw["path_hex"]) if "path_hex" in raw else raw["path"].encode()
        parts = tuple(path.split(b"/"))
        if raw["type"] == "file":
            files[parts] = golden_data(raw.get("data", []))
        elif raw["type"] == "hardlink":
            links[parts] = tuple(raw["target"].encode().split(b"/"))
    for name, target in links.items():
        files[name] = files[target]
    # Canonical order: sort by path components. A link group's data goes at its first name.
    groups: dict[tuple[bytes, ...], tuple[bytes, ...]] = {}
    for name, target in links.items():
        first = min(name, target)
        groups[name] = groups[target] = first
    small = bytearray()
    spans: dict[tuple[bytes, ...], tuple[int, int]] = {}
    actual: dict[str, Any] = {}
    for parts in sorted(files):
        data = files[parts]
        if groups.get(parts, parts) != parts or not data:
            continue
        show = b"/".join(parts).decode("utf-8", "backslashreplace")
        if len(data) >= SPEC_LARGE_FILE:
            actual[show] = spec_extents(data, 0, len(data), gear)
        else:
            spans[parts] = (len(small), len(data))
            small += data
    cuts = spec_chunks(bytes(small), gear)
    for parts, (start, size) in spans.items():
        actual[b"/".join(parts).decode("utf-8", "backslashreplace")] = spec_extents(bytes(small), start, size, gear,
                                                                                   cuts)
    for name, target in links.items():
        first = groups[name]
        actual[b"/".join(name if first != name else target).decode()] = actual[b"/".join(first).decode()]
    assert actual == {path: info["extents"] for path, info in expected["files"].items()}
    for path, info in expected["files"].items():
        assert len(info["extents"]) <= fmt.INLINE_EXTENTS_MAX or path in expected["extents_objects"]


# --------------------------------------------------------------------------- hand-checked encodings


def test_directory_encoding_by_hand() -> None:
    """A directory object spelled out byte by byte from docs/format.md, without cbor2."""
    digest = bytes(range(32))
    content_hash = bytes(range(32, 64))
    d = fmt.Directory([
        fmt.Entry(b"z", fmt.Kind.SYMLINK, 0o777, target=b"a"),
        fmt.Entry(b"a", fmt.Kind.FILE, 0o644, uid=1000, mtime_ns=1, size=3,
                  extents=(fmt.Extent(digest, 5, 3),), hash=content_hash),
    ])
    expected = (
        "a3"                              # map(3)
        "00" "6a" + b"cnpsfs/dir".hex() +  # 0: "cnpsfs/dir"
        "01" "01"                         # 1: format version 1
        "02" "82"                         # 2: array(2), entries sorted by name
        "a8"                              # entry "a": map(8)
        "00" "41" "61"                    # 0: name h'61'
        "01" "01"                         # 1: kind 1 (file)
        "02" "19" "01a4"                  # 2: mode 0o644 = 420
        "03" "19" "03e8"                  # 3: uid 1000 (gid 0 omitted)
        "05" "01"                         # 5: mtime_ns 1
        "07" "03"                         # 7: size 3
        "08" "81" "83" "5820" + digest.hex() + "05" "03"  # 8: [[digest, 5, 3]]
        "0e" "5820" + content_hash.hex()  # 14: content hash
        + "a4"                            # entry "z": map(4)
        "00" "41" "7a"                    # 0: name h'7a'
        "01" "03"                         # 1: kind 3 (symlink)
        "02" "19" "01ff"                  # 2: mode 0o777
        "0a" "41" "61"                    # 10: target h'61'
    )
    assert fmt.encode_directory(d).hex() == expected


def test_fileset_and_image_encoding_by_hand() -> None:
    tree = bytes(32)
    fs = fmt.FileSet("example.org/x", "1", fmt.Entry(b"", fmt.Kind.DIR, 0o755, tree=tree), {"k": "v"})
    expected = (
        "a6" "00" "6e" + b"cnpsfs/fileset".hex() + "01" "01"
        "02" "6d" + b"example.org/x".hex()
        + "03" "61" "31"
        "04" "a4" "00" "40" "01" "02" "02" "19" "01ed" "0c" "5820" + tree.hex()
        + "05" "a1" "61" "6b" "61" "76"
    )
    assert fmt.encode_fileset(fs).hex() == expected
    image = fmt.Image("example.org/img", "2", "union",
                      [fmt.Layer(tree), fmt.Layer(tree, at="/opt", unlinked=True, override=True, label="L")],
                      config={"cmd": ["sh"]})
    expected_img = (
        "a7" "00" "6c" + b"cnpsfs/image".hex() + "01" "01"
        "02" "6f" + b"example.org/img".hex()
        + "03" "61" "32" "04" "65" + b"union".hex()
        + "05" "82" "a1" "00" "5820" + tree.hex()
        + "a5" "00" "5820" + tree.hex() + "01" "64" + b"/opt".hex() + "02" "f5" "03" "f5" "04" "61" "4c"
        "06" "a1" "63" + b"cmd".hex() + "81" "62" + b"sh".hex()
    )
    assert fmt.encode_image(image).hex() == expected_img


def test_image_layer_encoding_by_hand() -> None:
    """A layer naming an image has key 5 instead of key 0; FileSet layers encode as before."""
    fs, img = bytes(32), bytes(range(32))
    image = fmt.Image("example.org/app", "1", "layers",
                      [fmt.Layer(None, image=img), fmt.Layer(fs, at="/opt/app"),
                       fmt.Layer(None, at="/srv", unlinked=True, label="B", image=img)])
    expected = (
        "a6" "00" "6c" + b"cnpsfs/image".hex() + "01" "01"
        "02" "6f" + b"example.org/app".hex()
        + "03" "61" "31" "04" "66" + b"layers".hex()
        + "05" "83"
        "a1" "05" "5820" + img.hex()
        + "a2" "00" "5820" + fs.hex() + "01" "68" + b"/opt/app".hex()
        + "a4" "01" "64" + b"/srv".hex() + "02" "f5" "04" "61" "42" "05" "5820" + img.hex()
    )
    data = fmt.encode_image(image)
    assert data.hex() == expected
    decoded = fmt.decode_image(data)
    assert decoded == image and decoded.layers[0].digest == img and decoded.layers[1].digest == fs


@pytest.mark.parametrize("layer, message", [
    ({0: bytes(32), 5: bytes(32)}, "names both a FileSet"),
    ({1: "/opt"}, "FileSet"),
    ({5: b"short"}, "image"),
])
def test_image_layer_decoding_refuses(layer: dict[int, Any], message: str) -> None:
    data = cbor2.dumps({0: fmt.TYPE_IMAGE, 1: 1, 2: "example.org/x", 3: "1", 4: "layers", 5: [layer]},
                       canonical=True)
    with pytest.raises(FormatError, match=message):
        fmt.decode_image(data)


def test_image_layer_encoder_needs_exactly_one_digest() -> None:
    for layer in (fmt.Layer(None), fmt.Layer(bytes(32), image=bytes(32))):
        with pytest.raises(FormatError, match="exactly one"):
            fmt.encode_image(fmt.Image("example.org/x", "1", "layers", [layer]))


def test_golden_nested_images() -> None:
    """tests/golden/nested.json: a base image of the golden FileSet and an app image nesting it.

    The base image has FileSet layers only, so its digest is what it was before images
    could nest: pinning it here pins that nesting changed no existing digest.
    """
    golden = json.loads((GOLDEN / "nested.json").read_text())
    fileset = fmt.parse_digest(json.loads((GOLDEN / "expected.json").read_text())["fileset"])
    base = fmt.Image("example.org/golden-base", "1", "layers", [fmt.Layer(fileset)], {"cmd": ["/hello.txt"]})
    base_bytes = fmt.encode_image(base)
    assert base_bytes.hex() == golden["base_cbor_hex"]
    assert fmt.format_digest(blake3.blake3(base_bytes).digest()) == golden["base"]
    app = fmt.Image("example.org/golden-app", "1", "layers",
                    [fmt.Layer(None, image=fmt.parse_digest(golden["base"])),
                     fmt.Layer(fileset, at="/opt/app", label="app")], {"cmd": ["/opt/app/hello.txt"]})
    app_bytes = fmt.encode_image(app)
    assert app_bytes.hex() == golden["app_cbor_hex"]
    assert fmt.format_digest(blake3.blake3(app_bytes).digest()) == golden["app"]
    assert fmt.decode_image(app_bytes) == app


def test_composition_mode_is_an_enum_and_nothing_else_is_a_mode() -> None:
    tree = bytes(32)
    image = fmt.Image("example.org/img", "1", "layers", [fmt.Layer(tree)])
    assert image.mode is fmt.CompositionMode.LAYERS, "a plain string is converted"
    same = fmt.Image("example.org/img", "1", fmt.CompositionMode.LAYERS, [fmt.Layer(tree)])
    assert fmt.encode_image(same) == fmt.encode_image(image)
    assert fmt.decode_image(fmt.encode_image(image)).mode is fmt.CompositionMode.LAYERS
    with pytest.raises(FormatError, match="unknown composition mode 'stack'"):
        fmt.Image("example.org/img", "1", "stack", [fmt.Layer(tree)])
    raw = cbor2.loads(fmt.encode_image(image))
    raw[4] = "stack"
    with pytest.raises(FormatError, match="unknown composition mode stack"):
        fmt.decode_image(cbor2.dumps(raw, canonical=True))


def test_whiteout_opaque_and_link_encoding() -> None:
    d = fmt.Directory([fmt.Entry(b"gone", fmt.Kind.WHITEOUT, 0, uid=5, mtime_ns=9)], opaque=True)
    obj = cbor2.loads(fmt.encode_directory(d))
    # A whiteout carries its name and kind only; an opaque directory has key 3 = true.
    assert obj == {0: "cnpsfs/dir", 1: 1, 2: [{0: b"gone", 1: 8}], 3: True}
    d = fmt.Directory([fmt.Entry(b"n", fmt.Kind.FIFO, 0o600, link=(b"a/n", 2))])
    assert cbor2.loads(fmt.encode_directory(d))[2] == [{0: b"n", 1: 6, 2: 0o600, 13: [b"a/n", 2]}]


def test_defaults_are_omitted() -> None:
    e = fmt.Entry(b"f", fmt.Kind.FILE, 0)
    raw = cbor2.loads(fmt.encode_directory(fmt.Directory([e])))[2][0]
    assert raw == {0: b"f", 1: 1, 2: 0}  # mode is always present; empty file: no size, extents, hash
    dev = fmt.Entry(b"d", fmt.Kind.CHARDEV, 0o600, rdev=(0, 0))
    assert cbor2.loads(fmt.encode_directory(fmt.Directory([dev])))[2][0][11] == [0, 0]


def test_long_extent_lists_need_an_extents_object() -> None:
    extents = tuple(fmt.Extent(bytes([i]) * 32, 0, 1) for i in range(fmt.INLINE_EXTENTS_MAX + 1))
    entry = fmt.Entry(b"f", fmt.Kind.FILE, 0o644, size=len(extents), extents=extents, hash=bytes(32))
    with pytest.raises(FormatError, match="inline extents"):
        fmt.encode_directory(fmt.Directory([entry]))
    obj = fmt.encode_extents_object(extents)
    assert fmt.decode_extents_object(obj) == extents
    entry.extents = extents[:16]
    entry.size = 16
    fmt.encode_directory(fmt.Directory([entry]))


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("value", [1.5, float("nan"), {1: 2, "a": 3}, {-1: 0}, 2**64, -(2**64) - 1, "\udce9",
                                   {True: 1}, object(), [b"x", [1, {2: 3.0}]]])
def test_values_outside_the_subset_are_rejected(value: Any) -> None:
    with pytest.raises(FormatError):
        fmt.encode_canonical({0: value})


def test_integers_at_the_64_bit_limits_have_no_tags() -> None:
    assert fmt.encode_canonical(2**64 - 1).hex() == "1bffffffffffffffff"
    assert fmt.encode_canonical(-(2**64)).hex() == "3bffffffffffffffff"


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"a\0b", b"x" * 256])
def test_bad_entry_names(name: bytes) -> None:
    with pytest.raises(FormatError):
        fmt.encode_directory(fmt.Directory([fmt.Entry(name, fmt.Kind.FIFO, 0o644)]))


def test_name_of_255_bytes_is_fine() -> None:
    """NAME_MAX is the limit, not one below it: such a name encodes and comes back intact."""
    entry = fmt.Entry(b"x" * 255, fmt.Kind.FIFO, 0o644)
    decoded = fmt.decode_directory(fmt.encode_directory(fmt.Directory([entry])))
    assert [e.name for e in decoded.entries] == [b"x" * 255]
    assert decoded.entries[0] == entry


@pytest.mark.parametrize("entry", [
    fmt.Entry(b"dup", fmt.Kind.FIFO),  # paired with itself below
    fmt.Entry(b"m", fmt.Kind.FIFO, 0o10000),
    fmt.Entry(b"f", fmt.Kind.FILE, 0o644, size=3, extents=(fmt.Extent(bytes(32), 0, 3),)),  # no hash
    fmt.Entry(b"f", fmt.Kind.FILE, 0o644, size=4, extents=(fmt.Extent(bytes(32), 0, 3),), hash=bytes(32)),
    fmt.Entry(b"d", fmt.Kind.DIR, 0o755),  # no tree
], ids=["duplicate", "mode", "no-hash", "short-extents", "dir-without-tree"])
def test_invalid_directories(entry: fmt.Entry) -> None:
    entries = [entry, entry] if entry.name == b"dup" else [entry]
    with pytest.raises(FormatError):
        fmt.encode_directory(fmt.Directory(entries))


def test_digest_text_form() -> None:
    d = blake3.blake3(b"abc").digest()
    text = fmt.format_digest(d)
    assert text == "blake3:" + d.hex() and len(text) == 7 + 64
    assert fmt.parse_digest(text) == d
    for bad in ("sha256:" + d.hex(), "blake3:" + d.hex()[:-1], "blake3:" + "g" * 64):
        with pytest.raises(FormatError):
            fmt.parse_digest(bad)
    # Objects are named by BLAKE3-256 of their encoded bytes; large inputs hash the same on threads.
    big = os.urandom(3 << 20)
    assert fmt.digest_bytes(big) == blake3.blake3(big).digest()


@pytest.mark.parametrize("data", [b"", b"\xa0", b"\x80", cbor2.dumps([1, 2]), cbor2.dumps({0: "cnpsfs/dir", 1: 2}),
                                  cbor2.dumps({0: "cnpsfs/dir", 1: 1, 2: [{1: 99}]})])
def test_malformed_objects_raise_format_errors(data: bytes) -> None:
    with pytest.raises(FormatError):
        fmt.decode_directory(data)


def test_decoding_checks_the_object_type() -> None:
    fs = fmt.encode_fileset(fmt.FileSet("a.b/c", "1", fmt.Entry(b"", fmt.Kind.DIR, 0o755, tree=bytes(32))))
    with pytest.raises(FormatError, match="expected a cnpsfs/dir"):
        fmt.decode_directory(fs)
    assert fmt.object_type(fs) == fmt.TYPE_FILESET


def test_referenced_digests() -> None:
    a, b, c, d = (bytes([i]) * 32 for i in range(1, 5))
    directory = fmt.Directory([
        fmt.Entry(b"sub", fmt.Kind.DIR, 0o755, tree=a),
        fmt.Entry(b"big", fmt.Kind.FILE, 0o644, size=9, content=b, hash=bytes(32)),
        fmt.Entry(b"f", fmt.Kind.FILE, 0o644, size=6, hash=bytes(32),
                  extents=(fmt.Extent(c, 0, 3), fmt.Extent(None, 0, 3))),
    ])
    refs = fmt.referenced_digests(fmt.encode_directory(directory))
    assert sorted(refs) == sorted([(a, False), (b, False), (c, True)])
    assert fmt.referenced_digests(fmt.encode_extents_object([fmt.Extent(d, 1, 2), fmt.Extent(None, 0, 5)])) == [
        (d, True)]
    image = fmt.Image("a.b/i", "1", "layers", [fmt.Layer(a), fmt.Layer(b)])
    assert fmt.referenced_digests(fmt.encode_image(image)) == [(a, False), (b, False)]
    nesting = fmt.Image("a.b/j", "1", "layers", [fmt.Layer(None, image=c), fmt.Layer(d)])
    assert fmt.referenced_digests(fmt.encode_image(nesting)) == [(c, False), (d, False)]  # gc keeps nested images


# --------------------------------------------------------------------------- hypothesis: the codec

digests = st.binary(min_size=32, max_size=32)
names = st.binary(min_size=1, max_size=255).filter(lambda n: b"/" not in n and b"\0" not in n
                                                  and n not in (b".", b".."))
modes = st.integers(0, 0o7777)
ids = st.integers(0, 2**32 - 1)
mtimes = st.integers(-(2**63), 2**63 - 1)
no_nul = st.binary(min_size=1, max_size=60).filter(lambda b: b"\0" not in b)
xattr_maps = st.dictionaries(no_nul, st.binary(max_size=64), max_size=4)
# A hole has offset 0; a data extent lies inside one chunk, and no chunk exceeds CDC_MAX (§1.5).
data_extents = st.integers(0, CDC_MAX - 1).flatmap(
    lambda offset: st.builds(fmt.Extent, digests, st.just(offset), st.integers(1, CDC_MAX - offset)))
extents = st.lists(st.one_of(st.builds(fmt.Extent, st.none(), st.just(0), st.integers(1, 2**40)), data_extents),
                   min_size=1, max_size=fmt.INLINE_EXTENTS_MAX)
links = st.one_of(st.none(), st.tuples(no_nul, st.integers(2, 2**16)))
metadata = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64 - 1), st.text(max_size=20),
              st.binary(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12)


@st.composite
def entries(draw: st.DrawFn, name: bytes | None = None) -> fmt.Entry:
    """Entries in the form decoding produces (canonical: nothing that encoding would drop)."""
    kind = draw(st.sampled_from(list(fmt.Kind)))
    e = fmt.Entry(name if name is not None else draw(names), kind)
    if kind is fmt.Kind.WHITEOUT:
        e.mode = 0
        return e
    e.mode, e.uid, e.gid, e.mtime_ns, e.xattrs = draw(modes), draw(ids), draw(ids), draw(mtimes), draw(xattr_maps)
    if kind is fmt.Kind.FILE:
        if draw(st.booleans()):
            exts = tuple(draw(extents))
            e.size = sum(x.length for x in exts)
            e.hash = draw(digests)
            if draw(st.booleans()):
                e.content = draw(digests)  # the list lives in an extents object
            else:
                e.extents = exts
    elif kind is fmt.Kind.SYMLINK:
        e.target = draw(st.binary(min_size=1, max_size=100).filter(lambda b: b"\0" not in b))
    elif kind in (fmt.Kind.CHARDEV, fmt.Kind.BLOCKDEV):
        e.rdev = (draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)))
    elif kind is fmt.Kind.DIR:
        e.tree = draw(digests)
    if kind is not fmt.Kind.DIR:
        e.link = draw(links)
    return e


@st.composite
def directories(draw: st.DrawFn) -> fmt.Directory:
    unique = draw(st.lists(names, max_size=12, unique=True))
    return fmt.Directory([draw(entries(n)) for n in unique], draw(st.booleans()))


def test_decoders_know_the_largest_chunk() -> None:
    """Decoders refuse extents past CHUNK_MAX; it must be the chunker's own maximum."""
    assert fmt.CHUNK_MAX == CDC_MAX


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(directories())
def test_directory_roundtrip(directory: fmt.Directory) -> None:
    data = fmt.encode_directory(directory)
    decoded = fmt.decode_directory(data)
    assert decoded.opaque == directory.opaque
    assert decoded.entries == sorted(directory.entries, key=lambda e: e.name)
    assert fmt.encode_directory(decoded) == data


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(directories(), st.randoms(use_true_random=False))
def test_directory_encoding_ignores_entry_order(directory: fmt.Directory, rnd: Any) -> None:
    shuffled = list(directory.entries)
    rnd.shuffle(shuffled)
    assert fmt.encode_directory(fmt.Directory(shuffled, directory.opaque)) == fmt.encode_directory(directory)


@settings(max_examples=100)
@given(st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30), entries(b""),
       st.dictionaries(st.text(max_size=10), metadata, max_size=4))
def test_fileset_roundtrip(name: str, version: str, root: fmt.Entry, meta: dict[str, Any]) -> None:
    root = fmt.Entry(b"", fmt.Kind.DIR, root.mode if root.kind is not fmt.Kind.WHITEOUT else 0o755, root.uid,
                     root.gid, root.mtime_ns, root.xattrs, tree=bytes(32))
    fs = fmt.FileSet(name, version, root, meta)
    data = fmt.encode_fileset(fs)
    assert fmt.decode_fileset(data) == fs
    assert fmt.encode_fileset(fmt.decode_fileset(data)) == data


_placements = st.sampled_from(["/", "/opt", "/usr/local"])
layers = st.one_of(
    st.builds(fmt.Layer, digests, _placements, st.booleans(), st.booleans(), st.text(max_size=10)),
    st.builds(fmt.Layer, st.none(), _placements, st.booleans(), st.booleans(), st.text(max_size=10), digests))


@settings(max_examples=100)
@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20), st.sampled_from(["layers", "union"]),
       st.lists(layers, max_size=5), st.dictionaries(st.text(max_size=8), metadata, max_size=3),
       st.dictionaries(st.text(max_size=8), metadata, max_size=3))
def test_image_roundtrip(name: str, version: str, mode: str, layer_list: list[fmt.Layer], config: dict[str, Any],
                         meta: dict[str, Any]) -> None:
    image = fmt.Image(name, version, mode, layer_list, config, meta)
    data = fmt.encode_image(image)
    assert fmt.decode_image(data) == image
    assert fmt.encode_image(fmt.decode_image(data)) == data


@settings(max_examples=100)
@given(st.dictionaries(st.text(max_size=8), metadata, max_size=6))
def test_canonical_maps_do_not_depend_on_insertion_order(meta: dict[str, Any]) -> None:
    reversed_meta = dict(reversed(list(meta.items())))
    assert fmt.encode_canonical(meta) == fmt.encode_canonical(reversed_meta)
    # Text keys sort by their encoded bytes: shorter first, then bytewise.
    keys = list(cbor2.loads(fmt.encode_canonical(meta)))
    assert keys == sorted(keys, key=lambda k: (len(k.encode()), k.encode()))


# --------------------------------------------------------------------------- hypothesis: extent maps


@st.composite
def extent_maps(draw: st.DrawFn) -> tuple[list[fmt.Extent], dict[bytes, bytes]]:
    """Extents over random chunks (and holes), with the chunk bytes to read them from."""
    chunks: dict[bytes, bytes] = {}
    out = []
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.booleans()):
            out.append(fmt.Extent(None, 0, draw(st.integers(1, 50))))
            continue
        data = draw(st.binary(min_size=1, max_size=60))
        digest = blake3.blake3(data).digest()
        chunks[digest] = data
        start = draw(st.integers(0, len(data) - 1))
        length = draw(st.integers(1, len(data) - start))
        out.append(fmt.Extent(digest, start, length))
    return out, chunks


@settings(max_examples=300)
@given(extent_maps(), st.integers(0, 400), st.integers(0, 400))
def test_extent_map_pieces_cover_exactly_the_range(em: tuple[list[fmt.Extent], dict[bytes, bytes]], offset: int,
                                                   size: int) -> None:
    exts, chunks = em
    emap = ExtentMap(exts)
    total = sum(e.length for e in exts)
    assert emap.size == total
    pieces = list(emap.pieces(offset, size))
    end = min(offset + size, total)
    assert sum(n for _e, _i, n in pieces) == max(0, end - offset)
    for ext, inner, n in pieces:
        assert n > 0 and inner >= 0 and inner + n <= ext.length
    # The pieces are contiguous and in file order: rebuild the file and compare.
    whole = b"".join(bytes(e.length) if e.digest is None else chunks[e.digest][e.offset:e.offset + e.length]
                     for e in exts)
    assert read_range(emap, offset, size, chunks.__getitem__) == whole[offset:offset + size]
    assert emap.chunks_for(offset, size) == [e.digest for e, _i, _n in pieces if e.digest is not None]
