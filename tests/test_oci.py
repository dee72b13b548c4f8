"""OCI images in and out, against the real tools: umoci builds the images and unpacks the
reference trees, skopeo converts between transports and reads our output back.

Fidelity: an image imported through each transport (OCI layout with gzip, zstd and
plain layers, a docker save archive), mounted, equals ``umoci unpack`` of it path by path,
and its run config equals ``skopeo inspect --config``. Bad input: every damaged or
hostile image is refused with one line naming the culprit, exit 1, no tag, nothing
written outside the store.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cnpsfs_testlib import Cli, index_counts
from mountutil import compare_mount, mount_image
from ociimages import (
    BUSYBOX_CONFIG,
    LayoutEditor,
    busybox_image,  # noqa: F401 (fixture)
    converted,
    debian_image,  # noqa: F401 (fixture)
    skopeo_config,
    unpacked,
)

TRANSPORTS = ("oci", "oci-zstd", "oci-plain", "docker-archive")
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def reference(layout: Path, tag: str, transport: str) -> str:
    return f"oci:{layout}:{tag}" if transport == "oci" else converted(layout, tag, transport)


def inspect(cli: Cli, ref: str) -> dict[str, Any]:
    return json.loads(cli.ok("inspect", ref, "--json").stdout)


def root_differences(problems: list[str]) -> list[str]:
    """compare_mount's findings minus the root directory (umoci makes it at unpack time)."""
    return [p for p in problems if not p.startswith("b'': ")]


#: Layer 3 whites out bin/cat, one of the 7 names of busybox's hard-link group in layer 1.
#: umoci unpack (one tree) then counts 6 links; the mount counts the links of the layer's
#: FileSet, 7, as overlayfs counts those of its lower inode (docs/oci.md).
BUSYBOX_NLINK = {f"{name!r}: st_nlink 6 != 7" for name in
                 (b"bin/busybox", b"bin/sh", b"bin/ls", b"bin/echo", b"bin/true", b"bin/id")}


@pytest.fixture(scope="module")
def bb(tmp_path_factory: pytest.TempPathFactory, busybox_image: Path) -> dict[str, Any]:  # noqa: F811
    """The busybox image imported through every transport into one store."""
    base = tmp_path_factory.mktemp("oci-busybox")
    cli = Cli(base / "store")
    digests = {}
    for transport in TRANSPORTS:
        result = cli.ok("import", "oci", reference(busybox_image, "full", transport), "--name",
                        f"example.org/busybox-{transport}", "--version", "1", "--json")
        digests[transport] = json.loads(result.stdout)
    return {"cli": cli, "store": base / "store", "imports": digests, "layout": busybox_image}


# --------------------------------------------------------------------------- fidelity


def test_every_transport_gives_the_same_layers(bb: dict[str, Any]) -> None:
    """Layer FileSets depend on the uncompressed layers only: gzip, zstd, plain and docker-archive agree."""
    filesets = {t: [layer["fileset"] for layer in r["layers"]] for t, r in bb["imports"].items()}
    assert len(filesets["oci"]) == 3
    assert all(f == filesets["oci"] for f in filesets.values()), filesets
    diff_ids = {t: [layer["diff_id"] for layer in r["layers"]] for t, r in bb["imports"].items()}
    assert all(d == diff_ids["oci"] for d in diff_ids.values())
    # The first import read every layer; the later ones found them by diff_id.
    assert not any(layer["reused"] for layer in bb["imports"]["oci"]["layers"])
    assert all(layer["reused"] for t in TRANSPORTS[1:] for layer in bb["imports"][t]["layers"])


@pytest.mark.fuse
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_busybox_mount_equals_umoci_unpack(bb: dict[str, Any], transport: str, tmp_path: Path) -> None:
    rootfs = unpacked(bb["layout"], "full")
    with mount_image(bb["store"], bb["imports"][transport]["digest"], tmp_path / "mnt") as mnt:
        problems = set(root_differences(compare_mount(rootfs, mnt.mountpoint)))
        assert problems == BUSYBOX_NLINK, "\n".join(sorted(problems ^ BUSYBOX_NLINK)[:40])
        # What the layers were made to carry is really there.
        assert not (mnt / "etc/motd").exists()  # whiteout (layer 2)
        assert sorted(os.listdir(mnt / "opt/old")) == ["d"]  # opaque directory (layer 3)
        assert (mnt / "srv/data").read_bytes() == b"now a file\n"  # directory replaced by a file
        assert not (mnt / "bin/cat").exists() and (mnt / "bin/sh").stat().st_ino == (mnt / "bin/ls").stat().st_ino
        assert os.stat(mnt / "usr/lib/new/x").st_ino == os.stat(mnt / "usr/lib/new/y").st_ino
        assert os.stat(mnt / "usr/lib/new/x").st_mtime_ns == 1_700_000_000_123_456_789
        assert os.getxattr(mnt / "usr/lib/new/x", "user.k") == b"v"


