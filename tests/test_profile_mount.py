"""Prefetch profiles on real mounts of a Debian root filesystem (issue 14).

A profile is recorded while a real program runs in a chroot of the mount; a later cold
mount (kernel caches dropped first) replays it and the same program then makes far fewer
FUSE READs, with the same output and a tree identical to its source. Profiles that are
malformed, too large, recorded on another image or larger than the cache are ignored or
capped, with a log line, and the mount works. Prefetch during live upgrades and during
an unmount leaves no error, no daemon behind, and nothing of the wrong generation.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cnpsfs_testlib import Cli, wait_until
from mountutil import FUSE, Mount, compare_mount, is_mounted, mount_image, needs_root

from cnpsfs import format as fmt
from cnpsfs.fs.daemon import pid_alive
from cnpsfs.image.profiles import store_profile
from cnpsfs.store import LocalStore

pytestmark = [*FUSE, needs_root]

ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root"}
#: What "the program" does: dpkg reads its database, the rest reads documentation and binaries whole.
SCRIPT = "dpkg -l >/dev/null && cat /usr/share/doc/*/copyright | sha256sum && sha256sum /usr/bin/perl /etc/os-release"
PREFETCH_TIMEOUT = 180.0
#: The one line a replay that outgrows its budget logs (a WARNING: an operator may want a larger one).
CAPPED = r"WARNING: prefetch of profile default .* stopped \(reached its budget"


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@dataclass
class World:
    base: Path
    store: Path
    cli: Cli
    source: Path
    overlay: Path
    digests: dict[str, bytes]  # image refs -> digests

    def attach(self, image: str, profile: fmt.Profile) -> None:
        store = LocalStore(self.store)
        try:
            store_profile(store, self.digests[image], profile)
        finally:
            store.close()

    def attach_raw(self, image: str, value: dict[int, Any]) -> None:
        """File an object of the profile type that no reader accepts (it bypasses the encoder's checks)."""
        import cbor2

        store = LocalStore(self.store)
        try:
            with store.writer() as writer:
                digest = writer.add_object(cbor2.dumps(value, canonical=True))
                writer.commit(attach=[(self.digests[image], digest)])
        finally:
            store.close()


@pytest.fixture(scope="module")
def world(debian_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp("profiles")
    cli = Cli(base / "store")
    cli.ok("import", "dir", debian_rootfs, "--name", "example.org/debian", "--version", "bookworm")
    overlay = base / "overlay"
    (overlay / "etc").mkdir(parents=True)
    (overlay / "etc/os-release").write_text('PRETTY_NAME="upgraded"\n')
    (overlay / "usr/share/doc/bash").mkdir(parents=True)
    (overlay / "usr/share/doc/bash/copyright").write_text("a changed copyright file\n" * 50)
    cli.ok("import", "dir", overlay, "--name", "example.org/overlay", "--version", "1")
    digests = {}
    for name, version, layers in (("example.org/app", "1", ["example.org/debian@bookworm"]),
                                  ("example.org/odd", "1", ["example.org/debian@bookworm"]),
                                  ("example.org/up", "1", ["example.org/debian@bookworm"]),
                                  ("example.org/up", "2", ["example.org/debian@bookworm", "example.org/overlay@1"])):
        manifest = base / f"{name.split('/')[1]}-{version}.toml"
        manifest.write_text(f'name = "{name}"\nversion = "{version}"\n'
                            + "".join(f'[[layers]]\nfileset = "{layer}"\n' for layer in layers))
        digests[f"{name}@{version}"] = fmt.parse_digest(cli.ok("image", "create", manifest).last_line)
    return World(base, base / "store", cli, debian_rootfs, overlay, digests)


def run_script(mnt: Mount) -> str:
    result = subprocess.run(["chroot", str(mnt.mountpoint), "/bin/sh", "-c", SCRIPT], capture_output=True, env=ENV,
                            timeout=300)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout.decode()


def prefetch_settled(mnt: Mount) -> dict[str, Any] | None:
    """The prefetch state once the replay has ended (or there is none), else None."""
    state = mnt.status()["prefetch"]
    return state if state["state"] not in ("loading", "running") else None


def every_file_profile(source: Path, image: bytes, name: str = "default") -> fmt.Profile:
    """A profile naming every regular file of *source* whole, in path order."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames.sort()
        for fname in sorted(filenames):
            path = Path(dirpath, fname)
            if path.is_file() and not path.is_symlink() and path.stat().st_size:
                rel = os.fsencode(path.relative_to(source))
                entries.append(fmt.ProfileEntry(fmt.Touch.FILE, rel, (0, path.stat().st_size)))
    return fmt.Profile(name, image, entries[: fmt.PROFILE_MAX_ENTRIES], time.time_ns())


@pytest.fixture
def mountpoint(tmp_path: Path) -> Path:
    (tmp_path / "mnt").mkdir()
    return tmp_path / "mnt"


def test_record_then_a_cold_mount_with_the_profile_reads_less(world: World, mountpoint: Path) -> None:
    with mount_image(world.store, "example.org/app@1", mountpoint) as mnt:
        state = wait_until(lambda: prefetch_settled(mnt), timeout=PREFETCH_TIMEOUT, what="the prefetch to end")
        assert state["state"] == "none" and state["reason"] == "the image has no profile 'default'"
        recorded = world.cli.ok("profile", "record", mountpoint, "--", "chroot", mountpoint, "/bin/sh", "-c", SCRIPT,
                                env=ENV)
        *printed, digest = recorded.stdout.splitlines()  # the command's own output passes through
        assert digest.startswith("blake3:") and len(printed) == 3
    shown = json.loads(world.cli.ok("profile", "show", "example.org/app@1", "--json").stdout)
    assert shown["digest"] == digest and shown["recorded_on"] == fmt.format_digest(world.digests["example.org/app@1"])
    files = {e["path"]: e.get("ranges") for e in shown["entries"] if e["touch"] == "file"}
    dirs = {e["path"] for e in shown["entries"] if e["touch"] != "file"}
    perl = world.source / "usr/bin/perl"
    assert files["/usr/bin/perl"] == [[0, perl.stat().st_size]]  # read whole by sha256sum, merged into one range
    assert "/var/lib/dpkg/status" in files and "/usr/lib/os-release" in files  # /etc/os-release links there
    docs = world.source / "usr/share/doc"
    assert {f"/usr/share/doc/{p.name}/copyright" for p in docs.iterdir()
            if not p.is_symlink() and (p / "copyright").is_file() and not (p / "copyright").is_symlink()} <= set(files)
    assert {"/", "/usr", "/usr/share/doc"} <= dirs
    assert shown["metadata"]["command"][:2] == ["chroot", str(mountpoint)] and shown["metadata"]["exit_status"] == 0
    inspected = json.loads(world.cli.ok("inspect", "example.org/app@1", "--json").stdout)
    assert [p["name"] for p in inspected["profiles"]] == ["default"] and inspected["profiles"][0]["digest"] == digest

    # Cold, without the profile: the READs the program needs.
    drop_caches()
    with mount_image(world.store, "example.org/app@1", mountpoint, args=["--no-prefetch"]) as mnt:
        assert mnt.status()["prefetch"]["reason"] == "prefetch is off (--no-prefetch)"
        before = mnt.requests()
        expected = run_script(mnt)
        without = mnt.requests()["read"] - before["read"]
    assert expected.splitlines() == printed
    # Cold, with it: the replay finishes (--wait-prefetch: before the mount returns), then the same program.
    drop_caches()
    with mount_image(world.store, "example.org/app@1", mountpoint, args=["--wait-prefetch=60"]) as mnt:
        state = mnt.status()["prefetch"]
        assert state["state"] == "done" and state["digest"] == digest, state
        assert state["first_push_seconds"] is not None and state["planned_bytes"] > 0
        assert state["walked"] == state["entries"] and state["missing"] == 0 and state["pushed_files"] > 100
        before = mnt.requests()
        assert run_script(mnt) == expected
        with_profile = mnt.requests()["read"] - before["read"]
        assert without > 50 and with_profile <= without // 10, (without, with_profile)
        problems = compare_mount(world.source, mnt.mountpoint)
        assert not problems, "\n".join(problems[:20])
    # Cold, the program started at once: it races the replay and must still be right.
    drop_caches()
    with mount_image(world.store, "example.org/app@1", mountpoint) as mnt:
        before = mnt.requests()
        assert run_script(mnt) == expected
        assert mnt.requests()["read"] - before["read"] <= without
        wait_until(lambda: prefetch_settled(mnt), timeout=PREFETCH_TIMEOUT, what="the prefetch to end")


def test_unusable_profiles_are_ignored_and_the_mount_works(world: World, mountpoint: Path) -> None:
    image = world.digests["example.org/odd@1"]
    world.attach_raw("example.org/odd@1", {0: "cnpsfs/profile", 1: 1, 2: "default", 3: b"not a digest", 4: []})
    many = [[0, f"d{i}".encode()] for i in range(fmt.PROFILE_MAX_ENTRIES + 1)]
    world.attach_raw("example.org/odd@1", {0: "cnpsfs/profile", 1: 1, 2: "default", 3: image, 4: many})
    unusable = r"profile blake3:\w+ of image blake3:\w+ is unusable, ignored"
    with mount_image(world.store, "example.org/odd@1", mountpoint, allow_log=[unusable]) as mnt:
        state = wait_until(lambda: prefetch_settled(mnt), timeout=PREFETCH_TIMEOUT, what="the prefetch to end")
        assert state["state"] == "none" and state["reason"] == "the image has no profile 'default'"
        expected = run_script(mnt)
        log = mnt.log()
    lines = [line for line in log.splitlines() if "is unusable, ignored" in line]
    assert len(lines) == 2, log
    assert any("not a 32-byte digest" in line for line in lines) and any("65536 entries" in line for line in lines)
    listed = world.cli.ok("profile", "ls", "example.org/odd@1").stdout
    assert listed.count("unreadable") == 2

    # Stale: recorded on another image (paths from a profile of app, some of them missing here).
    stale = every_file_profile(world.source / "usr/share/doc", world.digests["example.org/app@1"])
    stale.entries = [fmt.ProfileEntry(e.touch, b"usr/share/doc/" + e.path, e.ranges) for e in stale.entries]
    stale.entries.insert(0, fmt.ProfileEntry(fmt.Touch.FILE, b"no/such/file", (0, 100)))
    world.attach("example.org/odd@1", stale)
    with mount_image(world.store, "example.org/odd@1", mountpoint, allow_log=[unusable]) as mnt:
        state = wait_until(lambda: prefetch_settled(mnt), timeout=PREFETCH_TIMEOUT, what="the prefetch to end")
        assert state["state"] == "done" and state["missing"] == 1 and state["chunks"] > 0, state
        assert state["recorded_on"] == fmt.format_digest(world.digests["example.org/app@1"])
        assert run_script(mnt) == expected

    # Larger than its share of the cache: the replay stops there, saying so once.
    world.attach("example.org/odd@1", every_file_profile(world.source, image))
    with mount_image(world.store, "example.org/odd@1", mountpoint, allow_log=[unusable, CAPPED],
                     args=["--prefetch-mib", "4"]) as mnt:
        state = wait_until(lambda: prefetch_settled(mnt), timeout=PREFETCH_TIMEOUT, what="the prefetch to end")
        assert state["state"] == "stopped" and state["reason"] == "reached its budget of pages, 4.0 MiB", state
        assert 4 << 20 <= state["pushed_bytes"] < 8 << 20
        assert state["walked"] < state["entries"]
        assert run_script(mnt) == expected
        log = mnt.log()
    assert len([line for line in log.splitlines() if "stopped (reached its budget" in line]) == 1, log


def test_prefetch_during_live_upgrades(world: World, mountpoint: Path) -> None:
    """Upgrades while the replay of a large profile runs: each generation replays its own image's
    profile, the old replay stops, and what the mount shows is the new tree."""
    with mount_image(world.store, "example.org/up@2", mountpoint, args=["--no-prefetch"]) as mnt:
        expected = run_script(mnt)  # what up@2 shows, no profile involved
    for ref in ("example.org/up@1", "example.org/up@2"):
        world.attach(ref, every_file_profile(world.source, world.digests[ref]))
    drop_caches()
    with mount_image(world.store, "example.org/up@1", mountpoint, allow_log=[CAPPED]) as mnt:
        old_release = (world.source / "etc/os-release").read_bytes()
        with open(mnt / "etc/os-release", "rb") as held:  # open across the swaps: keeps its content
            wait_until(lambda: mnt.status()["prefetch"]["state"] == "running", timeout=30, what="the replay to start")
            for ref in ("example.org/up@2", "example.org/up@1", "example.org/up@2"):
                mnt.upgrade(ref)
            assert mnt.status()["generation"] == 4
            state = wait_until(lambda: prefetch_settled(mnt), timeout=PREFETCH_TIMEOUT, what="the prefetch to end")
            assert state["generation"] == 4 and state["state"] in ("done", "stopped"), state
            assert state["chunks"] > 0
            assert (mnt / "etc/os-release").read_text() == 'PRETTY_NAME="upgraded"\n'
            assert (mnt / "usr/share/doc/bash/copyright").read_text() == "a changed copyright file\n" * 50
            assert run_script(mnt) == expected
            assert held.read() == old_release
            runs = mnt.status()["prefetch_runs"]
    generations = [r["generation"] for r in runs]
    assert generations[0] == 1 and generations[-1] == 4 and generations == sorted(set(generations)), runs
    for run in runs[:-1]:  # each replay ended when its generation was replaced, whichever noticed first
        assert (run["state"], run["reason"]) in (("cancelled", f"replaced by generation {run['generation'] + 1}"),
                                                 ("stopped", "the mount swapped generations")), run
    profiles = {1: runs[0]["digest"], 0: runs[-1]["digest"]}  # up@1 at odd generations, up@2 at even ones
    assert profiles[0] != profiles[1] and all(r["digest"] == profiles[r["generation"] % 2] for r in runs), runs


def test_unmount_during_prefetch(world: World, mountpoint: Path) -> None:
    world.attach("example.org/up@1", every_file_profile(world.source, world.digests["example.org/up@1"]))
    # --wait-prefetch is bounded: a replay longer than it goes on after the mount returns.
    late = "WARNING: the replay did not end within --wait-prefetch's 0.05 s: the mount is ready, the replay goes on"
    with mount_image(world.store, "example.org/up@1", mountpoint, allow_log=[CAPPED, re.escape(late)],
                     args=["--wait-prefetch=0.05"]) as mnt:
        assert late in mnt.log()
        assert wait_until(lambda: mnt.status()["prefetch"]["state"] == "running", timeout=30,
                          what="the prefetch to start")
        started = time.monotonic()
        result = world.cli("umount", mountpoint, timeout=60)
        assert result.rc == 0, result
        assert time.monotonic() - started < 30
        mnt.expect_exit = True
        wait_until(lambda: not pid_alive(mnt.pid), timeout=30, what="the daemon to exit")
        assert not is_mounted(mountpoint)


def test_refusals(world: World, mountpoint: Path, tmp_path: Path) -> None:
    bad = world.cli("mount", "--profile", "nope", "example.org/app@1", mountpoint)
    assert bad.rc == 1 and "image example.org/app@1 has no profile named 'nope' (it has" in bad.stderr, bad
    assert not is_mounted(mountpoint)
    both = world.cli("mount", "--profile", "x", "--no-prefetch", "example.org/app@1", mountpoint)
    assert both.rc == 2 and "exclude each other" in both.stderr
    manifest = world.base / "up-2.toml"  # two layers, from a file: nothing stored to file a profile under
    with mount_image(world.store, manifest, mountpoint) as mnt:
        result = world.cli("profile", "record", mountpoint, "--for", "1")
        assert result.rc == 1 and "not stored" in result.stderr, result
        assert mnt.status()["prefetch"]["state"] == "none"
    # A FileSet mounted alone: its profiles are filed under the FileSet.
    with mount_image(world.store, "example.org/overlay@1", mountpoint) as mnt:
        world.cli.ok("profile", "record", mountpoint, "--", "cat", mountpoint / "etc/os-release")
    listed = json.loads(world.cli.ok("profile", "ls", "example.org/overlay@1", "--json").stdout)
    assert [p["name"] for p in listed] == ["default"] and listed[0]["files"] == 1
    assert json.loads(world.cli.ok("inspect", "example.org/overlay@1", "--json").stdout)["profiles"] == listed
    with mount_image(world.store, "example.org/overlay@1", mountpoint) as mnt:
        state = wait_until(lambda: prefetch_settled(mnt), timeout=PREFETCH_TIMEOUT, what="the prefetch to end")
        assert state["state"] == "done" and state["digest"] == listed[0]["digest"] and state["pushed_files"] == 1
    assert world.cli("profile", "ls", "example.org/debian@bookworm").stdout == ""
    world.cli.ok("profile", "rm", "example.org/overlay@1", "default")
    assert world.cli.ok("profile", "ls", "example.org/overlay@1").stdout == ""
    gone = world.cli("profile", "rm", "example.org/overlay@1", "default")
    assert gone.rc == 1 and "no profile named 'default'" in gone.stderr
    with mount_image(world.store, "example.org/up@1", mountpoint, args=["--no-prefetch"]) as mnt:
        result = world.cli("profile", "record", mountpoint)
        assert result.rc == 2 and "say how long to record" in result.stderr
        # A swap abandons a recording: its paths would mix two trees.
        recording = world.cli.popen("profile", "record", mountpoint, "--for", "60", stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        try:
            wait_until(lambda: mnt.status()["recording"] is not None, timeout=30, what="the recording to start")
            mnt.upgrade("example.org/up@2")
            swapped = time.monotonic()
            _out, err = recording.communicate(timeout=90)
            ended = time.monotonic() - swapped
        finally:
            if recording.poll() is None:
                recording.kill()
        assert recording.returncode == 1 and b"abandoned: the mount swapped to generation 2" in err, err
        assert ended < 30, f"the abandoned recording of 60 s ended {ended:.1f} s after the swap"


@pytest.fixture(autouse=True)
def _no_leftover_mount(mountpoint: Path) -> Iterator[None]:
    yield
    assert not is_mounted(mountpoint), "a test left its mount behind"


def test_bundle_records_the_image_command_first(world: World, tmp_path: Path) -> None:
    """bundle --record-profile: the image's command runs once (entrypoint + cmd, in its workdir,
    stopped at --record-seconds), its reads become the profile, and the bundle's mount replays it."""
    manifest = tmp_path / "cmd.toml"
    manifest.write_text('name = "example.org/cmd"\nversion = "1"\n[[layers]]\nfileset = "example.org/debian@bookworm"\n'
                        '[config]\nentrypoint = ["/bin/sh", "-c"]\n'
                        'cmd = ["cat share/doc/bash/copyright >/dev/null; sha256sum /usr/bin/perl >/dev/null; '
                        'sleep 600"]\nworkdir = "/usr"\nenv = ["LC_ALL=C"]\n')
    world.cli.ok("image", "create", manifest)
    bundle = tmp_path / "bundle"
    started = time.monotonic()
    result = world.cli("bundle", "--record-profile", "--record-seconds", "3", "example.org/cmd@1", bundle)
    try:
        assert result.rc == 0, result
        assert time.monotonic() - started < 60
        assert "still ran after 3 s: stopped it" in result.stderr and "recorded profile default" in result.stderr
        shown = json.loads(world.cli.ok("profile", "show", "example.org/cmd@1", "--json").stdout)
        files = {e["path"] for e in shown["entries"] if e["touch"] == "file"}
        assert {"/usr/share/doc/bash/copyright", "/usr/bin/perl"} <= files  # the workdir applied
        assert shown["metadata"]["command"][:2] == ["/bin/sh", "-c"] and shown["metadata"]["exit_status"] is None
        rootfs = bundle / "rootfs"

        def settled() -> dict[str, Any] | None:
            state = json.loads(world.cli.ok("status", rootfs, "--json").stdout)["prefetch"]
            return state if state["state"] not in ("loading", "running") else None

        state = wait_until(settled, timeout=PREFETCH_TIMEOUT, what="the bundle's replay to end")
        assert state["state"] == "done" and state["digest"] == shown["digest"], state
    finally:
        if (bundle / "config.json").exists():
            world.cli.ok("bundle", "--remove", bundle)
    assert not is_mounted(bundle / "rootfs")


def test_build_records_the_image_command(tmp_path: Path) -> None:
    """build --record-profile, on a small package set (needs the Debian mirror or the build cache)."""
    from test_build import SMALL, SMALL_PACKAGES

    recipe = tmp_path / "small.toml"
    recipe.write_text(SMALL.format(packages=", ".join(f'"{p}"' for p in SMALL_PACKAGES)))
    cli = Cli(tmp_path / "store")
    result = cli.ok("build", recipe, "--record-profile", "--json", timeout=1800)
    built = json.loads(result.stdout)  # the command's own output went to stderr
    assert "Hello, world!" in result.stderr
    profile = built["profile"]
    assert profile["name"] == "default" and profile["files"] >= 2, profile  # /usr/bin/hello and the C library
    shown = json.loads(cli.ok("profile", "show", built["digest"], "--json").stdout)
    assert "/usr/bin/hello" in {e["path"] for e in shown["entries"] if e["touch"] == "file"}
    assert shown["metadata"]["command"] == ["/usr/bin/hello"] and shown["metadata"]["exit_status"] == 0


def test_record_until_idle(world: World, mountpoint: Path) -> None:
    """--until-idle ends once no request has reached the mount for --idle seconds (after the first)."""
    with mount_image(world.store, "example.org/overlay@1", mountpoint, args=["--no-prefetch"]) as mnt:
        recording = world.cli.popen("profile", "record", mountpoint, "--until-idle", "--idle", "1", "--name", "idle",
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: (mnt.status()["recording"] or {}).get("seconds", 0) > 0, timeout=30,
                       what="the recording to start")
            time.sleep(1.5)  # idle before the first request does not count
            assert recording.poll() is None, "the recording ended before anything reached the mount"
            assert (mountpoint / "usr/share/doc/bash/copyright").read_text().startswith("a changed")
            out, err = recording.communicate(timeout=30)
        finally:
            if recording.poll() is None:
                recording.kill()
        assert recording.returncode == 0, err
        assert out.decode().strip().startswith("blake3:")
    shown = json.loads(world.cli.ok("profile", "show", "example.org/overlay@1", "idle", "--json").stdout)
    assert [e["path"] for e in shown["entries"] if e["touch"] == "file"] == ["/usr/share/doc/bash/copyright"]
