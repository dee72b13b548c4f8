"""Remote stores against real servers on loopback, without FUSE: push and pull (file://,
nginx, docker-registry), deduplication against what the remote has, a push killed
half-way, corrupt and malformed remote data, the fault proxy's faults, the cache's bound.

The images are the Debian trees of remoteutil.py (v1 minbase, v2 = v1 + python3). The
FUSE side (lazy mounts, chroot, EIO and recovery) is in test_remote_mount.py.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cnpsfs_testlib import CNPSFS, Cli
from remoteutil import (
    IMAGE_V1,
    IMAGE_V2,
    NGINX_REMOTE_CONF,
    SourceStore,
    build_rootfs_python,
    make_source_store,
    python_debs,
)
from servers import FaultProxy, RegistryServer, start_nginx

from cnpsfs import format as fmt
from cnpsfs.errors import CorruptObjectError, NotFoundError, UnavailableError
from cnpsfs.store import LocalStore
from cnpsfs.store.cached import CachedStore, cache_summary, evict
from cnpsfs.store.maintenance import gc, reachable, verify
from cnpsfs.store.protocol import T_IMAGE
from cnpsfs.store.remote import RemoteStore
from cnpsfs.store.remoteconf import RemoteSpec
from cnpsfs.store.sync import pull
from cnpsfs.store.wire import decode_manifest, ref_tag

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="session")
def debian_python(debian_rootfs: Path) -> Path:
    return build_rootfs_python(debian_rootfs, python_debs())


@pytest.fixture(scope="module")
def source(debian_rootfs: Path, debian_python: Path, tmp_path_factory: pytest.TempPathFactory) -> SourceStore:
    return make_source_store(tmp_path_factory.mktemp("source"), debian_rootfs, debian_python)


def push_cli(src: SourceStore, ref: str, remote: str, *args: str) -> dict:
    out = src.cli.ok("push", ref, remote, "--json", *args)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def file_remote(source: SourceStore, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """v1 then v2 pushed to a file:// remote: (its directory, push report of v1, of v2)."""
    directory = tmp_path_factory.mktemp("file-remote") / "remote"
    v1 = push_cli(source, IMAGE_V1, f"file://{directory}")
    v2 = push_cli(source, IMAGE_V2, f"file://{directory}")
    return directory, v1, v2


def remote_store(url: str, state: Path | None = None, **kw: object) -> RemoteStore:
    return RemoteSpec(name=url, urls=(url,), **kw).open(state)  # type: ignore[arg-type]


def digests_of(store: object, ref: str) -> tuple[bytes, set[bytes]]:
    root = store.resolve(ref)  # type: ignore[attr-defined]
    return root, reachable(store, [root])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- push: only what is missing


def test_push_sends_only_what_the_remote_lacks(source: SourceStore, file_remote: tuple[Path, dict, dict]) -> None:
    directory, v1, v2 = file_remote
    assert v1["bytes_skipped"] == 0 and v1["members_skipped"] == 0
    # v1 sent about what the local store holds of it (blocks travel as stored, plus the index)
    assert 0.9 * source.v1_new_bytes < v1["bytes_sent"] < 1.1 * source.v1_new_bytes + (1 << 20)
    # v2 after v1: what importing v2 after v1 stored anew, not the whole image again
    assert v2["members_skipped"] > 2000, v2
    assert v2["bytes_sent"] < 1.1 * source.v2_new_bytes + (2 << 20), (v2, source.v2_new_bytes)
    assert v2["bytes_sent"] < 0.5 * v1["bytes_sent"], (v1, v2)
    assert v2["bytes_skipped"] > 0.8 * v1["bytes_sent"]
    again = push_cli(source, IMAGE_V2, f"file://{directory}")
    assert again["members_sent"] == 0 and again["bytes_sent"] < 8192, again
    assert again["manifest"] == v2["manifest"] or again["bytes_sent"] > 0
    # the layout: a marker, immutable blobs named by sha256, tags naming manifests
    assert (directory / "cnpsfs-remote").read_text() == "cnpsfs remote layout 1\n"
    manifest = decode_manifest((directory / "tags" / ref_tag("example.org/debian-image", "2")).read_bytes(), "t")
    assert manifest.ref == IMAGE_V2
    for blob in (manifest.index, *manifest.layers):
        assert (directory / "blobs/sha256" / blob.digest.split(":")[1]).stat().st_size == blob.size


