"""kill -9 at seeded points of ``push`` and ``pull`` (issue 15's crash matrix, remote side).

The remote is mostly a ``file://`` directory (fast, and its static layout can be checked
file by file); a smaller number of kills push to a real docker-registry on 127.0.0.1.

* **push** ``example.org/img@2`` (a FileSet shared with ``img@1``, already on the remote,
  and a new one of several MiB, cut into 1 MiB pack blobs) to a remote that holds
  ``img@1``;
* **pull** ``example.org/img@2`` from a remote that holds both into a local store that has
  ``img@1``.

Kill points, as in test_crash_matrix.py: the calls on store files (local for pull, the
remote's directory for push) that one thread alone makes, so strace hits the same call
on every run, topped up to the wanted number with kills after a seeded delay (the push's
uploads run on worker threads with temporary names, so most of its points are timed).
After each kill:

* the local store verifies clean, and so does the remote: every blob file's name is its
  sha256, every tag names a manifest that decodes, whose index decodes and whose blobs
  (packs, shards, index) are all there — a registry is checked the same way through its
  API (the tag never names an image whose objects are missing);
* nothing partial is visible: the remote's ``img@2`` tag is absent or names the complete
  image, the local tags are exactly as before the operation or as after it;
* running it again converges on the rehearsal's digests (the root, the image index, every
  pack and shard blob) and transfers only what is missing: a push uploads exactly the
  blobs the remote lacked and rewrites none, a pull fetches exactly the members the local
  store lacked;
* a following gc leaves the local store as the rehearsal's after its gc, with no
  leftover; the remote keeps no temporary file and no blob that no tag reaches.

The default run kills each operation at ``SMOKE`` points (registry: ``REGISTRY_SMOKE``);
``--long`` at ``LONG`` (registry: ``REGISTRY_LONG``). docs/reliability.md has the figures.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cnpsfs_testlib import Cli, Node, build_tree
from faultutil import KILL_CALLS, Call, Point, inject, leftovers, needs_strace, trace
from mountutil import write_manifest
from servers import FaultProxy, RegistryServer
from test_crash_matrix import kill_after, problems, settle, tags

from cnpsfs.store import LocalStore
from cnpsfs.store.backends import open_backend
from cnpsfs.store.remote import RemoteStore
from cnpsfs.store.wire import decode_manifest, parse_digest_tag, parse_ref_tag

SMOKE = 3
LONG = 50
REGISTRY_SMOKE = 1
REGISTRY_LONG = 12
MTIME = 1_600_000_000_000_000_000
IMAGE = "example.org/img@2"

pytestmark = [needs_strace, pytest.mark.timeout(3600)]


def _tree(root: Path, seed: int, big: int) -> Path:
    rng = random.Random(seed)
    nodes = [Node(f"small/{i:02d}".encode(), "file", data=rng.randbytes(rng.randrange(10, 3000)), mtime_ns=MTIME)
             for i in range(30)]
    nodes += [Node(f"big/{i}".encode(), "file", data=rng.randbytes(700_000), mtime_ns=MTIME) for i in range(big)]
    nodes += [Node(b"text", "file", data=f"line {seed} of text\n".encode() * 20_000, mtime_ns=MTIME),
              Node(b"link", "symlink", target=b"text", mtime_ns=MTIME)]
    return build_tree(root, nodes, root_mtime_ns=MTIME)


def local_images(cli: Cli, tmp: Path) -> None:
    """img@1 (base@1) and img@2 (base@1 under new@1: 5 MiB of new data)."""
    cli.ok("import", "dir", _tree(tmp / "base", 1, 2), "--name", "example.org/base", "--version", "1")
    cli.ok("import", "dir", _tree(tmp / "new", 2, 7), "--name", "example.org/new", "--version", "1")
    cli.ok("image", "create", write_manifest(tmp / "img1.toml", "example.org/img", ["example.org/base@1"]))
    cli.ok("image", "create", write_manifest(tmp / "img2.toml", "example.org/img",
                                             ["example.org/base@1", "example.org/new@1"], version="2"))


# --------------------------------------------------------------------------- checking a remote


@dataclass
class RemoteState:
    tags: dict[str, str]  # tag -> manifest sha256
    blobs: dict[str, int]  # every blob present -> its inode (file://) or 0
    reached: set[str] = field(default_factory=set)  # blobs some tag's manifest reaches
    problems: list[str] = field(default_factory=list)
    temporary: list[str] = field(default_factory=list)


def image_blobs(remote_url: str, manifest: bytes) -> tuple[bytes, set[str]]:
    """The root digest and every blob (index, shards, packs) the pushed image's manifest names."""
    info = decode_manifest(manifest, remote_url)
    return info.root, {info.index.digest, *(b.digest for b in info.layers)}


