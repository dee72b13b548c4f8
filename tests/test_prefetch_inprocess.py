"""Profile recording and prefetch in-process: the FUSE handlers and the prefetcher under
``trio.run`` over a real LocalStore, no root or FUSE (the world of test_ops_inprocess.py).

What is checked: a recording lists what the handlers served, by path and in order, with
ranges merged and bounded; a replay on a fresh mount loads exactly those chunks, so the
same reads then need no load of their own (and count as hits); demand goes first; a
profile of another image, a wrong one, one that outgrows its budget and one cut short by
a swap cost nothing but time; pages pushed into the kernel are exactly the file's bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing
from test_ops_inprocess import (
    CTX,
    FakeKernel,
    World,
    base_files,
    big,
    image_of,
    import_tree,
    lib_files,
    list_dir,
    lookup_path,
    read,
    read_all,
    run,
    swapper,
    with_extras,
    write_tree,
)

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError
from cnpsfs.fs.operations import Kernel, Operations
from cnpsfs.fs.prefetch import Prefetcher
from cnpsfs.fs.recorder import FILE_RANGES_MAX, ProfileRecorder
from cnpsfs.image.manifest import compose
from cnpsfs.image.view import Generation
from cnpsfs.store import LocalStore

IMAGE = bytes(range(32))
TOOL = big(1, 1_300_000)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """test_ops_inprocess's world: a base layer and two versions of a library layer."""
    store = LocalStore(tmp_path / "store", create=True)
    base = import_tree(store, with_extras(write_tree(tmp_path / "base", base_files())), "example.org/base")
    libs = [import_tree(store, write_tree(tmp_path / f"lib{v}", lib_files(v)), f"example.org/lib{v}") for v in (1, 2)]
    try:
        yield World(store, tmp_path / "base", image_of(base, libs[0]), image_of(base, libs[1], version="2"))
    finally:
        store.close()


@dataclass
class PushKernel(FakeKernel):
    """A FakeKernel that also keeps the pages a prefetch stores (notify_store)."""

    pages: dict[int, dict[int, bytes]] = field(default_factory=dict)

    def seam(self) -> Kernel:
        base = super().seam()
        return Kernel(readdir_reply=base.readdir_reply, invalidate_entry=base.invalidate_entry,
                      invalidate_inode=base.invalidate_inode,
                      notify_store=lambda ino, off, data: self.pages.setdefault(ino, {}).__setitem__(off, data))


def ops_for(generation: Generation, kernel: FakeKernel | None = None, cache_mib: int = 16) -> Callable[[], Operations]:
    return lambda: Operations(generation, cache_bytes=cache_mib << 20, threads=2,
                              kernel=(kernel or FakeKernel()).seam())


async def workload(ops: Operations) -> dict[str, bytes]:
    """What the "program" does: a few lookups, a listing, whole and partial reads."""
    out = {}
    hostname = await lookup_path(ops, "etc/hostname")
    out["etc/hostname"] = await read_all(ops, hostname.st_ino, hostname.st_size)
    doc = await lookup_path(ops, "usr/share/doc")
    await list_dir(ops, doc.st_ino)
    tool = await lookup_path(ops, "usr/bin/tool")
    out["tool-head"] = await read(ops, tool.st_ino, 0, 256 << 10)
    out["tool-mid"] = await read(ops, tool.st_ino, 640 << 10, 128 << 10)
    lib = await lookup_path(ops, "usr/lib/libbig.so")
    out["libbig"] = await read_all(ops, lib.st_ino, lib.st_size)
    await ops.lookup((await lookup_path(ops, "etc")).st_ino, b"not-there", CTX)
    link = await lookup_path(ops, "usr/lib/libx.so.1")  # looked up, not read: a symlink
    out["link"] = await ops.readlink(link.st_ino, CTX)
    return out


def record(world: World, image: fmt.Image | None = None) -> tuple[fmt.Profile, dict[str, bytes]]:
    got: dict[str, bytes] = {}
    profile: list[fmt.Profile] = []

    async def test(ops: Operations) -> None:
        ops.recorder = ProfileRecorder(generation=ops.generation.number, image=IMAGE)
        got.update(await workload(ops))
        profile.append(ops.recorder.profile("default", image=IMAGE, created_ns=1))

    run(ops_for(compose(world.store, image or world.v1)), test)
    return profile[0], got


