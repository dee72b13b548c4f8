"""Issue 15 bug 7: limits on manifest and object size, enforced at create, mount and decode.

docs/format.md §1.11 sets them: layers per image, entries per directory object, extents
per extents object, bytes per object, nesting depth. Each test goes just past one limit
and expects a one-line error naming it, quickly and before anything is built.
"""

from __future__ import annotations

import time
from pathlib import Path

import cbor2
import pytest
from cnpsfs_testlib import Cli

from cnpsfs import format as fmt
from cnpsfs.errors import FormatError, ImportRejected, UsageError
from cnpsfs.image.manifest import parse_manifest
from cnpsfs.ingest.tree import ImportOptions, TreeBuilder, write_fileset
from cnpsfs.store import T_IMAGE, Store

D = b"\x01" * 32


def layers_manifest(count: int, ref: str = "example.org/base@1") -> str:
    return 'name = "example.org/many"\nversion = "1"\n' + f'[[layers]]\nfileset = "{ref}"\n' * count


def test_ten_thousand_layers_are_refused_quickly(tmp_path: Path, cli: Cli) -> None:
    """The issue's 10,000-layer manifest took 43 s and 2.4 GB in image create; it is refused at once."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "f").write_text("f")
    cli.ok("import", "dir", base, "--name", "example.org/base", "--version", "1")
    manifest = tmp_path / "many.toml"
    manifest.write_text(layers_manifest(10_000))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for args in (("image", "create", manifest), ("mount", manifest, mnt)):
        started = time.monotonic()
        result = cli(*args)
        seconds = time.monotonic() - started
        assert result.rc == 2, result
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        assert "10000 layers" in result.stderr and f"limit of {fmt.MAX_LAYERS} layers per image" in result.stderr
        assert seconds < 5, f"{args[0]} took {seconds:.1f} s to refuse 10,000 layers"
    assert "example.org/many" not in cli.ok("tag", "list").stdout


def test_layer_limit_is_inclusive() -> None:
    spec = parse_manifest(layers_manifest(fmt.MAX_LAYERS), "m.toml")
    assert len(spec["layers"]) == fmt.MAX_LAYERS
    with pytest.raises(UsageError, match=rf"m\.toml: {fmt.MAX_LAYERS + 1} layers .* limit of {fmt.MAX_LAYERS}"):
        parse_manifest(layers_manifest(fmt.MAX_LAYERS + 1), "m.toml")


def test_manifest_file_size_is_limited(tmp_path: Path, cli: Cli) -> None:
    cli.ok("import", "tar", "-", "--name", "example.org/base", "--version", "1", input=bytes(10240))
    manifest = tmp_path / "huge.toml"
    manifest.write_text(layers_manifest(1) + "# " + "x" * (17 << 20) + "\n")
    result = cli("image", "create", manifest)
    assert result.rc == 2 and "huge.toml" in result.stderr and "limit of 16 MiB" in result.stderr, result


def image_cbor(layers: int) -> bytes:
    return cbor2.dumps({0: fmt.TYPE_IMAGE, 1: 1, 2: "example.org/i", 3: "1", 4: "layers",
                        5: [{0: D}] * layers}, canonical=True)


def test_image_layer_limit_in_encoder_and_decoder() -> None:
    assert len(fmt.decode_image(image_cbor(fmt.MAX_LAYERS)).layers) == fmt.MAX_LAYERS
    with pytest.raises(FormatError, match=f"{fmt.MAX_LAYERS + 1} layers exceeds the limit of {fmt.MAX_LAYERS}"):
        fmt.decode_image(image_cbor(fmt.MAX_LAYERS + 1))
    image = fmt.Image("example.org/i", "1", "layers", [fmt.Layer(D)] * (fmt.MAX_LAYERS + 1))
    with pytest.raises(FormatError, match="layers per image"):
        fmt.encode_image(image)


def test_stored_image_past_the_limit_is_refused_by_mount(tmp_path: Path, cli: Cli, store: Store) -> None:
    """An image object from elsewhere (a remote store) past the limit: mount refuses it, naming the limit."""
    with store.writer() as writer:
        digest = writer.add(image_cbor(fmt.MAX_LAYERS + 1), T_IMAGE)
        writer.commit([("example.org/hostile", "1", T_IMAGE, digest)])
    store.close()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for args in (("mount", "example.org/hostile@1", mnt), ("inspect", "example.org/hostile@1")):
        result = cli(*args)
        assert result.rc == 1 and result.stderr.count("\n") == 1, result
        assert f"limit of {fmt.MAX_LAYERS} layers per image" in result.stderr, result


def directory_cbor(entries: int) -> bytes:
    return cbor2.dumps({0: fmt.TYPE_DIR, 1: 1, 2: [{0: b"f%07d" % i, 1: 1, 2: 0o644} for i in range(entries)]},
                       canonical=True)


def test_directory_entry_limit() -> None:
    assert len(fmt.decode_directory(directory_cbor(fmt.MAX_DIR_ENTRIES)).entries) == fmt.MAX_DIR_ENTRIES
    with pytest.raises(FormatError, match=f"limit of {fmt.MAX_DIR_ENTRIES} entries per directory object"):
        fmt.decode_directory(directory_cbor(fmt.MAX_DIR_ENTRIES + 1))


def test_import_of_a_directory_past_the_limit_names_it(store: Store) -> None:
    builder = TreeBuilder(ImportOptions(name="example.org/wide", version="1"), source_name="wide")
    builder.set_root(fmt.Entry(b"", fmt.Kind.DIR, 0o755))
    builder.add((b"sub",), fmt.Entry(b"", fmt.Kind.DIR, 0o755), what="sub")
    for i in range(fmt.MAX_DIR_ENTRIES + 1):
        builder.add((b"sub", b"f%07d" % i), fmt.Entry(b"", fmt.Kind.FIFO, 0o644), what="f")
    with pytest.raises(ImportRejected, match=rf"wide: directory sub: .*limit of {fmt.MAX_DIR_ENTRIES} entries"):
        write_fileset(store, builder)
    assert store.tags() == []


def test_extents_limit() -> None:
    extents = [fmt.Extent(D, 0, 1)] * (fmt.MAX_EXTENTS + 1)
    with pytest.raises(FormatError, match=f"exceed the limit of {fmt.MAX_EXTENTS}"):
        fmt.encode_extents_object(extents)
    data = cbor2.dumps({0: fmt.TYPE_EXTENTS, 1: 1, 2: [[D, 0, 1]] * (fmt.MAX_EXTENTS + 1)}, canonical=True)
    with pytest.raises(FormatError, match=f"exceed the limit of {fmt.MAX_EXTENTS}"):
        fmt.decode_extents_object(data)
    assert len(fmt.decode_extents_object(fmt.encode_extents_object(extents[1:]))) == fmt.MAX_EXTENTS


def test_object_size_limit() -> None:
    root = fmt.Entry(b"", fmt.Kind.DIR, 0o755, tree=D)
    big = fmt.FileSet("example.org/big", "1", root, {"blob": b"x" * fmt.MAX_OBJECT_SIZE})
    with pytest.raises(FormatError, match=f"exceeds the limit of {fmt.MAX_OBJECT_SIZE} bytes per object"):
        fmt.encode_fileset(big)
    data = cbor2.dumps({0: fmt.TYPE_FILESET, 1: 1, 2: "n", 3: "v", 4: fmt.entry_to_cbor(root),
                        5: {"blob": b"x" * fmt.MAX_OBJECT_SIZE}})
    started = time.monotonic()
    with pytest.raises(FormatError, match="bytes per object"):
        fmt.decode_fileset(data)
    assert time.monotonic() - started < 0.5  # refused before decoding


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_depth_limit() -> None:
    """Metadata may nest MAX_DEPTH levels below the object: the encoder and decoder agree on the edge."""
    root = fmt.Entry(b"", fmt.Kind.DIR, 0o755, tree=D)
    ok = fmt.encode_fileset(fmt.FileSet("example.org/deep", "1", root, {"k": nested(fmt.MAX_DEPTH - 2)}))
    assert fmt.decode_fileset(ok).metadata == {"k": nested(fmt.MAX_DEPTH - 2)}
    deep = {"k": nested(fmt.MAX_DEPTH - 1)}
    with pytest.raises(FormatError, match=f"limit of {fmt.MAX_DEPTH} levels"):
        fmt.encode_fileset(fmt.FileSet("example.org/deep", "1", root, deep))
    data = cbor2.dumps({0: fmt.TYPE_FILESET, 1: 1, 2: "n", 3: "v", 4: fmt.entry_to_cbor(root), 5: deep})
    with pytest.raises(FormatError, match=f"limit of {fmt.MAX_DEPTH} levels"):
        fmt.decode_fileset(data)


def test_limits_are_documented() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "format.md").read_text()
    for value in (fmt.MAX_OBJECT_SIZE, fmt.MAX_DIR_ENTRIES, fmt.MAX_EXTENTS, fmt.MAX_LAYERS, fmt.MAX_DEPTH,
                  fmt.MAX_NESTING):
        assert f"{value:,}" in doc, value


def test_manifest_metadata_depth_matches_the_image_encoder() -> None:
    """What the manifest parser accepts as [metadata], the image encoder can write (one level down)."""
    def manifest(depth: int) -> str:
        return layers_manifest(1) + "[metadata]\nk = " + "[" * depth + "1" + "]" * depth + "\n"

    deepest = fmt.MAX_DEPTH - 2  # the image object, its metadata map, then the arrays
    spec = parse_manifest(manifest(deepest), "m.toml")
    fmt.encode_image(fmt.Image("example.org/many", "1", "layers", [fmt.Layer(D)], {}, spec["metadata"]))
    with pytest.raises(UsageError, match=f"m.toml: metadata: .*limit of {fmt.MAX_DEPTH} levels"):
        parse_manifest(manifest(deepest + 1), "m.toml")