def check_remote(url: str, state_dir: Path) -> RemoteState:
    """Everything a reader relies on, for every tag (see the module doc)."""
    backend = open_backend(url)
    rs = RemoteStore(url, [backend], state_dir=None)
    try:
        state = RemoteState({}, {})
        if url.startswith("file://"):
            base = Path(url[len("file://"):])
            blob_dir = base / "blobs" / "sha256"
            for path in sorted(blob_dir.iterdir()) if blob_dir.is_dir() else []:
                if path.name.startswith("."):
                    state.temporary.append(f"blobs/sha256/{path.name}")
                    continue
                digest = "sha256:" + path.name
                try:
                    backend.get_blob(digest, path.stat().st_size)
                except Exception as exc:
                    state.problems.append(f"blob {path.name}: {exc}")
                state.blobs[digest] = path.stat().st_ino
            state.temporary += [f"tags/{p.name}" for p in (base / "tags").glob(".*")] if (base / "tags").is_dir() \
                else []
        for tag in backend.list_tags():
            data = backend.get_tag(tag)
            if data is None:
                continue  # listed but gone (a registry's tag list may lag)
            try:
                index = rs.open_manifest(data, f"tag {tag}")
                root, blobs = image_blobs(url, data)
                if not url.startswith("file://"):
                    present = backend.has_blobs(blobs)
                    state.blobs.update(dict.fromkeys(present, 0))
                missing = sorted(blobs - set(state.blobs))
                assert not missing, f"names {len(missing)} missing blobs, {missing[0]}"
                state.reached |= blobs
                state.reached.add("sha256:" + hashlib.sha256(data).hexdigest())
                entries = sum(1 for _ in index.entries())  # every shard decodes
                assert entries > 0
                named = parse_digest_tag(tag)
                if named is not None:
                    assert named == root, "a digest tag names another image"
                elif parse_ref_tag(tag) is not None:
                    assert index.manifest.ref == "@".join(parse_ref_tag(tag) or ()), "a tag names another ref"
                state.tags[tag] = index.manifest.digest
            except Exception as exc:
                state.problems.append(f"tag {tag}: {type(exc).__name__}: {exc}")
        return state
    finally:
        rs.close()


# --------------------------------------------------------------------------- the matrix


@dataclass
class Setup:
    local: Path  # pristine local store
    remote: str  # remote URL
    pristine_remote: Path | None  # file:// remote's pristine copy (None for a registry: fresh repo per kill)
    args: list[str]
    store_for_points: Path  # where the operation's kill points are (the files it writes)


def _file_remote(url: str) -> Path:
    return Path(url[len("file://"):])


def _reset(setup: Setup, store: Path, remote: str) -> None:
    if store.exists():
        shutil.rmtree(store)
    shutil.copytree(setup.local, store)
    if setup.pristine_remote is not None:
        target = _file_remote(remote)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(setup.pristine_remote, target)


