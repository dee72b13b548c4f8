"""The remote read-ahead (docs/remote.md, "What a lazy mount does"), against nginx on loopback
through the tests' proxy: a missed small-file block comes with the blocks around it in the
same Range request, a corrupt neighbour never yields wrong bytes nor enters the cache, a
block read ahead is not fetched twice, and ``read-ahead = 0`` turns it off.

The image is a synthetic tree of small incompressible files, so its small-file stream fills
a run of hot 256 KiB blocks (docs/format.md 2.1) back to back in one pack blob.
"""

from __future__ import annotations

import itertools
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cnpsfs_testlib import Cli
from remoteutil import NGINX_REMOTE_CONF
from servers import FaultProxy, start_nginx

from cnpsfs.errors import CorruptObjectError, UsageError
from cnpsfs.store import LocalStore
from cnpsfs.store.cached import CachedStore
from cnpsfs.store.maintenance import reachable, verify
from cnpsfs.store.remote import DEFAULT_READ_AHEAD, RemoteLocation, RemoteStore
from cnpsfs.store.remoteconf import RemoteSpec, load_remotes

pytestmark = pytest.mark.timeout(300)

REF = "example.org/small@1"


@dataclass
class Pushed:
    source: Path  # the local store the tree was imported into
    remote: Path  # the file:// remote's directory
    url: str  # nginx serving it


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    top = tmp_path_factory.mktemp("readahead")
    tree = top / "tree"
    rng = random.Random(12)
    for n in range(360):  # 360 x 6000 bytes: a 2.1 MB small-file stream, about 8 hot blocks
        path = tree / f"d{n // 40:02d}" / f"f{n:04d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(6000))
    cli = Cli(top / "source")
    cli.ok("import", "dir", tree, "--name", "example.org/small", "--version", "1")
    cli.ok("push", REF, f"file://{top / 'remote'}")
    server = start_nginx(top / "remote", top / "nginx", server_conf=NGINX_REMOTE_CONF)
    try:
        yield Pushed(top / "source", top / "remote", server.url)
    finally:
        server.stop()


def open_cached(tmp: Path, url: str, **kw: object) -> tuple[CachedStore, RemoteStore]:
    remote = RemoteSpec(name=url, urls=(url,), **kw).open(tmp / "store" / "remote")  # type: ignore[arg-type]
    return CachedStore(LocalStore(tmp / "store", create=True), [remote]), remote


def hot_blocks(cached: CachedStore, remote: RemoteStore, source: LocalStore) -> list[tuple[RemoteLocation, bytes]]:
    """The image's chunk blocks in one blob, in offset order: (a location, a chunk in it) each."""
    root = cached.resolve(REF)
    blocks: dict[tuple[str, int], tuple[RemoteLocation, bytes]] = {}
    for digest in reachable(source, [root]):
        if source.object_type(digest) == 0:
            loc = remote.locate(digest)
            assert loc is not None
            blocks.setdefault(loc.block, (loc, digest))
    by_blob: dict[str, list[tuple[RemoteLocation, bytes]]] = {}
    for loc, digest in blocks.values():
        by_blob.setdefault(loc.blob, []).append((loc, digest))
    run = max(by_blob.values(), key=len)
    run.sort(key=lambda item: item[0].header)
    assert len(run) >= 5 and all(loc.raw <= DEFAULT_READ_AHEAD for loc, _d in run), "expected small hot blocks"
    return run


