"""Prefetch profiles carried by ``export oci`` and filed by ``import oci`` (docs/oci.md,
"Profiles"): an artifact per profile whose ``subject`` is the image manifest, listed in a
layout's ``index.json`` or under the real docker-registry's referrers fallback tag
``sha256-<hex>``. Imported into a fresh store, the image has the same profiles (the same
objects: a profile names paths, not digests, so it needs no rewriting); a malformed
profile, or one of another image, is ignored with a warning and the image imports.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cnpsfs_testlib import Cli
from ociimages import busybox_image, run  # noqa: F401 (fixture)
from servers import ReferrersRegistry, referrers_registry, registry  # noqa: F401 (fixtures)

from cnpsfs import format as fmt
from cnpsfs.image.profiles import store_profile
from cnpsfs.store import LocalStore

ARTIFACT_TYPE = "application/vnd.cnpsfs.profile.v1+cbor"
SIGNATURE_TYPE = "application/vnd.cnpsfs.signature.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def _profile(name: str, image: bytes, created_ns: int) -> fmt.Profile:
    entries = [fmt.ProfileEntry(fmt.Touch.DIR, b""), fmt.ProfileEntry(fmt.Touch.LISTED, b"bin"),
               fmt.ProfileEntry(fmt.Touch.FILE, b"bin/busybox", (0, 4096, 65536, 8192)),
               fmt.ProfileEntry(fmt.Touch.LOOKUP, b"etc/no-such-file" + name.encode())]
    return fmt.Profile(name, image, entries, created_ns, {"command": ["/bin/true"], "requests": 7})


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory, busybox_image: Path) -> dict[str, Any]:  # noqa: F811
    """busybox imported as example.org/bb@1 with profiles ``default`` and ``sh``; and the same
    image signed, as example.org/signed@1, with a profile ``default``."""
    top = tmp_path_factory.mktemp("oci-profiles")
    cli = Cli(top / "store")
    image = json.loads(cli.ok("import", "oci", f"oci:{busybox_image}:full", "--name", "example.org/bb",
                              "--version", "1", "--json").stdout)["digest"]
    signed = json.loads(cli.ok("import", "oci", f"oci:{busybox_image}:base", "--name", "example.org/signed",
                               "--version", "1", "--json").stdout)["digest"]
    cli.ok("key", "generate", top / "a")
    cli.ok("sign", "example.org/signed@1", "--key", top / "a.key")
    store = LocalStore(top / "store")
    digests = {name: fmt.format_digest(store_profile(store, fmt.parse_digest(image),
                                                     _profile(name, fmt.parse_digest(image), 1_700_000_000 + n)))
               for n, name in enumerate(["default", "sh"])}
    store_profile(store, fmt.parse_digest(signed), _profile("default", fmt.parse_digest(signed), 5))
    return {"cli": cli, "top": top, "image": image, "signed": signed, "digests": digests,
            "shown": {name: show(top / "store", "example.org/bb@1", name) for name in digests}}


def show(store: Path, ref: str, name: str) -> dict[str, Any]:
    return json.loads(Cli(store).ok("profile", "show", ref, name, "--json").stdout)  # type: ignore[no-any-return]


def listed(store: Path, ref: str) -> list[dict[str, Any]]:
    return json.loads(Cli(store).ok("profile", "ls", ref, "--json").stdout)  # type: ignore[no-any-return]


def export(cli: Cli, ref: str, dest: str, *args: str) -> dict[str, Any]:
    return json.loads(cli.ok("export", "oci", ref, dest, "--json", *args).stdout)  # type: ignore[no-any-return]


def import_oci(store: Path, source: str, ref: str = "example.org/bb@1") -> tuple[dict[str, Any], str]:
    name, _, version = ref.partition("@")
    result = Cli(store).ok("import", "oci", source, "--json", "--name", name, "--version", version)
    return json.loads(result.stdout), result.stderr


def check_filed(profiled: dict[str, Any], store: Path, out: dict[str, Any], ref: str = "example.org/bb@1") -> None:
    """The imported image has both profiles, the same objects with the same content."""
    assert sorted(out["profiles"]) == sorted(profiled["digests"].values())
    rows = listed(store, ref)
    assert {row["name"]: row["digest"] for row in rows} == profiled["digests"]
    assert all(row["recorded_on"] == profiled["image"] for row in rows)  # kept: it says where it was recorded
    for name in profiled["digests"]:
        assert show(store, ref, name) == profiled["shown"][name]
    shown = json.loads(Cli(store).ok("inspect", ref, "--json").stdout)
    assert sorted(p["name"] for p in shown["profiles"]) == ["default", "sh"]
    Cli(store).ok("verify")


# --------------------------------------------------------------------------- OCI layouts


def test_layout_lists_the_profiles_and_import_files_them(profiled: dict[str, Any], tmp_path: Path) -> None:
    layout = tmp_path / "out"
    out = export(profiled["cli"], "example.org/bb@1", f"oci:{layout}:t")
    assert len(out["profiles"]) == 2 and out["signatures"] == []
    index = json.loads((layout / "index.json").read_text())
    artifacts = [m for m in index["manifests"] if m.get("artifactType") == ARTIFACT_TYPE]
    assert sorted(m["digest"] for m in artifacts) == sorted(out["profiles"])
    names = set()
    for entry in artifacts:
        manifest = json.loads((layout / "blobs/sha256" / entry["digest"][7:]).read_text())
        assert manifest["subject"]["digest"] == out["manifest_digest"]
        assert manifest["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
        layer = manifest["layers"][0]
        assert layer["mediaType"] == ARTIFACT_TYPE
        blob = (layout / "blobs/sha256" / layer["digest"][7:]).read_bytes()
        name = manifest["annotations"]["org.cnpsfs.profile.name"]
        names.add(name)
        # The blob is the profile object itself, byte for byte.
        assert fmt.format_digest(fmt.digest_bytes(blob)) == profiled["digests"][name]
    assert names == {"default", "sh"}
    assert json.loads(run("skopeo", "inspect", f"oci:{layout}:t"))["Digest"] == out["manifest_digest"]
    # Exported again: the same artifacts, listed once.
    again = export(profiled["cli"], "example.org/bb@1", f"oci:{layout}:t")
    assert sorted(again["profiles"]) == sorted(out["profiles"])
    assert json.loads((layout / "index.json").read_text()) == index
    store = tmp_path / "store"
    imported, _ = import_oci(store, f"oci:{layout}:t")
    assert imported["digest"] != profiled["image"]  # a new image object (OCI provenance), same profiles
    check_filed(profiled, store, imported)
    # Imported again into the same store: the profiles of each name replaced, not doubled.
    again_in, _ = import_oci(store, f"oci:{layout}:t")
    assert len(listed(store, "example.org/bb@1")) == 2
    assert sorted(again_in["profiles"]) == sorted(profiled["digests"].values())


def test_oci_archive_carries_profiles_and_docker_archive_warns(profiled: dict[str, Any], tmp_path: Path) -> None:
    out = export(profiled["cli"], "example.org/bb@1", f"oci-archive:{tmp_path / 'a.tar'}:t")
    assert len(out["profiles"]) == 2
    imported, _ = import_oci(tmp_path / "store", f"oci-archive:{tmp_path / 'a.tar'}:t")
    check_filed(profiled, tmp_path / "store", imported)
    result = profiled["cli"].ok("export", "oci", "example.org/bb@1", f"docker-archive:{tmp_path / 'd.tar'}")
    assert "cannot hold profiles" in result.stderr, result.stderr


def test_signed_image_is_restored_with_its_profile(profiled: dict[str, Any], tmp_path: Path) -> None:
    """The profile is filed under the restored signed image, whose digest is the original's."""
    out = export(profiled["cli"], "example.org/signed@1", f"oci:{tmp_path / 'out'}:t")
    assert len(out["signatures"]) == 1 and len(out["profiles"]) == 1
    imported, _ = import_oci(tmp_path / "store", f"oci:{tmp_path / 'out'}:t", "example.org/signed@1")
    assert imported["digest"] == profiled["signed"] and len(imported["signatures"]) == 1
    rows = listed(tmp_path / "store", "example.org/signed@1")
    assert [row["name"] for row in rows] == ["default"] and rows[0]["recorded_on"] == profiled["signed"]