def test_run_config_equals_skopeo_inspect(bb: dict[str, Any]) -> None:
    want = skopeo_config(f"oci:{bb['layout']}:full")["config"]
    assert isinstance(want, dict)
    assert {k: want.get(k) for k in BUSYBOX_CONFIG} == BUSYBOX_CONFIG  # the builder did its job
    for transport in TRANSPORTS:
        image = inspect(bb["cli"], f"example.org/busybox-{transport}@1")
        config, oci = image["config"], image["metadata"]["oci"]
        assert config == {"entrypoint": want["Entrypoint"], "cmd": want["Cmd"], "env": want["Env"],
                          "workdir": want["WorkingDir"], "user": want["User"], "labels": want["Labels"],
                          "stop_signal": want["StopSignal"]}, transport
        assert oci["exposed_ports"] == sorted(want["ExposedPorts"])
        assert oci["volumes"] == sorted(want["Volumes"])


def test_provenance_names_every_digest(bb: dict[str, Any]) -> None:
    layout = bb["layout"]
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == "full")
    manifest = json.loads((layout / "blobs/sha256" / entry["digest"][7:]).read_text())
    image = inspect(bb["cli"], "example.org/busybox-oci@1")
    oci = image["metadata"]["oci"]
    assert oci["source"] == f"oci:{layout}:full"
    assert oci["manifest_digest"] == entry["digest"]
    assert oci["config_digest"] == manifest["config"]["digest"]
    assert [x["digest"] for x in oci["layers"]] == [x["digest"] for x in manifest["layers"]]
    assert [x["fileset"] for x in oci["layers"]] == [layer["fileset"] for layer in image["layers"]]
    text = bb["cli"].ok("inspect", "example.org/busybox-oci@1").stdout
    assert f"source   oci:{layout}:full" in text
    assert manifest["layers"][2]["digest"] in text and entry["digest"] in text


def test_default_name_and_version_are_repository_and_tag(cli: Cli, busybox_image: Path) -> None:  # noqa: F811
    cli.ok("import", "oci", f"oci:{busybox_image}:base")
    archive = converted(busybox_image, "full", "docker-archive")
    cli.ok("import", "oci", archive)
    tags = {t["name"] + "@" + t["version"] for t in json.loads(cli.ok("tag", "list", "--json").stdout)}
    assert tags == {"localhost/layout@base", "localhost/busybox@full"}


def test_importing_twice_gives_the_same_digests(cli: Cli, busybox_image: Path) -> None:  # noqa: F811
    first = json.loads(cli.ok("import", "oci", f"oci:{busybox_image}:full", "--json").stdout)
    before = index_counts(cli.store_path)
    second = json.loads(cli.ok("import", "oci", f"oci:{busybox_image}:full", "--json").stdout)
    assert first["digest"] == second["digest"]
    assert [x["fileset"] for x in first["layers"]] == [x["fileset"] for x in second["layers"]]
    assert second["new_bytes"] == 0 and all(x["reused"] for x in second["layers"])
    assert index_counts(cli.store_path)["objects"] == before["objects"]


def test_compression_level_changes_bytes_not_digests(busybox_image: Path, tmp_path: Path) -> None:  # noqa: F811
    """--compression-level is the store's block compression: the same image, the same
    digests, into two stores (each reads every layer)."""
    results = {}
    for level in ("1", "19"):
        cli = Cli(tmp_path / f"store-{level}")
        results[level] = json.loads(cli.ok("import", "oci", f"oci:{busybox_image}:full", "--json",
                                           "--compression-level", level).stdout)
    assert results["1"]["digest"] == results["19"]["digest"]
    assert [x["fileset"] for x in results["1"]["layers"]] == [x["fileset"] for x in results["19"]["layers"]]
    assert results["19"]["new_bytes"] < results["1"]["new_bytes"]


def test_second_image_on_the_same_base_stores_only_its_new_layer(cli: Cli, busybox_image: Path) -> None:  # noqa: F811
    full = json.loads(cli.ok("import", "oci", f"oci:{busybox_image}:full", "--json").stdout)
    df_before = json.loads(cli.ok("df", "--json").stdout)["stored_bytes"]
    other = json.loads(cli.ok("import", "oci", f"oci:{busybox_image}:other", "--json").stdout)
    df_after = json.loads(cli.ok("df", "--json").stdout)["stored_bytes"]
    assert other["layers"][0]["fileset"] == full["layers"][0]["fileset"] and other["layers"][0]["reused"]
    assert not other["layers"][1]["reused"]
    # The new layer is 1 MiB of random bytes (incompressible): that, and little else, is stored.
    grown = df_after - df_before
    assert 1 << 20 <= grown < (1 << 20) + (64 << 10), grown
    assert other["new_bytes"] == other["layers"][1]["new_bytes"]


# --------------------------------------------------------------------------- platforms


