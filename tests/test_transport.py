"""cnpsfs.transport against real servers on loopback (docker-registry, nginx, our token server
and fault proxy from tests/servers.py), plus in-process tests of the parsing and lookup rules."""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from servers import FaultProxy, RegistryServer, sha256_digest

from cnpsfs.errors import (
    AuthError,
    RegistryError,
    RemoteDataError,
    RemoteNotFoundError,
    TransportError,
    TransportTimeout,
    UsageError,
)
from cnpsfs.transport import (
    OCI_INDEX,
    OCI_MANIFEST,
    Credentials,
    HttpConfig,
    RegistryClient,
    Session,
    lookup_credentials,
    parse_creds,
    parse_reference,
)
from cnpsfs.transport.http import _retry_after, env_proxy, no_proxy_matches
from cnpsfs.transport.registry import parse_challenge

FAST = HttpConfig(connect_timeout=2, read_timeout=5, deadline=15, retries=2, backoff=0.01, backoff_max=0.05)


def one_line(err: BaseException, *needles: str) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return text


def repo_name(prefix: str = "test") -> str:
    return f"cnpsfs/{prefix}-{secrets.token_hex(4)}"


def client(server: RegistryServer | FaultProxy, repository: str | None = None, *, config: HttpConfig = FAST,
           **kw: Any) -> RegistryClient:
    return RegistryClient(server.host, repository or repo_name(), session=Session(config), **kw)


def push_image(c: RegistryClient, tag: str = "v1", layers: int = 2,
               **manifest_extra: Any) -> tuple[str, dict[str, bytes]]:
    """Push random layers, a config and an OCI manifest; returns (manifest digest, blobs by digest)."""
    blobs: dict[str, bytes] = {}
    layer_descs = []
    for _ in range(layers):
        data = secrets.token_bytes(50_000)
        d = sha256_digest(data)
        blobs[d] = data
        layer_descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": len(data)})
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    cd = sha256_digest(config)
    blobs[cd] = config
    for d, data in blobs.items():
        c.push_blob(d, data)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": len(config)},
                "layers": layer_descs, **manifest_extra}
    data = json.dumps(manifest, sort_keys=True).encode()
    return c.put_manifest(tag, data, OCI_MANIFEST), blobs


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize(("text", "expected"), [
    ("docker://localhost:5000/a/b:tag", ("localhost:5000", "a/b", "tag", None)),
    ("busybox", ("docker.io", "library/busybox", "latest", None)),
    ("docker://debian:bookworm", ("docker.io", "library/debian", "bookworm", None)),
    ("index.docker.io/foo/bar", ("docker.io", "foo/bar", "latest", None)),
    ("quay.io/org/app@sha256:" + "a" * 64, ("quay.io", "org/app", None, "sha256:" + "a" * 64)),
    ("127.0.0.1:5000/x/y:1.0@sha256:" + "b" * 64, ("127.0.0.1:5000", "x/y", "1.0", "sha256:" + "b" * 64)),
    ("[::1]:5000/img", ("[::1]:5000", "img", "latest", None)),
    ("my-registry/ns/repo", ("docker.io", "my-registry/ns/repo", "latest", None)),
    ("Registry/x", ("Registry", "x", "latest", None)),
])
def test_parse_reference(text: str, expected: tuple[str, str, str | None, str | None]) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == expected
    assert parse_reference(str(ref)) == ref


def test_parse_reference_defaults_and_endpoint() -> None:
    ref = parse_reference("docker://alpine", default_tag=None)
    assert ref.tag is None and ref.reference == "latest" and ref.endpoint == "registry-1.docker.io"
    assert parse_reference("localhost/x").endpoint == "localhost"