# --------------------------------------------------------------------------- malformed


def _edit_profile(layout: Path, name: str, edit: Any) -> None:
    """Rewrite the layout's artifact of profile *name*: *edit(blob, manifest_doc)* changes them."""
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs/sha256"
    entry = next(m for m in index["manifests"] if m.get("artifactType") == ARTIFACT_TYPE and json.loads(
        (blobs / m["digest"][7:]).read_bytes())["annotations"]["org.cnpsfs.profile.name"] == name)
    manifest = json.loads((blobs / entry["digest"][7:]).read_bytes())
    size = manifest["layers"][0]["size"]
    blob = edit((blobs / manifest["layers"][0]["digest"][7:]).read_bytes(), manifest)
    edited_size = manifest["layers"][0]["size"]

    def put(data: bytes) -> tuple[str, int]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (blobs / digest[7:]).write_bytes(data)
        return digest, len(data)

    manifest["layers"][0]["digest"], manifest["layers"][0]["size"] = put(blob)
    if edited_size != size:
        manifest["layers"][0]["size"] = edited_size  # a size the edit set: kept, however false
    entry["digest"], entry["size"] = put(json.dumps(manifest).encode())
    (layout / "index.json").write_text(json.dumps(index))


def _truncated(blob: bytes, _manifest: dict[str, Any]) -> bytes:
    return blob[:-5]