def _platform_index(src: Path, dest: Path) -> Path:
    """The busybox image as a two-platform index (amd64 as built, and an 'arm64' copy)."""
    editor = LayoutEditor(src, dest, "full")
    amd64 = dict(editor.entry, platform={"os": "linux", "architecture": "amd64"})
    amd64.pop("annotations", None)
    editor.config["architecture"] = "arm64"
    editor.config["variant"] = "v8"
    arm_config = editor.put_blob(json.dumps(editor.config).encode(), editor.manifest["config"]["mediaType"])
    arm_manifest = dict(editor.manifest, config=arm_config)
    arm = editor.put_blob(json.dumps(arm_manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    arm["platform"] = {"os": "linux", "architecture": "arm64", "variant": "v8"}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [amd64, arm]}
    desc = editor.put_blob(json.dumps(index).encode(), "application/vnd.oci.image.index.v1+json")
    desc["annotations"] = {"org.opencontainers.image.ref.name": "multi"}
    editor.index["manifests"].append(desc)
    (dest / "index.json").write_text(json.dumps(editor.index))
    return dest


def test_platform_picks_the_image_from_an_index(cli: Cli, busybox_image: Path, tmp_path: Path) -> None:  # noqa: F811
    layout = _platform_index(busybox_image, tmp_path / "multi")
    cli.ok("import", "oci", f"oci:{layout}:multi", "--name", "example.org/multi", "--version", "arm",
           "--platform", "linux/arm64")
    cli.ok("import", "oci", f"oci:{layout}:multi", "--name", "example.org/multi", "--version", "host",
           "--platform", "linux/amd64")
    arm = inspect(cli, "example.org/multi@arm")["metadata"]["oci"]
    host = inspect(cli, "example.org/multi@host")["metadata"]["oci"]
    assert arm["platform"] == "linux/arm64/v8" and host["platform"] == "linux/amd64"
    assert arm["index_digest"] == host["index_digest"] and arm["manifest_digest"] != host["manifest_digest"]


def test_index_without_the_wanted_platform_names_what_it_has(cli: Cli, busybox_image: Path,  # noqa: F811
                                                             tmp_path: Path) -> None:
    layout = _platform_index(busybox_image, tmp_path / "multi")
    result = cli("import", "oci", f"oci:{layout}:multi", "--platform", "linux/s390x")
    assert_refused(cli, result, "no image for platform linux/s390x (available: linux/amd64, linux/arm64/v8)")


# --------------------------------------------------------------------------- bad input


def assert_refused(cli: Cli, result: Any, *needles: str) -> None:
    """Exit 1, one line naming the culprit, no tag, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.rc == 1, str(result)
    assert len(lines) == 1 and lines[0].startswith("cnpsfs: error: "), result.stderr
    assert "internal error" not in lines[0] and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert index_counts(cli.store_path)["tags"] == 0


@pytest.fixture
def editor(busybox_image: Path, tmp_path: Path) -> LayoutEditor:  # noqa: F811
    return LayoutEditor(busybox_image, tmp_path / "bad", "full")


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _tar(members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info in members:
            payload = (data or {}).get(info.name)
            if payload is not None:
                info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return out.getvalue()


def _add_layer(editor: LayoutEditor, tar_bytes: bytes) -> str:
    desc = editor.put_blob(_gzip(tar_bytes), OCI_LAYER_GZIP)
    editor.manifest["layers"].append(desc)
    editor.config["rootfs"]["diff_ids"].append("sha256:" + __import__("hashlib").sha256(tar_bytes).hexdigest())
    return editor.save(config=True)


def test_blob_that_does_not_match_its_digest(cli: Cli, editor: LayoutEditor) -> None:
    layer = editor.manifest["layers"][1]
    path = editor.path(layer["digest"])
    data = bytearray(path.read_bytes())
    data[4:8] = b"\x01\x02\x03\x04"  # the gzip header's mtime: not covered by its CRC
    path.write_bytes(bytes(data))
    result = cli("import", "oci", f"oci:{editor.root}:full")
    assert_refused(cli, result, "layer 2/3", "digest mismatch", layer["digest"])


def test_config_diff_id_that_does_not_match(cli: Cli, editor: LayoutEditor) -> None:
    editor.config["rootfs"]["diff_ids"][2] = "sha256:" + "0" * 64
    ref = editor.save(config=True)
    assert_refused(cli, cli("import", "oci", ref), "layer 3/3", "diff_id mismatch", "0" * 64)


def test_truncated_layer(cli: Cli, editor: LayoutEditor) -> None:
    layer = editor.manifest["layers"][0]
    path = editor.path(layer["digest"])
    path.write_bytes(path.read_bytes()[: layer["size"] // 2])
    assert_refused(cli, cli("import", "oci", f"oci:{editor.root}:full"), "layer 1/3",
                   layer["digest"][:19], "truncated")


def test_unknown_layer_media_type(cli: Cli, editor: LayoutEditor) -> None:
    editor.manifest["layers"][1]["mediaType"] = "application/vnd.example.layer.v1.tar+lz4"
    ref = editor.save()
    assert_refused(cli, cli("import", "oci", ref), "layer 2/3", "unknown layer media type",
                   "application/vnd.example.layer.v1.tar+lz4")


def test_unknown_manifest_media_type(cli: Cli, editor: LayoutEditor) -> None:
    editor.entry["mediaType"] = "application/vnd.example.manifest"
    editor.manifest["mediaType"] = "application/vnd.example.manifest"
    ref = editor.save()
    assert_refused(cli, cli("import", "oci", ref), "unknown manifest media type", "application/vnd.example.manifest")


def test_oversized_manifest(cli: Cli, editor: LayoutEditor) -> None:
    editor.manifest["annotations"] = {"padding": "x" * (5 << 20)}
    ref = editor.save()
    assert_refused(cli, cli("import", "oci", ref), "more than the 4 MiB allowed")


def test_layer_that_is_not_what_its_media_type_says(cli: Cli, editor: LayoutEditor) -> None:
    editor.manifest["layers"][1]["mediaType"] = "application/vnd.oci.image.layer.v1.tar"
    ref = editor.save()
    assert_refused(cli, cli("import", "oci", ref), "layer 2/3", "uncompressed tar", "gzip-compressed")


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize(("members", "culprit", "why"), [
    ([_member("../evil")], "'../evil'", "'..'"),
    ([_member("/etc/evil")], "'/etc/evil'", "absolute path"),
    ([_member("a/../../evil")], "'a/../../evil'", "'..'"),
    ([_member("x", tarfile.LNKTYPE, "../../etc/passwd")], "'x'", "'..'"),
    ([_member("l", tarfile.SYMTYPE, "/etc"), _member("l/passwd")], "'l/passwd'", "through symlink"),
], ids=["dotdot", "absolute", "inner-dotdot", "hardlink-out", "through-symlink"])
def test_hostile_layer_is_refused_naming_the_member(cli: Cli, editor: LayoutEditor, tmp_path: Path,
                                                    members: list[tarfile.TarInfo], culprit: str, why: str) -> None:
    ref = _add_layer(editor, _tar(members, {m.name: b"pwned\n" for m in members if m.isreg()}))
    before = sorted(p.name for p in tmp_path.iterdir())
    work = tmp_path / "cwd"
    work.mkdir()
    result = cli("import", "oci", ref, cwd=work)
    assert_refused(cli, result, "layer 4/4", culprit, why)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "cwd", "store"]) and not os.listdir(work)
    assert not Path("/etc/evil").exists()


def test_layout_errors_name_the_layout(cli: Cli, busybox_image: Path, tmp_path: Path) -> None:  # noqa: F811
    result = cli("import", "oci", f"oci:{busybox_image}:nosuchtag")
    assert_refused(cli, result, "no image tagged 'nosuchtag'", "base, full, other")
    result = cli("import", "oci", f"oci:{busybox_image}")
    assert_refused(cli, result, "holds 3 images")
    (tmp_path / "empty").mkdir()
    assert_refused(cli, cli("import", "oci", f"oci:{tmp_path / 'empty'}"), "not an OCI layout")
    usage = cli("import", "oci", "nosuchtransport:x")
    assert usage.rc == 2 and "unknown transport" in usage.stderr


def test_missing_blob(cli: Cli, editor: LayoutEditor) -> None:
    editor.path(editor.manifest["layers"][2]["digest"]).unlink()
    assert_refused(cli, cli("import", "oci", f"oci:{editor.root}:full"), "layer 3/3", "cannot open")


def _no_pack_left(store: Path) -> None:
    """A refused import leaves no temporary pack behind (every layer's writer discarded)."""
    tmp = store / "tmp"
    assert not tmp.exists() or not [p for p in tmp.iterdir() if p.suffix == ".pack"], list(tmp.iterdir())


def test_corrupt_layer_among_parallel_layers(cli: Cli, editor: LayoutEditor) -> None:
    """Layers import at once, each decoded on a thread of its own: damage in the middle of
    layer 2's deflate data fails on its decoding thread, stops the others, and is the one
    error reported (not a sibling's cancellation)."""
    layer = editor.manifest["layers"][1]
    path = editor.path(layer["digest"])
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))
    assert_refused(cli, cli("import", "oci", f"oci:{editor.root}:full"), "layer 2/3", "corrupt")
    _no_pack_left(cli.store_path)