def _crash_remote(tmp_path: Path, op: str, remote_kind: str, count: int, registry_base: str | None = None,
                  quiesce: Callable[[], None] = lambda: None, direct_base: str | None = None) -> None:
    pristine = tmp_path / "pristine"
    pcli = Cli(pristine)
    local_images(pcli, tmp_path)

    def remote_url(n: int | str) -> str:
        if remote_kind == "file":
            return f"file://{tmp_path}/remote-{n}"
        assert registry_base is not None
        return f"docker://{registry_base}/crash-{op}-{os.getpid()}-{n}"

    def prepare_remote(url: str, work: Path) -> None:
        """What the remote holds before the operation: img@1 (push) or img@1 and img@2 (pull)."""
        if direct_base is not None and registry_base is not None:  # not through the slow proxy
            url = url.replace(registry_base, direct_base, 1)
        helper = Cli(work)
        helper.ok("push", "example.org/img@1", url, "--pack-size", "1M")
        if op == "pull":
            helper.ok("push", IMAGE, url, "--pack-size", "1M")

    if op == "push":
        args = ["push", IMAGE, "--pack-size", "1M", "--parallel", "1", "--json"]
    else:
        args = ["pull", IMAGE, "--json"]
        # the local store has img@1 only: pull fetches new@1 and img@2
        src = tmp_path / "source"
        shutil.copytree(pristine, src)
        shutil.rmtree(pristine)
        with_one = Cli(pristine)
        with_one.ok("import", "dir", tmp_path / "base", "--name", "example.org/base", "--version", "1")
        with_one.ok("image", "create", tmp_path / "img1.toml")
        pristine_source = src
    source_store = pristine if op == "push" else pristine_source

    # A pristine remote for file:// kills (copied per kill); registry kills each get a fresh repository.
    pristine_remote = None
    if remote_kind == "file":
        pristine_remote = tmp_path / "remote-pristine"
        prepare_remote(f"file://{pristine_remote}", source_store)

    def fresh(n: int | str) -> str:
        url = remote_url(n)
        if remote_kind == "file":
            target = _file_remote(url)
            if target.exists():
                shutil.rmtree(target)
            assert pristine_remote is not None
            shutil.copytree(pristine_remote, target)
        else:
            prepare_remote(url, source_store)
        return url

    # Rehearsal: what the operation does when nothing goes wrong.
    rehearsal = tmp_path / "rehearsal"
    shutil.copytree(pristine, rehearsal)
    url = fresh("rehearsal")
    before_remote = check_remote(url, tmp_path)
    before_local = tags(rehearsal)
    watched = rehearsal if op == "pull" else _file_remote(url) if remote_kind == "file" else rehearsal
    proc, calls = trace(Cli(rehearsal).argv(*args[:2], url, *args[2:]), list(KILL_CALLS))
    assert proc.returncode == 0, proc.stderr
    full = json.loads(proc.stdout)
    after_remote = check_remote(url, tmp_path)
    assert after_remote.problems == [] and before_remote.problems == []
    after_local = tags(rehearsal)
    expected_local = settle(rehearsal)
    want_manifest = after_remote.tags.get(_ref_tag(IMAGE)) if op == "push" else None
    want_blobs = _image_blob_set(url) if op == "push" else set()
    if op == "push":
        assert _ref_tag(IMAGE) not in before_remote.tags and want_manifest is not None
    else:
        assert before_local != after_local

    every = stable_points(calls, watched) if remote_kind == "file" or op == "pull" else []
    rng = random.Random(f"crash/{op}/{remote_kind}")
    chosen: list[Point | float] = list(rng.sample(every, min(count, len(every))))
    if len(chosen) < count:
        timed_store = tmp_path / "timed"
        shutil.copytree(pristine, timed_store)
        turl = fresh("timed")
        started = time.monotonic()
        Cli(timed_store).ok(*args[:2], turl, *args[2:])
        duration = time.monotonic() - started
        startup = _startup_seconds()
        # Kills spread over the work itself, past the interpreter's start (which kills nothing new).
        low = min(startup, duration * 0.5)
        chosen += [rng.uniform(low, low + (duration - low) * 0.9) for _ in range(count - len(chosen))]
        print(f"\n{op} ({remote_kind}): {duration:.2f} s, the CLI starts in {startup:.2f} s")

    failures: list[str] = []
    outcome = {"before": 0, "after": 0, "finished": 0, "temporary": 0}
    store = tmp_path / "store"
    for n, point in enumerate(chosen):
        if store.exists():
            shutil.rmtree(store)
        shutil.copytree(pristine, store)
        url = fresh(n)
        cli = Cli(store)
        argv = cli.argv(*args[:2], url, *args[2:])
        if isinstance(point, Point):
            where_store = store if op == "pull" else _file_remote(url)
            killed = inject(argv, point, "signal=KILL", store=where_store).returncode
            where = f"{op} ({remote_kind}) killed at {point} (of {len(every)} points)"
        else:
            killed = kill_after(argv, point)
            where = f"{op} ({remote_kind}) killed after {point:.3f} s"
        quiesce()
        try:
            if killed == 0 and not isinstance(point, Point):
                outcome["finished"] += 1
            else:
                assert killed == -9, f"not killed: rc {killed}"
            # The local store and the remote verify clean; nothing partial is visible.
            assert problems(store) == [], problems(store)
            now = check_remote(url, tmp_path)
            assert now.problems == [], now.problems
            assert tags(store) in (before_local, after_local), f"partial local tags: {tags(store)}"
            if op == "push":
                assert set(now.tags) - set(before_remote.tags) <= set(after_remote.tags), now.tags
                done = _ref_tag(IMAGE) in now.tags
            else:
                done = tags(store) == after_local
            outcome["after" if done else "before"] += 1
            # Run again: the same digests, and only what is missing travels.
            if op == "push":
                present = dict(now.blobs)
                if remote_kind != "file":  # a registry lists no blobs: ask for the image's
                    backend = open_backend(url)
                    try:
                        present.update(dict.fromkeys(backend.has_blobs(want_blobs), 0))
                    finally:
                        backend.close()
                again = cli(*args[:2], url, *args[2:])
                assert again.rc == 0, again
                report = json.loads(again.stdout)
                final = check_remote(url, tmp_path)
                assert final.problems == []
                assert final.tags.get(_ref_tag(IMAGE)) is not None
                assert _image_blob_set(url) == want_blobs, "a re-run converges on the same index, shards and packs"
                assert report["root"] == full["root"]
                lacking = {b for b in want_blobs if b not in present}
                if done:
                    assert report["blobs_sent"] == 0, report
                else:
                    assert report["blobs_sent"] == len(lacking), (report, len(lacking))
                if remote_kind == "file":
                    rewritten = [b for b, ino in present.items() if final.blobs.get(b) != ino]
                    assert not rewritten, f"re-uploaded {len(rewritten)} blobs that were there"
                    outcome["temporary"] += bool(final.temporary)
                    unreached = sorted(set(final.blobs) - final.reached)
                    assert not final.temporary, f"temporary files left on the remote: {final.temporary}"
                    assert not unreached, f"{len(unreached)} blobs no tag reaches, e.g. {unreached[0]}"
            else:
                lacking = _lacking(store, url)
                again = cli(*args[:2], url, *args[2:])
                assert again.rc == 0, again
                report = json.loads(again.stdout)
                assert report["root"] == full["root"]
                assert report["members_sent"] == lacking, (report, lacking)
                assert report["members_sent"] + report["members_skipped"] == (full["members_sent"]
                                                                             + full["members_skipped"])
            assert tags(store) == after_local, "a re-run converges on the same local tags"
            assert settle(store) == expected_local, "gc leaves what the rehearsal's store holds"
            assert leftovers(store) == [], leftovers(store)
            kept = sorted(str(p.relative_to(store)) for p in (store / "remote").rglob("*")
                          if p.name.endswith(".tmp") or (p.is_file() and "pushing" in p.parts))
            assert not kept, f"temporary files or a pending push left in the remote state: {kept}"
            assert problems(store) == []
        except AssertionError as exc:
            failures.append(f"{where}: {exc}")
    timed_kills = sum(1 for p in chosen if not isinstance(p, Point))
    print(f"\ncrash matrix: {op} ({remote_kind}): {len(chosen) - timed_kills} kills of {len(every)} points and "
          f"{timed_kills} after a delay ({outcome['finished']} finished first); {outcome['before']} left it to "
          f"do, {outcome['after']} had done it; {len(failures)} failed")
    assert not failures, "\n".join(failures)