def test_push_reads_only_what_its_image_needs_of_the_remote(source: SourceStore, tmp_path: Path) -> None:
    """The catalogue holds what the pushed image reaches, not the remote's indexes: images of
    the same name are scanned first, and the scan stops once everything is found, so an
    unrelated image's shards are never read."""
    from cnpsfs.store.backends import FileBackend
    from cnpsfs.store.sync import push

    class Counting(FileBackend):
        def __init__(self, url: str, path: Path) -> None:
            super().__init__(url, path)
            self.fetched: list[str] = []

        def get_blob(self, digest: str, size: int, *, deadline: float | None = None) -> bytes:
            self.fetched.append(digest)
            return super().get_blob(digest, size, deadline=deadline)

    directory = tmp_path / "remote"
    tree = tmp_path / "other"
    tree.mkdir()
    (tree / "hello.txt").write_text("an unrelated image\n")
    source.cli.ok("import", "dir", tree, "--name", "example.org/other", "--version", "1")
    (tmp_path / "other.toml").write_text('name = "example.org/other-image"\nversion = "1"\n'
                                         '[[layers]]\nfileset = "example.org/other@1"\n')
    source.cli.ok("image", "create", tmp_path / "other.toml")
    (tmp_path / "again.toml").write_text('name = "example.org/debian-image"\nversion = "1b"\n'
                                         '[[layers]]\nfileset = "example.org/debian@1"\n')
    source.cli.ok("image", "create", tmp_path / "again.toml")
    push_cli(source, "example.org/other-image@1", f"file://{directory}")
    push_cli(source, IMAGE_V1, f"file://{directory}")
    other = remote_store(f"file://{directory}")
    try:
        index = other.open_image(other.resolve("example.org/other-image@1"))
        shards = {s.blob.digest for s in (*index.root.object_shards, *index.root.chunk_shards)}
    finally:
        other.close()
    local = LocalStore(source.path)
    backend = Counting(f"file://{directory}", directory)
    try:
        report = push(local, "example.org/debian-image@1b", backend)
    finally:
        local.close()
    assert report.members_sent == 1 and report.members_skipped > 2000, report  # the new image object only
    assert not shards & set(backend.fetched), "the unrelated image's index was read"


def test_pull_round_trip_and_v2_after_v1(source: SourceStore, file_remote: tuple[Path, dict, dict],
                                         tmp_path: Path) -> None:
    directory, _v1, v2_push = file_remote
    src = LocalStore(source.path)
    local = LocalStore(tmp_path / "store", create=True)
    remote = remote_store(f"file://{directory}", tmp_path / "store" / "remote")
    try:
        first = pull(local, IMAGE_V1, remote)
        root, want = digests_of(src, IMAGE_V1)
        assert local.resolve(IMAGE_V1) == root
        assert first.members_sent == len(want) and first.members_skipped == 0
        for digest in want:
            assert local.get(digest) == src.get(digest)
        second = pull(local, IMAGE_V2, remote)
        # only blocks holding what v1 did not have: about what push sent for v2
        assert second.members_skipped > 2000
        assert second.sent < 1.2 * v2_push["bytes_sent"] + (1 << 20), (second.as_json(), v2_push)
        assert not verify(local, None).problems
        assert cache_summary(local)["packs"] == 0  # pulled packs are ordinary packs, not cache
        assert pull(local, IMAGE_V2, remote).sent == 0
    finally:
        remote.close()
        local.close()
        src.close()


# --------------------------------------------------------------------------- the registry