def _bad_range(blob: bytes, _manifest: dict[str, Any]) -> bytes:
    """A well-formed object whose ranges break §1.13 (unsorted): decode_profile refuses it."""
    obj = fmt.decode_object(blob)
    obj[4] = [[2, b"bin/busybox", [4096, 10, 0, 10]]]
    return fmt.encode_canonical(obj)


def _signature_blob(blob: bytes, manifest: dict[str, Any]) -> bytes:
    return b'{"signature": "", "objects": []}'


def _wrong_subject(blob: bytes, manifest: dict[str, Any]) -> bytes:
    manifest["subject"]["digest"] = "sha256:" + "0" * 64
    return blob


def _huge(blob: bytes, manifest: dict[str, Any]) -> bytes:
    manifest["layers"][0]["size"] = 64 << 20  # the reader refuses it before reading anything
    return blob


@pytest.mark.parametrize(("edit", "warning"), [
    (_truncated, "the profile does not decode"),
    (_bad_range, "ranges are not sorted"),
    (_signature_blob, "the profile does not decode"),
    (_wrong_subject, ""),  # not listed for this image at all: no warning
    (_huge, "blob of at most 16 MiB"),
])
def test_malformed_profile_is_ignored_and_the_image_imports(profiled: dict[str, Any], tmp_path: Path, edit: Any,
                                                            warning: str) -> None:
    layout = tmp_path / "out"
    export(profiled["cli"], "example.org/bb@1", f"oci:{layout}:t")
    _edit_profile(layout, "sh", edit)
    store = tmp_path / "store"
    imported, stderr = import_oci(store, f"oci:{layout}:t")
    rows = listed(store, "example.org/bb@1")
    assert [row["name"] for row in rows] == ["default"], rows
    assert imported["profiles"] == [profiled["digests"]["default"]]
    assert show(store, "example.org/bb@1", "default") == profiled["shown"]["default"]
    lines = [line for line in stderr.splitlines() if "profile artifact" in line]
    if edit is _wrong_subject:
        # A layout lists the artifacts of all its images: one of another image is not this one's.
        assert not lines, stderr
    else:
        assert len(lines) == 1 and "WARNING" in lines[0] and warning in lines[0] and "ignored" in lines[0], stderr
        assert str(layout) in lines[0]


# --------------------------------------------------------------------------- registries