def wait_for(check: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def block_gets(proxy: FaultProxy) -> list[str | None]:
    """The ranges of the blob requests the proxy served."""
    return [rng for method, path, _status, rng in proxy.log if method == "GET" and path.startswith("/blobs/")]


def test_a_miss_fetches_the_blocks_around_it_in_the_same_request(pushed: Pushed, tmp_path: Path,
                                                                 fault_proxy: Callable[[str], FaultProxy]) -> None:
    proxy = fault_proxy(pushed.url)
    source = LocalStore(pushed.source)
    cached, remote = open_cached(tmp_path, proxy.url)
    try:
        run = hot_blocks(cached, remote, source)
        middle = len(run) // 2
        loc, digest = run[middle]
        proxy.clear()
        blocks = remote.counters()["blocks"]  # the image's metadata, fetched by resolve
        assert cached.get(digest) == source.get(digest)
        # one request brought the block and its neighbours on both sides, back to back
        ahead = cached.counters()["cache"]["read_ahead_blocks"]
        assert ahead >= 2 and wait_for(lambda: remote.counters()["blocks"] == blocks + 1 + ahead)
        assert len(block_gets(proxy)) == 1
        before, after = run[middle - 1], run[middle + 1]
        assert before[0].header + before[0].record_length == loc.header
        assert loc.header + loc.record_length == after[0].header
        (rng,) = block_gets(proxy)
        assert rng is not None
        first, last = (int(x) for x in rng.removeprefix("bytes=").split("-"))
        assert first <= before[0].header and last >= after[0].header + after[0].record_length - 1
        # the neighbours are served from what was read ahead: no request, the right bytes
        proxy.clear()
        for _loc, neighbour in (before, after):
            assert cached.get(neighbour) == source.get(neighbour)
        assert cached.counters()["cache"]["read_ahead_used"] == 2
        # a reader that reached a block read ahead after the miss reads on past it, in one request
        assert len(block_gets(proxy)) <= 1
        cached.commit()
        assert not verify(cached.local, None).problems
    finally:
        cached.close()
        source.close()


def test_a_block_read_ahead_is_fetched_once_however_many_want_it(pushed: Pushed, tmp_path: Path,
                                                                 fault_proxy: Callable[[str], FaultProxy]) -> None:
    proxy = fault_proxy(pushed.url)
    source = LocalStore(pushed.source)
    cached, remote = open_cached(tmp_path, proxy.url)
    try:
        run = hot_blocks(cached, remote, source)
        (_l, wanted), (_n, neighbour) = run[1], run[2]
        proxy.clear()
        blocks = remote.counters()["blocks"]
        proxy.request_delay = 0.5
        results: dict[str, bytes] = {}
        first = threading.Thread(target=lambda: results.setdefault("wanted", cached.get(wanted)))
        first.start()
        # the neighbour's fetch is under way (read ahead with the wanted block): join it
        assert wait_for(lambda: bool(cached.counters()["cache"].get("read_ahead_blocks")))
        results["neighbour"] = cached.get(neighbour)
        first.join(30)
        assert results == {"wanted": source.get(wanted), "neighbour": source.get(neighbour)}
        # ... and on from it (a reader reached a block read ahead): then every block came once
        assert wait_for(lambda: not cached._inflight)
        assert remote.counters()["blocks"] == blocks + 1 + cached.counters()["cache"]["read_ahead_blocks"]
        spans = sorted(tuple(int(x) for x in (r or "").removeprefix("bytes=").split("-")) for r in block_gets(proxy))
        assert 1 <= len(spans) <= 2 and all(a[1] < b[0] for a, b in itertools.pairwise(spans))
    finally:
        cached.close()
        source.close()


def _flip(directory: Path, loc: RemoteLocation) -> None:
    """Flip one payload byte of the block at *loc* in the remote's directory."""
    path = directory / "blobs/sha256" / loc.blob.split(":")[1]
    offset = loc.header + loc.record_length - loc.stored // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_corrupt_neighbour_is_dropped_never_served_nor_cached(pushed: Pushed, tmp_path: Path,
                                                                 fault_proxy: Callable[[str], FaultProxy]) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(pushed.remote, bad)
    server = start_nginx(bad, tmp_path / "nginx", server_conf=NGINX_REMOTE_CONF)
    proxy = fault_proxy(server.url)
    source = LocalStore(pushed.source)
    cached, remote = open_cached(tmp_path, proxy.url)
    try:
        run = hot_blocks(cached, remote, source)
        (_loc, wanted), (after, _neighbour) = run[2], run[3]
        _flip(bad, after)
        probe = RemoteSpec(name="probe", urls=(server.url,)).open()
        probe.resolve(REF)
        try:  # which member of the neighbour the flipped byte damaged (every one, if it no longer decodes)
            block = probe.fetch_blocks([after])[after.block]
        except CorruptObjectError:
            members, neighbour = [], _neighbour
        else:
            members = [d for d, _t, _i, _n in block.members]
            neighbour = next(d for d in members if block.member(d) is None)
        probe.close()
        proxy.clear()
        assert cached.get(wanted) == source.get(wanted)  # the wanted read succeeds
        # the neighbours are checked after the wanted block was handed out
        assert wait_for(lambda: cached.counters()["remotes"][0]["corrupt"] >= 1)
        assert len(block_gets(proxy)) == 1  # the bad neighbour was not fetched again as advice
        cached.commit()
        assert cached.local.contains(wanted)
        assert not any(cached.local.contains(d) for d in [*members, neighbour])  # the neighbour is not cached
        # a reader of the neighbour fetches it in earnest: once more, then an error naming it
        with pytest.raises(CorruptObjectError) as info:
            cached.get(neighbour)
        assert after.blob in str(info.value)
        cached.commit()
        assert not cached.local.contains(neighbour)
        assert not verify(cached.local, None).problems
    finally:
        cached.close()
        source.close()
        server.stop()


