"""``export oci`` to ``oci-archive:`` and ``docker-archive:`` files, read back by the real
tools (skopeo inspect and copy, podman load and run) and by ``import oci``; hostile
archives refused naming the culprit; archives written atomically.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from cnpsfs_testlib import Cli
from ociimages import busybox_image, run  # noqa: F401 (fixture)
from test_oci import podman  # noqa: F401 (fixture)

ARCHIVES = {"oci-archive": "oci-archive:{path}:rt", "docker-archive": "docker-archive:{path}:example.org/bb:1"}


@pytest.fixture(scope="module")
def bb(tmp_path_factory: pytest.TempPathFactory, busybox_image: Path) -> dict[str, Any]:  # noqa: F811
    top = tmp_path_factory.mktemp("oci-archives")
    cli = Cli(top / "store")
    first = json.loads(cli.ok("import", "oci", f"oci:{busybox_image}:full", "--name", "example.org/bb",
                              "--version", "1", "--json").stdout)
    return {"cli": cli, "top": top, "first": first}


def export(cli: Cli, ref: str, dest: str, *args: str) -> dict[str, Any]:
    return json.loads(cli.ok("export", "oci", ref, dest, "--json", *args).stdout)


def trees(cli: Cli, layers: list[dict[str, Any]]) -> list[str]:
    return [json.loads(cli.ok("inspect", x["fileset"], "--json").stdout)["root"] for x in layers]


def members(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return [m.name for m in tf]


@pytest.mark.parametrize("kind", sorted(ARCHIVES))
def test_archive_is_read_by_skopeo_and_imported_again(bb: dict[str, Any], kind: str, tmp_path: Path) -> None:
    cli = bb["cli"]
    path = tmp_path / "image.tar"
    dest = ARCHIVES[kind].format(path=path)
    out = export(cli, "example.org/bb@1", dest)
    if kind == "docker-archive":
        assert {x["media_type"] for x in out["layers"]} == {"application/vnd.oci.image.layer.v1.tar"}
        assert sorted(members(path)) == sorted([f"{out['config_digest'][7:]}.json", "manifest.json", "repositories",
                                                *(f"{x['diff_id'][7:]}.tar" for x in out["layers"])])
        with tarfile.open(path) as tf:
            manifest = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
            repositories = json.load(tf.extractfile("repositories"))  # type: ignore[arg-type]
        assert manifest == [{"Config": f"{out['config_digest'][7:]}.json", "RepoTags": ["example.org/bb:1"],
                             "Layers": [f"{x['diff_id'][7:]}.tar" for x in out["layers"]]}]
        assert repositories == {"example.org/bb": {"1": out["layers"][-1]["diff_id"][7:]}}
        skopeo_ref = f"docker-archive:{path}"
    else:
        assert {"oci-layout", "index.json", *(f"blobs/sha256/{x['digest'][7:]}" for x in out["layers"])} \
            <= set(members(path))
        skopeo_ref = f"oci-archive:{path}:rt"
    inspected = json.loads(run("skopeo", "inspect", skopeo_ref))
    assert inspected["Layers"] == [x["digest"] for x in out["layers"]]
    if kind == "oci-archive":
        assert inspected["Digest"] == out["manifest_digest"]
    config = json.loads(run("skopeo", "inspect", "--config", skopeo_ref))
    assert config["rootfs"]["diff_ids"] == [x["diff_id"] for x in out["layers"]]
    run("skopeo", "copy", "-q", skopeo_ref, f"oci:{tmp_path / 'copied'}:c")
    assert json.loads(run("skopeo", "inspect", "--config", f"oci:{tmp_path / 'copied'}:c")) == config
    # Archives are reproducible: the same image exported again gives the same bytes.
    export(cli, "example.org/bb@1", ARCHIVES[kind].format(path=tmp_path / "again.tar"))
    assert (tmp_path / "again.tar").read_bytes() == path.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["again.tar", "copied", "image.tar"]  # no temporary files left
    # import oci reads it back: the same trees, layer by layer, as the image exported.
    other = Cli(tmp_path / "store2")
    again = json.loads(other.ok("import", "oci", skopeo_ref, "--name", "example.org/back", "--version", "1",
                                "--json").stdout)
    assert trees(other, again["layers"]) == trees(cli, bb["first"]["layers"])


def test_round_trip_gives_the_same_filesets(bb: dict[str, Any], tmp_path: Path) -> None:
    """import -> export -> import -> export -> import: from the first re-import on, the
    same layer FileSets (their digests) and the same archive bytes."""
    cli = bb["cli"]
    imports = [bb["first"]]
    archives = []
    for number in range(2):
        path = tmp_path / f"round{number}.tar"
        source = imports[-1]["digest"]
        export(cli, source, f"docker-archive:{path}:example.org/round:{number}")
        archives.append(path)
        imports.append(json.loads(cli.ok("import", "oci", f"docker-archive:{path}", "--name", "example.org/round",
                                         "--version", str(number), "--json").stdout))
    filesets = [[x["fileset"] for x in result["layers"]] for result in imports]
    assert filesets[1] == filesets[2]
    assert trees(cli, imports[0]["layers"]) == trees(cli, imports[1]["layers"])
    config = [json.loads(run("skopeo", "inspect", "--config", f"docker-archive:{p}")) for p in archives]
    assert config[0] == config[1]
    # And through an OCI archive: the very same FileSets as through the docker archive.
    export(cli, imports[1]["digest"], f"oci-archive:{tmp_path / 'o.tar'}")
    via_oci = json.loads(cli.ok("import", "oci", f"oci-archive:{tmp_path / 'o.tar'}", "--name", "example.org/round",
                                "--version", "oci", "--json").stdout)
    assert [x["fileset"] for x in via_oci["layers"]] == filesets[1]


@pytest.mark.parametrize("kind", sorted(ARCHIVES))
def test_podman_loads_and_runs_the_archive(bb: dict[str, Any], kind: str, tmp_path: Path,
                                           podman: Any) -> None:  # noqa: F811
    path = tmp_path / "image.tar"
    export(bb["cli"], "example.org/bb@1", ARCHIVES[kind].format(path=path))
    loaded = podman("load", "-i", str(path))
    assert loaded.returncode == 0, loaded.stderr
    names = [line.split(":", 1)[1].strip() for line in loaded.stdout.splitlines() if line.startswith("Loaded image")]
    assert names, loaded.stdout
    if kind == "docker-archive":
        assert names == ["example.org/bb:1"]
    proc = podman("run", "--rm", "--network", "none", names[0].split(",")[0].strip())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2:] == ["hello from busybox", "1000"]


def test_docker_archive_refuses_compressed_layers(bb: dict[str, Any], tmp_path: Path) -> None:
    result = bb["cli"]("export", "oci", "example.org/bb@1", f"docker-archive:{tmp_path / 'x.tar'}",
                       "--compression-format", "gzip")
    assert result.rc == 2, result
    assert "uncompressed layers" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_failed_export_leaves_the_old_archive(bb: dict[str, Any], tmp_path: Path) -> None:
    """A store that fails mid-export (a damaged pack) leaves FILE as it was and no temporary files."""
    import shutil

    store = tmp_path / "damaged"
    shutil.copytree(bb["cli"].store_path, store)
    packs = sorted((store / "packs").iterdir(), key=lambda p: p.stat().st_size)
    biggest = packs[-1]
    data = bytearray(biggest.read_bytes())
    for offset in range(len(data) // 4, len(data) * 3 // 4, 4096):
        data[offset] ^= 0xFF
    biggest.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    for kind in sorted(ARCHIVES):
        path = out / f"{kind}.tar"
        path.write_bytes(b"the previous archive")
        result = Cli(store)("export", "oci", "example.org/bb@1", ARCHIVES[kind].format(path=path))
        assert result.rc == 1, result
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert path.read_bytes() == b"the previous archive"
    assert sorted(os.listdir(out)) == ["docker-archive.tar", "oci-archive.tar"]


# --------------------------------------------------------------------------- hostile archives


def _tar(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return path


@pytest.fixture(scope="module")
def docker_archive(bb: dict[str, Any]) -> dict[str, bytes]:
    """The members of a good docker archive of the busybox image."""
    path = bb["top"] / "good.tar"
    export(bb["cli"], "example.org/bb@1", f"docker-archive:{path}:example.org/bb:1")
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}  # type: ignore[union-attr]


def _manifest(files: dict[str, bytes]) -> list[dict[str, Any]]:
    return json.loads(files["manifest.json"])


@pytest.mark.parametrize(("case", "needle"), [
    ("traversal", "manifest.json[0]: path '../../etc/passwd' leaves the archive"),
    ("absolute", "manifest.json[0]: path '/etc/passwd' leaves the archive"),
    ("not-json", "manifest.json is not valid JSON"),
    ("not-a-list", "manifest.json lists no image"),
    ("no-layers", "manifest.json[0]: needs Config (a path) and Layers (a list of paths)"),
    ("missing-layer", "no regular file 'gone.tar' in the archive"),
    ("missing-manifest", "no manifest.json (not a docker save archive)"),
    ("symlink-out", "links to '../../../../etc/passwd', outside the archive"),
    ("bad-config-digest", "digest mismatch: the file hashes to"),
    ("tampered-layer", "layer 1/3 (sha256:"),
])
def test_hostile_docker_archive(bb: dict[str, Any], docker_archive: dict[str, bytes], case: str, needle: str,
                                tmp_path: Path) -> None:
    files = dict(docker_archive)
    links: dict[str, str] = {}
    manifest = _manifest(files)
    if case == "traversal":
        manifest[0]["Layers"][0] = "../../etc/passwd"
    elif case == "absolute":
        manifest[0]["Layers"][0] = "/etc/passwd"
    elif case == "not-json":
        files["manifest.json"] = b"[{"
    elif case == "not-a-list":
        manifest = {"Config": "x"}  # type: ignore[assignment]
    elif case == "no-layers":
        del manifest[0]["Layers"]
    elif case == "missing-layer":
        manifest[0]["Layers"][1] = "gone.tar"
    elif case == "missing-manifest":
        del files["manifest.json"]
    elif case == "symlink-out":
        name = manifest[0]["Layers"][0]
        del files[name]
        links[name] = "../../../../etc/passwd"
    elif case == "bad-config-digest":
        files[manifest[0]["Config"]] = files[manifest[0]["Config"]].replace(b'"os":"linux"', b'"os":"linux" ')
    elif case == "tampered-layer":
        name = manifest[0]["Layers"][0]
        data = bytearray(files[name])
        data[len(data) // 2] ^= 1  # a diff_id mismatch, or a damaged header: either names the layer
        files[name] = bytes(data)
    if case not in ("not-json", "missing-manifest"):
        files["manifest.json"] = json.dumps(manifest).encode()
    archive = _tar(tmp_path / "hostile.tar", files, links)
    cli = Cli(tmp_path / "store")
    result = cli("import", "oci", f"docker-archive:{archive}", "--name", "example.org/hostile", "--version", "1")
    lines = result.stderr.strip().splitlines()
    assert result.rc == 1 and len(lines) == 1, result
    assert needle in lines[0], lines[0]
    assert str(archive) in lines[0]
    assert "example.org/hostile" not in cli("tag", "list").stdout
    assert set(os.listdir(tmp_path)) <= {"hostile.tar", "store"}  # nothing extracted


@pytest.mark.parametrize(("case", "needle"), [
    ("missing-blob", "no regular file 'blobs/sha256/"),
    ("bad-index", "index.json: not valid JSON"),
    ("traversal-member", "no regular file 'blobs/sha256/"),
])
def test_hostile_oci_archive(bb: dict[str, Any], case: str, needle: str, tmp_path: Path) -> None:
    path = tmp_path / "good.tar"
    out = export(bb["cli"], "example.org/bb@1", f"oci-archive:{path}:rt")
    with tarfile.open(path) as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}  # type: ignore[union-attr]
    layer = f"blobs/sha256/{out['layers'][1]['digest'][7:]}"
    if case == "missing-blob":
        del files[layer]
    elif case == "bad-index":
        files["index.json"] = b"{"
    elif case == "traversal-member":
        files[f"../{layer}"] = files.pop(layer)
    archive = _tar(tmp_path / "hostile.tar", files)
    cli = Cli(tmp_path / "store")
    result = cli("import", "oci", f"oci-archive:{archive}:rt", "--name", "example.org/hostile", "--version", "1")
    lines = result.stderr.strip().splitlines()
    assert result.rc == 1 and len(lines) == 1, result
    assert needle in lines[0] and str(archive) in lines[0], lines[0]
    assert "example.org/hostile" not in cli("tag", "list").stdout