def test_registry_without_referrers_api_gets_the_fallback_tag(profiled: dict[str, Any], registry: Any,  # noqa: F811
                                                              tmp_path: Path) -> None:
    dest = f"docker://{registry.host}/prof/bb:1"
    out = export(profiled["cli"], "example.org/bb@1", dest)
    assert len(out["profiles"]) == 2
    fallback = "sha256-" + out["manifest_digest"][7:]
    tags = json.loads(run("skopeo", "list-tags", "--tls-verify=false", f"docker://{registry.host}/prof/bb"))
    assert sorted(tags["Tags"]) == sorted(["1", fallback])
    index = json.loads(run("skopeo", "inspect", "--raw", "--tls-verify=false",
                           f"docker://{registry.host}/prof/bb:{fallback}"))
    assert index["mediaType"] == OCI_INDEX
    assert sorted((m["digest"], m["artifactType"]) for m in index["manifests"]) == \
        sorted((d, ARTIFACT_TYPE) for d in out["profiles"])
    export(profiled["cli"], "example.org/bb@1", dest)  # pushed again: listed once
    assert json.loads(run("skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{registry.host}/prof/bb:{fallback}")) == index
    imported, _ = import_oci(tmp_path / "store", dest)
    check_filed(profiled, tmp_path / "store", imported)
    # A signed image's signature and profile share the fallback index; both come back.
    signed_dest = f"docker://{registry.host}/prof/signed:1"
    out = export(profiled["cli"], "example.org/signed@1", signed_dest)
    index = json.loads(run("skopeo", "inspect", "--raw", "--tls-verify=false",
                           f"docker://{registry.host}/prof/signed:sha256-{out['manifest_digest'][7:]}"))
    assert sorted(m["artifactType"] for m in index["manifests"]) == [ARTIFACT_TYPE, SIGNATURE_TYPE]
    imported, _ = import_oci(tmp_path / "store2", signed_dest, "example.org/signed@1")
    assert imported["digest"] == profiled["signed"] and len(imported["signatures"]) == 1
    assert [row["name"] for row in listed(tmp_path / "store2", "example.org/signed@1")] == ["default"]


def test_registry_with_referrers_api(profiled: dict[str, Any], referrers_registry: ReferrersRegistry,  # noqa: F811
                                     tmp_path: Path) -> None:
    """A registry that lists referrers itself (OCI-Subject) gets no fallback tag; the
    import lists the referrers once, for signatures and profiles together."""
    dest = f"docker://{referrers_registry.host}/profapi/bb:1"
    out = export(profiled["cli"], "example.org/bb@1", dest)
    recorded = referrers_registry.referrers[("profapi/bb", out["manifest_digest"])]
    assert sorted((m["digest"], m["artifactType"]) for m in recorded) == sorted((d, ARTIFACT_TYPE)
                                                                                 for d in out["profiles"])
    tags = json.loads(run("skopeo", "list-tags", "--tls-verify=false", f"docker://{referrers_registry.host}/profapi/bb"))
    assert tags["Tags"] == ["1"]
    before = referrers_registry.listed
    imported, _ = import_oci(tmp_path / "store", dest)
    assert referrers_registry.listed == before + 1
    check_filed(profiled, tmp_path / "store", imported)


# --------------------------------------------------------------------------- replayed


@pytest.mark.fuse
def test_imported_profile_is_replayed_on_mount(profiled: dict[str, Any], tmp_path: Path) -> None:
    """A mount of the imported image replays its imported ``default`` profile (recorded on
    the exporting store's image: advice, not refused)."""
    from cnpsfs_testlib import wait_until
    from mountutil import mount_image

    export(profiled["cli"], "example.org/bb@1", f"oci:{tmp_path / 'out'}:t")
    store = tmp_path / "store"
    import_oci(store, f"oci:{tmp_path / 'out'}:t")
    (tmp_path / "mnt").mkdir()
    with mount_image(store, "example.org/bb@1", tmp_path / "mnt") as mnt:
        state = wait_until(lambda: (lambda s: s if s["state"] not in ("loading", "running") else None)(
            mnt.status()["prefetch"]), timeout=60, what="the prefetch to end")
        assert state["state"] == "done", state
        assert state["digest"] == profiled["digests"]["default"] and state["recorded_on"] == profiled["image"]
        assert state["walked"] > 0 and state["bytes"] > 0, state
        assert (tmp_path / "mnt/bin/busybox").is_file()