def test_a_recording_lists_what_was_served_in_order(world: World) -> None:
    profile, got = record(world)
    assert got["tool-head"] == TOOL[: 256 << 10] and got["tool-mid"] == TOOL[640 << 10 : 768 << 10]
    by_path = {e.path: e for e in profile.entries}
    order = [e.path for e in profile.entries]
    # First-access order: the root, then etc and the file read in it, then the rest.
    assert order[:3] == [b"", b"etc", b"etc/hostname"]
    assert order.index(b"usr/share/doc") < order.index(b"usr/bin/tool") < order.index(b"usr/lib/libbig.so")
    assert by_path[b"usr/share/doc"].touch is fmt.Touch.LISTED
    assert by_path[b"usr/bin"].touch is fmt.Touch.DIR
    # Ranges clipped to the file size and merged (the read-all loop reads past the end).
    assert by_path[b"etc/hostname"].ranges == (0, len(b"inprocess\n"))
    assert by_path[b"usr/bin/tool"].ranges == (0, 256 << 10, 640 << 10, 128 << 10)
    assert by_path[b"usr/lib/libbig.so"].ranges == (0, 300_000)
    # Names looked up and neither read nor listed: a symlink, and one that does not exist.
    assert by_path[b"etc/not-there"].touch is fmt.Touch.LOOKUP
    assert by_path[b"usr/lib/libx.so.1"].touch is fmt.Touch.LOOKUP
    assert order.index(b"etc/hostname") < order.index(b"etc/not-there")
    assert fmt.decode_profile(fmt.encode_profile(profile)) == profile


def test_a_recording_is_bounded(world: World) -> None:
    clock = iter(range(10**9))
    recorder = ProfileRecorder(generation=1, image=IMAGE, clock=lambda: float(next(clock)))
    for i in range(FILE_RANGES_MAX * 3):  # scattered reads of one file: merged, then coalesced
        recorder.read((b"big",), (i * 2) * 4096, 4096, 1 << 40)
    for i in range(fmt.PROFILE_MAX_ENTRIES + 10):
        recorder.directory((b"d", str(i).encode()))
    profile = recorder.profile("default", image=IMAGE)
    assert recorder.truncated
    assert len(profile.entries) == fmt.PROFILE_MAX_ENTRIES
    big_file = profile.entries[0]
    assert big_file.path == b"big" and len(big_file.ranges) // 2 <= FILE_RANGES_MAX
    spans = list(big_file.spans())
    for i in range(FILE_RANGES_MAX * 3):  # more data, never less: every range read is covered
        start = i * 2 * 4096
        assert any(o <= start and start + 4096 <= o + n for o, n in spans), start
    fmt.decode_profile(fmt.encode_profile(profile))  # within the format's limits


def replay(world: World, profile: fmt.Profile, image: fmt.Image | None = None, *,
           kernel: FakeKernel | None = None, budget: int | None = None,
           then: Callable[[Operations, Prefetcher], object] | None = None, push: bool = False) -> dict[str, object]:
    """A fresh mount (cold chunk cache) replays *profile* to the end, then runs the workload."""
    result: dict[str, object] = {}

    async def test(ops: Operations) -> None:
        prefetcher = Prefetcher(ops, ops.generation, profile, b"\1" * 32, budget_bytes=budget,
                                push_to="/nonexistent" if push else None)
        await prefetcher.run()
        result["prefetch"] = prefetcher.status()
        opens = ops.fetcher.opens
        result["got"] = await workload(ops)
        result["misses"] = ops.demand_misses
        result["hits"] = ops.prefetch_hits
        result["opens_after"] = ops.fetcher.opens - opens
        if then is not None:
            then(ops, prefetcher)

    run(ops_for(compose(world.store, image or world.v1), kernel), test)
    return result


def test_a_replay_loads_what_the_program_then_reads(world: World) -> None:
    profile, recorded = record(world)
    result = replay(world, profile)
    status = result["prefetch"]
    assert isinstance(status, dict)
    assert status["state"] == "done" and status["walked"] == len(profile.entries) and status["missing"] == 0
    assert status["chunks"] > 3 and status["bytes"] >= 300_000 + (384 << 10)
    assert result["got"] == recorded  # the same bytes as without a profile
    assert result["misses"] == 0 and result["opens_after"] == 0, "demand had to load chunks itself"
    assert result["hits"] == status["chunks"]


def test_without_a_profile_the_same_reads_load_chunks(world: World) -> None:
    """The control for the test above: an empty profile leaves every chunk to demand."""
    empty = fmt.Profile("default", IMAGE, [])
    result = replay(world, empty)
    assert result["misses"] > 3 and result["hits"] == 0


def test_demand_goes_first(world: World) -> None:
    profile, _ = record(world)

    async def test(ops: Operations) -> None:
        prefetcher = Prefetcher(ops, ops.generation, profile, b"\1" * 32)
        ops._demand_begin()  # a FUSE request is loading something
        async with trio.open_nursery() as nursery:
            nursery.start_soon(prefetcher.run)
            for _ in range(50):
                await trio.lowlevel.checkpoint()
            assert prefetcher.walked == 0 and ops.fetcher.hops == 0, "prefetch ran while demand was loading"
            ops._demand_end()
        assert prefetcher.state == "done" and prefetcher.chunks > 3

    run(ops_for(compose(world.store, world.v1)), test)


