"""The init layer (docs/manifest.md, "The init layer"): in-process, what it adds and what
it leaves alone; then real mounts run by the real runtimes — a ``FROM scratch`` busybox
image under runc (``cnpsfs bundle``), crun where the host's cgroups allow, and podman
``run --rootfs`` read-only and with its ``:O`` overlay on a ``cnpsfs mount --init-layer``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cnpsfs_testlib import IS_ROOT, Cli
from mountutil import IN_CI, is_mounted, manifest_text, mount_image, require_fuse
from test_compose import WH, D, F, L, make_fileset, missing, names, read
from test_oci import podman  # noqa: F401 (fixture)

from cnpsfs import format as fmt
from cnpsfs.errors import UsageError
from cnpsfs.image.initlayer import CONTAINER_FILES, CONTAINER_TMPFS, added_paths, find_init_layer
from cnpsfs.image.manifest import compose, image_from_manifest, parse_manifest, store_image
from cnpsfs.image.swap import prepare
from cnpsfs.image.view import Generation
from cnpsfs.store import Store

T = 1_700_000_000_000_000_000
BUSYBOX = "/usr/bin/busybox"


def image_of(store: Store, layers: list[Any], *, mode: str | None = None) -> fmt.Image:
    spec = parse_manifest(manifest_text("example.org/img", layers, mode=mode), "test.toml")
    return image_from_manifest(store, spec, "test.toml")


def with_init(store: Store, layers: list[Any], dirs: tuple[str, ...] = (), *, mode: str | None = None) -> Generation:
    return compose(store, image_of(store, layers, mode=mode), init=dirs)


# --------------------------------------------------------------------------- what it adds


def test_an_image_lacking_everything_gets_all_of_it(store: Store) -> None:
    fs = make_fileset(store, "scratch", {"bin/sh": F("sh", mode=0o755)})
    plain = compose(store, image_of(store, [fs]))
    assert names(plain, "/") == ["bin"] and find_init_layer(plain) is None
    g = with_init(store, [fs], ("/data/vol",))
    assert names(g, "/") == ["bin", "data", "dev", "etc", "proc", "sys"]
    assert names(g, "/etc") == ["hostname", "hosts", "mtab", "resolv.conf"]
    for path in ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf"):
        entry = g.resolve(path).entry
        assert (entry.kind, entry.mode, entry.size, entry.uid) == (fmt.Kind.FILE, 0o644, 0, 0)
        assert read(g, path) == b""
    mtab = g.resolve("/etc/mtab").entry
    assert (mtab.kind, mtab.target) == (fmt.Kind.SYMLINK, b"/proc/mounts")
    for path in ("/proc", "/sys", "/dev", "/data", "/data/vol"):
        entry = g.resolve(path).entry
        assert (entry.kind, entry.mode, entry.mtime_ns) == (fmt.Kind.DIR, 0o755, 0)
        assert names(g, path) == (["vol"] if path == "/data" else [])
    assert added_paths(g) == ["/data", "/data/vol", "/dev", "/etc", "/etc/hostname", "/etc/hosts", "/etc/mtab",
                              "/etc/resolv.conf", "/proc", "/sys"]
    assert read(g, "/bin/sh") == b"sh"


def test_only_where_the_image_lacks_it(store: Store) -> None:
    fs = make_fileset(store, "os", {
        "etc": D(0o700, uid=5, gid=6, mtime=T, xattrs={b"user.k": b"v"}),
        "etc/hosts": "127.0.0.1 localhost\n",
        "etc/mtab": L("../proc/self/mounts"),
        "proc": F("a file where a directory is wanted"),
        "var/run": L("/run"),
        "sys": D(0o555, mtime=T),
    })
    g = with_init(store, [fs], ("/var/run/app", "/srv/data"))
    etc = g.resolve("/etc").entry
    assert (etc.mode, etc.uid, etc.gid, etc.mtime_ns, etc.xattrs) == (0o700, 5, 6, T, {b"user.k": b"v"})
    assert read(g, "/etc/hosts") == b"127.0.0.1 localhost\n"
    assert g.resolve("/etc/mtab").entry.target == b"../proc/self/mounts"
    assert g.resolve("/proc").entry.kind is fmt.Kind.FILE  # the image's, not replaced
    assert g.resolve("/sys").entry.mode == 0o555
    assert g.resolve("/var/run").entry.kind is fmt.Kind.SYMLINK  # nothing created through it
    assert names(g, "/etc") == ["hostname", "hosts", "mtab", "resolv.conf"]
    assert added_paths(g) == ["/dev", "/etc/hostname", "/etc/resolv.conf", "/srv", "/srv/data"]
    # The layer a path comes from: the image's where it has one.
    _node, layer = g.layer_for("/etc")
    assert layer is not None and layer.name == "example.org/os@1"


def test_a_whiteout_in_the_image_counts_as_lacking(store: Store) -> None:
    base = make_fileset(store, "base", {"etc/hostname": "old", "etc/passwd": "root"})
    top = make_fileset(store, "top", {"etc/hostname": WH})
    g = with_init(store, [base, top])
    assert read(g, "/etc/hostname") == b"" and read(g, "/etc/passwd") == b"root"


def test_a_union_image_gets_its_init_layer_on_top(store: Store) -> None:
    a = make_fileset(store, "a", {"etc/a": "a", "usr/bin/a": "a"})
    b = make_fileset(store, "b", {"etc/b": "b"})
    g = with_init(store, [a, b], mode="union")
    g.check()
    assert names(g, "/etc") == ["a", "b", "hostname", "hosts", "mtab", "resolv.conf"]
    assert find_init_layer(g) is not None and find_init_layer(g).override  # type: ignore[union-attr]


def test_an_image_that_has_everything_gets_none(store: Store) -> None:
    spec = {p: D() for p in ("proc", "sys", "dev", "run")} | {f"etc/{n}": "" for n in ("hostname", "hosts",
                                                                                          "resolv.conf")}
    fs = make_fileset(store, "full", spec | {"etc/mtab": L("/proc/mounts")})
    g = with_init(store, [fs], ("/run",))
    assert find_init_layer(g) is None and added_paths(g) == []


def test_the_image_and_the_store_are_unchanged(store: Store) -> None:
    fs = make_fileset(store, "scratch", {"bin/sh": "sh"})
    image = image_of(store, [fs])
    digest = store_image(store, image)
    before = store.counts()
    g = compose(store, store.get_image(digest), digest=digest, init=CONTAINER_TMPFS, init_files=CONTAINER_FILES)
    assert "run" in names(g, "/") and names(g, "/run") == [".containerenv"]
    assert store.counts() == before  # nothing stored: the layer lives in memory
    assert fmt.digest_bytes(fmt.encode_image(g.image)) == digest


def test_bad_destinations_are_refused(store: Store) -> None:
    fs = make_fileset(store, "scratch", {"bin/sh": "sh"})
    for bad in ("relative/dir", "/a/../b", "/a\0b"):
        with pytest.raises(UsageError, match="init layer: mount destination"):
            with_init(store, [fs], (bad,))


def test_swaps_recompute_it_and_share_what_did_not_change(store: Store) -> None:
    docs = make_fileset(store, "docs", {f"usr/share/doc/p{i}/README": f"{i}" for i in range(20)})
    scratch = make_fileset(store, "scratch", {"bin/sh": "sh"})
    withproc = make_fileset(store, "proc", {"proc": D(0o555, mtime=T)})
    old = with_init(store, [docs, scratch])
    list(old.walk())
    new = compose(store, image_of(store, [docs, scratch, withproc]), old.inodes, previous=old, init=())
    plan = prepare(old, new)
    assert "/proc" not in added_paths(new) and new.resolve("/proc").entry.mode == 0o555
    assert plan.shared_dirs >= 2  # /usr/... and /bin are shared: the init layer does not reach them
    assert missing(new, "/nothing")


# --------------------------------------------------------------------------- real mounts, real runtimes


@pytest.fixture
def scratch(cli: Cli, tmp_path: Path) -> Cli:
    """A FROM scratch busybox image: /bin and busybox, nothing else (no /proc, /dev, /sys, /etc)."""
    if not os.path.exists(BUSYBOX):
        if IN_CI:
            pytest.fail(f"{BUSYBOX} missing (apt-get install busybox-static); CI must not skip")
        pytest.skip(f"{BUSYBOX} missing (apt-get install busybox-static)")
    tree = tmp_path / "scratch"
    (tree / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, tree / "bin/busybox")
    for applet in ("sh", "ls", "cat", "echo", "mount", "grep", "hostname", "wc"):
        os.link(tree / "bin/busybox", tree / "bin" / applet)
    cli.ok("import", "dir", tree, "--name", "example.org/scratch", "--version", "1")
    script = "ls /; ls /etc; grep -c ' /proc proc ' /proc/self/mounts; echo done"
    (tmp_path / "scratch.toml").write_text(manifest_text("example.org/scratch-app", ["example.org/scratch@1"],
                                                         extra=f'[config]\ncmd = ["/bin/sh", "-c", "{script}"]\n'))
    cli.ok("image", "create", tmp_path / "scratch.toml")
    return cli


SCRATCH_OUT = "bin\ndev\netc\nproc\nsys\nhostname\nhosts\nmtab\nresolv.conf\n1\ndone\n"


def runtime(name: str, bundle: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which(name) is None:
        if IN_CI:
            pytest.fail(f"{name} is not installed (scripts/install --test installs it); CI must not skip")
        pytest.skip(f"{name} is not installed")
    container = f"cnpsfs-init-{uuid.uuid4().hex[:12]}"
    try:
        return subprocess.run([name, "run", "--bundle", str(bundle), container], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
    finally:
        subprocess.run([name, "delete", "--force", container], capture_output=True, timeout=60)


@pytest.fixture
def bundle(scratch: Cli, tmp_path: Path) -> Iterator[Path]:
    require_fuse()
    if not IS_ROOT:
        pytest.skip("OCI runtimes need root here")
    directory = tmp_path / "bundle"
    scratch.ok("bundle", "example.org/scratch-app@1", directory)
    try:
        yield directory
    finally:
        scratch("bundle", "--remove", directory)
        if is_mounted(directory / "rootfs"):
            scratch("umount", "--lazy", directory / "rootfs")


@pytest.mark.fuse
def test_runc_runs_a_scratch_image_read_only(scratch: Cli, bundle: Path, tmp_path: Path) -> None:
    config = json.loads((bundle / "config.json").read_text())
    assert config["root"]["readonly"] is True
    status = json.loads(scratch.ok("status", bundle / "rootfs", "--json").stdout)
    assert status["init_layer"]["added"][:3] == ["/dev", "/dev/mqueue", "/dev/pts"]
    result = runtime("runc", bundle)
    assert result.returncode == 0, result.stderr
    assert result.stdout == SCRATCH_OUT
    # The image is unchanged: a plain mount of it still lacks all of that, and runc
    # cannot start on it (what the init layer is for).
    plain = tmp_path / "plain"
    with mount_image(scratch.store_path, "example.org/scratch-app@1", plain / "rootfs") as mnt:
        assert sorted(os.listdir(mnt.mountpoint)) == ["bin"]
        shutil.copy(bundle / "config.json", plain / "config.json")
        failed = runtime("runc", plain)
        assert failed.returncode != 0 and "read-only file system" in failed.stderr, failed.stderr


@pytest.mark.fuse
def test_crun_runs_a_scratch_image(bundle: Path) -> None:
    result = runtime("crun", bundle)
    if result.returncode != 0 and "hybrid mode not supported" in result.stderr:
        # crun 1.8 refuses hosts that mount cgroup v1 controllers beside a v2 hierarchy;
        # that is the one reason to skip, and it says so.
        pytest.skip(f"crun cannot run containers on this host's cgroup layout: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert result.stdout == SCRATCH_OUT


@pytest.fixture
def init_mount(scratch: Cli, tmp_path: Path) -> Iterator[Path]:
    if not IS_ROOT:
        pytest.skip("podman with a FUSE rootfs needs root here")
    with mount_image(scratch.store_path, "example.org/scratch-app@1", tmp_path / "mnt", args=["--init-layer"]) as mnt:
        yield mnt.mountpoint


PODMAN_SCRIPT = "echo $(cat /etc/hostname); ls -a /run; grep -c ' / fuse.cnpsfs ro' /proc/self/mounts; echo done"


@pytest.mark.fuse
def test_podman_runs_an_init_layer_mount_read_only(init_mount: Path, podman: Any) -> None:  # noqa: F811
    assert sorted(os.listdir(init_mount)) == ["bin", "dev", "etc", "proc", "run", "sys", "tmp", "var"]
    for extra in ((), ("--read-only",)):
        proc = podman("run", "--rm", "--network", "none", "--hostname", "box", *extra, "--rootfs", str(init_mount),
                      "/bin/sh", "-c", PODMAN_SCRIPT)
        assert proc.returncode == 0, proc.stderr
        hostname, *rest = proc.stdout.splitlines()
        assert hostname == "box" and rest[-2:] == ["1", "done"], proc.stdout
        assert ".containerenv" in rest
        refused = podman("run", "--rm", "--network", "none", *extra, "--rootfs", str(init_mount),
                         "/bin/sh", "-c", "echo x > /written")
        assert refused.returncode != 0 and "Read-only file system" in refused.stderr, refused.stderr


@pytest.mark.fuse
def test_podman_overlay_gives_a_writable_instance(init_mount: Path, podman: Any) -> None:  # noqa: F811
    proc = podman("run", "--rm", "--network", "none", "--rootfs", f"{init_mount}:O", "/bin/sh", "-c",
                  "echo written > /hello && cat /hello && grep -c '^overlay / overlay' /proc/self/mounts")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "written\n1\n"
    assert not (init_mount / "hello").exists()  # the instance's changes stay in podman's overlay


@pytest.mark.fuse
def test_podman_volumes_need_their_destination_and_users_need_allow_other(scratch: Cli, tmp_path: Path,
                                                                           podman: Any) -> None:  # noqa: F811
    if not IS_ROOT:
        pytest.skip("podman with a FUSE rootfs needs root here")
    (tmp_path / "users/etc").mkdir(parents=True)
    (tmp_path / "users/etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/tmp:/bin/sh\n")
    (tmp_path / "users/etc/group").write_text("root:x:0:\nuser:x:1000:\n")
    scratch.ok("import", "dir", tmp_path / "users", "--name", "example.org/users", "--version", "1")
    (tmp_path / "users.toml").write_text(manifest_text("example.org/user-app",
                                                       ["example.org/scratch@1", "example.org/users@1"]))
    scratch.ok("image", "create", tmp_path / "users.toml")
    (tmp_path / "vol").mkdir()
    (tmp_path / "vol/v").write_text("from the volume\n")
    volume = ["-v", f"{tmp_path / 'vol'}:/data:ro"]
    with mount_image(scratch.store_path, "example.org/user-app@1", tmp_path / "mnt",
                     args=["--init-layer", "--init-dir", "/data"]) as mnt:
        proc = podman("run", "--rm", "--network", "none", *volume, "--rootfs", str(mnt.mountpoint),
                      "/bin/cat", "/data/v")
        assert proc.returncode == 0 and proc.stdout == "from the volume\n", proc.stderr
        denied = podman("run", "--rm", "--network", "none", "--user", "1000", "--rootfs", str(mnt.mountpoint),
                        "/bin/sh", "-c", "id -u")
        assert denied.returncode != 0 and "permission denied" in denied.stderr, denied.stderr
    with mount_image(scratch.store_path, "example.org/user-app@1", tmp_path / "mnt2",
                     args=["--init-layer", "--allow-other"]) as mnt:
        lacking = podman("run", "--rm", "--network", "none", *volume, "--rootfs", str(mnt.mountpoint),
                         "/bin/cat", "/data/v")
        assert lacking.returncode != 0 and "read-only file system" in lacking.stderr, lacking.stderr
        proc = podman("run", "--rm", "--network", "none", "--user", "1000", "--rootfs", str(mnt.mountpoint),
                      "/bin/sh", "-c", "id -u")
        assert proc.returncode == 0 and proc.stdout == "1000\n", proc.stderr