#: Directories of a store whose file names change from run to run: temporary packs, pack
#: names, and the remote state (named by the remote's URL, which differs per kill).
UNSTABLE = ("tmp/", "packs/", "remote/")
#: Calls the push's main thread does not make while its upload thread works (it only
#: writes and opens its spool packs then), so counting them over all threads in order
#: gives the same point on every run.
SEQUENTIAL = ("rename", "fsync", "fdatasync", "unlink", "link", "ftruncate", "mkdir")


def stable_points(calls: list[Call], remote: Path) -> list[Point]:
    """Kill points of a ``push --parallel 1`` on a file:// remote (or of a pull in the
    local store) that every run hits again.

    Temporary files have random names (so have the directories of :data:`UNSTABLE`), so
    the calls on them are counted by system call
    alone (strace without ``-P``); stable names (``blobs/sha256``, ``tags``, a blob or tag
    being read) per file. strace counts per thread: a call is a point when no other
    thread's count of it reaches the same number first — for :data:`SEQUENTIAL` calls
    (the catalogue loader, the upload thread and the main thread make them one phase
    after the other), or when only one thread reaches that number at all (``write``,
    ``openat``, which the main thread makes while uploads run).
    """
    root = os.path.realpath(remote)
    key_of: list[tuple[Call, tuple[str, str | None], int]] = []
    for c in calls:
        if not c.path.startswith(root + "/") and c.path != root:
            continue
        stable = not (os.path.basename(c.path).startswith(".") or c.path[len(root) + 1:].startswith(UNSTABLE))
        key = (c.name, c.path.replace(root, "{store}", 1) if stable else None)
        key_of.append((c, key, c.nth_on_path if stable else c.nth))
    # Over the whole trace (other files too): which threads reach each count of each key.
    reach: dict[tuple[str, str | None, int], set[int]] = {}
    for c in calls:
        reach.setdefault((c.name, None, c.nth), set()).add(c.tid)
        if c.path.startswith(root + "/") or c.path == root:
            stable_path = c.path.replace(root, "{store}", 1)
            reach.setdefault((c.name, stable_path, c.nth_on_path), set()).add(c.tid)
    found: list[Point] = []
    seen: set[tuple[str, str | None, int]] = set()
    for c, (name, path), nth in key_of:
        k = (name, path, nth)
        first = k not in seen
        seen.add(k)
        if (name in SEQUENTIAL and first) or reach.get(k) == {c.tid}:
            found.append(Point(name, nth, path))
    return list(dict.fromkeys(found))