def test_a_stale_or_wrong_profile_costs_only_time(world: World) -> None:
    """Recorded on v1, replayed on v2 (libbig changed, opt/only-v1 gone), plus paths that are wrong."""
    profile, _ = record(world)
    wrong = [fmt.ProfileEntry(fmt.Touch.FILE, b"opt/only-v1/file", (0, 10)),
             fmt.ProfileEntry(fmt.Touch.FILE, b"etc", (0, 4096)),  # a directory recorded as a file
             fmt.ProfileEntry(fmt.Touch.LISTED, b"etc/hostname"),  # a file recorded as a directory
             fmt.ProfileEntry(fmt.Touch.FILE, b"usr/share/empty", (1 << 40, 4096)),  # past the end
             fmt.ProfileEntry(fmt.Touch.DIR, b"no/such/dir")]
    stale = fmt.Profile("default", b"\2" * 32, wrong + profile.entries)
    result = replay(world, stale, world.v2)
    status = result["prefetch"]
    assert isinstance(status, dict)
    assert status["state"] == "done" and status["missing"] == 4 and status["errors"] == 0
    got = result["got"]
    assert isinstance(got, dict)
    assert got["libbig"] == big(12, 300_000)  # v2's content: the profile names paths, not chunks
    assert got["tool-head"] == TOOL[: 256 << 10]


