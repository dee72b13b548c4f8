"""Fuzzing the decoders added with remotes, OCI, trust and prefetch (issue 15, second round).

The same approach as test_fuzz.py (whose helpers this module uses): hypothesis-driven
inputs — random bytes or text, mutations of valid seeds, and structured documents of the
right shape with odd values — fed to every decoder that takes bytes from outside:

* signature objects and their payloads (``trust.signature``), public key files
  (``trust.keys``), policy files (``trust.policy``), the Debian stanzas and Release
  files a provenance check reads (``trust.provenance``);
* prefetch profiles (``format.profile``);
* OCI manifests, indexes and image configs (``oci.model``), turned into a cnpsfs image as
  the importer does, and a ``docker save`` archive's ``manifest.json`` (``oci.layout``);
* the remote wire format (``store.wire``, ``store.remote``): image indexes, index shards,
  image manifests, tags, block records as fetched;
* ``remotes.toml`` (``store.remoteconf``).

Every input must end in a value the format allows or in a one-line :class:`CnpsfsError`
(each decoder's documented subclass: FormatError, CorruptObjectError, ImportRejected,
UsageError, PolicyError, KeyFileError) — never another exception, never longer than
``DECODE_DEADLINE``, never more than ``MEMORY_LIMIT`` bytes allocated for one input
(tracemalloc's peak above what the process held before it), never a file written. An
accepted value is checked, not assumed: it re-encodes to the same value, its digests and
names obey the format's rules.

Seeds (valid encodings, ``seed-*``) and inputs that once broke a decoder (the rest) are
committed under ``tests/corpus/<decoder>/`` and replayed on every run; ``python
tests/test_fuzz_formats.py`` writes the seeds again. docs/reliability.md has the figures.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import re
import sys
import tarfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import strategies as st
from test_fuzz import CORPUS, DECODE_DEADLINE, ODD_VALUES, RUNS, VALUES, fuzz, mutated, outcome

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError

#: Examples per decoder in the default run's smoke (fourteen decoders: about a minute in
#: all) and in the long run (``--long``).
SMOKE = int(os.environ.get("CNPSFS_FUZZ_SMOKE_FORMATS", "100"))
LONG = int(os.environ.get("CNPSFS_FUZZ_LONG", "20000"))
#: No single input may make a decoder allocate more than this (tracemalloc's peak above
#: what the process held before the input).
MEMORY_LIMIT = 64 << 20
#: Strict forms of what accepted values must look like (the wire format's rules).
SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
OCI_DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")

KINDS = ["signature", "profile", "oci-manifest", "oci-config", "docker-archive", "remote-index", "remote-shard",
         "remote-manifest", "remote-tag", "remote-record", "remotes-toml", "policy", "public-key", "deb822"]


# --------------------------------------------------------------------------- bounded decoding


def bounded(kind: str, call: Callable[[], Any]) -> Any:
    """Run *call*; a CnpsfsError is a refusal (returns None), anything else propagates.

    Checks the deadline and the memory bound, and that the refusal is one line."""
    outcome("input")
    tracemalloc.reset_peak()
    baseline = tracemalloc.get_traced_memory()[0]  # what the process holds already
    started = time.monotonic()
    try:
        value = call()
    except CnpsfsError as exc:
        assert "\n" not in str(exc), f"{kind}: a multi-line error: {exc!r}"
        outcome("refused")
        value = None
    else:
        outcome("accepted")
    elapsed = time.monotonic() - started
    peak = tracemalloc.get_traced_memory()[1] - baseline
    assert elapsed < DECODE_DEADLINE, f"{kind}: took {elapsed:.1f} s"
    assert peak < MEMORY_LIMIT, f"{kind}: allocated {peak >> 20} MiB"
    return value


@pytest.fixture
def traced() -> Any:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


# --------------------------------------------------------------------------- seeds

D1, D2, D3 = (bytes([n]) * 32 for n in (1, 2, 3))
SHA_A, SHA_B, SHA_C = ("sha256:" + hashlib.sha256(c).hexdigest() for c in (b"a", b"b", b"c"))
PRIVATE = bytes(range(32))


def _signing() -> tuple[Any, Any]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cnpsfs.trust.keys import PublicKey

    key = Ed25519PrivateKey.from_private_bytes(PRIVATE)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key, PublicKey(raw, "fuzz", "seed")


def seed_signatures() -> list[bytes]:
    from cnpsfs.trust.signature import Payload, Signature

    key, public = _signing()
    out = []
    for expires in (None, 2_000_000_000):
        payload = Payload(D1, "image", "example.org/app", "1.0", 3, 1_700_000_000, public.key_id, expires).encode()
        out.append(Signature(payload, key.sign(payload)).encode())
    return out


def seed_profiles() -> list[bytes]:
    from cnpsfs.format.profile import Profile, ProfileEntry, Touch, encode_profile

    entries = [ProfileEntry(Touch.DIR, b""), ProfileEntry(Touch.LISTED, b"usr/lib"),
               ProfileEntry(Touch.FILE, b"usr/bin/python3", (0, 4096, 65536, 8192)),
               ProfileEntry(Touch.FILE, b"etc/\xffname", (10, 1))]
    return [encode_profile(Profile("default", D2, entries, 1_700_000_000_000_000_000, {"recorded-by": "seed"})),
            encode_profile(Profile("x", D1, []))]


def seed_oci_manifests() -> list[bytes]:
    from cnpsfs.oci.model import (
        DOCKER_CONFIG,
        DOCKER_LAYER_GZIP,
        DOCKER_LIST,
        DOCKER_MANIFEST,
        OCI_CONFIG,
        OCI_INDEX,
        OCI_LAYER_GZIP,
        OCI_LAYER_ZSTD,
        OCI_MANIFEST,
    )

    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": SHA_A, "size": 700},
                "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": SHA_B, "size": 1234},
                           {"mediaType": OCI_LAYER_ZSTD, "digest": SHA_C, "size": 99,
                            "annotations": {"org.opencontainers.image.title": "x"}}],
                "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"}}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
             "manifests": [{"mediaType": OCI_MANIFEST, "digest": SHA_A, "size": 500,
                            "platform": {"os": "linux", "architecture": "amd64"}},
                           {"mediaType": OCI_MANIFEST, "digest": SHA_B, "size": 501,
                            "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                           {"mediaType": OCI_MANIFEST, "digest": SHA_C, "size": 502,
                            "platform": {"os": "unknown", "architecture": "unknown"},
                            "annotations": {"vnd.docker.reference.type": "attestation-manifest"}}]}
    docker = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
              "config": {"mediaType": DOCKER_CONFIG, "digest": SHA_A, "size": 7},
              "layers": [{"mediaType": DOCKER_LAYER_GZIP, "digest": SHA_B, "size": 12}]}
    listing = {"schemaVersion": 2, "mediaType": DOCKER_LIST,
               "manifests": [{"mediaType": DOCKER_MANIFEST, "digest": SHA_A, "size": 5,
                              "platform": {"os": "linux", "architecture": "amd64"}}]}
    return [json.dumps(d, indent=1).encode() for d in (manifest, index, docker, listing)]


def seed_oci_configs() -> list[bytes]:
    config = {"architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z", "author": "me",
              "config": {"Env": ["PATH=/usr/bin", "A=1"], "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"],
                         "WorkingDir": "/srv", "User": "1000:1000", "Labels": {"k": "v"},
                         "ExposedPorts": {"80/tcp": {}}, "Volumes": {"/data": {}}, "StopSignal": "SIGTERM"},
              "rootfs": {"type": "layers", "diff_ids": [SHA_B, SHA_C]},
              "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "ADD x /"},
                          {"created_by": "ENV A=1", "empty_layer": True}]}
    return [json.dumps(config).encode(), json.dumps({"rootfs": {"type": "layers", "diff_ids": []}}).encode()]


def seed_docker_archive_manifests() -> list[bytes]:
    return [json.dumps([{"Config": "config.json", "RepoTags": ["example.org/app:1"],
                         "Layers": ["layer.tar"]}]).encode(),
            json.dumps([{"Config": "./config.json", "Layers": ["./layer.tar"]}]).encode()]


def seed_index() -> Any:
    from cnpsfs.store.protocol import T_IMAGE
    from cnpsfs.store.wire import BlobRef, BlockEntry, IndexRoot, ShardRef

    blobs = (BlobRef(SHA_A, 10_000), BlobRef(SHA_B, 50_000))
    blocks = (BlockEntry(0, 8, 2, 100, 300, 1), BlockEntry(1, 8, 1, 4000, 4000, 0), BlockEntry(1, 4100, 3, 40, 90, 1))
    shards = (ShardRef(bytes(32), BlobRef(SHA_C, 8 + 12 + 45 * 3), 3),)
    return IndexRoot(D1, T_IMAGE, blobs, blocks, shards, (ShardRef(bytes(32), BlobRef(SHA_C, 57), 1),),
                     ((D1, D2), (D1, D3)))


def seed_remote_indexes() -> list[bytes]:
    from cnpsfs.store.protocol import T_FILESET
    from cnpsfs.store.wire import IndexRoot, encode_index

    index = seed_index()
    return [encode_index(index), encode_index(IndexRoot(D2, T_FILESET, (), (), (), ()))]


def seed_shards() -> list[bytes]:
    from cnpsfs.store.protocol import T_CHUNK, T_DIR, T_IMAGE
    from cnpsfs.store.wire import ShardEntry, encode_shard

    return [encode_shard([ShardEntry(D1, 0, T_IMAGE, 0, 200), ShardEntry(D2, 0, T_DIR, 200, 100),
                          ShardEntry(D3, 2, T_CHUNK, 10, 80)]),
            encode_shard([])]


def seed_remote_manifests() -> list[bytes]:
    from cnpsfs.store.protocol import T_FILESET, T_IMAGE
    from cnpsfs.store.wire import MT_PACK, MT_SHARD, BlobRef, encode_manifest

    return [encode_manifest(BlobRef(SHA_A, 300), [(MT_SHARD, BlobRef(SHA_B, 57)), (MT_PACK, BlobRef(SHA_C, 9000))],
                            D1, T_IMAGE, "example.org/app@1.0", "2024-01-01T00:00:00Z"),
            encode_manifest(BlobRef(SHA_A, 1), [], D2, T_FILESET, None, None)]


def seed_tags() -> list[str]:
    from cnpsfs.store.wire import digest_tag, ref_tag

    return [ref_tag("example.org/app", "1.0"), ref_tag("debian.org/bash_x", "5.2+dfsg-1~u1:2"),
            digest_tag(D1), SHA_A, "h-" + "0" * 64, "latest"]


def record_for(members: list[tuple[bytes, int]], *, zstd: bool) -> tuple[bytes, Any]:
    """A block record of *members* (data, type) and the RemoteLocation an index gives it."""
    from cnpsfs.store.packs import encode_record_header
    from cnpsfs.store.remote import RemoteLocation

    raw = b"".join(data for data, _t in members)
    if zstd:
        import zstandard

        payload, codec = zstandard.ZstdCompressor(level=3).compress(raw), 1
    else:
        payload, codec = raw, 0
    headers = [(fmt.digest_bytes(data), t, len(data)) for data, t in members]
    record = encode_record_header(codec, len(payload), len(raw), headers) + payload
    loc = RemoteLocation(SHA_A, 1 << 20, 8, len(members), len(payload), len(raw), codec, members[0][1], 0,
                         len(members[0][0]))
    return record, loc


SEED_RECORDS = [record_for([(b"hello world\n" * 50, 0), (b"\x00" * 3000, 0)], zstd=True),
                record_for([(b"plain bytes", 0)], zstd=False)]


def seed_remotes_toml() -> list[bytes]:
    return [b'[remotes.origin]\nurl = "https://cdn.example.org/cnpsfs"\n'
            b'mirrors = ["https://eu.example.org/cnpsfs", "file:///srv/nfs/cnpsfs"]\nca = "/etc/ca.pem"\n'
            b'tls-verify = true\nproxy = "http://squid:3128"\ntimeout = 30\nconnect-timeout = 10\nretries = 4\n'
            b'parallel = 8\nauthfile = "/etc/auth.json"\ncreds-file = "/etc/origin.creds"\n'
            b'[remotes.reg]\nurl = "docker://registry.example.org/cnpsfs"\ntimeout = 2.5\n',
            b'[remotes.x]\nurl = "file:///srv/x"\n']


def seed_policies() -> list[bytes]:
    return [b'default = "reject"\nrevoked = ["old.pub"]\n\n[[rule]]\nnames = ["example.org/*", "*.example.com/app"]\n'
            b'require = "signed"\nkeys = ["good.pub"]\n\n[[rule]]\nnames = "debian.org/*"\n'
            b'require = "debian-provenance"\n\n[[rule]]\nnames = ["*"]\nrequire = "accept"\n',
            b'default = "accept"\n']


def seed_public_keys() -> list[bytes]:
    _key, public = _signing()
    return [(public.line() + "\n").encode(), f"# comment\n\n{public.line()}\n  {public.line()}  \n".encode()]


def seed_deb822() -> list[bytes]:
    return [b"Package: bash\nVersion: 5.2-1\nArchitecture: amd64\nSHA256: " + b"ab" * 32
            + b"\nDescription: x\n y\n .\n",
            b"Origin: Debian\nSuite: stable\nSHA256:\n " + b"cd" * 32 + b" 1234 main/binary-amd64/Packages\n "
            + b"ef" * 32 + b"  99 main/binary-amd64/Packages.xz\nMD5Sum:\n 00 1 x\n"]


SEEDERS: dict[str, Callable[[], list[bytes]]] = {
    "signature": seed_signatures, "profile": seed_profiles, "oci-manifest": seed_oci_manifests,
    "oci-config": seed_oci_configs, "docker-archive": seed_docker_archive_manifests,
    "remote-index": seed_remote_indexes, "remote-shard": seed_shards, "remote-manifest": seed_remote_manifests,
    "remote-tag": lambda: [t.encode() for t in seed_tags()],
    "remote-record": lambda: [r for r, _loc in SEED_RECORDS], "remotes-toml": seed_remotes_toml,
    "policy": seed_policies, "public-key": seed_public_keys, "deb822": seed_deb822,
}


def corpus(kind: str) -> list[Path]:
    directory = CORPUS / kind
    return sorted(directory.glob("*")) if directory.is_dir() else []


def seeds(kind: str) -> list[bytes]:
    """The committed seeds of *kind* (tests/corpus/KIND/seed-*), else freshly made ones."""
    found = [p.read_bytes() for p in corpus(kind) if p.name.startswith("seed-")]
    return found or SEEDERS[kind]()


def write_seeds() -> None:
    suffix = {"signature": "cbor", "profile": "cbor", "remote-index": "cbor", "remote-shard": "bin",
              "remote-record": "bin", "remote-tag": "txt", "remotes-toml": "toml", "policy": "toml",
              "public-key": "pub", "deb822": "txt"}
    for kind, make in SEEDERS.items():
        directory = CORPUS / kind
        directory.mkdir(parents=True, exist_ok=True)
        for n, data in enumerate(make(), 1):
            (directory / f"seed-{n}.{suffix.get(kind, 'json')}").write_bytes(data)


# --------------------------------------------------------------------------- the properties, one per decoder


def check_signature(data: bytes) -> None:
    from cnpsfs.trust.signature import Payload, Signature

    sig = bounded("signature", lambda: Signature.decode(data))
    if sig is not None:
        assert type(sig.payload_bytes) is bytes and type(sig.signature) is bytes
        assert Signature.decode(sig.encode()) == sig
        payload = bounded("signature payload", sig.payload)
        if payload is not None:
            assert payload.encode() == sig.payload_bytes  # exactly the bytes that were signed
            _key, public = _signing()
            assert public.verify(sig.signature, sig.payload_bytes) in (True, False)
    payload = bounded("signature payload", lambda: Payload.decode(data))
    if payload is not None:
        assert payload.encode() == data


def check_profile(data: bytes) -> None:
    from cnpsfs.format.profile import check_profile_path, decode_profile, encode_profile

    profile = bounded("profile", lambda: decode_profile(data))
    if profile is not None:
        for entry in profile.entries:
            check_profile_path(entry.path)
            assert all(type(n) is int and n >= 0 for n in entry.ranges)
        assert decode_profile(encode_profile(profile)) == profile


MEDIA_TYPES = st.sampled_from([None, "application/vnd.oci.image.manifest.v1+json",
                               "application/vnd.oci.image.index.v1+json",
                               "application/vnd.docker.distribution.manifest.v2+json",
                               "application/vnd.docker.distribution.manifest.list.v2+json",
                               "application/vnd.docker.distribution.manifest.v1+prettyjws", "text/plain", ""])


def check_oci_manifest(args: tuple[bytes, str | None]) -> None:
    from cnpsfs.oci.model import (
        Index,
        Platform,
        check_config_descriptor,
        layer_compression,
        parse_manifest_document,
        select_platform,
    )

    data, media_type = args
    doc = bounded("oci manifest", lambda: parse_manifest_document(data, media_type, "fuzz"))
    if doc is None:
        return
    descriptors = doc.manifests if isinstance(doc, Index) else [doc.config, *doc.layers]
    for desc in descriptors:
        assert OCI_DIGEST.fullmatch(desc.digest), desc.digest
        assert type(desc.size) is int and desc.size >= 0
        assert all(type(k) is str and type(v) is str for k, v in desc.annotations.items())
    if isinstance(doc, Index):
        for want in (Platform("linux", "amd64"), Platform("linux", "arm64", "v8")):
            chosen = bounded("oci index platform", lambda w=want: select_platform(doc, w, "fuzz"))
            assert chosen is None or chosen in doc.manifests
    else:
        bounded("oci config descriptor", lambda: check_config_descriptor(doc.config, "fuzz"))
        for layer in doc.layers:
            bounded("oci layer", lambda x=layer: layer_compression(x, "fuzz"))


def check_oci_config(data: bytes) -> None:
    from cnpsfs.oci.importer import build_image, chain_ids
    from cnpsfs.oci.model import OCI_CONFIG, OCI_MANIFEST, Descriptor, Manifest, parse_config

    config = bounded("oci config", lambda: parse_config(data, "fuzz"))
    if config is None:
        return
    assert all(OCI_DIGEST.fullmatch(d) for d in config.diff_ids), config.diff_ids
    assert len(chain_ids(config.diff_ids)) == len(config.diff_ids)
    manifest = Manifest(OCI_MANIFEST, Descriptor(OCI_CONFIG, SHA_A, len(data)), [])
    image = build_image("example.org/fuzz", "1", "oci:fuzz", manifest, SHA_B, None, config, [])
    # What the importer would store: the image object encodes, or the refusal is clean.
    bounded("oci config as an image", lambda: fmt.decode_image(fmt.encode_image(image)))


def _docker_archive(manifest_json: bytes, where: Path) -> Path:
    path = where / "archive.tar"
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [SHA_B]}, "os": "linux",
                         "architecture": "amd64"}).encode()
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as t:
        info = tarfile.TarInfo("hello")
        info.size = 3
        t.addfile(info, io.BytesIO(b"hi\n"))
    with tarfile.open(path, "w") as t:
        for name, content in (("manifest.json", manifest_json), ("config.json", config),
                              ("layer.tar", layer.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            t.addfile(info, io.BytesIO(content))
    return path


def check_docker_archive(data: bytes, where: Path) -> None:
    from cnpsfs.oci.layout import DockerArchiveSource
    from cnpsfs.oci.model import parse_manifest_document

    path = _docker_archive(data, where)
    for ref in ("", ":example.org/app:1", ":@0", ":@7"):
        source = bounded("docker archive", lambda r=ref: DockerArchiveSource(f"{path}{r}"))
        if source is not None:
            manifest, media_type, _ = source.root()
            parse_manifest_document(manifest, media_type, "synthesised")  # what it makes is valid


def check_remote_index(data: bytes) -> None:
    from cnpsfs.store.wire import decode_index, encode_index

    index = bounded("remote index", lambda: decode_index(data, "fuzz"))
    if index is not None:
        assert len(index.root) == 32
        for blob in index.blobs:
            assert SHA256.fullmatch(blob.digest) and blob.size >= 0
        for shard in (*index.object_shards, *index.chunk_shards):
            assert SHA256.fullmatch(shard.blob.digest) and len(shard.first) == 32
        assert decode_index(encode_index(index), "again") == index


def check_shard(data: bytes) -> None:
    from cnpsfs.store.protocol import TYPE_NAMES
    from cnpsfs.store.wire import Shard

    index = seed_index()
    shard = bounded("remote shard", lambda: Shard(data, "fuzz", index))
    if shard is not None:
        rows = list(shard)
        assert [d for d, _r in rows] == sorted({d for d, _r in rows})
        for digest, (block, type_code, inner, length) in rows:
            assert type_code in TYPE_NAMES and inner + length <= index.blocks[block].raw
            assert shard.find(digest) == (block, type_code, inner, length)


def check_remote_manifest(data: bytes) -> None:
    from cnpsfs.store.protocol import T_FILESET, T_IMAGE
    from cnpsfs.store.wire import decode_manifest

    info = bounded("remote manifest", lambda: decode_manifest(data, "fuzz"))
    if info is not None:
        assert SHA256.fullmatch(info.index.digest) and all(SHA256.fullmatch(b.digest) for b in info.layers)
        assert len(info.root) == 32 and info.root_type in (T_FILESET, T_IMAGE)
        assert info.ref is None or type(info.ref) is str


def check_tag(text: str) -> None:
    from cnpsfs.store.names import check_tag_name, check_tag_version
    from cnpsfs.store.wire import check_sha256_name, parse_digest_tag, parse_ref_tag, ref_tag

    outcome("input")
    parsed = parse_ref_tag(text)
    if parsed is not None:
        outcome("a NAME@VERSION tag")
        name, version = parsed
        check_tag_name(name)  # a remote's tag never yields a name or version a local tag could not have
        check_tag_version(version)
        assert ref_tag(name, version) == text
    digest = parse_digest_tag(text)
    if digest is not None:
        outcome("a digest tag")
        assert len(digest) == 32 and f"blake3-{digest.hex()}" == text
    try:
        check_sha256_name(text, "fuzz")
    except CnpsfsError:
        pass
    else:
        assert SHA256.fullmatch(text)


def check_record(args: tuple[bytes, int]) -> None:
    from cnpsfs.store.remote import parse_record

    data, which = args
    _record, loc = SEED_RECORDS[which % len(SEED_RECORDS)]
    parsed = bounded("block record", lambda: parse_record(data, loc, "fuzz"))
    if parsed is not None:
        members, out = parsed
        assert len(members) == loc.count
        for digest, value in out.items():
            assert value is None or fmt.digest_bytes(value) == digest


def _listing(where: Path) -> list[str]:
    return sorted(str(p.relative_to(where)) for p in where.rglob("*"))


def check_remotes_toml(data: bytes, where: Path) -> None:
    from cnpsfs.store.backends import parse_remote_url
    from cnpsfs.store.remoteconf import load_remotes

    path = where / "remotes.toml"
    path.write_bytes(data)
    before = _listing(where)
    specs = bounded("remotes.toml", lambda: load_remotes([path]))
    assert _listing(where) == before
    for spec in (specs or {}).values():
        assert spec.urls and all(type(u) is str for u in spec.urls)
        for url in spec.urls:
            parse_remote_url(url)
        # Every wait is bounded and every pool sized: no setting may mean "forever" or "unbounded".
        for seconds in (spec.timeout, spec.connect_timeout):
            assert math.isfinite(seconds) and 0 < seconds <= 3600, seconds
        assert 1 <= spec.parallel <= 64 and 0 <= spec.retries <= 100, (spec.parallel, spec.retries)


def check_policy(data: bytes, where: Path) -> None:
    from cnpsfs.trust.policy import parse_policy

    before = _listing(where)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # load_policy refuses it before parsing (test_policy_file_that_is_not_text)
    policy = bounded("policy", lambda: parse_policy(text, str(where / "policy.toml")))
    assert _listing(where) == before
    if policy is not None:
        assert policy.default in ("accept", "reject")
        for pattern, rule in policy.patterns:
            assert rule.require in ("signed", "accept", "reject", "debian-provenance")
            if pattern.domain is not None:
                assert re.fullmatch(r"[a-z0-9.-]+", pattern.domain), pattern
                assert all(re.fullmatch(r"[A-Za-z0-9._+-]+", s) for s in pattern.segments), pattern
            for name in ("example.org/app", "a.example.com/app", "debian.org/bash"):
                assert pattern.matches(name) in (True, False)
            assert rule.require != "signed" or rule.keys


def check_public_key(data: bytes, where: Path) -> None:
    from cnpsfs.trust.keys import load_public_keys

    path = where / "fuzz.pub"
    path.write_bytes(data)
    keys = bounded("public key file", lambda: load_public_keys(path))
    for key in keys or []:
        assert type(key.raw) is bytes and len(key.raw) == 32 and len(key.key_id) == 32


def check_deb822(data: bytes) -> None:
    from cnpsfs.trust.provenance import parse_stanza, release_sha256

    fields = bounded("deb822 stanza", lambda: parse_stanza(data))
    if fields is not None:
        assert all(type(k) is str and type(v) is str for k, v in fields.items())
    found = bounded("Release SHA256", lambda: release_sha256(data, "main/binary-amd64/Packages"))
    if found is not None:
        sha, size = found
        assert type(sha) is str and type(size) is int


# --------------------------------------------------------------------------- input strategies


def text_inputs(kind: str) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=400), mutated(seeds(kind)), st.text(max_size=200).map(str.encode))


@st.composite
def cbor_structured(draw: st.DrawFn, kind: str) -> bytes:
    """A seed decoded, a few fields replaced by odd values (and nested ones for profiles)."""
    obj = cbor2.loads(draw(st.sampled_from(seeds(kind))))
    if kind == "signature" and draw(st.booleans()):
        inner = cbor2.loads(obj[2])
        for key in draw(st.lists(st.integers(0, 10), max_size=3)):
            inner[key] = draw(st.one_of(ODD_VALUES, VALUES))
        try:
            obj[2] = cbor2.dumps(inner)
        except (cbor2.CBOREncodeError, TypeError, ValueError):
            pass
    if kind == "profile" and draw(st.booleans()):
        obj[4] = draw(st.lists(st.one_of(
            st.tuples(st.integers(-1, 3), st.sampled_from([b"", b"a", b"a/b", b"../x", b"/abs", b"a//b", b"a\0b",
                                                           b"n" * 256, "text", 5])).map(list),
            st.tuples(st.just(2), st.just(b"f"), st.lists(st.integers(-2, 1 << 64), max_size=6)).map(list),
            VALUES), max_size=5))
    for key in draw(st.lists(st.integers(0, 10), max_size=3)):
        if draw(st.booleans()):
            obj.pop(key, None)
        else:
            obj[key] = draw(st.one_of(ODD_VALUES, VALUES))
    try:
        return cbor2.dumps(obj)
    except (cbor2.CBOREncodeError, TypeError, ValueError):
        return cbor2.dumps({0: "x"})


JSON_ODD = st.sampled_from([None, True, 0, -1, 1.5, 1e400, 10 ** 30, "", "x", "sha256:" + "0" * 64,
                            "sha256:" + "0" * 64 + "\n", "sha256:" + "A" * 64, "sha512:" + "0" * 128, "\ud800",
                            "../../etc/passwd", "/abs", [], {}, [1, "a"], {"a": 1}, "linux", "amd64",
                            "application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.oci.image.config.v1+json",
                            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "layers"]).map(copy.deepcopy)
JSON_VALUES = st.recursive(st.one_of(JSON_ODD, st.text(max_size=8), st.integers()), lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=8)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def json_structured(draw: st.DrawFn, kind: str) -> bytes:
    """A JSON seed with 1-4 values anywhere in it replaced (or removed), re-serialised."""
    doc = json.loads(draw(st.sampled_from(seeds(kind))))
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        if isinstance(parent, dict) and draw(st.booleans()) and draw(st.booleans()):
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = draw(st.one_of(JSON_ODD, JSON_VALUES))
    nest = draw(st.sampled_from([0, 0, 0, 200_000]))
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    if nest:  # very deep nesting: the recursion limit
        text = text[:-1] + ', "deep": ' + "[" * nest + "]" * nest + text[-1]
    return text.encode("utf-8", "surrogatepass")


@st.composite
def binary_structured(draw: st.DrawFn, kind: str) -> bytes:
    """Fixed-size tables (shards, records): entries with odd fields, counts that lie."""
    import struct

    if kind == "remote-shard":
        count = draw(st.integers(0, 6))
        entries = [struct.pack("<32sIBII", draw(st.sampled_from([D1, D2, D3, bytes(32), b"\xff" * 32])),
                               draw(st.integers(0, 5)), draw(st.integers(0, 255)), draw(st.integers(0, 5000)),
                               draw(st.integers(0, (1 << 32) - 1))) for _ in range(count)]
        header = struct.pack("<8sI", draw(st.sampled_from([b"CNPSIS01", b"CNPSIS02"])),
                             draw(st.sampled_from([count, count + 1, (1 << 32) - 1, 0])))
        return header + b"".join(entries)
    record, loc = draw(st.sampled_from(SEED_RECORDS))
    data = bytearray(record)
    field = draw(st.sampled_from(["codec", "stored", "raw", "count", "length", "digest", "payload"]))
    if field == "codec":
        data[4] = draw(st.integers(0, 255))
    elif field in ("stored", "raw", "count"):
        at = {"stored": 5, "raw": 9, "count": 13}[field]
        data[at:at + 4] = struct.pack("<I", draw(st.sampled_from([0, 1, loc.raw, 1 << 31, (1 << 32) - 1])))
    elif field == "length":
        data[17 + 33:17 + 37] = struct.pack("<I", draw(st.sampled_from([0, 1, 1 << 31, (1 << 32) - 1])))
    elif field == "digest":
        data[17:17 + 32] = draw(st.binary(min_size=32, max_size=32))
    else:
        import zstandard

        bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))  # a zstd bomb in place of the payload
        data = data[: 17 + 37 * loc.count] + bytearray(bomb)
    return bytes(data)


@st.composite
def toml_structured(draw: st.DrawFn, kind: str) -> bytes:
    keys = (["url", "mirrors", "ca", "tls-verify", "proxy", "timeout", "connect-timeout", "retries", "parallel",
             "authfile", "creds-file", "colour"] if kind == "remotes-toml"
            else ["default", "rule", "revoked", "names", "require", "keys", "keyrings", "x"])
    atoms = ['"x"', '""', '"file:///srv"', '"file://rel"', '"docker://h/r"', '"docker://h/r:tag"', '"http://h"',
             '"ftp://h"', '"https://h/p"', "0", "-1", "1", "8", "65", "1000000000", "9223372036854775807", "inf",
             "-inf", "nan", "1e308", "0.000001", "true", "[]", '["file:///a", 3]', '["good.pub"]', '["missing.pub"]',
             '["../../etc/passwd"]', '["/dev/null"]', '["bad.pub"]', '"signed"', '"accept"', '"reject"',
             '"debian-provenance"', '"example.org/*"', '"*"', '"*.example.org/*"', '"example.org\\n/*"',
             '"Example.org/*"', '"example.org/a*"', '"example.org"', '["a.b/c", "a.b/c"]', "{}", "{ url = 1 }"]
    header = (["[remotes.a]", "[remotes.b]", '[remotes."weird name"]', "[remotes]", "[other]", "[[remotes.c]]"]
              if kind == "remotes-toml" else ["[[rule]]", "[rule]", "[[rule.x]]"])
    lines: list[str] = []
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from(seeds(kind))).decode())
    for _ in range(draw(st.integers(0, 4))):
        lines.append(draw(st.sampled_from(header)))
        lines += [f"{draw(st.sampled_from(keys))} = {draw(st.sampled_from(atoms))}"
                  for _ in range(draw(st.integers(0, 5)))]
    return "\n".join(lines).encode() + b"\n"


def inputs(kind: str) -> st.SearchStrategy[Any]:
    base = text_inputs(kind)
    if kind in ("signature", "profile"):
        return st.one_of(base, cbor_structured(kind))
    if kind in ("oci-manifest",):
        return st.tuples(st.one_of(base, json_structured(kind)), MEDIA_TYPES)
    if kind in ("oci-config", "docker-archive", "remote-manifest"):
        return st.one_of(base, json_structured(kind))
    if kind == "remote-index":
        return st.one_of(base, st.builds(_index_structured, st.data()))
    if kind in ("remote-shard",):
        return st.one_of(base, binary_structured(kind))
    if kind == "remote-record":
        return st.tuples(st.one_of(base, binary_structured(kind)), st.integers(0, 1))
    if kind == "remote-tag":
        return st.one_of(st.text(max_size=140), mutated(seeds(kind)).map(lambda b: b.decode("utf-8", "replace")),
                         st.tuples(st.text(alphabet="ab_asuptc:.-~+/@\n", max_size=12),
                                   st.text(alphabet="19_a.~:+\n", max_size=6)).map(lambda t: t[0] + "_a" + t[1]))
    if kind in ("remotes-toml", "policy"):
        return st.one_of(base, toml_structured(kind))
    return base


def _index_structured(data: st.DataObject) -> bytes:
    obj = cbor2.loads(seeds("remote-index")[0])
    for key in data.draw(st.lists(st.integers(0, 9), max_size=3)):
        obj[key] = data.draw(st.one_of(ODD_VALUES, VALUES, st.binary(max_size=200),
                                       st.lists(st.lists(st.one_of(st.binary(max_size=33), st.integers(-1, 1 << 64)),
                                                         max_size=5), max_size=3)))
    try:
        return cbor2.dumps(obj)
    except (cbor2.CBOREncodeError, TypeError, ValueError):
        return b""


# --------------------------------------------------------------------------- the tests


def _key_files(where: Path) -> None:
    """What the policies name: a good key file, a bad one, a revoked key."""
    _key, public = _signing()
    (where / "good.pub").write_text(public.line() + "\n")
    (where / "old.pub").write_text(public.line() + "\n")
    (where / "bad.pub").write_text("ssh-rsa AAAA nope\n")


PLAIN: dict[str, Callable[[Any], None]] = {
    "signature": check_signature, "profile": check_profile, "oci-manifest": check_oci_manifest,
    "oci-config": check_oci_config, "remote-index": check_remote_index, "remote-shard": check_shard,
    "remote-manifest": check_remote_manifest, "remote-tag": check_tag, "remote-record": check_record,
    "deb822": check_deb822,
}
#: Decoders that read files: they get a directory of their own (and must write nothing in it).
WITH_DIR: dict[str, Callable[[Any, Path], None]] = {
    "docker-archive": check_docker_archive, "remotes-toml": check_remotes_toml, "policy": check_policy,
    "public-key": check_public_key,
}


def run_one(kind: str, where: Path, value: Any) -> None:
    if kind in WITH_DIR:
        WITH_DIR[kind](value, where)
    else:
        PLAIN[kind](value)


def replay_value(kind: str, data: bytes) -> Any:
    """A corpus file as the input its decoder takes."""
    if kind == "oci-manifest":
        return (data, None)
    if kind == "remote-record":
        return (data, 0)
    if kind == "remote-tag":
        return data.decode("utf-8", "surrogateescape")
    return data


@pytest.mark.parametrize("kind", KINDS)
def test_seeds_are_accepted(kind: str, tmp_path: Path, traced: None) -> None:
    """The committed seeds are valid inputs (else mutating them would test little) and current."""
    assert corpus(kind), f"no seed corpus for {kind}: run python tests/test_fuzz_formats.py"
    if kind == "policy":
        _key_files(tmp_path)
    for data in seeds(kind):
        value = replay_value(kind, data)
        if kind == "remote-record":
            value = (data, [r for r, _l in SEED_RECORDS].index(data))
        run_one(kind, tmp_path, value)
    assert [p.read_bytes() for p in corpus(kind) if p.name.startswith("seed-")] == SEEDERS[kind](), \
        "the committed seeds are stale: run python tests/test_fuzz_formats.py"


@pytest.mark.parametrize("long", RUNS)
@pytest.mark.parametrize("kind", KINDS)
def test_fuzz(kind: str, long: bool, tmp_path: Path, traced: None) -> None:
    """Any input ends in a value the format allows or a one-line CnpsfsError, in bounded time and memory."""
    if kind == "policy":
        _key_files(tmp_path)
    fuzz(long, inputs(kind), lambda value: run_one(kind, tmp_path, value), kind, LONG if long else SMOKE)


def regression_inputs() -> list[Any]:
    return [pytest.param(kind, path, id=f"{kind}/{path.name}") for kind in KINDS for path in corpus(kind)
            if not path.name.startswith("seed-")]


@pytest.mark.parametrize(("kind", "path"), regression_inputs())
def test_corpus(kind: str, path: Path, tmp_path: Path, traced: None) -> None:
    """Inputs that once broke a decoder (docs/reliability.md): each now ends cleanly."""
    if kind == "policy":
        _key_files(tmp_path)
    run_one(kind, tmp_path, replay_value(kind, path.read_bytes()))


def test_names_and_versions_with_a_trailing_newline_are_refused(cli: Any, tmp_path: Path) -> None:
    """What fuzzing the tag parser showed: ``re.match`` with ``$`` accepts a trailing newline,
    so ``example.org/x\n`` was a valid tag name and ``1\n`` a valid version (a line break in
    tags.log, one line per tag), ``sha256:<hex>\n`` a valid OCI digest and ``example.org\n/*``
    a policy pattern."""
    from cnpsfs.errors import UsageError
    from cnpsfs.oci.model import check_digest
    from cnpsfs.store.names import check_tag_name, check_tag_version
    from cnpsfs.trust.policy import Pattern

    for call in (lambda: check_tag_name("example.org/x\n"), lambda: check_tag_version("1\n"),
                 lambda: check_digest(SHA_A + "\n", "x"), lambda: Pattern.parse("example.org\n/*", "x"),
                 lambda: Pattern.parse("example.org/app\n", "x")):
        with pytest.raises(CnpsfsError):
            call()
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("x")
    result = cli("import", "dir", tree, "--name", "example.org/x", "--version", "1\n")
    assert result.rc != 0 and "invalid version" in result.stderr, result
    with pytest.raises(UsageError):
        check_tag_name("example.org/x\n")


def test_outside_text_in_oci_errors_stays_on_one_line() -> None:
    """What the long run found: ``served as … but declares mediaType <text>`` put a
    manifest's own mediaType into the message verbatim, so a newline in it made a
    two-line error (a forged log line); so did a foreign layer's media type and the
    platforms an index offers."""
    from cnpsfs.errors import ImportRejected
    from cnpsfs.oci.model import OCI_MANIFEST, Platform, layer_compression, parse_manifest_document, select_platform

    doc = json.loads(seeds("oci-manifest")[0])
    doc["mediaType"] = "x\nforged: line"
    with pytest.raises(ImportRejected) as exc:
        parse_manifest_document(json.dumps(doc).encode(), OCI_MANIFEST, "fuzz")
    assert "\n" not in str(exc.value) and "x\\nforged" in str(exc.value)
    doc = json.loads(seeds("oci-manifest")[0])
    doc["layers"][0]["mediaType"] = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip\n"
    doc["layers"][0]["urls"] = ["https://example.org/x"]
    manifest = parse_manifest_document(json.dumps(doc).encode(), None, "fuzz")
    with pytest.raises(ImportRejected) as exc:
        layer_compression(manifest.layers[0], "fuzz")  # type: ignore[union-attr]
    assert "\n" not in str(exc.value)
    index = json.loads(seeds("oci-manifest")[1])
    index["manifests"][0]["platform"]["os"] = "linux\nforged"
    parsed = parse_manifest_document(json.dumps(index).encode(), None, "fuzz")
    with pytest.raises(ImportRejected) as exc:
        select_platform(parsed, Platform("linux", "s390x"), "fuzz")  # type: ignore[arg-type]
    assert "\n" not in str(exc.value)


class _Registry:
    """The smallest registry that answers ``tags/list`` with a chosen body (loopback only)."""

    def __init__(self, body: bytes) -> None:
        import http.server
        import threading

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                data = b"{}" if self.path == "/v2/" else outer.body
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args: Any) -> None:
                pass

        self.body = body
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.host = f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("body", [b'{"tags": 5}', b'{"tags": {"a": 1}}', b'{"tags": ' + b"[" * 100_000 + b"]" * 100_000
                                  + b"}", b'{"errors": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"],
                         ids=["tags-int", "tags-object", "deep-tags", "deep-errors"])
def test_a_registry_tag_list_that_is_not_a_list(body: bytes) -> None:
    """What a hostile registry may answer to ``tags/list``: a number (``TypeError`` in the loop
    over it), nesting past the recursion limit (``RecursionError`` from json): a one-line
    RegistryError, not an internal error; a dict's keys are no tags either."""
    from cnpsfs.store.backends import open_backend

    server = _Registry(body)
    try:
        backend = open_backend(f"docker://{server.host}/repo")
        try:
            try:
                tags = backend.list_tags()
            except CnpsfsError as exc:
                assert "\n" not in str(exc)
            else:
                assert tags == [], tags
        finally:
            backend.close()
    finally:
        server.close()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    write_seeds()
    print(f"seeds written under {CORPUS}", file=sys.stderr)
    os._exit(0)