def test_hostile_member_ahead_of_a_large_member(cli: Cli, editor: LayoutEditor) -> None:
    """The tar thread refuses the first member while the decoding thread still has megabytes
    to read: the import stops (the read-ahead thread with it) and nothing is tagged."""
    members = [_member("../evil"), _member("big")]
    ref = _add_layer(editor, _tar(members, {"../evil": b"pwned\n", "big": os.urandom(12 << 20)}))
    assert_refused(cli, cli("import", "oci", ref), "layer 4/4", "'../evil'", "'..'")
    _no_pack_left(cli.store_path)


class _Source(io.RawIOBase):
    """*pieces* pieces of data, then an error or the end; counts what was read."""

    def __init__(self, pieces: int | None, error: Exception | None = None) -> None:
        self.left, self.error, self.reads = pieces, error, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.left is not None:
            if self.left == 0:
                if self.error is not None:
                    raise self.error
                return 0
            self.left -= 1
        self.reads += 1
        buffer[:4] = b"data"
        return 4


def test_read_ahead_hands_over_data_then_the_end_after_its_epilogue() -> None:
    from cnpsfs.oci.blobs import ReadAhead

    ran: list[str] = []
    reader = ReadAhead(_Source(3), "layer", piece=4, epilogue=lambda: ran.append("epilogue"))
    assert reader.read(100) == b"data"
    assert io.BufferedReader(reader).read() == b"data" * 2
    assert ran == ["epilogue"]  # before the end was reported
    reader.close()