def test_a_profile_larger_than_its_budget_stops_there(world: World, caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    profile, recorded = record(world)
    caplog.set_level("INFO", logger="cnpsfs.fs.prefetch")
    monkeypatch.setattr("cnpsfs.fs.prefetch.BATCH_BYTES", 64 << 10)  # a batch per file...
    monkeypatch.setattr("cnpsfs.fs.prefetch.FETCHERS", 1)  # ...loaded one at a time: it stops after the first
    result = replay(world, profile, budget=64 << 10)
    status = result["prefetch"]
    assert isinstance(status, dict)
    assert status["state"] == "stopped" and "share of the chunk cache" in status["reason"]
    assert result["got"] == recorded and result["misses"] > 0
    assert [r for r in caplog.records if "stopped" in r.getMessage()], "no log line says why it stopped"


def test_a_swap_stops_the_prefetch_of_the_old_generation(world: World) -> None:
    profile, _ = record(world)

    async def test(ops: Operations) -> None:
        old = ops.generation
        prefetcher = Prefetcher(ops, old, profile, b"\1" * 32)
        ops._demand_begin()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(prefetcher.run)
            await trio.testing.wait_all_tasks_blocked()
            await ops.swap(swapper(world, world.v2, ops))
            composed = len(old.nodes)
            ops._demand_end()
        assert prefetcher.state == "stopped" and prefetcher.reason == "the mount swapped generations"
        assert len(old.nodes) == composed, "the prefetch composed the replaced generation"
        assert prefetcher.chunks == 0
        lib = await lookup_path(ops, "usr/lib/libbig.so")
        assert await read_all(ops, lib.st_ino, lib.st_size) == big(12, 300_000)

    run(ops_for(compose(world.store, world.v1)), test)


def test_pushed_pages_are_the_files_bytes(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """With push, every profiled range goes to the kernel page-aligned, as a READ would return it."""
    import os

    profile, recorded = record(world)
    kernel = PushKernel()
    generation = compose(world.store, world.v1)
    inos = {}

    calls: list[tuple[str, str]] = []

    def fake_lstat(path: bytes, **_kw: object) -> os.stat_result:
        """What a lookup through the mount would answer (the mount is the generation itself)."""
        rel = path.split(b"/nonexistent/", 1)[1].decode()
        calls.append(("lstat", rel))
        try:
            node = generation.resolve(rel)
        except CnpsfsError:
            raise FileNotFoundError(rel) from None
        inos[node.ino] = rel
        return os.stat_result((0, node.ino, 0, 1, 0, 0, node.size, 0, 0, 0))

    monkeypatch.setattr("cnpsfs.fs.prefetch.os.lstat", fake_lstat)
    monkeypatch.setattr("cnpsfs.fs.prefetch.os.listdir",
                        lambda p: calls.append(("listdir", p.split(b"/nonexistent/", 1)[1].decode())))
    monkeypatch.setattr("cnpsfs.fs.prefetch.os.readlink",
                        lambda p: calls.append(("readlink", p.split(b"/nonexistent/", 1)[1].decode())))

    async def test(ops: Operations) -> None:
        prefetcher = Prefetcher(ops, generation, profile, b"\1" * 32, push_to="/nonexistent")
        await prefetcher.run()
        assert prefetcher.pushed_files == 3
        # Every path in profile order (the root needs no lookup), listings listed, the symlink read.
        assert [rel for op, rel in calls if op == "lstat"] == [os.fsdecode(e.path) for e in profile.entries
                                                                 if e.path]
        assert ("listdir", "usr/share/doc") in calls and ("readlink", "usr/lib/libx.so.1") in calls
        assert prefetcher.looked_up == len(profile.entries) - 1
        tool_ino = next(i for i, rel in inos.items() if rel == "usr/bin/tool")
        assert kernel.pages[tool_ino] == {0: TOOL[: 256 << 10], 640 << 10: TOOL[640 << 10 : 768 << 10]}
        host_ino = next(i for i, rel in inos.items() if rel == "etc/hostname")
        assert kernel.pages[host_ino] == {0: recorded["etc/hostname"]}  # the last page ends at EOF
        lib_ino = next(i for i, rel in inos.items() if rel == "usr/lib/libbig.so")
        assert kernel.pages[lib_ino] == {0: big(11, 300_000)}

    run(lambda: Operations(generation, cache_bytes=16 << 20, threads=2, kernel=kernel.seam()), test)


def test_record_on_a_fresh_mount_after_dropping_kernel_caches(world: World) -> None:
    """drop_kernel_caches invalidates every name and inode the kernel holds, the root too."""
    kernel = FakeKernel()

    async def test(ops: Operations) -> None:
        hostname = await lookup_path(ops, "etc/hostname")
        etc = await lookup_path(ops, "etc")
        assert await ops.drop_kernel_caches() == len(ops.held) + ops.generation.inodes.stats()["held"]
        assert (etc.st_ino, b"hostname") in kernel.entries and (1, b"etc") in kernel.entries
        assert {hostname.st_ino, etc.st_ino, 1} <= set(kernel.inodes)

    run(ops_for(compose(world.store, world.v1), kernel), test)


def test_profiles_live_as_long_as_their_image(world: World, tmp_path: Path) -> None:
    """Filed under the image (one per name, the newest replacing the older), kept by gc with the
    image, and gone with it; the image's digest does not change."""
    from cnpsfs.image.manifest import store_image
    from cnpsfs.image.profiles import image_profiles, remove_profile, store_profile
    from cnpsfs.store.maintenance import gc

    store = world.store
    image = store_image(store, world.v1)
    entry = [fmt.ProfileEntry(fmt.Touch.FILE, b"etc/hostname", (0, 10))]
    first = store_profile(store, image, fmt.Profile("default", image, entry, 1))
    web = store_profile(store, image, fmt.Profile("web", image, entry, 2))
    newer = store_profile(store, image, fmt.Profile("default", image, entry[:0], 3))
    assert store_image(store, world.v1) == image
    assert [(s.name, s.digest) for s in image_profiles(store, image)] == [("default", newer), ("web", web)]
    gc(store, runtime=tmp_path / "run")
    assert not store.contains(first) and store.contains(newer) and store.contains(web)
    assert remove_profile(store, image, "web") == 1
    gc(store, runtime=tmp_path / "run")
    assert not store.contains(web) and store.contains(newer)
    store.remove_tag(world.v1.name, world.v1.version)
    gc(store, runtime=tmp_path / "run")
    assert not store.contains(newer) and store.attachments() == []


def test_profiles_are_pushed_and_pulled_with_the_image(tmp_path: Path) -> None:
    """push and pull carry every detached object of an image (docs/remote.md), profiles too."""
    import json

    from cnpsfs_testlib import Cli

    from cnpsfs.image.profiles import store_profile

    src = Cli(tmp_path / "src")
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").write_text("ID=test\n")
    src.ok("import", "dir", tree, "--name", "example.org/files", "--version", "1")
    (tmp_path / "app.toml").write_text('name = "example.org/app"\nversion = "1"\n'
                                       '[[layers]]\nfileset = "example.org/files@1"\n')
    image = fmt.parse_digest(src.ok("image", "create", tmp_path / "app.toml").last_line)
    store = LocalStore(tmp_path / "src")
    try:
        digest = store_profile(store, image, fmt.Profile("default", image, [
            fmt.ProfileEntry(fmt.Touch.FILE, b"etc/os-release", (0, 8))], 1))
    finally:
        store.close()
    remote = f"file://{tmp_path}/remote"
    src.ok("push", "example.org/app@1", remote)
    dst = Cli(tmp_path / "dst")
    dst.ok("pull", "example.org/app@1", remote)
    pulled = json.loads(dst.ok("profile", "ls", "example.org/app@1", "--json").stdout)
    assert [(p["name"], p["digest"]) for p in pulled] == [("default", fmt.format_digest(digest))]