def _ref_tag(ref: str) -> str:
    from cnpsfs.store.wire import ref_tag

    name, _, version = ref.partition("@")
    return ref_tag(name, version)


def _tag_manifest(url: str) -> bytes:
    backend = open_backend(url)
    try:
        data = backend.get_tag(_ref_tag(IMAGE))
        assert data is not None
        return data
    finally:
        backend.close()


def _image_blob_set(url: str) -> set[str]:
    return image_blobs(url, _tag_manifest(url))[1]


def _lacking(store: Path, url: str) -> int:
    """How many members of IMAGE the local store lacks (what a pull must fetch)."""
    rs = RemoteStore(url, [open_backend(url)])
    local = LocalStore(store)
    try:
        index = rs.open_image(rs.resolve(IMAGE))
        entries = dict(index.entries())
        return len(entries) - len(local.existing(entries))
    finally:
        rs.close()
        local.close()


def _startup_seconds() -> float:
    """How long the CLI takes to start and do nothing (``--help``)."""
    started = time.monotonic()
    subprocess.run(Cli(Path("/nonexistent-store")).argv("--help"), capture_output=True, check=False)
    return time.monotonic() - started


@pytest.mark.parametrize("op", ["push", "pull"])
def test_kill_9_remote_smoke(tmp_path: Path, op: str) -> None:
    _crash_remote(tmp_path, op, "file", SMOKE)


@pytest.mark.long
@pytest.mark.parametrize("op", ["push", "pull"])
def test_kill_9_remote_long(tmp_path: Path, op: str) -> None:
    _crash_remote(tmp_path, op, "file", LONG)


def _via_proxy(registry: RegistryServer,
               fault_proxy: Callable[[str], FaultProxy]) -> tuple[str, Callable[[], None], str]:
    """The registry behind the tests' proxy, each request delayed a little so that a push
    of a few MiB over loopback takes long enough to be killed in the middle; and a wait
    until the requests the proxy had taken in have reached the registry."""
    proxy = fault_proxy(registry.url)
    proxy.request_delay = 0.03

    def quiesce() -> None:
        deadline = time.monotonic() + 30
        while proxy.in_flight:
            assert time.monotonic() < deadline, "the proxy did not drain"
            time.sleep(0.02)

    return proxy.host, quiesce, registry.host


