"""cnpsfs signatures carried by ``export oci`` and restored by ``import oci`` (docs/oci.md,
"Signatures"): an artifact per signature whose ``subject`` is the image manifest, listed
in a layout's ``index.json``, under a registry's referrers fallback tag ``sha256-<hex>``
(the real docker-registry 2.8 has no referrers API) or by the referrers API (a small
fake of the tests' own in front of that registry). Imported, the signed image comes back
with its digest, and the trust policy accepts it for a trusted key; a tampered
signature, a tampered carried image, an artifact of another image or a malformed one is
refused (or ignored with a warning and the image imported unsigned, which a policy
requiring signatures then refuses).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
from pathlib import Path
from typing import Any

import pytest
from cnpsfs_testlib import Cli
from ociimages import busybox_image, run  # noqa: F401 (fixture)
from servers import ReferrersRegistry, fault_proxy, referrers_registry, registry  # noqa: F401 (fixtures)
from test_oci import podman  # noqa: F401 (fixture)

from cnpsfs import format as fmt
from cnpsfs.store import LocalStore
from cnpsfs.trust import TrustError, check_image

ARTIFACT_TYPE = "application/vnd.cnpsfs.signature.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def write_policy(path: Path, pub: Path) -> Path:
    path.write_text(f'default = "reject"\n[[rule]]\nnames = "example.org/*"\nrequire = "signed"\n'
                    f'keys = ["{pub}"]\n')
    return path


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, busybox_image: Path) -> dict[str, Any]:  # noqa: F811
    """busybox imported as example.org/bb@1 and signed with key a; key b signs nothing here."""
    top = tmp_path_factory.mktemp("oci-signatures")
    cli = Cli(top / "store")
    image = json.loads(cli.ok("import", "oci", f"oci:{busybox_image}:full", "--name", "example.org/bb",
                              "--version", "1", "--json").stdout)
    for name in "ab":
        cli.ok("key", "generate", top / name)
    signature = cli.ok("sign", "example.org/bb@1", "--key", top / "a.key").last_line
    # A second signed image, of other layers, whose artifact a test hangs on the first.
    other = json.loads(cli.ok("import", "oci", f"oci:{busybox_image}:base", "--name", "example.org/other",
                              "--version", "1", "--json").stdout)
    cli.ok("sign", "example.org/other@1", "--key", top / "a.key")
    return {"cli": cli, "top": top, "digest": image["digest"], "signature": signature, "other": other["digest"],
            "trusted": write_policy(top / "trusted.toml", top / "a.pub"),
            "untrusted": write_policy(top / "untrusted.toml", top / "b.pub")}


def export(cli: Cli, ref: str, dest: str, *args: str) -> dict[str, Any]:
    return json.loads(cli.ok("export", "oci", ref, dest, "--json", *args).stdout)


def import_oci(store: Path, source: str, *args: str, env: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    result = Cli(store).ok("import", "oci", source, "--json", *args, env=env)
    return json.loads(result.stdout), result.stderr


def decide(store: Path, policy: Path, digest: str) -> str:
    """The policy's decision on a stored image: "accepted" or the refusal's reason."""
    try:
        decision = check_image(LocalStore(store), policy, fmt.parse_digest(digest))
    except TrustError as exc:
        return str(exc)
    assert decision.accepted
    return "accepted"


def check_restored(signed: dict[str, Any], store: Path, out: dict[str, Any]) -> None:
    assert out["digest"] == signed["digest"]  # the signed image itself, not a new one
    assert (out["name"], out["version"]) == ("example.org/bb", "1")
    assert out["signatures"] == [signed["signature"]]
    assert decide(store, signed["trusted"], out["digest"]) == "accepted"
    assert "unknown key" in decide(store, signed["untrusted"], out["digest"])
    shown = json.loads(Cli(store).ok("inspect", "example.org/bb@1", "--json").stdout)
    assert [s["digest"] for s in shown["signatures"]] == [signed["signature"]]
    Cli(store).ok("verify")  # every object the restored image names is there


# --------------------------------------------------------------------------- OCI layouts


def test_layout_lists_the_signature_and_import_restores_it(signed: dict[str, Any], tmp_path: Path) -> None:
    layout = tmp_path / "out"
    out = export(signed["cli"], "example.org/bb@1", f"oci:{layout}:t")
    assert len(out["signatures"]) == 1
    index = json.loads((layout / "index.json").read_text())
    artifacts = [m for m in index["manifests"] if m.get("artifactType") == ARTIFACT_TYPE]
    assert [m["digest"] for m in artifacts] == out["signatures"]
    artifact = json.loads((layout / "blobs/sha256" / out["signatures"][0][7:]).read_text())
    assert artifact["subject"]["digest"] == out["manifest_digest"]
    assert artifact["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
    assert artifact["annotations"]["org.cnpsfs.signature.subject"] == signed["digest"]
    # The tools still find the image by its tag.
    assert json.loads(run("skopeo", "inspect", f"oci:{layout}:t"))["Digest"] == out["manifest_digest"]
    # Exporting again lists the artifact once; --remove-signatures writes none.
    again = export(signed["cli"], "example.org/bb@1", f"oci:{layout}:t")
    assert again["signatures"] == out["signatures"]
    assert json.loads((layout / "index.json").read_text()) == index
    bare = export(signed["cli"], "example.org/bb@1", f"oci:{tmp_path / 'bare'}:t", "--remove-signatures")
    assert bare["signatures"] == [] and bare["manifest_digest"] == out["manifest_digest"]
    store = tmp_path / "store"
    restored, _ = import_oci(store, f"oci:{layout}:t")
    check_restored(signed, store, restored)
    # Under the policy the import judges the restored image before tagging it: accepted.
    under, _ = import_oci(tmp_path / "store-policy", f"oci:{layout}:t", env={"CNPSFS_POLICY": str(signed["trusted"])})
    assert under["digest"] == signed["digest"]
    # Without the signatures the same layers give an image of its own, unsigned.
    plain, _ = import_oci(tmp_path / "store2", f"oci:{layout}:t", "--remove-signatures", "--name",
                          "example.org/bb", "--version", "1")
    assert plain["digest"] != signed["digest"] and plain["signatures"] == []
    assert [x["fileset"] for x in plain["layers"]] == [x["fileset"] for x in restored["layers"]]
    assert "unsigned" in decide(tmp_path / "store2", signed["trusted"], plain["digest"])


def test_tools_accept_a_layout_with_signatures(signed: dict[str, Any], tmp_path: Path,
                                               podman: Any) -> None:  # noqa: F811
    """The artifact entries in index.json do not disturb podman or umoci."""
    out = export(signed["cli"], "example.org/bb@1", f"oci:{tmp_path / 'out'}:t")
    assert len(out["signatures"]) == 1
    proc = podman("run", "--rm", "--network", "none", f"oci:{tmp_path / 'out'}:t")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2:] == ["hello from busybox", "1000"]
    run("umoci", "unpack", "--image", f"{tmp_path / 'out'}:t", tmp_path / "bundle")
    assert (tmp_path / "bundle/rootfs/bin/busybox").is_file()


def test_oci_archive_carries_the_signature(signed: dict[str, Any], tmp_path: Path) -> None:
    out = export(signed["cli"], "example.org/bb@1", f"oci-archive:{tmp_path / 'a.tar'}:t")
    assert len(out["signatures"]) == 1
    restored, _ = import_oci(tmp_path / "store", f"oci-archive:{tmp_path / 'a.tar'}:t")
    check_restored(signed, tmp_path / "store", restored)


def test_docker_archive_has_no_place_for_signatures(signed: dict[str, Any], tmp_path: Path) -> None:
    result = signed["cli"].ok("export", "oci", "example.org/bb@1", f"docker-archive:{tmp_path / 'd.tar'}", "--json")
    assert json.loads(result.stdout)["signatures"] == []
    assert "cannot hold signatures" in result.stderr


def test_explicit_other_name_imports_unsigned(signed: dict[str, Any], tmp_path: Path) -> None:
    export(signed["cli"], "example.org/bb@1", f"oci:{tmp_path / 'out'}:t")
    out, stderr = import_oci(tmp_path / "store", f"oci:{tmp_path / 'out'}:t", "--name", "example.org/renamed")
    assert out["signatures"] == [] and out["name"] == "example.org/renamed"
    assert "its signatures are for example.org/bb@1" in stderr


def test_native_image_and_fileset_are_restored(signed: dict[str, Any], tmp_path: Path) -> None:
    """A cnpsfs image and a FileSet made here (not from OCI), with hard links, a symlink, a
    FIFO, setuid and sub-second mtimes, exported into one layout and imported back: both
    signed objects come back with their digests, each finding only its own artifact."""
    import os

    src = tmp_path / "src"
    (src / "a/b").mkdir(parents=True)
    (src / "a/f").write_text("hello\n")
    os.link(src / "a/f", src / "a/g")
    os.symlink("f", src / "a/s")
    os.mkfifo(src / "p")
    os.chmod(src / "a/f", 0o4755)
    for path in (src / "a/f", src / "a/b", src):
        os.utime(path, ns=(1_577_934_245_123_456_789, 1_577_934_245_123_456_789))
    cli = signed["cli"]
    files = cli.ok("import", "dir", src, "--name", "example.org/files", "--version", "1").last_line
    (tmp_path / "app.toml").write_text('name = "example.org/app"\nversion = "2"\n[[layers]]\n'
                                       'fileset = "example.org/files@1"\n[config]\ncmd = ["/a/s"]\n')
    app = cli.ok("image", "create", tmp_path / "app.toml").last_line
    for ref in ("example.org/files@1", "example.org/app@2"):
        cli.ok("sign", ref, "--key", signed["top"] / "a.key")
    layout = tmp_path / "out"
    export(cli, "example.org/app@2", f"oci:{layout}:app")
    export(cli, "example.org/files@1", f"oci:{layout}:files")
    store = tmp_path / "store"
    for tag, digest in (("app", app), ("files", files)):
        out, stderr = import_oci(store, f"oci:{layout}:{tag}")
        assert out["digest"] == digest and len(out["signatures"]) == 1, stderr
        assert "WARNING" not in stderr, stderr
        assert decide(store, signed["trusted"], digest) == "accepted"


# --------------------------------------------------------------------------- tampering


def _edit_artifact(layout: Path, edit: Any) -> None:
    """Rewrite the layout's one signature artifact: *edit(blob_doc, manifest_doc)* changes them."""
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m.get("artifactType") == ARTIFACT_TYPE)
    blobs = layout / "blobs/sha256"
    manifest = json.loads((blobs / entry["digest"][7:]).read_bytes())
    blob = (blobs / manifest["layers"][0]["digest"][7:]).read_bytes()
    blob = edit(blob, manifest)

    def put(data: bytes) -> tuple[str, int]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (blobs / digest[7:]).write_bytes(data)
        return digest, len(data)

    manifest["layers"][0]["digest"], manifest["layers"][0]["size"] = put(blob)
    entry["digest"], entry["size"] = put(json.dumps(manifest).encode())
    (layout / "index.json").write_text(json.dumps(index))


