"""The remote wire format in-process: tags, the image index, shards, manifests, range merging,
and the remotes.toml parser. No servers (test_remote.py has those)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cnpsfs.errors import CorruptObjectError, UsageError
from cnpsfs.store.names import NAME_RE, VERSION_RE
from cnpsfs.store.protocol import T_CHUNK, T_DIR, T_IMAGE
from cnpsfs.store.remote import RemoteLocation, merge_runs
from cnpsfs.store.remoteconf import load_remotes, remote_spec
from cnpsfs.store.wire import (
    BlobRef,
    BlockEntry,
    IndexRoot,
    Shard,
    ShardEntry,
    ShardRef,
    decode_index,
    decode_manifest,
    digest_tag,
    encode_index,
    encode_manifest,
    encode_shard,
    parse_digest_tag,
    parse_ref_tag,
    ref_tag,
    sha256_name,
    split_shards,
)

_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
names = st.builds(lambda host, parts: host + "".join("/" + p for p in parts),
                  st.lists(_label, min_size=1, max_size=3).map(".".join),
                  st.lists(st.from_regex(r"[A-Za-z0-9._+-]{1,12}", fullmatch=True), min_size=1, max_size=3))
versions = st.from_regex(r"[A-Za-z0-9._+~:-]{1,30}", fullmatch=True)


@given(names, versions)
def test_ref_tags_are_valid_oci_tags_and_reversible(name: str, version: str) -> None:
    assert NAME_RE.match(name) and VERSION_RE.match(version)
    tag = ref_tag(name, version)
    assert len(tag) <= 128
    import re

    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag)
    if tag.startswith("h-"):
        assert parse_ref_tag(tag) is None  # too long to spell out: the manifest's annotation names it
    else:
        assert parse_ref_tag(tag) == (name, version)


def test_ref_tag_examples() -> None:
    assert ref_tag("example.org/rootfs", "1") == "example.org_srootfs_a1"
    assert ref_tag("debian.org/bash", "5.2.15-2+b7_amd64") == "debian.org_sbash_a5.2.15-2_pb7_uamd64"
    assert parse_ref_tag("latest") is None
    assert parse_ref_tag("blake3-" + "0" * 64) is None
    assert parse_ref_tag("a_x_a1") is None  # _x is no escape
    assert parse_digest_tag(digest_tag(bytes(range(32)))) == bytes(range(32))
    assert parse_digest_tag("blake3-xyz") is None


def _index(nblocks: int = 2) -> IndexRoot:
    blob = BlobRef(sha256_name(b"pack"), 1 << 20)
    blocks = tuple(BlockEntry(0, 8 + i * 1000, 1, 500, 900, 1) for i in range(nblocks))
    shard = ShardRef(bytes(32), BlobRef(sha256_name(b"shard"), 10), 1)
    return IndexRoot(b"\x01" * 32, T_IMAGE, (blob,), blocks, (shard,), (shard,))


def test_index_round_trip() -> None:
    index = _index()
    data = encode_index(index)
    assert decode_index(data, "r: image index") == index
    assert encode_index(decode_index(data, "x")) == data  # deterministic


@pytest.mark.parametrize("mutate, problem", [
    (lambda d: d[:-3], "not CBOR"),
    (lambda d: b"\xa0", "not a cnpsfs/remote-index"),
    (lambda d: json.dumps([1]).encode(), "not"),
])
def test_malformed_index_names_the_object(mutate, problem) -> None:
    with pytest.raises(CorruptObjectError, match=rf"^origin: image index sha256:ab: malformed image index: {problem}"):
        decode_index(mutate(encode_index(_index())), "origin: image index sha256:ab")


def test_index_block_outside_its_blob_is_rejected() -> None:
    index = _index()
    bad = IndexRoot(index.root, index.root_type, index.blobs, (BlockEntry(0, (1 << 20) - 10, 1, 500, 900, 1),),
                    index.object_shards, index.chunk_shards)
    with pytest.raises(CorruptObjectError, match="block 0 does not fit its blob"):
        decode_index(encode_index(bad), "r")
    bad = IndexRoot(index.root, index.root_type, index.blobs, (BlockEntry(3, 8, 1, 5, 9, 1),), (), ())
    with pytest.raises(CorruptObjectError, match="names blob 3 of 1"):
        decode_index(encode_index(bad), "r")


def test_shards_find_and_reject_damage() -> None:
    index = _index(3)
    entries = [ShardEntry(bytes([i]) * 32, i % 3, T_CHUNK, 0, 100) for i in range(1, 200)]
    parts = split_shards(entries, 64)
    assert [len(p) for _f, p in parts] == [64, 64, 64, 7]
    assert parts[0][0] == bytes(32) and parts[1][0] == entries[64].digest
    shard = Shard(encode_shard(parts[1][1]), "s", index)
    assert shard.find(entries[70].digest) == (entries[70].block, T_CHUNK, 0, 100)
    assert shard.find(entries[10].digest) is None
    data = encode_shard(parts[1][1])
    with pytest.raises(CorruptObjectError, match=r"^s: malformed index shard: bad header or length"):
        Shard(data[:-1], "s", index)
    swapped = encode_shard([parts[1][1][1], parts[1][1][0]])
    with pytest.raises(CorruptObjectError, match="out of order"):
        Shard(swapped, "s", index)
    too_long = encode_shard([ShardEntry(b"\x05" * 32, 0, T_DIR, 800, 200)])
    with pytest.raises(CorruptObjectError, match="does not fit its block"):
        Shard(too_long, "s", index)


def test_manifest_round_trip_and_rejects() -> None:
    index = BlobRef(sha256_name(b"i"), 1)
    layers = [("application/vnd.cnpsfs.pack.v1", BlobRef(sha256_name(b"p"), 5))]
    data = encode_manifest(index, layers, b"\x07" * 32, T_IMAGE, "example.org/a@1", "2026-01-01T00:00:00Z")
    info = decode_manifest(data, "m")
    assert (info.index, info.root, info.root_type, info.ref) == (index, b"\x07" * 32, T_IMAGE, "example.org/a@1")
    assert info.layers == (layers[0][1],)
    assert info.digest == sha256_name(data)
    doc = json.loads(data)
    assert doc["artifactType"] == "application/vnd.cnpsfs.image.v1+json"
    for key, value, problem in [("artifactType", "application/vnd.oci.image.config.v1+json", "artifactType"),
                                ("config", {"mediaType": "x"}, "config"),
                                ("layers", [{"digest": "sha256:zz", "size": 1}], "descriptor digest")]:
        broken = json.dumps({**doc, key: value}).encode()
        with pytest.raises(CorruptObjectError, match=f"^r: tag x: not a cnpsfs image manifest: {problem}"):
            decode_manifest(broken, "r: tag x")
    with pytest.raises(CorruptObjectError, match="not JSON"):
        decode_manifest(b"{", "r")


def _loc(blob: str, header: int, length: int) -> RemoteLocation:
    # record length = 17 + 37 * count + stored: count 0, stored = length - 17
    return RemoteLocation(blob, 1 << 30, header, 0, length - 17, 0, 0, T_CHUNK, 0, 0)


def test_merge_runs_joins_close_records_up_to_the_limit() -> None:
    a = [_loc("sha256:a", off, 100) for off in (0, 100, 200, 400, 100_000)]
    b = [_loc("sha256:b", 0, 100)]
    runs = merge_runs(a + b, gap=150, limit=350)
    spans = sorted((r[0].blob, r[0].header, r[-1].header + r[-1].record_length) for r in runs)
    # 0-300 merged; 400 is 100 past 300 (within the gap) but would make the run 500 > 350 long
    assert spans == [("sha256:a", 0, 300), ("sha256:a", 400, 500), ("sha256:a", 100_000, 100_100),
                     ("sha256:b", 0, 100)]
    assert len(merge_runs(a, gap=0, limit=1 << 20)) == 3  # exactly adjacent only: 0-300, 400, 100000


def test_remotes_toml(tmp_path: Path) -> None:
    system, user = tmp_path / "sys.toml", tmp_path / "user.toml"
    system.write_text('[remotes.origin]\nurl = "https://a.example/cnpsfs"\ntimeout = 5\n'
                      '[remotes.reg]\nurl = "docker://reg.example/cnpsfs"\n')
    user.write_text('[remotes.origin]\nurl = "http://127.0.0.1:1/x"\nmirrors = ["file:///srv/x"]\n'
                    'proxy = "http://127.0.0.1:3128"\nparallel = 4\n')
    remotes = load_remotes([system, user])
    assert remotes["origin"].urls == ("http://127.0.0.1:1/x", "file:///srv/x")
    assert remotes["origin"].timeout == 30.0  # the user's entry replaces the system's whole
    assert remotes["origin"].http_config().proxy == "http://127.0.0.1:3128"
    assert remotes["reg"].url == "docker://reg.example/cnpsfs"
    assert remote_spec("reg", remotes).name == "reg"
    assert remote_spec("file:///x", remotes).urls == ("file:///x",)
    assert remote_spec("reg", remotes, timeout=2).timeout == 2
    with pytest.raises(UsageError, match="not a URL and not a configured remote"):
        remote_spec("nope", remotes)
    user.write_text('[remotes.bad]\nurl = "ftp://x"\n')
    with pytest.raises(UsageError, match="expected docker://HOST/REPO"):
        load_remotes([user])
    user.write_text('[remotes.bad]\nurl = "file:///x"\ntimeuot = 3\n')
    with pytest.raises(UsageError, match="unknown setting 'timeuot'"):
        load_remotes([user])
    user.write_text('[remotes.bad]\nurl = "file:///x"\ntimeout = "3"\n')
    with pytest.raises(UsageError, match="timeout has the wrong type"):
        load_remotes([user])


def test_meta_ranges_are_advice_checked_against_the_layers() -> None:
    """docs/format.md 3.5: a usable org.cnpsfs.meta-ranges names pack layers, inside them,
    within the bounds; any broken rule makes the whole annotation ignored, not the image."""
    from cnpsfs.store.wire import META_RANGES_MAX, MT_PACK, MT_SHARD, encode_meta_ranges

    pack, shard = BlobRef(sha256_name(b"p"), 5000), BlobRef(sha256_name(b"s"), 90)
    layers = [(MT_SHARD, shard), (MT_PACK, pack)]
    index = BlobRef(sha256_name(b"i"), 1)

    def ranges(text: str | None) -> tuple[tuple[BlobRef, int, int], ...]:
        data = encode_manifest(index, layers, b"\x07" * 32, T_IMAGE, None, None, text)
        info = decode_manifest(data, "m")
        assert info.shards == (shard,)
        return info.meta_ranges

    good = encode_meta_ranges([(pack.digest, 8, 100), (pack.digest, 4000, 1000)])
    assert json.loads(encode_manifest(index, layers, b"\x07" * 32, T_IMAGE, None, None, good))["annotations"][
        "org.cnpsfs.meta-ranges"] == f"{pack.digest}@8+100 {pack.digest}@4000+1000"
    assert ranges(good) == ((pack, 8, 100), (pack, 4000, 1000))
    assert ranges(None) == ()
    for bad in (f"{pack.digest}@4000+1001",  # past the blob's end
                f"{shard.digest}@0+10",  # not a pack layer
                f"{sha256_name(b'x')}@0+10",  # not a layer at all
                f"{pack.digest}@0+0",  # empty
                f"{pack.digest}@8+100  {pack.digest}@200+1",  # two spaces
                f"{pack.digest}:8-100",  # another syntax
                " ".join([f"{pack.digest}@0+1"] * (META_RANGES_MAX + 1))):  # too many
        assert ranges(bad) == (), bad