@pytest.mark.parametrize("op", ["push", "pull"])
def test_kill_9_registry_smoke(tmp_path: Path, op: str, registry: RegistryServer,
                               fault_proxy: Callable[[str], FaultProxy]) -> None:
    _crash_remote(tmp_path, op, "registry", REGISTRY_SMOKE, *_via_proxy(registry, fault_proxy))


@pytest.mark.long
@pytest.mark.parametrize("op", ["push", "pull"])
def test_kill_9_registry_long(tmp_path: Path, op: str, registry: RegistryServer,
                              fault_proxy: Callable[[str], FaultProxy]) -> None:
    _crash_remote(tmp_path, op, "registry", REGISTRY_LONG, *_via_proxy(registry, fault_proxy))


def test_dead_writers_temporary_files_are_reclaimed_live_ones_kept(tmp_path: Path) -> None:
    """What the matrix found: a killed push left its temporary blob and tag files on a
    file:// remote (and a killed pull in the local remote state) forever. A push now removes
    a dead writer's at once, another host's (or an unowned one) only when a day old."""
    import subprocess as sp

    from cnpsfs.store.backends import FileBackend
    from cnpsfs.store.packs import TEMPORARY_MAX_AGE, temporary_name

    remote = FileBackend(f"file://{tmp_path}/r", tmp_path / "r")
    remote.initialise()
    blobs = tmp_path / "r" / "blobs" / "sha256"
    dead = sp.Popen(["true"])
    dead.wait()
    mine = temporary_name(blobs / ("a" * 64))  # this process: alive
    gone = Path(str(temporary_name(blobs / ("b" * 64))).replace(f"+{os.getpid()}@", f"+{dead.pid}@"))
    other = blobs / f".{'c' * 64}+1@another-host+0123abcd.tmp"
    old_other = blobs / f".{'d' * 64}+1@another-host+0123abcd.tmp"
    unowned = tmp_path / "r" / "tags" / ".example.org_sa_a1.0123abcd.tmp"
    for path in (mine, gone, other, old_other, unowned):
        path.write_bytes(b"partial")
    stale = time.time() - TEMPORARY_MAX_AGE - 60
    os.utime(old_other, (stale, stale))
    os.utime(unowned, (stale, stale))
    remote.initialise()  # what every push does first
    assert sorted(p.name for p in blobs.iterdir()) == sorted([mine.name, other.name])
    assert not unowned.exists()


def test_gc_during_a_push_waits_for_it(tmp_path: Path, registry: RegistryServer,
                                       fault_proxy: Callable[[str], FaultProxy]) -> None:
    """Found beside the matrix: a push keeps the packs it has built and not yet uploaded in
    the store's tmp/, unlocked, and took no store lock, so a gc run meanwhile removed them
    as a dead writer's and the push failed (``…/tmp/push-….pack: No such file or directory``).
    A push now holds the store's shared lock as writers do: gc waits for it."""
    cli = Cli(tmp_path / "store")
    local_images(cli, tmp_path)
    proxy = fault_proxy(registry.url)
    proxy.request_delay = 0.1  # five 1 MiB packs, three requests each: seconds of uploads
    url = f"docker://{proxy.host}/gc-during-push-{os.getpid()}"
    push = cli.popen("push", IMAGE, url, "--pack-size", "1M", "--parallel", "1", stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while proxy.count("PUT", r"/blobs/uploads/") < 1:  # packs are built; the first is uploaded
            assert push.poll() is None, push.communicate()
            assert time.monotonic() < deadline, "the push uploaded nothing"
            time.sleep(0.02)
        gc_run = cli("gc")
        _out, err = push.communicate(timeout=120)
    finally:
        if push.poll() is None:
            push.kill()
            push.wait()
    assert push.returncode == 0, err.decode()
    assert gc_run.rc == 0, gc_run
    state = check_remote(url, tmp_path)
    assert state.problems == [] and _ref_tag(IMAGE) in state.tags