def _flip_signature(blob: bytes, _manifest: dict[str, Any]) -> bytes:
    doc = json.loads(blob)
    sig = bytearray(base64.b64decode(doc["signature"]))
    sig[-1] ^= 0x01  # the last byte of the Ed25519 signature (key 3, last in canonical order)
    doc["signature"] = base64.b64encode(bytes(sig)).decode()
    return json.dumps(doc).encode()


def _edit_image(blob: bytes, _manifest: dict[str, Any]) -> bytes:
    doc = json.loads(blob)
    image = fmt.decode_image(base64.b64decode(doc["objects"][0]))
    image.config["entrypoint"] = ["/bin/sh", "-c", "evil"]
    doc["objects"][0] = base64.b64encode(fmt.encode_image(image)).decode()
    return json.dumps(doc).encode()


def _garbage(_blob: bytes, _manifest: dict[str, Any]) -> bytes:
    return b"not json"


def _wrong_subject(blob: bytes, manifest: dict[str, Any]) -> bytes:
    manifest["subject"]["digest"] = "sha256:" + "0" * 64
    return blob


@pytest.mark.parametrize(("case", "warning", "reason"), [
    ("flipped-signature", None, "bad signature by SHA256:"),
    ("edited-image", "does not carry blake3:", "unsigned"),
    ("malformed", "the blob is not JSON", "unsigned"),
    ("wrong-subject", "", "unsigned"),  # an artifact of another image of the layout: not this one's
    ("other-image", "is not what the image's layers hold", "unsigned"),
])
def test_tampered_signature_is_refused(signed: dict[str, Any], case: str, warning: str | None, reason: str,
                                       tmp_path: Path) -> None:
    layout = tmp_path / "out"
    export(signed["cli"], "example.org/bb@1", f"oci:{layout}:t")
    if case == "other-image":
        # The other image's genuine artifact, hung on this image's manifest.
        theirs = tmp_path / "theirs"
        export(signed["cli"], "example.org/other@1", f"oci:{theirs}:t")
        donor = json.loads((theirs / "index.json").read_text())
        entry = next(m for m in donor["manifests"] if m.get("artifactType") == ARTIFACT_TYPE)
        donor_blob = (theirs / "blobs/sha256" / json.loads((theirs / "blobs/sha256" / entry["digest"][7:])
                                                           .read_text())["layers"][0]["digest"][7:]).read_bytes()
        _edit_artifact(layout, lambda _blob, _manifest: donor_blob)
    else:
        _edit_artifact(layout, {"flipped-signature": _flip_signature, "edited-image": _edit_image,
                                "malformed": _garbage, "wrong-subject": _wrong_subject}[case])
    store = tmp_path / "store"
    imported, stderr = import_oci(store, f"oci:{layout}:t", "--name", "example.org/bb", "--version", "1")
    if warning is None:
        assert imported["digest"] == signed["digest"], "a well-formed signature restores the image"
    else:
        assert imported["digest"] != signed["digest"] and imported["signatures"] == []
        lines = [line for line in stderr.splitlines() if "WARNING" in line and "signature artifact" in line]
        if warning:
            assert lines and warning in lines[0] and "ignored" in lines[0], stderr
        else:
            assert not lines, stderr
    assert reason in decide(store, signed["trusted"], imported["digest"])
    if warning is None:
        # Imported under the policy: the restored image is judged before it is tagged, as pull does.
        fresh = Cli(tmp_path / "store-policy")
        result = fresh("--policy", signed["trusted"], "import", "oci", f"oci:{layout}:t")
        lines = result.stderr.strip().splitlines()
        assert result.rc == 1 and "refused by policy" in lines[-1] and reason in lines[-1], result
        assert "example.org/bb" not in fresh("tag", "list").stdout
    # The CLI refuses to mount it, in one line naming the image and the reason.
    result = Cli(store)("--policy", signed["trusted"], "mount", imported["digest"], tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.rc == 1 and len(lines) == 1 and "refused by policy" in lines[0] and reason in lines[0], result


@pytest.mark.fuse
def test_restored_image_mounts_under_the_policy(signed: dict[str, Any], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from mountutil import mount_image

    export(signed["cli"], "example.org/bb@1", f"oci:{tmp_path / 'out'}:t")
    store = tmp_path / "store"
    import_oci(store, f"oci:{tmp_path / 'out'}:t")
    monkeypatch.setenv("CNPSFS_POLICY", str(signed["trusted"]))
    with mount_image(store, "example.org/bb@1", tmp_path / "mnt") as mnt:
        assert (mnt.mountpoint / "bin/busybox").is_file()
        status = json.loads(Cli(store).ok("status", mnt.mountpoint, "--json").stdout)
        assert "SHA256:" in json.dumps(status["trust"])


# --------------------------------------------------------------------------- registries


def test_registry_without_referrers_api_gets_the_fallback_tag(signed: dict[str, Any], registry: Any,  # noqa: F811
                                                              tmp_path: Path) -> None:
    dest = f"docker://{registry.host}/sig/bb:1"
    out = export(signed["cli"], "example.org/bb@1", dest)
    assert len(out["signatures"]) == 1
    conn = http.client.HTTPConnection(registry.host, timeout=30)
    conn.request("GET", f"/v2/sig/bb/referrers/{out['manifest_digest']}")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 404  # distribution 2.8 has no referrers API: the tag schema is what runs here
    fallback = "sha256-" + out["manifest_digest"][7:]
    tags = json.loads(run("skopeo", "list-tags", "--tls-verify=false", f"docker://{registry.host}/sig/bb"))
    assert sorted(tags["Tags"]) == sorted(["1", fallback])
    index = json.loads(run("skopeo", "inspect", "--raw", "--tls-verify=false",
                           f"docker://{registry.host}/sig/bb:{fallback}"))
    assert index["mediaType"] == OCI_INDEX
    assert [(m["digest"], m["artifactType"]) for m in index["manifests"]] == [(out["signatures"][0], ARTIFACT_TYPE)]
    assert json.loads(run("skopeo", "inspect", "--tls-verify=false", dest))["Digest"] == out["manifest_digest"]
    # Pushed again: the same artifact, listed once.
    export(signed["cli"], "example.org/bb@1", dest)
    again = json.loads(run("skopeo", "inspect", "--raw", "--tls-verify=false",
                           f"docker://{registry.host}/sig/bb:{fallback}"))
    assert again == index
    restored, _ = import_oci(tmp_path / "store", dest)
    check_restored(signed, tmp_path / "store", restored)


def test_registry_with_referrers_api(signed: dict[str, Any], referrers_registry: ReferrersRegistry,  # noqa: F811
                                     tmp_path: Path) -> None:
    dest = f"docker://{referrers_registry.host}/sigapi/bb:1"
    out = export(signed["cli"], "example.org/bb@1", dest)
    assert referrers_registry.referrers == {("sigapi/bb", out["manifest_digest"]): [
        {"mediaType": OCI_MANIFEST, "digest": out["signatures"][0], "size": referrers_registry.referrers[
            ("sigapi/bb", out["manifest_digest"])][0]["size"], "artifactType": ARTIFACT_TYPE}]}
    # The registry maintains referrers itself (OCI-Subject): no fallback tag was written.
    tags = json.loads(run("skopeo", "list-tags", "--tls-verify=false", f"docker://{referrers_registry.host}/sigapi/bb"))
    assert tags["Tags"] == ["1"]
    restored, _ = import_oci(tmp_path / "store", dest)
    assert referrers_registry.listed >= 1
    check_restored(signed, tmp_path / "store", restored)


def test_untagged_layout_with_a_signature_still_imports(signed: dict[str, Any], tmp_path: Path) -> None:
    """The artifact entry in index.json is not taken for a second image."""
    out = export(signed["cli"], "example.org/bb@1", f"oci:{tmp_path / 'out'}")
    assert len(out["signatures"]) == 1
    restored, _ = import_oci(tmp_path / "store", f"oci:{tmp_path / 'out'}")
    check_restored(signed, tmp_path / "store", restored)


def test_failing_referrers_listing_is_a_one_line_error(signed: dict[str, Any], registry: Any,  # noqa: F811
                                                       fault_proxy: Any, tmp_path: Path) -> None:  # noqa: F811
    """A registry that fails the referrers request (and its fallback) says so; the image
    is not imported half-signed. --remove-signatures does without them."""
    export(signed["cli"], "example.org/bb@1", f"docker://{registry.host}/sigfault/bb:1")
    proxy = fault_proxy(registry.url)
    proxy.add("status", status=500, path="/referrers/", times=None)
    cli = Cli(tmp_path / "store")
    source = f"docker://{proxy.host}/sigfault/bb:1"
    result = cli("import", "oci", source, "--retry-times", "0", "--timeout", "5")
    lines = result.stderr.strip().splitlines()
    assert result.rc == 1 and len(lines) == 1, result
    assert proxy.host in lines[0] and "referrers" in lines[0] and "500" in lines[0], lines[0]
    assert "example.org/bb" not in cli("tag", "list").stdout
    out, _ = import_oci(tmp_path / "store", source, "--remove-signatures", "--retry-times", "0")
    assert out["signatures"] == [] and out["digest"] != signed["digest"]