def test_read_ahead_raises_the_producer_error_after_the_data_before_it() -> None:
    from cnpsfs.errors import ImportRejected
    from cnpsfs.oci.blobs import ReadAhead

    reader = ReadAhead(_Source(2, ImportRejected("layer 1/1: corrupt gzip data")), "layer", piece=4)
    assert reader.read(4) + reader.read(4) == b"datadata"
    with pytest.raises(ImportRejected, match="corrupt gzip data"):
        reader.read(4)
    reader.close()


def test_read_ahead_stops_when_its_consumer_goes_away() -> None:
    """An endless source, a consumer that gives up after one piece: close() ends the thread
    at once, having read no more than the queue holds."""
    import threading

    from cnpsfs.oci.blobs import ReadAhead

    source = _Source(None)
    reader = ReadAhead(source, "layer", piece=4, depth=2)
    assert reader.read(4) == b"data"
    reader.close(timeout=10)
    assert not any(t.name == "cnpsfs-decode" and t.is_alive() for t in threading.enumerate())
    assert source.reads <= 5


# --------------------------------------------------------------------------- Debian


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory, debian_image: Path) -> Iterator[dict[str, Any]]:  # noqa: F811
    base = tmp_path_factory.mktemp("oci-debian")
    cli = Cli(base / "store")
    imports = {t: json.loads(cli.ok("import", "oci", reference(debian_image, "full", t), "--name",
                                    f"example.org/debian-{t}", "--version", "1", "--json").stdout)
               for t in ("oci", "docker-archive")}
    yield {"cli": cli, "store": base / "store", "imports": imports, "layout": debian_image}


@pytest.mark.fuse
@pytest.mark.slow
def test_debian_mount_equals_umoci_unpack(deb: dict[str, Any], tmp_path: Path) -> None:
    a, b = (deb["imports"][t] for t in ("oci", "docker-archive"))
    assert [x["fileset"] for x in a["layers"]] == [x["fileset"] for x in b["layers"]]
    rootfs = unpacked(deb["layout"], "full")
    with mount_image(deb["store"], a["digest"], tmp_path / "mnt") as mnt:
        problems = root_differences(compare_mount(rootfs, mnt.mountpoint))
        assert not problems, "\n".join(problems[:40])
        assert not (mnt / "usr/share/doc").exists()
        assert os.listdir(mnt / "usr/share/locale") == ["README"]
        assert os.listdir(mnt / "etc/apt/apt.conf.d") == ["99test"]


# --------------------------------------------------------------------------- export


def export(cli: Cli, ref: str, dest: str, *args: str) -> dict[str, Any]:
    return json.loads(cli.ok("export", "oci", ref, dest, *args, "--json").stdout)


def tree_of(cli: Cli, fileset: str) -> str:
    return inspect(cli, fileset)["root"]


def blobs(layout: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((layout / "blobs/sha256").iterdir())}


@pytest.mark.fuse
def test_round_trip_through_export_equals_umoci_unpack(bb: dict[str, Any], tmp_path: Path) -> None:
    """import -> export oci -> umoci unpack gives the tree the mount shows."""
    cli = bb["cli"]
    out = export(cli, "example.org/busybox-oci@1", f"oci:{tmp_path / 'out'}:rt")
    assert len(out["layers"]) == 3
    from ociimages import run

    run("umoci", "unpack", "--image", f"{tmp_path / 'out'}:rt", tmp_path / "bundle")
    with mount_image(bb["store"], "example.org/busybox-oci@1", tmp_path / "mnt") as mnt:
        problems = set(root_differences(compare_mount(tmp_path / "bundle/rootfs", mnt.mountpoint)))
        assert problems == BUSYBOX_NLINK, "\n".join(sorted(problems ^ BUSYBOX_NLINK)[:40])


def test_round_trip_keeps_layers_run_config_and_history(bb: dict[str, Any], tmp_path: Path) -> None:
    cli = bb["cli"]
    original = skopeo_config(f"oci:{bb['layout']}:full")
    export(cli, "example.org/busybox-oci@1", f"oci:{tmp_path / 'out'}:rt")
    exported = skopeo_config(f"oci:{tmp_path / 'out'}:rt")
    for key in ("config", "history", "created", "architecture", "os"):
        assert exported[key] == original[key], key
    assert len(exported["rootfs"]["diff_ids"]) == 3  # type: ignore[index]
    # Importing the export gives the same trees layer by layer, and exporting that again
    # gives the very same image.
    again = json.loads(cli.ok("import", "oci", f"oci:{tmp_path / 'out'}:rt", "--name", "example.org/again",
                              "--version", "1", "--json").stdout)
    first = bb["imports"]["oci"]
    assert [tree_of(cli, x["fileset"]) for x in again["layers"]] == [tree_of(cli, x["fileset"])
                                                                     for x in first["layers"]]
    second = export(cli, "example.org/again@1", f"oci:{tmp_path / 'out2'}:rt")
    assert second["manifest_digest"] == export(cli, "example.org/busybox-oci@1",
                                               f"oci:{tmp_path / 'out3'}:rt")["manifest_digest"]