def test_read_ahead_zero_turns_it_off(pushed: Pushed, tmp_path: Path,
                                      fault_proxy: Callable[[str], FaultProxy]) -> None:
    proxy = fault_proxy(pushed.url)
    source = LocalStore(pushed.source)
    cached, remote = open_cached(tmp_path, proxy.url, read_ahead=0)
    try:
        run = hot_blocks(cached, remote, source)
        proxy.clear()
        blocks = remote.counters()["blocks"]
        for _loc, digest in run[1:4]:
            assert cached.get(digest) == source.get(digest)
        assert len(block_gets(proxy)) == 3
        counters = cached.counters()
        assert counters["remotes"][0]["blocks"] == blocks + 3 and not counters["cache"].get("read_ahead_blocks")
    finally:
        cached.close()
        source.close()


def test_a_bounded_cache_bounds_the_read_ahead(pushed: Pushed, tmp_path: Path) -> None:
    source = LocalStore(pushed.source)
    remote = RemoteSpec(name="r", urls=(pushed.url,)).open(tmp_path / "store" / "remote")
    # 1/8 of a 2 MiB cache is 256 KiB: smaller than a hot block, so nothing is read ahead
    cached = CachedStore(LocalStore(tmp_path / "store", create=True), [remote], cache_size=2 << 20)
    try:
        run = hot_blocks(cached, remote, source)
        blocks = remote.counters()["blocks"]
        assert cached.get(run[2][1]) == source.get(run[2][1])
        time.sleep(0.3)  # (a neighbour read ahead would be counted once checked)
        assert remote.counters()["blocks"] == blocks + 1 and not cached.counters()["cache"].get("read_ahead_blocks")
    finally:
        cached.close()
        source.close()


@pytest.mark.parametrize(("text", "expected"), [
    ("0", 0), ("786432", 786432), ('"1M"', 1 << 20), ('"768K"', 768 << 10),
    ('"-1K"', "negative"), ("-5", "read-ahead must be 0 to 16 MiB"), ('"lots"', "bad size"),
    ('"64M"', "read-ahead must be 0 to 16 MiB"), ("true", "wrong type"), ("1.5", "wrong type"),
])
def test_read_ahead_setting_in_remotes_toml(tmp_path: Path, text: str, expected: int | str) -> None:
    conf = tmp_path / "remotes.toml"
    conf.write_text(f'[remotes.origin]\nurl = "file:///srv/x"\nread-ahead = {text}\n')
    if isinstance(expected, int):
        spec = load_remotes([conf])["origin"]
        assert spec.read_ahead == expected and spec.open().read_ahead == expected
    else:
        with pytest.raises(UsageError) as info:
            load_remotes([conf])
        assert f"{conf}: remote origin" in str(info.value) and expected in str(info.value)


def test_read_ahead_default(tmp_path: Path) -> None:
    conf = tmp_path / "remotes.toml"
    conf.write_text('[remotes.origin]\nurl = "file:///srv/x"\n')
    assert load_remotes([conf])["origin"].read_ahead == DEFAULT_READ_AHEAD == 512 << 10