def test_registry_push_pull_and_skopeo_copy(source: SourceStore, registry: RegistryServer, tmp_path: Path) -> None:
    repo = f"docker://{registry.host}/cnpsfs-remote/reg"
    v1 = push_cli(source, IMAGE_V1, repo)
    v2 = push_cli(source, IMAGE_V2, repo)
    assert v2["members_skipped"] > 2000 and v2["bytes_sent"] < 0.5 * v1["bytes_sent"]
    # skopeo moves a cnpsfs image like any OCI artifact: the manifest names every blob
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        pytest.skip("skopeo is not installed")
    tag = ref_tag("example.org/debian-image", "2")
    copy = subprocess.run([skopeo, "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                           f"{repo}:{tag}", f"docker://{registry.host}/cnpsfs-remote/copy:{tag}"],
                          capture_output=True, text=True, timeout=300)
    assert copy.returncode == 0, copy.stderr
    cli = Cli(tmp_path / "store")
    pulled = cli.ok("pull", IMAGE_V2, f"docker://{registry.host}/cnpsfs-remote/copy", "--json")
    assert json.loads(pulled.stdout)["members_sent"] > 3000
    assert cli.ok("verify").rc == 0
    src = LocalStore(source.path)
    try:
        assert cli.ok("tag", "list", "--json").stdout.count("example.org/debian-image") == 1
        assert json.loads(cli.ok("inspect", IMAGE_V2, "--json").stdout)["digest"].endswith(
            src.resolve(IMAGE_V2).hex())
    finally:
        src.close()


def test_push_killed_half_way_resumes(source: SourceStore, registry: RegistryServer,
                                      fault_proxy: type[FaultProxy], tmp_path: Path) -> None:
    proxy = fault_proxy(registry.url)
    proxy.request_delay = 0.2  # each request waits: the ~20-pack push takes seconds, so it is killed mid-way
    repo = f"docker://{proxy.host}/cnpsfs-remote/resume"
    argv = [*CNPSFS, "--store", str(source.path), "push", IMAGE_V1, repo, "--pack-size", "4M", "--parallel", "2",
            "--json"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while proxy.count("PUT", r"/blobs/uploads/") < 4:
            assert proc.poll() is None, f"push ended before it was killed: {proc.communicate()}"
            assert time.monotonic() < deadline, "push made no progress"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    deadline = time.monotonic() + 30
    while proxy.in_flight:  # uploads the proxy had received whole still reach the registry
        assert time.monotonic() < deadline
        time.sleep(0.05)
    uploaded_before = proxy.count("PUT", r"/blobs/uploads/")
    assert proxy.count("PUT", r"/manifests/") == 0, "the killed push must not have tagged anything"
    proxy.request_delay = 0
    again = push_cli(source, IMAGE_V1, repo, "--pack-size", "4M")
    assert again["blobs_skipped"] >= uploaded_before, again
    assert again["bytes_skipped"] >= 3 * (4 << 20), again
    full = json.loads(Cli(tmp_path / "x").ok("push", IMAGE_V1, f"file://{tmp_path}/ref", "--json",
                                             "--pack-size", "4M", store=source.path).stdout)
    assert again["bytes_sent"] < full["bytes_sent"] - 3 * (4 << 20)
    # and the result is whole: a fresh store pulls and verifies it
    cli = Cli(tmp_path / "store")
    cli.ok("pull", IMAGE_V1, repo)
    assert cli.ok("verify").rc == 0


# --------------------------------------------------------------------------- corrupt and malformed data


def _flip_in_a_pack(directory: Path, remote: RemoteStore, digest: bytes) -> str:
    """Flip one payload byte of the block holding *digest* in the remote's directory; its blob."""
    loc = remote.locate(digest)
    assert loc is not None
    path = directory / "blobs/sha256" / loc.blob.split(":")[1]
    offset = loc.header + loc.record_length - loc.stored // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    return loc.blob


def test_corrupt_block_is_refetched_from_the_mirror_then_reported(source: SourceStore,
                                                                 file_remote: tuple[Path, dict, dict],
                                                                 tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    directory, _v1, _v2 = file_remote
    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    src = LocalStore(source.path)
    _root, want = digests_of(src, IMAGE_V1)
    chunk = next(d for d in sorted(want) if src.object_type(d) == 0)
    probe = remote_store(f"file://{bad}")
    probe.resolve(IMAGE_V1)
    blob = _flip_in_a_pack(bad, probe, chunk)
    # which member the flipped byte damaged (the whole block, if it no longer decodes)
    loc = probe.locate(chunk)
    assert loc is not None
    try:
        block = probe.fetch_blocks([loc])[loc.block]
    except CorruptObjectError:
        pass
    else:
        chunk = next(d for d, _t, _i, _n in block.members if block.member(d) is None)
    probe.close()

    # the bad copy first, the good one as its mirror: the read succeeds, the switch is logged
    spec = RemoteSpec(name="origin", urls=(f"file://{bad}", f"file://{directory}"))
    local = LocalStore(tmp_path / "s1", create=True)
    cached = CachedStore(local, [spec.open(tmp_path / "s1" / "remote")])
    try:
        with caplog.at_level(logging.WARNING):
            cached.resolve(IMAGE_V1)
            assert cached.get(chunk) == src.get(chunk)
        assert any(blob in r.getMessage() and "fetching it again" in r.getMessage() for r in caplog.records)
        assert cached.counters()["remotes"][0]["corrupt"] >= 1
    finally:
        cached.close()

    # alone, the bad copy is an error naming the remote and the blob, never wrong bytes
    local = LocalStore(tmp_path / "s2", create=True)
    cached = CachedStore(local, [remote_store(f"file://{bad}", tmp_path / "s2" / "remote")])
    try:
        cached.resolve(IMAGE_V1)
        with pytest.raises(CorruptObjectError) as info:
            cached.get(chunk)
        assert f"file://{bad}: blob {blob}" in str(info.value)
        cached.commit()
        assert not local.contains(chunk)  # a bad block never enters the cache
        assert not verify(local, None).problems
    finally:
        cached.close()
        src.close()


def test_malformed_remote_objects_are_errors_naming_them(source: SourceStore, file_remote: tuple[Path, dict, dict],
                                                         tmp_path: Path) -> None:
    directory, _v1, _v2 = file_remote
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    tag = broken / "tags" / ref_tag("example.org/debian-image", "1")
    cli = Cli(tmp_path / "store")
    tag.write_bytes(b'{"schemaVersion": 2, "oops": ')
    result = cli("ls", "--remote", f"file://{broken}", IMAGE_V1, "/")
    assert result.rc == 1 and "Traceback" not in result.stderr
    assert f"file://{broken}: tag {IMAGE_V1}: not a cnpsfs image manifest: not JSON" in result.stderr
    # a manifest whose index blob's bytes are not what it says
    good = decode_manifest((directory / "tags" / ref_tag("example.org/debian-image", "1")).read_bytes(), "m")
    shutil.copy(directory / "tags" / ref_tag("example.org/debian-image", "1"), tag)
    index_file = broken / "blobs/sha256" / good.index.digest.split(":")[1]
    index_file.write_bytes(b"\0" + index_file.read_bytes()[1:])
    result = cli("ls", "--remote", f"file://{broken}", IMAGE_V1, "/")
    assert result.rc == 1 and "Traceback" not in result.stderr
    assert good.index.digest in result.stderr and "does not match its digest" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("ls", "--remote", f"file://{empty}", IMAGE_V1, "/")
    assert result.rc == 1 and "not a cnpsfs remote" in result.stderr
    result = cli("ls", "--remote", f"file://{directory}", "example.org/debian-image@9", "/")
    assert result.rc == 1 and "no such tag" in result.stderr


# --------------------------------------------------------------------------- HTTP faults


@pytest.fixture(scope="module")
def served(file_remote: tuple[Path, dict, dict], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = start_nginx(file_remote[0], tmp_path_factory.mktemp("nginx"), server_conf=NGINX_REMOTE_CONF)
    try:
        yield server.url
    finally:
        server.stop()


def test_nginx_serves_the_layout_with_cache_headers(served: str) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{served}/cnpsfs-remote", timeout=10) as resp:
        assert resp.read() == b"cnpsfs remote layout 1\n"
    tag = ref_tag("example.org/debian-image", "1")
    with urllib.request.urlopen(f"{served}/tags/{tag}", timeout=10) as resp:
        assert resp.headers["Cache-Control"] == "public, max-age=10"
        manifest = decode_manifest(resp.read(), "t")
    req = urllib.request.Request(f"{served}/blobs/sha256/{manifest.index.digest.split(':')[1]}",
                                 headers={"Range": "bytes=0-9"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 206 and len(resp.read()) == 10
        assert "immutable" in resp.headers["Cache-Control"]


@pytest.mark.parametrize("fault", [
    dict(action="ignore_range", times=None),        # a 200 with the whole blob instead of a 206
    dict(action="truncate", at=1000, times=2),      # connection closed mid-body: retried
    dict(action="status", status=503, headers={"Retry-After": "1"}, times=2),
    dict(action="reset", times=2),
    dict(action="flip", at=300, times=1),           # a wrong byte: the block is fetched again
])
def test_faults_on_block_reads_still_give_the_right_bytes(source: SourceStore, served: str,
                                                          fault_proxy: type[FaultProxy], tmp_path: Path,
                                                          fault: dict) -> None:
    proxy = fault_proxy(served)
    src = LocalStore(source.path)
    local = LocalStore(tmp_path / "store", create=True)
    cached = CachedStore(local, [remote_store(proxy.url, tmp_path / "store" / "remote", timeout=20.0)])
    try:
        cached.resolve(IMAGE_V1)
        _root, want = digests_of(src, IMAGE_V1)
        chunks = sorted(d for d in want if src.object_type(d) == 0)[:40]
        proxy.add(path=r"^/blobs/", **fault)
        for digest in chunks:
            assert cached.get(digest) == src.get(digest)
        assert proxy.faults[0].hits >= 1, "the fault never fired"
    finally:
        cached.close()
        src.close()


def test_a_stalled_server_is_unavailable_within_the_timeout(source: SourceStore, served: str,
                                                           fault_proxy: type[FaultProxy], tmp_path: Path) -> None:
    proxy = fault_proxy(served)
    src = LocalStore(source.path)
    local = LocalStore(tmp_path / "store", create=True)
    cached = CachedStore(local, [remote_store(proxy.url, tmp_path / "store" / "remote", timeout=2.0)])
    try:
        cached.resolve(IMAGE_V1)
        _root, want = digests_of(src, IMAGE_V1)
        chunk = next(d for d in sorted(want) if src.object_type(d) == 0)
        proxy.add("stall", path=r"^/blobs/", seconds=30, times=None)
        start = time.monotonic()
        with pytest.raises(UnavailableError) as info:
            cached.get(chunk)
        assert time.monotonic() - start < 4.0
        assert proxy.url in str(info.value) and "blob sha256:" in str(info.value)
        # While the mirror is down, further reads fail at once instead of each waiting out the timeout.
        start = time.monotonic()
        with pytest.raises(UnavailableError):
            cached.get(chunk)
        assert time.monotonic() - start < 0.5
        proxy.clear()
        deadline = time.monotonic() + 10  # and it recovers by itself
        while True:
            try:
                assert cached.get(chunk) == src.get(chunk)
                break
            except UnavailableError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        cached.close()
        src.close()


# --------------------------------------------------------------------------- what is fetched, what is kept


def test_resolving_preloads_every_shard_and_directory_in_a_few_round_trips(source: SourceStore, served: str,
                                                                          fault_proxy: type[FaultProxy],
                                                                          tmp_path: Path) -> None:
    """A lazy mount's critical path: the marker and the tag at once, the index, every shard at
    once, every metadata block at once (merged ranges); after that, a walk of the whole tree
    (every directory, every file's extents) makes no request at all."""
    from cnpsfs.image.walk import walk
    from cnpsfs.store.remote import merge_runs

    proxy = fault_proxy(served)
    proxy.request_delay = 0.02  # 20 ms a request: what serial round trips would cost shows
    local = LocalStore(tmp_path / "store", create=True)
    remote = remote_store(proxy.url, tmp_path / "store" / "remote")
    cached = CachedStore(local, [remote])
    try:
        start = time.monotonic()
        root = cached.resolve(IMAGE_V2)
        assert cached.resolve(IMAGE_V2) == root  # a command resolves twice: the tag is asked once
        seconds = time.monotonic() - start
        index = remote.open_image(root)
        shards = [s.blob.digest for s in (*index.root.object_shards, *index.root.chunk_shards)]
        meta = index.preload()
        log = list(proxy.log)
        gets = [(path, rng) for method, path, _status, rng in log if method == "GET"]
        assert sum(1 for path, _r in gets if path.startswith("/tags/")) == 1, gets
        for digest in shards:  # every shard, once
            assert sum(1 for path, _r in gets if path.endswith(digest.split(":")[1])) == 1
        ranges = [rng for _p, rng in gets if rng]
        # One request per merged run of metadata blocks, no more (how many runs there are
        # depends on where the source's parallel import put its metadata blocks in packs).
        assert meta and len(ranges) == len(merge_runs(meta)) <= len(meta), ranges
        assert cached.counters()["cache"]["preloaded_blocks"] == len(meta)
        # marker+tag, index, shards, metadata: four rounds, the requests of each at once
        assert proxy.max_in_flight >= 2
        print(f"resolve with preload: {len(log)} requests in {seconds:.2f} s at 20 ms a request")
        before = len(proxy.log)
        image = cached.get_image(root)
        fileset = cached.get_fileset(image.layers[0].fileset)
        entries = 0
        for _path, entry, _is_dir in walk(cached, fileset.root):
            if entry.kind is fmt.Kind.FILE:
                cached.file_extents(entry)
            entries += 1
        assert entries > 1000
        assert len(proxy.log) == before, proxy.log[before:before + 5]  # everything came with the preload
    finally:
        cached.close()


def test_a_lookup_begun_ahead_is_taken_by_resolve_without_asking_again(source: SourceStore, served: str,
                                                                        fault_proxy: type[FaultProxy],
                                                                        tmp_path: Path) -> None:
    """What ``cnpsfs mount --remote`` does before its imports: resolve_ahead returns at once
    while the tag, the index, the shards and the meta-ranges come in on a thread; resolve
    then takes that answer, with no request and no round trip of its own. A failure there
    is resolve's; a tag the local store has asks nothing; close waits for the thread."""
    delay = 0.3
    proxy = fault_proxy(served)
    proxy.request_delay = delay
    local = LocalStore(tmp_path / "store", create=True)
    remote = remote_store(proxy.url, tmp_path / "store" / "remote")
    cached = CachedStore(local, [remote])
    try:
        start = time.monotonic()
        cached.resolve_ahead(IMAGE_V2)
        assert time.monotonic() - start < delay  # nothing waited for
        deadline = time.monotonic() + 30
        # The lookup's thread ends with the index; the shards and meta-ranges it sent beside it
        # are answered by then or soon after.
        while (any(t.name == "cnpsfs-resolve" for t in threading.enumerate()) or proxy.in_flight) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        served_ahead = len(proxy.log)
        assert served_ahead >= 3, proxy.log  # the tag, the index, the shards (and the meta-ranges)
        start = time.monotonic()
        root = cached.resolve(IMAGE_V2)
        assert time.monotonic() - start < delay, "resolve waited for a round trip"
        cached.get_image(root)  # in the cache: its block came with the meta-ranges
        assert len(proxy.log) == served_ahead, proxy.log[served_ahead:]
        whole = [path for method, path, _status, rng in proxy.log if method == "GET" and not rng]
        assert len(whole) == len(set(whole)), whole  # the tag and each index blob once

        cached.resolve_ahead("example.org/nothing@1")  # a failure is resolve's, as it would have been
        with pytest.raises(NotFoundError, match=r"example\.org/nothing@1"):
            cached.resolve("example.org/nothing@1")

        before = len(proxy.log)
        local.set_tag("example.org/here", "1", T_IMAGE, root)
        cached.resolve_ahead("example.org/here@1")  # the local store has it: nothing asked
        assert cached.resolve("example.org/here@1") == root
        assert len(proxy.log) == before

        cached.resolve_ahead(IMAGE_V1)  # never taken: close waits for it
    finally:
        cached.close()
    assert not any(t.name == "cnpsfs-resolve" for t in threading.enumerate())


def test_closing_fails_fetches_still_queued(source: SourceStore, served: str, fault_proxy: type[FaultProxy],
                                            tmp_path: Path) -> None:
    """A store is closed before the daemon forks: a fetch its pool never ran must fail, not hang."""
    proxy = fault_proxy(served)
    local = LocalStore(tmp_path / "store", create=True)
    remote = remote_store(proxy.url, tmp_path / "store" / "remote", timeout=2.0, parallel=1)
    cached = CachedStore(local, [remote])
    cached.resolve(IMAGE_V2)
    index = remote.open_image(cached.resolve(IMAGE_V2))
    blocks = {}
    for number in range(len(index.root.chunk_shards)):
        for digest, row in index._shard(True, number):
            loc = index.location(digest, *row)
            blocks.setdefault(loc.blob, loc)  # one block in each blob: runs that cannot merge
    assert len(blocks) >= 2
    proxy.add("stall", path=r"^/blobs/", seconds=5, times=None)
    cached.prefetch(list(blocks.values()))
    futures = list(cached._inflight.values())
    assert len(futures) == len(blocks)
    start = time.monotonic()
    cached.close()
    assert time.monotonic() - start < 5
    assert all(f.done() and isinstance(f.exception(), UnavailableError) for f in futures)
    assert not cached._inflight


def test_preload_respects_its_budgets(source: SourceStore, file_remote: tuple[Path, dict, dict]) -> None:
    directory, _v1, _v2 = file_remote
    remote = remote_store(f"file://{directory}")
    try:
        index = remote.open_image(remote.resolve(IMAGE_V2))
        assert index.preload(shards_max=0, meta_max=0) == []  # metadata over budget: none named
        assert len(index._shards) == len(index.root.object_shards)  # object shards always, chunk shards not
        metas = index.preload()
        assert len(index._shards) == len(index.root.object_shards) + len(index.root.chunk_shards)
        assert {loc.type for loc in metas} <= {1, 2, 3, 4, 5, 6, 7}  # each names an object in a metadata block
        assert len({loc.block for loc in metas}) == len(metas)
    finally:
        remote.close()


def test_reading_one_file_fetches_only_its_blocks(source: SourceStore, file_remote: tuple[Path, dict, dict],
                                                   tmp_path: Path) -> None:
    from cnpsfs.image.manifest import compose

    directory, _v1, _v2 = file_remote
    local = LocalStore(tmp_path / "store", create=True)
    remote = remote_store(f"file://{directory}", tmp_path / "store" / "remote")
    cached = CachedStore(local, [remote])
    try:
        root = cached.resolve(IMAGE_V2)
        generation = compose(cached, cached.get_image(root))
        node = generation.resolve("/usr/bin/python3.11")
        extents = cached.file_extents(node.entry)
        before = remote.counters().get("blocks", 0)
        chunks = {e.digest for e in extents if e.digest is not None}
        for digest in chunks:
            cached.get(digest)
        fetched = remote.counters()["blocks"] - before
        blocks = {remote.locate(d).block for d in chunks}  # type: ignore[union-attr]
        assert fetched == len(blocks) > 3  # each block once, nothing else
        # a remount (a new cached store over the same local store) reads them locally
        cached.close()
        again = CachedStore(LocalStore(tmp_path / "store"), [remote_store(f"file://{directory}")])
        again.resolve(IMAGE_V2)
        for digest in chunks:
            again.get(digest)
        assert again.counters()["remotes"][0].get("blocks", 0) == 0
        again.close()
    finally:
        cached.close()


def test_cache_bound_evicts_lru_but_never_tagged_or_recent(source: SourceStore,
                                                           file_remote: tuple[Path, dict, dict],
                                                           tmp_path: Path) -> None:
    directory, _v1, _v2 = file_remote
    local = LocalStore(tmp_path / "store", create=True)
    cached = CachedStore(local, [remote_store(f"file://{directory}", tmp_path / "store" / "remote")])
    try:
        root, want = digests_of(cached, IMAGE_V1)
        for digest in want:
            cached.get(digest)
        cached.commit()
        total = cache_summary(local)["bytes"]
        assert total > 50 << 20
        # read just now: pinned (the working set of a mount)
        assert evict(local, 10 << 20) == 0
        # an hour later, a local tag reaching them still pins them
        local.index.db.execute("UPDATE cache_packs SET last_used_ns=?", (time.time_ns() - 3600 * 10**9,))
        local.set_tag("example.org/pinned", "1", 4, root)
        assert evict(local, 0, to=0.0) == 0
        local.remove_tag("example.org/pinned", "1")
        freed = evict(local, 20 << 20)
        left = cache_summary(local)["bytes"]
        assert freed > 0 and left <= 0.9 * (20 << 20) and left + freed == total
        # what is gone is fetched again on need, the rest still reads locally
        for digest in want:
            assert cached.get(digest)
        # gc keeps cache packs: they are refetchable, not garbage
        report = gc(local)
        assert report.cache_packs > 0 and report.removed_objects == 0
        assert not verify(local, None).problems
    finally:
        cached.close()


def test_unreachable_remote_fails_fast_and_clearly(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = Cli(tmp_path / "store")
    start = time.monotonic()
    result = cli("ls", "--remote", f"http://127.0.0.1:{port}/x", "--remote-timeout", "3", IMAGE_V1, "/")
    assert result.rc == 1 and time.monotonic() - start < 10
    assert f"http://127.0.0.1:{port}/x" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(NotFoundError):
        LocalStore(tmp_path / "store").resolve(IMAGE_V1)


@pytest.mark.parametrize("value", ["inf", "nan", "0", "7200"])
def test_remote_timeout_must_be_a_bounded_number(tmp_path: Path, value: str) -> None:
    """A read may not wait forever: --remote-timeout is a usage error unless 0.1 to 3600 s."""
    result = Cli(tmp_path / "store")("ls", "--remote", "file:///nonexistent", "--remote-timeout", value, IMAGE_V1, "/")
    assert result.rc == 2 and "--remote-timeout" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- signatures travel with the image


def test_signatures_are_pushed_and_pulled_with_the_image(tmp_path: Path) -> None:
    src = Cli(tmp_path / "src")
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").write_text("ID=test\n")
    src.ok("import", "dir", tree, "--name", "example.org/files", "--version", "1")
    for name in ("signed", "unsigned"):
        (tmp_path / f"{name}.toml").write_text(f'name = "example.org/{name}"\nversion = "1"\n'
                                               '[[layers]]\nfileset = "example.org/files@1"\n')
        src.ok("image", "create", tmp_path / f"{name}.toml")
    src.ok("key", "generate", tmp_path / "k")
    src.ok("sign", "example.org/signed@1", "--key", tmp_path / "k.key")
    policy = tmp_path / "policy.toml"
    policy.write_text(f'default = "reject"\n[[rule]]\nnames = "example.org/*"\nrequire = "signed"\n'
                      f'keys = ["{tmp_path}/k.pub"]\n')
    remote = f"file://{tmp_path}/remote"
    for name in ("signed", "unsigned"):
        src.ok("push", f"example.org/{name}@1", remote)

    dst = Cli(tmp_path / "dst")
    dst.ok("--policy", policy, "pull", "example.org/signed@1", remote)  # accepted: the signature came along
    refused = dst("--policy", policy, "pull", "example.org/unsigned@1", remote)
    assert refused.rc == 1 and len(refused.stderr.strip().splitlines()) == 1, refused
    assert "example.org/unsigned@1" not in dst.ok("tag", "list").stdout  # refused: not tagged

    # signed after it was pushed: the next push carries the signature
    src.ok("sign", "example.org/unsigned@1", "--key", tmp_path / "k.key")
    again = json.loads(src.ok("push", "example.org/unsigned@1", remote, "--json").stdout)
    assert again["members_sent"] >= 1, again  # the signature object
    dst.ok("--policy", policy, "pull", "example.org/unsigned@1", remote)
    assert "example.org/unsigned@1" in dst.ok("tag", "list").stdout
    assert dst.ok("verify").rc == 0


def test_push_can_reblock_into_smaller_blocks(source: SourceStore, tmp_path: Path) -> None:
    directory = tmp_path / "small-blocks"
    report = push_cli(source, IMAGE_V1, f"file://{directory}", "--block-size", "256K")
    assert report["members_sent"] > 3000
    remote = remote_store(f"file://{directory}")
    try:
        index = remote.open_image(remote.resolve(IMAGE_V1))
        assert max(b.raw for b in index.root.blocks) < (256 << 10) + (256 << 10)  # target plus one member
        assert len(index.root.blocks) > 300  # the store's 1 MiB blocks cut about four ways
    finally:
        remote.close()
    cli = Cli(tmp_path / "store")
    cli.ok("pull", IMAGE_V1, f"file://{directory}")
    assert cli.ok("verify").rc == 0
    src = LocalStore(source.path)
    dst = LocalStore(tmp_path / "store")
    try:
        _root, want = digests_of(src, IMAGE_V1)
        assert all(dst.get(d) == src.get(d) for d in sorted(want)[:500])
    finally:
        src.close()
        dst.close()