def test_exports_are_byte_identical(bb: dict[str, Any], tmp_path: Path) -> None:
    cli = bb["cli"]
    for compression in ("gzip", "zstd", "none"):
        a = export(cli, "example.org/busybox-oci@1", f"oci:{tmp_path / compression / 'a'}:t",
                   "--compression-format", compression, "--jobs", "1")
        b = export(cli, "example.org/busybox-oci@1", f"oci:{tmp_path / compression / 'b'}:t",
                   "--compression-format", compression, "--jobs", "3")
        assert a == {**b, "seconds": a["seconds"]}
        assert blobs(tmp_path / compression / "a") == blobs(tmp_path / compression / "b")
        assert (tmp_path / compression / "a/index.json").read_bytes() == (tmp_path / compression / "b/index.json"
                                                                          ).read_bytes()
        media = {x["media_type"] for x in a["layers"]}
        assert media == {{"gzip": OCI_LAYER_GZIP, "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
                          "none": "application/vnd.oci.image.layer.v1.tar"}[compression]}
        # skopeo reads every variant back, and our reader takes what skopeo copies.
        skopeo_config(f"oci:{tmp_path / compression / 'a'}:t")
    diff_ids = {c: [x["diff_id"] for x in export(cli, "example.org/busybox-oci@1", f"oci:{tmp_path / c / 'a'}:t",
                                                 "--compression-format", c)["layers"]]
                for c in ("gzip", "zstd", "none")}
    assert diff_ids["gzip"] == diff_ids["zstd"] == diff_ids["none"]


def test_layer_tar_is_pinned(tmp_path: Path, cli: Cli) -> None:
    """The reproducible tar rules of docs/oci.md, pinned byte for byte on a small tree."""
    layer = _tar([_member("etc/", tarfile.DIRTYPE), _member("etc/a"), _member("etc/.wh.gone"),
                  _member("etc/b", tarfile.LNKTYPE, "etc/a"), _member("s", tarfile.SYMTYPE, "etc/a")],
                 {"etc/a": b"hello\n"})
    (tmp_path / "l.tar").write_bytes(layer)
    cli.ok("import", "tar", tmp_path / "l.tar", "--name", "example.org/pinned", "--version", "1")
    out = export(cli, "example.org/pinned@1", f"oci:{tmp_path / 'out'}", "--compression-format", "none")
    data = (tmp_path / "out/blobs/sha256" / out["layers"][0]["digest"][7:]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = [(m.name, m.type, m.mode, m.uid, m.gid, m.mtime, m.uname, m.linkname) for m in tf]
    assert members == [
        (".", tarfile.DIRTYPE, 0o755, 0, 0, 0, "", ""),
        ("etc", tarfile.DIRTYPE, 0o644, 0, 0, 0, "", ""),
        ("etc/a", tarfile.REGTYPE, 0o644, 0, 0, 0, "", ""),
        ("etc/b", tarfile.LNKTYPE, 0o644, 0, 0, 0, "", "etc/a"),
        ("etc/.wh.gone", tarfile.REGTYPE, 0, 0, 0, 0, "", ""),
        ("s", tarfile.SYMTYPE, 0o644, 0, 0, 0, "", "etc/a"),
    ]
    assert len(data) % 10240 == 0
    assert out["layers"][0]["diff_id"] == "sha256:" + __import__("hashlib").sha256(data).hexdigest()
    assert out["layers"][0]["diff_id"] == PINNED_DIFF_ID


PINNED_DIFF_ID = "sha256:7aa1ca1a562be08a11023e6c89de55e153df94c31491db98b7a8083126310a4c"


@pytest.mark.fuse
def test_native_image_exports_with_placement_and_config(cli: Cli, tmp_path: Path,
                                                         busybox_image: Path) -> None:  # noqa: F811
    """A cnpsfs image (not from OCI) with a FileSet placed at /opt/app runs the same unpacked."""
    from mountutil import write_manifest
    from ociimages import run

    base = unpacked(busybox_image, "base")
    cli.ok("import", "dir", base, "--name", "example.org/bb-base", "--version", "1")
    app = tmp_path / "app"
    (app / "bin").mkdir(parents=True)
    (app / "bin/run").write_text("#!/bin/sh\necho native app\n")
    (app / "bin/run").chmod(0o755)
    cli.ok("import", "dir", app, "--name", "example.org/app-code", "--version", "1")
    manifest = write_manifest(tmp_path / "app.toml", "example.org/native",
                              ["example.org/bb-base@1", {"fileset": "example.org/app-code@1", "at": "/opt/app"}],
                              extra='[config]\nentrypoint = ["/opt/app/bin/run"]\nenv = ["A=b"]\n')
    cli.ok("image", "create", manifest)
    out = export(cli, "example.org/native@1", f"oci:{tmp_path / 'out'}:n")
    config = skopeo_config(f"oci:{tmp_path / 'out'}:n")
    assert config["config"] == {"Entrypoint": ["/opt/app/bin/run"], "Env": ["A=b"]}
    assert len(out["layers"]) == 2
    run("umoci", "unpack", "--image", f"{tmp_path / 'out'}:n", tmp_path / "bundle")
    with mount_image(cli.store_path, "example.org/native@1", tmp_path / "mnt") as mnt:
        problems = root_differences(compare_mount(tmp_path / "bundle/rootfs", mnt.mountpoint))
        # /opt comes only from the placement: the mount synthesises it (0755, mtime 0), and
        # the export writes no entry for it, so umoci makes it at unpack time.
        problems = [p for p in problems if not p.startswith("b'opt': st_mtime_ns")]
        assert not problems, "\n".join(problems[:40])


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Any]:
    """``podman(*args)`` with private storage (vfs) and the settings this host needs (docs/oci.md)."""
    import shutil
    import subprocess
    import tempfile

    if shutil.which("podman") is None:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail("podman is not installed (scripts/install --test installs it); CI must not skip")
        pytest.skip("podman is not installed")
    conf = tmp_path / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    with tempfile.TemporaryDirectory(prefix="pm-", dir="/tmp") as short:  # podman: runroot < 50 characters
        def podman(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["podman", "--root", f"{short}/root", "--runroot", f"{short}/run",
                                   "--storage-driver", "vfs", "--runtime", "runc", *args],
                                  capture_output=True, text=True, env=env, timeout=300)

        yield podman
        podman("rmi", "--all", "--force")