@pytest.mark.parametrize(("text", "reason"), [
    ("docker:busybox", "docker://"),
    ("localhost:5000/Upper", "bad repository name"),
    ("busybox:bad tag", "bad tag"),
    ("busybox@sha256:abc", "sha256 needs 64"),
    ("busybox@md5:" + "a" * 32, "unsupported digest algorithm"),
    ("", "empty"),
    ("localhost:5000/", "no repository"),
    ("host..name:1/x", "bad registry host"),
])
def test_parse_reference_rejects(text: str, reason: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_reference(text)
    one_line(info.value, reason)


# --------------------------------------------------------------------------- small rules


def test_no_proxy_rules() -> None:
    assert no_proxy_matches("example.com", "example.com")
    assert no_proxy_matches("a.example.com", ".example.com")
    assert no_proxy_matches("a.example.com", "foo, example.com")
    assert not no_proxy_matches("badexample.com", "example.com")
    assert no_proxy_matches("10.1.2.3", "10.0.0.0/8")
    assert not no_proxy_matches("11.1.2.3", "10.0.0.0/8")
    assert no_proxy_matches("127.0.0.1", "127.0.0.1")
    assert no_proxy_matches("::1", "::1")
    assert no_proxy_matches("anything", "*")
    assert no_proxy_matches("example.com", "example.com:8080")
    assert not no_proxy_matches("example.com", "")


def test_env_proxy_follows_curl() -> None:
    assert env_proxy("http", {"HTTP_PROXY": "http://evil:1"}) is None  # curl ignores upper-case HTTP_PROXY
    assert env_proxy("http", {"http_proxy": "http://p:1"}) == "http://p:1"
    assert env_proxy("https", {"HTTPS_PROXY": "http://p:2"}) == "http://p:2"
    assert env_proxy("https", {"all_proxy": "http://p:3"}) == "http://p:3"
    s = Session(FAST, environ={"http_proxy": "p:3128", "no_proxy": "direct.example"})
    assert s.proxy_for("http://x.example/v2/") == "http://p:3128"
    assert s.proxy_for("http://a.direct.example/v2/") is None
    assert s.proxy_for("https://x.example/v2/") is None
    assert Session(HttpConfig(trust_env=False), environ={"http_proxy": "p:1"}).proxy_for("http://x/") is None
    assert Session(HttpConfig(proxy="http://q:1", no_proxy="x"), environ={}).proxy_for("http://x/") is None
    with pytest.raises(UsageError):
        Session(HttpConfig(proxy="socks5://q:1")).proxy_for("http://y/")


def test_parse_challenge_and_retry_after() -> None:
    assert parse_challenge('Bearer realm="https://a/token",service="reg",scope="repository:x/y:pull,push"') == (
        "bearer", {"realm": "https://a/token", "service": "reg", "scope": "repository:x/y:pull,push"})
    assert parse_challenge('Basic realm="Registry Realm"') == ("basic", {"realm": "Registry Realm"})
    assert parse_challenge('Basic realm="a", Bearer realm="b"')[0] == "bearer"
    assert _retry_after("3") == 3.0
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert _retry_after("soon") is None


# --------------------------------------------------------------------------- credentials


def write_auth(path: Path, auths: dict[str, Any], **extra: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": auths, **extra}))
    return path


def auth_entry(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_credentials_lookup_order(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    assert lookup_credentials("reg.example:5000", "a/b", environ=env) is None
    write_auth(home / ".docker/config.json", {"https://reg.example:5000/v1/": auth_entry("docker", "pw1")})
    found = lookup_credentials("reg.example:5000", "a/b", environ=env)
    assert found is not None and (found.username, found.password) == ("docker", "pw1")
    assert "config.json" in found.source
    write_auth(home / ".config/containers/auth.json", {"reg.example:5000": auth_entry("xdgcfg", "pw2")})
    assert lookup_credentials("reg.example:5000", "a/b", environ=env).username == "xdgcfg"  # type: ignore[union-attr]
    runtime = write_auth(tmp_path / "run/containers/auth.json", {
        "reg.example:5000": auth_entry("host", "h"),
        "reg.example:5000/a": auth_entry("ns", "n"),
        "reg.example:5000/a/b": auth_entry("repo", "r:with:colons"),
    })
    assert lookup_credentials("reg.example:5000", "a/b", environ=env) == Credentials(
        "repo", "r:with:colons", f"{runtime} (reg.example:5000/a/b)")
    assert lookup_credentials("reg.example:5000", "a/c", environ=env).username == "ns"  # type: ignore[union-attr]
    assert lookup_credentials("reg.example:5000", "ab/c", environ=env).username == "host"  # type: ignore[union-attr]
    assert lookup_credentials("other.example", "a/b", environ=env) is None
    # REGISTRY_AUTH_FILE (and --authfile) replace the whole search list.
    only = write_auth(tmp_path / "only.json", {"other.example": auth_entry("only", "o")})
    env2 = {**env, "REGISTRY_AUTH_FILE": str(only)}
    assert lookup_credentials("reg.example:5000", "a/b", environ=env2) is None
    assert lookup_credentials("other.example", "x", environ=env2).username == "only"  # type: ignore[union-attr]
    assert lookup_credentials("reg.example:5000", "a/b", environ=env, authfile=str(only)) is None
    # --creds wins over everything.
    assert lookup_credentials("reg.example:5000", "a/b", environ=env, creds="me:pw") == Credentials("me", "pw")


def test_credentials_docker_hub_aliases_and_legacy(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    write_auth(home / ".docker/config.json", {"https://index.docker.io/v1/": auth_entry("hub", "h")})
    assert lookup_credentials("docker.io", "library/busybox", environ=env).username == "hub"  # type: ignore[union-attr]
    (home / ".docker/config.json").unlink()
    (home / ".dockercfg").write_text(json.dumps({"legacy.example": auth_entry("old", "o")}))
    assert lookup_credentials("legacy.example", "x", environ=env).username == "old"  # type: ignore[union-attr]


def test_credentials_bad_files(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    bad = tmp_path / "run/containers/auth.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    with pytest.raises(UsageError) as info:
        lookup_credentials("r.example", "x", environ=env)
    one_line(info.value, str(bad), "not valid JSON")
    write_auth(bad, {"r.example": {"auth": "!!!"}})
    with pytest.raises(UsageError) as info:
        lookup_credentials("r.example", "x", environ=env)
    one_line(info.value, str(bad), "r.example", "base64")
    with pytest.raises(UsageError):
        parse_creds("nopassword")
    with pytest.raises(UsageError) as info:
        lookup_credentials("r.example", "x", environ=env, authfile=str(tmp_path / "missing.json"))
    one_line(info.value, "missing.json")


def test_credential_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-cnpsfstest"
    helper.write_text('#!/bin/sh\nread server\nif [ "$server" = "helped.example" ]; then\n'
                      '  echo \'{"ServerURL":"helped.example","Username":"hu","Secret":"hs"}\'\n'
                      'else echo "credentials not found in native keychain"; exit 1; fi\n')
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    authfile = write_auth(tmp_path / "auth.json", {}, credHelpers={"helped.example": "cnpsfstest"})
    found = lookup_credentials("helped.example", "x", authfile=str(authfile))
    assert found is not None and (found.username, found.password) == ("hu", "hs")
    write_auth(authfile, {}, credsStore="cnpsfstest")
    assert lookup_credentials("unhelped.example", "x", authfile=str(authfile)) is None


# --------------------------------------------------------------------------- the plain registry


def test_push_pull_roundtrip(registry: RegistryServer, tmp_path: Path) -> None:
    c = client(registry)
    digest, blobs = push_image(c, "v1")
    assert c.base_url == f"http://{registry.host}"  # loopback: plain HTTP, tried first
    m = c.get_manifest("v1")
    assert m.digest == digest and m.media_type == OCI_MANIFEST
    assert c.get_manifest(digest).data == m.data
    head = c.head_manifest("v1")
    assert head is not None and head.digest == digest and head.size == len(m.data)
    assert c.head_manifest("nope") is None
    for d, data in blobs.items():
        assert c.stat_blob(d) == len(data)
        assert c.get_blob(d, size=len(data)) == data
    d0, data0 = next(iter(blobs.items()))
    out = tmp_path / "blob"
    assert c.fetch_blob_to_path(d0, out, size=len(data0)) == len(data0)
    assert out.read_bytes() == data0
    assert c.read_blob(d0, 1000, 5000, blob_size=len(data0)) == data0[1000:6000]
    missing = sha256_digest(b"missing")
    assert c.has_blobs([*blobs, missing]) == {**{d: len(b) for d, b in blobs.items()}, missing: None}
    assert c.push_blob(d0, data0) == "exists"
    assert sorted(c.list_tags()) == ["v1"]
    with pytest.raises(RemoteNotFoundError) as info:
        c.get_manifest("nope")
    one_line(info.value, registry.host, "manifest nope", "MANIFEST_UNKNOWN")
    with pytest.raises(RemoteNotFoundError) as info:
        c.get_blob(missing)
    one_line(info.value, registry.host, missing)
    c.delete_manifest(digest)
    with pytest.raises(RemoteNotFoundError):
        c.get_manifest(digest)


def test_chunked_upload_from_file_and_paging(registry: RegistryServer, tmp_path: Path) -> None:
    c = client(registry)
    c.monolithic_max, c.chunk_size = 100_000, 64 * 1024
    data = secrets.token_bytes(300_001)
    src = tmp_path / "big"
    src.write_bytes(data)
    d = sha256_digest(data)
    sent: list[int] = []
    assert c.push_blob(d, src, progress=sent.append) == "uploaded"
    assert sent == [65536] * 4 + [300_001 - 4 * 65536]
    assert c.get_blob(d) == data
    small = b"small blob from a file"
    (tmp_path / "small").write_bytes(small)
    assert c.push_blob(sha256_digest(small), tmp_path / "small") == "uploaded"
    # A wrong digest is refused by the registry, one line.
    with pytest.raises(RegistryError) as info:
        c.push_blob(sha256_digest(b"other"), b"not it")
    one_line(info.value, registry.host, "DIGEST_INVALID")
    for i in range(5):
        c.put_manifest(f"t{i}", json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json", "digest": d, "size": len(data)},
            "layers": [], "annotations": {"i": str(i)}}).encode(), OCI_MANIFEST)
    assert sorted(c.list_tags(page_size=2)) == [f"t{i}" for i in range(5)]


def test_cross_repository_mount(registry: RegistryServer) -> None:
    a = client(registry)
    data = secrets.token_bytes(10_000)
    d = sha256_digest(data)
    assert a.push_blob(d, data) == "uploaded"
    b = a.for_repository(repo_name("mount"))
    assert b.push_blob(d, data, mount_from=a.repository) == "mounted"
    assert b.get_blob(d) == data
    # The source lacks the blob: the registry answers 202 and the upload goes on normally.
    other = secrets.token_bytes(1000)
    c = a.for_repository(repo_name("mount"))
    assert c.push_blob(sha256_digest(other), other, mount_from=repo_name("empty")) == "uploaded"
    assert c.get_blob(sha256_digest(other)) == other
    results = c.push_blobs([(d, data, len(data)), (sha256_digest(other), other, None)], mount_from=a.repository)
    assert results == {d: "mounted", sha256_digest(other): "exists"}


def test_referrers_tag_fallback(registry: RegistryServer) -> None:
    c = client(registry)
    subject, _ = push_image(c, "app", layers=1)
    subject_desc = {"mediaType": OCI_MANIFEST, "digest": subject, "size": c.head_manifest(subject).size}  # type: ignore[union-attr]
    assert c.referrers(subject) == []
    empty = b"{}"
    c.push_blob(sha256_digest(empty), empty)
    for kind in ("application/vnd.example.sbom", "application/vnd.example.sig"):
        art = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": kind,
               "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256_digest(empty), "size": 2},
               "layers": [], "subject": subject_desc}
        c.put_manifest(sha256_digest(json.dumps(art).encode()), json.dumps(art).encode(), OCI_MANIFEST)
    found = c.referrers(subject)
    assert sorted(r["artifactType"] for r in found) == ["application/vnd.example.sbom", "application/vnd.example.sig"]
    assert [r["artifactType"] for r in c.referrers(subject, artifact_type="application/vnd.example.sig")] == [
        "application/vnd.example.sig"]
    tag = "sha256-" + subject.split(":")[1]
    assert tag in c.list_tags()
    assert c.get_manifest(tag).media_type == OCI_INDEX


def test_plain_http_policy(registry: RegistryServer) -> None:
    with pytest.raises(UsageError) as info:
        RegistryClient("registry.example", "x", scheme="http")
    one_line(info.value, "registry.example", "plain HTTP")
    # tls_verify=False allows plain HTTP for any host.
    RegistryClient("registry.example", "x", scheme="http", session=Session(HttpConfig(tls_verify=False)))
    # A loopback registry that does not speak TLS: plain http is tried first, and answers.
    c = client(registry)
    c.ping()
    assert c.base_url.startswith("http://")


def test_a_loopback_registry_is_pinged_over_plain_http_first(registry: RegistryServer, fault_proxy: Any,
                                                             tls_registry: RegistryServer) -> None:
    """One request, one connection, no TLS attempt before it (what a lazy mount from a local
    registry pays before its first manifest); a loopback TLS registry still gets https,
    after its 400 to the plain request."""
    proxy = fault_proxy(registry.url)
    c = client(proxy)
    c.ping()
    assert c.base_url == f"http://{proxy.host}"
    assert proxy.connections == 1 and [entry[:2] for entry in proxy.log] == [("GET", "/v2/")], proxy.log
    cfg = HttpConfig(**{**FAST.__dict__, "ca_file": tls_registry.ca_file})
    secure = client(tls_registry, config=cfg)
    secure.ping()
    assert secure.base_url == f"https://{tls_registry.host}"


def test_connection_refused_is_one_line() -> None:
    c = RegistryClient(f"127.0.0.1:{_closed_port()}", "x/y", session=Session(FAST))
    t0 = time.monotonic()
    with pytest.raises(TransportError) as info:
        c.get_manifest("latest")
    one_line(info.value, "127.0.0.1", "refused")
    assert time.monotonic() - t0 < 5


def _closed_port() -> int:
    from servers import free_port

    return free_port()


# --------------------------------------------------------------------------- TLS and Basic auth


def test_tls_registry_with_basic_auth(tls_registry: RegistryServer) -> None:
    creds = Credentials(tls_registry.username or "", tls_registry.password or "", "test")
    cfg = HttpConfig(**{**FAST.__dict__, "ca_file": tls_registry.ca_file})
    c = client(tls_registry, config=cfg, credentials=creds)
    digest, blobs = push_image(c, "v1")
    assert c.base_url.startswith("https://")
    assert c.get_manifest("v1").digest == digest
    assert all(c.get_blob(d) == data for d, data in blobs.items())

    wrong = client(tls_registry, c.repository, config=cfg, credentials=Credentials("cnpsfs", "wrong", "--creds"))
    with pytest.raises(AuthError) as info:
        wrong.get_manifest("v1")
    one_line(info.value, tls_registry.host, "authentication failed", "'cnpsfs'", "rejected")

    anonymous = client(tls_registry, c.repository, config=cfg)
    with pytest.raises(AuthError) as info:
        anonymous.get_manifest("v1")
    one_line(info.value, tls_registry.host, "no credentials found", "--creds")


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_refused_without_the_ca(tls_registry: RegistryServer) -> None:
    creds = Credentials(tls_registry.username or "", tls_registry.password or "", "test")
    c = client(tls_registry, credentials=creds)
    with pytest.raises(TransportError) as info:
        c.list_tags()
    one_line(info.value, tls_registry.host, "certificate verification failed")
    # No fallback to plain HTTP on a certificate failure, even on loopback: https stays.
    insecure = client(tls_registry, c.repository, config=HttpConfig(**{**FAST.__dict__, "tls_verify": False}),
                      credentials=creds)
    digest, _ = push_image(insecure, "v1", layers=1)
    assert insecure.base_url.startswith("https://")
    assert insecure.head_manifest("v1").digest == digest  # type: ignore[union-attr]


def test_client_certificate(tmp_path: Path) -> None:
    from servers import TestCA, start_registry

    ca = TestCA(tmp_path / "ca")
    cert, key, _, _ = ca.issue("registry")
    client_cert, client_key, _, _ = ca.issue("client", server=False)
    server = start_registry(tmp_path / "reg", tls=(cert, key), ca_file=ca.cert_file, client_ca=ca.cert_file,
                            client_cert=(client_cert, client_key))
    try:
        base = {**FAST.__dict__, "ca_file": str(ca.cert_file)}
        without = client(server, config=HttpConfig(**base))
        with pytest.raises(TransportError) as info:
            without.list_tags()
        one_line(info.value, server.host, "TLS")
        with_cert = client(server, config=HttpConfig(**{**base, "client_cert": str(client_cert),
                                                        "client_key": str(client_key)}))
        digest, _ = push_image(with_cert, "v1", layers=1)
        assert with_cert.get_manifest("v1").digest == digest
    finally:
        server.stop()


def test_bad_ca_file_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        Session(HttpConfig(ca_file=str(tmp_path / "nope.pem")))
    one_line(info.value, "nope.pem")


# --------------------------------------------------------------------------- the token flow


@pytest.fixture
def tokens(token_registry: RegistryServer):  # type: ignore[no-untyped-def]
    assert token_registry.tokens is not None
    token_registry.tokens.reset()
    yield token_registry.tokens
    token_registry.tokens.reset()


def test_token_flow_push_pull_and_anonymous(token_registry: RegistryServer, tokens: Any) -> None:
    alice = client(token_registry, credentials=Credentials("alice", "wonderland", "test"))
    digest, _ = push_image(alice, "v1")
    assert alice.get_manifest("v1").digest == digest
    accounts = {account for account, _, _ in tokens.requests}
    assert accounts == {"alice"}
    # Anonymous pull works (the token server grants pull), anonymous push does not.
    anon = client(token_registry, alice.repository)
    assert anon.get_manifest(digest).digest == digest
    assert (None, [f"repository:{alice.repository}:pull"], 200) in tokens.requests
    with pytest.raises(AuthError) as info:
        anon.push_blob(sha256_digest(b"x"), b"x")
    one_line(info.value, token_registry.host, "no credentials found")
    wrong = client(token_registry, alice.repository, credentials=Credentials("alice", "nope", "--creds"))
    with pytest.raises(AuthError) as info:
        wrong.get_manifest("v1")
    one_line(info.value, token_registry.host, "token server", "'alice'", "rejected")


def test_token_refresh_before_expiry(token_registry: RegistryServer, tokens: Any) -> None:
    c = client(token_registry, credentials=Credentials("alice", "wonderland", "test"))
    digest, _ = push_image(c, "v1", layers=1)
    tokens.lifetime = 2
    tokens.requests.clear()
    c2 = c.for_repository(c.repository)
    for _ in range(3):
        assert c2.head_manifest(digest) is not None
    assert len(tokens.requests) == 1  # cached
    time.sleep(2.1)
    assert c2.head_manifest(digest) is not None
    assert len(tokens.requests) == 2  # refreshed by the client before the registry would refuse it
    # No expires_in: the client assumes 60 s and keeps the token (the registry allows 60 s leeway).
    tokens.send_expires_in, tokens.lifetime = False, 1
    tokens.requests.clear()
    c3 = c.for_repository(c.repository)
    assert c3.head_manifest(digest) is not None
    time.sleep(1.2)
    assert c3.head_manifest(digest) is not None
    assert len(tokens.requests) == 1


def test_token_refreshed_once_on_401(token_registry: RegistryServer, tokens: Any,
                                     fault_proxy: Any) -> None:
    proxy = fault_proxy(token_registry.url)
    c = RegistryClient(proxy.host, repo_name(), session=Session(FAST),
                       credentials=Credentials("alice", "wonderland", "test"))
    digest, _ = push_image(c, "v1", layers=1)
    before = len(tokens.requests)
    proxy.add("drop_auth", path="/manifests/", method="GET")
    assert c.get_manifest("v1").digest == digest
    assert len(tokens.requests) == before + 1
    # A registry that keeps refusing: one retry, then a one-line AuthError.
    proxy.add("drop_auth", path="/manifests/", method="GET", times=None)
    with pytest.raises(AuthError) as info:
        c.get_manifest("v1")
    one_line(info.value, proxy.host, "authentication failed")
    assert len(tokens.requests) == before + 2


# --------------------------------------------------------------------------- faults


@pytest.fixture
def proxied(registry: RegistryServer, fault_proxy: Any) -> tuple[FaultProxy, RegistryClient, dict[str, bytes]]:
    """A fault proxy in front of the plain registry, and a client holding a pushed image."""
    proxy = fault_proxy(registry.url)
    c = RegistryClient(proxy.host, repo_name("fault"), session=Session(FAST))
    _, blobs = push_image(c, "v1", layers=2)
    proxy.clear()
    return proxy, c, blobs


def layer(blobs: dict[str, bytes]) -> tuple[str, bytes]:
    return next((d, b) for d, b in blobs.items() if len(b) == 50_000)


def test_retries_5xx_then_succeeds(proxied: Any) -> None:
    proxy, c, blobs = proxied
    d, data = layer(blobs)
    proxy.add("status", status=503, path=d, times=2)
    assert c.get_blob(d) == data
    assert proxy.count("GET", d) == 3


def test_retries_are_bounded(proxied: Any) -> None:
    proxy, c, blobs = proxied
    d, _ = layer(blobs)
    proxy.add("status", status=500, path=d, times=None)
    t0 = time.monotonic()
    with pytest.raises(RegistryError) as info:
        c.get_blob(d)
    one_line(info.value, proxy.host, d, "HTTP 500", "after 3 attempts")
    assert proxy.count("GET", d) == 1 + FAST.retries
    assert time.monotonic() - t0 < 3


def test_uploads_restart_after_server_errors(proxied: Any) -> None:
    proxy, c, _ = proxied
    c.monolithic_max, c.chunk_size = 10_000, 8_000
    data = secrets.token_bytes(20_000)
    d = sha256_digest(data)
    proxy.add("status", status=500, method="PATCH", path="/blobs/uploads/")
    proxy.add("status", status=502, method="PUT", path="/blobs/uploads/")
    assert c.push_blob(d, data) == "uploaded"
    assert proxy.count("POST", "/blobs/uploads/$") == 2  # the PATCH failure restarted the upload
    assert proxy.count("PUT", "/blobs/uploads/") == 2  # the PUT is idempotent: retried in place
    assert c.get_blob(d) == data
    proxy.add("status", status=400, method="POST", path="/blobs/uploads/")
    with pytest.raises(RegistryError) as info:
        c.push_blob(sha256_digest(b"y"), b"y")
    one_line(info.value, proxy.host, "HTTP 400")


def test_429_honours_retry_after(proxied: Any) -> None:
    proxy, c, blobs = proxied
    d, data = layer(blobs)
    proxy.add("status", status=429, headers={"Retry-After": "1"}, path=d)
    t0 = time.monotonic()
    assert c.get_blob(d) == data
    assert time.monotonic() - t0 >= 1.0
    proxy.add("status", status=429, headers={"Retry-After": "120"}, path=d)
    t0 = time.monotonic()
    with pytest.raises(RegistryError) as info:
        c.get_blob(d)
    one_line(info.value, "429", "Retry-After 120", "past the deadline")
    assert time.monotonic() - t0 < 2


def test_hang_fails_within_the_deadline(proxied: Any, registry: RegistryServer) -> None:
    proxy, c, blobs = proxied
    d, data = layer(blobs)
    patient = RegistryClient(proxy.host, c.repository,
                             session=Session(HttpConfig(read_timeout=1, deadline=2.5, retries=5, backoff=0.01)))
    patient.ping()
    proxy.add("stall", path=d, times=None, seconds=20)
    t0 = time.monotonic()
    with pytest.raises(TransportError) as info:
        patient.read_blob(d, 0, 100, deadline=2.5)
    elapsed = time.monotonic() - t0
    one_line(info.value, proxy.host, d)
    assert elapsed < 4, elapsed
    # Headers then silence: the body read gives up within the deadline too.
    proxy.clear()
    proxy.add("stall_body", path=d, times=None, at=1000, seconds=20)
    t0 = time.monotonic()
    with pytest.raises(TransportError) as info:
        patient.fetch_blob(d, lambda _b: None, size=len(data), deadline=2.5)
    assert isinstance(info.value, TransportTimeout) or "timed out" in str(info.value) or "deadline" in str(info.value)
    assert time.monotonic() - t0 < 4
    # A byte every 0.2 s never trips the read timeout; the deadline still ends the call.
    proxy.clear()
    proxy.add("trickle", path=d, times=None, seconds=0.2)
    t0 = time.monotonic()
    with pytest.raises(TransportTimeout) as info:
        patient.fetch_blob(d, lambda _b: None, size=len(data), deadline=2.5)
    one_line(info.value, proxy.host, d, "deadline")
    assert time.monotonic() - t0 < 4


def test_reset_and_truncation_are_resumed(proxied: Any) -> None:
    proxy, c, blobs = proxied
    d, data = layer(blobs)
    proxy.add("reset", path=d)
    assert c.get_blob(d) == data
    proxy.clear()
    proxy.add("truncate", path=d, at=20_000)
    assert c.get_blob(d, size=len(data)) == data
    ranges = [r for m, p, _s, r in proxy.log if p.endswith(d) and m == "GET"]
    assert ranges == [None, "bytes=20000-"]  # resumed where the connection broke


def test_wrong_bytes_are_a_digest_error(proxied: Any) -> None:
    proxy, c, blobs = proxied
    d, data = layer(blobs)
    proxy.add("flip", path=d, at=12345)
    with pytest.raises(RemoteDataError) as info:
        c.get_blob(d)
    one_line(info.value, proxy.host, f"blob {d}", "does not match its digest")
    proxy.add("short", path=d, at=40_000)
    with pytest.raises(RemoteDataError) as info:
        c.get_blob(d)
    one_line(info.value, f"blob {d}", "does not match its digest")
    proxy.add("short", path=d, at=40_000)
    with pytest.raises(RemoteDataError) as info:
        c.get_blob(d, size=len(data))
    one_line(info.value, f"blob {d}", "Content-Length 40000", "50000 bytes expected")
    manifest = c.get_manifest("v1")
    proxy.add("flip", path=f"/manifests/{manifest.digest}")
    with pytest.raises(RemoteDataError) as info:
        c.get_manifest(manifest.digest)
    one_line(info.value, f"manifest {manifest.digest}", "does not match its digest")


def test_200_instead_of_206(proxied: Any) -> None:
    proxy, c, blobs = proxied
    d, data = layer(blobs)
    proxy.add("ignore_range", path=d)
    assert c.read_blob(d, 30_000, 1000, blob_size=len(data)) == data[30_000:31_000]
    assert [s for m, p, s, _r in proxy.log if p.endswith(d)] == [200]
    assert c.read_blob(d, 30_000, 1000) == data[30_000:31_000]
    assert [s for m, p, s, _r in proxy.log if p.endswith(d)] == [200, 206]
    proxy.add("short", path=d, at=100)
    with pytest.raises(RemoteDataError) as info:
        c.read_blob(d, 0, 1000)
    one_line(info.value, f"blob {d}", "bytes 0-999")
    with pytest.raises(RemoteDataError):
        c.read_blob(d, len(data) - 10, 20)  # past the end: a short 206 is never accepted


def test_redirects_to_presigned_storage(proxied: Any) -> None:
    proxy, c, blobs = proxied
    d, data = layer(blobs)
    proxy.presign()
    assert c.get_blob(d) == data
    storage_gets = lambda: sum(n for (m, p), n in proxy.requests.items() if p.startswith("/_storage/"))  # noqa: E731
    assert storage_gets() == 1
    assert c.read_blob(d, 10, 10) == data[10:20]
    assert c.read_blob(d, 20, 10) == data[20:30]
    assert proxy.count("GET", f"^/v2/.*{d}$") == 2  # the second range read went straight to storage
    proxy.expire_presigned()
    assert c.read_blob(d, 30, 10) == data[30:40]  # 403 from storage: re-resolved from the registry once
    assert proxy.count("GET", f"^/v2/.*{d}$") == 3
    # Credentials never follow a redirect to another host.
    s = Session(FAST)
    resp = s.request("GET", f"{proxy.url}/v2/{c.repository}/blobs/{d}", headers={"Authorization": "Bearer secret"})
    assert resp.status == 200 and resp.content == data and resp.history
    assert proxy.auth_leaks == 0


def test_has_blobs_is_parallel_and_bounded(proxied: Any) -> None:
    proxy, c, _ = proxied
    c.max_parallel = 4
    digests = [sha256_digest(str(i).encode()) for i in range(12)]
    proxy.request_delay = 0.2
    t0 = time.monotonic()
    assert c.has_blobs(digests) == dict.fromkeys(digests)
    elapsed = time.monotonic() - t0
    assert proxy.max_in_flight == 4
    assert elapsed < 2.0, elapsed  # 12 in a row would take 2.4 s


def test_fault_proxy_shapes_traffic(proxied: Any) -> None:
    """The latency and bandwidth knobs other tests rely on for "20 ms RTT" really delay."""
    proxy, c, blobs = proxied
    d, data = layer(blobs)
    c.get_blob(d)  # a warm connection
    proxy.request_delay = 0.05
    t0 = time.monotonic()
    for _ in range(4):
        c.stat_blob(d)
    assert time.monotonic() - t0 >= 0.2
    proxy.request_delay = 0
    proxy.bandwidth = 200_000
    t0 = time.monotonic()
    assert c.get_blob(d) == data
    assert time.monotonic() - t0 >= 0.2  # 50 kB at 200 kB/s
    proxy.bandwidth = None
    proxy.connection_delay = 0.3
    fresh = RegistryClient(proxy.host, c.repository, session=Session(FAST), scheme="http")
    before = proxy.connections
    t0 = time.monotonic()
    fresh.stat_blob(d)
    fresh.stat_blob(d)
    assert proxy.connections == before + 1  # one new connection, reused
    assert 0.3 <= time.monotonic() - t0 < 1.0


def test_forward_proxy_from_config_and_environment(proxied: Any) -> None:
    proxy, c, blobs = proxied
    d, data = layer(blobs)
    # Nothing listens on 127.0.0.2:9; only the proxy (which forwards to the registry) can answer.
    via = RegistryClient("127.0.0.2:9", c.repository, scheme="http",
                         session=Session(HttpConfig(**{**FAST.__dict__, "proxy": proxy.url})))
    assert via.get_blob(d) == data
    env = RegistryClient("127.0.0.2:9", c.repository, scheme="http",
                         session=Session(FAST, environ={"http_proxy": proxy.url}))
    assert env.get_blob(d) == data
    authed = Session(HttpConfig(**{**FAST.__dict__, "proxy": f"http://pu:p%40ss@{proxy.host}"}))
    via_auth = RegistryClient("127.0.0.2:9", c.repository, scheme="http", session=authed)
    assert via_auth.get_blob(d) == data and via_auth.stat_blob(d) == len(data)
    assert set(proxy.proxy_authorizations) == {"Basic " + base64.b64encode(b"pu:p@ss").decode()}
    assert len(authed._pools) == 1  # one pool per proxy, whatever the number of calls
    direct = RegistryClient("127.0.0.2:9", c.repository, scheme="http",
                            session=Session(FAST, environ={"http_proxy": proxy.url, "no_proxy": "127.0.0.0/8"}))
    with pytest.raises(TransportError) as info:
        direct.get_blob(d)
    one_line(info.value, "127.0.0.2:9", "refused")


# --------------------------------------------------------------------------- plain web servers


def test_nginx_ranges_redirects_and_errors(nginx: Any, tmp_path: Path) -> None:
    root = tmp_path / "www"
    (root / "blobs").mkdir(parents=True)
    data = secrets.token_bytes(100_000)
    (root / "blobs" / "b1").write_bytes(data)
    server = nginx(root, server_conf="location /old/ { rewrite ^/old/(.*)$ /blobs/$1 redirect; }")
    s = Session(FAST)
    assert s.get_range(f"{server.url}/blobs/b1", 5000, 777, total_size=len(data)) == data[5000:5777]
    assert s.get_range(f"{server.url}/old/b1", 0, 10) == data[:10]
    with pytest.raises(RemoteDataError) as info:
        s.get_range(f"{server.url}/blobs/b1", 0, 10, total_size=len(data) + 1)
    one_line(info.value, server.host, "/blobs/b1", "has 100000 bytes")
    with pytest.raises(RemoteDataError) as info:
        s.get_range(f"{server.url}/blobs/b1", len(data) + 5, 10)
    one_line(info.value, server.host, "416")
    with pytest.raises(RemoteNotFoundError) as info:
        s.get_range(f"{server.url}/blobs/nope", 0, 10)
    one_line(info.value, server.host, "/blobs/nope", "404")
    log = server.access_log()
    assert {"method": "GET", "uri": "/blobs/b1", "status": "206", "bytes": "777", "range": "bytes=5000-5776"} in log
    assert any(row["uri"] == "/old/b1" and row["status"] == "302" for row in log)