def test_podman_runs_the_export(bb: dict[str, Any], tmp_path: Path, podman: Any) -> None:
    export(bb["cli"], "example.org/busybox-oci@1", f"oci:{tmp_path / 'out'}:rt")
    proc = podman("run", "--rm", "--network", "none", f"oci:{tmp_path / 'out'}:rt")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2:] == ["hello from busybox", "1000"]


def test_export_refuses_a_directory_that_is_not_a_layout(bb: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/file").write_text("x")
    result = bb["cli"]("export", "oci", "example.org/busybox-oci@1", f"oci:{tmp_path / 'busy'}")
    assert result.rc == 1 and "is not empty and not an OCI layout" in result.stderr
    assert os.listdir(tmp_path / "busy") == ["file"]


# --------------------------------------------------------------------------- registries


def skopeo_push(registry: Any, layout: Path, tag: str, repo: str, *args: str) -> str:
    from ociimages import run

    dest = f"docker://{registry.host}/{repo}:{tag}"
    run("skopeo", "copy", "-q", "--dest-tls-verify=false", *args, f"oci:{layout}:{tag}", dest)
    return dest


@pytest.fixture(scope="module")
def pushed(registry: Any, busybox_image: Path) -> dict[str, str]:  # noqa: F811
    """The busybox image in the plain-HTTP registry, as OCI and as Docker schema 2."""
    return {"oci": skopeo_push(registry, busybox_image, "full", "oci-test/busybox"),
            "v2s2": skopeo_push(registry, busybox_image, "full", "oci-test/busybox-v2s2", "--format", "v2s2"),
            "base": skopeo_push(registry, busybox_image, "base", "oci-test/busybox")}


@pytest.mark.fuse
@pytest.mark.parametrize("kind", ["oci", "v2s2"])
def test_registry_import_equals_umoci_unpack(bb: dict[str, Any], pushed: dict[str, str], kind: str, cli: Cli,
                                             tmp_path: Path) -> None:
    out = json.loads(cli.ok("import", "oci", pushed[kind], "--json").stdout)
    # The same layer FileSets as from the layout, in another store: FileSets are content-addressed.
    assert [x["fileset"] for x in out["layers"]] == [x["fileset"] for x in bb["imports"]["oci"]["layers"]]
    manifest = json.loads(skopeo_raw(pushed[kind]))
    media = {x["mediaType"] for x in manifest["layers"]}
    assert media == ({"application/vnd.docker.image.rootfs.diff.tar.gzip"} if kind == "v2s2" else {OCI_LAYER_GZIP})
    image = inspect(cli, out["digest"])
    assert image["metadata"]["oci"]["source"] == pushed[kind]
    assert image["name"] == "127.0.0.1/oci-test/" + ("busybox" if kind == "oci" else "busybox-v2s2")
    assert image["version"] == "full"
    with mount_image(cli.store_path, out["digest"], tmp_path / "mnt") as mnt:
        problems = set(root_differences(compare_mount(unpacked(bb["layout"], "full"), mnt.mountpoint)))
        assert problems == BUSYBOX_NLINK, "\n".join(sorted(problems ^ BUSYBOX_NLINK)[:40])


def skopeo_raw(reference: str) -> str:
    from ociimages import run

    return run("skopeo", "inspect", "--raw", "--tls-verify=false", reference)


def test_export_to_registry_skips_what_it_has_and_mounts_across_repositories(
        bb: dict[str, Any], registry: Any, cli: Cli, podman: Any) -> None:
    first = export(bb["cli"], "example.org/busybox-oci@1", f"docker://{registry.host}/oci-test/pushed:1")
    assert {x["outcome"] for x in first["layers"]} == {"uploaded"}
    accepted = json.loads(__import__("ociimages").run("skopeo", "inspect", "--tls-verify=false",
                                                      f"docker://{registry.host}/oci-test/pushed:1"))
    assert accepted["Digest"] == first["manifest_digest"]
    assert accepted["Layers"] == [x["digest"] for x in first["layers"]]
    again = export(bb["cli"], "example.org/busybox-oci@1", f"docker://{registry.host}/oci-test/pushed:1")
    assert again["manifest_digest"] == first["manifest_digest"]
    assert {x["outcome"] for x in again["layers"]} == {"exists"}
    # Imported from that repository, pushed to another: the registry links the blobs.
    imported = json.loads(cli.ok("import", "oci", f"docker://{registry.host}/oci-test/pushed:1", "--json").stdout)
    moved = export(cli, imported["digest"], f"docker://{registry.host}/oci-test/moved:1")
    assert moved["manifest_digest"] == first["manifest_digest"]
    assert {x["outcome"] for x in moved["layers"]} == {"mounted"}
    proc = podman("run", "--rm", "--network", "none", "--tls-verify=false", f"{registry.host}/oci-test/moved:1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2:] == ["hello from busybox", "1000"]


def test_authenticated_tls_registry(tls_registry: Any, busybox_image: Path, cli: Cli, tmp_path: Path) -> None:  # noqa: F811
    from ociimages import run

    server = tls_registry
    certs = tmp_path / "certs"  # skopeo's layout: CA certificates as *.crt, nothing else
    certs.mkdir()
    (certs / "ca.crt").write_bytes(Path(server.ca_file).read_bytes())
    dest = f"docker://{server.host}/oci-test/private:base"
    run("skopeo", "copy", "-q", f"--dest-cert-dir={certs}",
        f"--dest-creds={server.username}:{server.password}", f"oci:{busybox_image}:base", dest)
    refused = cli("import", "oci", dest, "--cert-dir", server.ca_file)
    assert_refused(cli, refused, server.host)
    assert any(word in refused.stderr.lower() for word in ("401", "credentials", "unauthorized"))
    untrusted = cli("import", "oci", dest, "--creds", f"{server.username}:{server.password}")
    assert_refused(cli, untrusted, server.host)
    ok = json.loads(cli.ok("import", "oci", dest, "--cert-dir", server.ca_file, "--creds",
                           f"{server.username}:{server.password}", "--json").stdout)
    assert len(ok["layers"]) == 1
    authfile = tmp_path / "auth.json"
    token = __import__("base64").b64encode(f"{server.username}:{server.password}".encode()).decode()
    authfile.write_text(json.dumps({"auths": {server.host: {"auth": token}}}))
    out = export(cli, ok["digest"], f"docker://{server.host}/oci-test/private-copy:1", "--cert-dir",
                 str(certs), "--authfile", str(authfile))
    assert len(out["layers"]) == 1


def test_token_registry(token_registry: Any, busybox_image: Path, cli: Cli) -> None:  # noqa: F811
    from ociimages import run

    tokens = token_registry.tokens
    assert tokens is not None
    dest = f"docker://{token_registry.host}/oci-test/tokened:base"
    run("skopeo", "copy", "-q", "--dest-tls-verify=false", "--dest-creds=alice:wonderland",
        f"oci:{busybox_image}:base", dest)
    out = json.loads(cli.ok("import", "oci", dest, "--creds", "alice:wonderland", "--json").stdout)
    assert len(out["layers"]) == 1
    assert any(account == "alice" and status == 200 for account, _scopes, status in tokens.requests)
    pushed = export(cli, out["digest"], f"docker://{token_registry.host}/oci-test/tokened-copy:1",
                    "--creds", "alice:wonderland")
    assert {x["outcome"] for x in pushed["layers"]} <= {"uploaded", "mounted"}


@pytest.mark.parametrize(("fault", "needles"), [
    ({"action": "status", "status": 401, "path": "/manifests/", "times": None}, ["401"]),
    ({"action": "status", "status": 404, "path": "/manifests/", "times": None}, ["404", "manifest full"]),
    ({"action": "status", "status": 500, "path": "/blobs/sha256:", "method": "GET", "times": None},
     ["500", "blob sha256:"]),
    ({"action": "stall", "seconds": 20, "path": "/blobs/sha256:", "method": "GET", "times": None},
     ["blob sha256:"]),
    ({"action": "flip", "at": 100, "path": "/blobs/sha256:", "method": "GET", "times": None},
     ["sha256:", "digest"]),
], ids=["401", "404", "500", "hang", "corrupt"])
def test_registry_faults_are_one_line_errors(registry: Any, pushed: dict[str, str], fault_proxy: Any,
                                             cli: Cli, fault: dict[str, Any], needles: list[str]) -> None:
    import time

    proxy = fault_proxy(registry.url)
    proxy.add(**fault)
    start = time.monotonic()
    result = cli("import", "oci", f"docker://{proxy.host}/oci-test/busybox:full", "--timeout", "2",
                 "--retry-times", "1", timeout=120)
    assert time.monotonic() - start < 60
    assert_refused(cli, result, proxy.host, *needles)
