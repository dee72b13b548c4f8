"""OCI bundles: config.json generation in-process, and real runc/crun runs over cnpsfs rootfs mounts."""

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
from mountutil import IN_CI, is_mounted, require_fuse

from cnpsfs import format as fmt
from cnpsfs.ingest.directory import import_directory
from cnpsfs.ingest.tree import ImportOptions
from cnpsfs.oci.bundle import (
    ANNOTATION_IMAGE,
    DEFAULT_PATH,
    BundleError,
    build_config,
    hostname_for,
    is_cnpsfs_bundle,
    resolve_user,
    runtime_config,
)
from cnpsfs.store import Store

PASSWD = """root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
app:x:1000:1000:App:/home/app:/bin/sh
broken:x:notanumber:1::/:/bin/sh
"""
GROUP = """root:x:0:
daemon:x:1:
app:x:1000:
audio:x:29:app,other
video:x:44:app
staff:x:50:
"""


def files(mapping: dict[str, str]) -> Any:
    return lambda path: mapping[path].encode() if path in mapping else None


ETC = files({"/etc/passwd": PASSWD, "/etc/group": GROUP})


# --------------------------------------------------------------------------- users


@pytest.mark.parametrize(("spec", "uid", "gid", "extra", "home"), [
    ("", 0, 0, [], "/root"),
    ("0", 0, 0, [], "/root"),
    ("app", 1000, 1000, [29, 44], "/home/app"),
    ("1000", 1000, 1000, [29, 44], "/home/app"),
    ("app:staff", 1000, 50, [], "/home/app"),
    ("app:7", 1000, 7, [], "/home/app"),
    ("4242", 4242, 0, [], None),  # numeric and unknown: allowed, as in Docker
    ("4242:4243", 4242, 4243, [], None),
])
def test_resolve_user(spec: str, uid: int, gid: int, extra: list[int], home: str | None) -> None:
    user = resolve_user(spec, ETC)
    assert (user.uid, user.gid, user.additional_gids, user.home) == (uid, gid, extra, home)


@pytest.mark.parametrize(("spec", "message"), [
    ("nobody", "not in the image's /etc/passwd"),
    ("app:nogroup", "not in the image's /etc/group"),
    (":1", "no user part"),
])
def test_resolve_user_errors(spec: str, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        resolve_user(spec, ETC)


def test_named_user_needs_a_passwd_file() -> None:
    with pytest.raises(BundleError, match="passwd"):
        resolve_user("app", files({}))
    assert resolve_user("1000", files({})).gid == 0


# --------------------------------------------------------------------------- config.json


def image(**config: Any) -> fmt.Image:
    return fmt.Image("example.org/app", "1", "layers", [fmt.Layer(b"\0" * 32)], config)


def test_runtime_config_follows_the_image() -> None:
    img = image(entrypoint=["/bin/app"], cmd=["--serve"], env=["PATH=/opt/bin", "A=1"], workdir="/srv",
                labels={"org.example.tier": "web"}, stop_signal="SIGINT")
    config = runtime_config(img, resolve_user("app", ETC), readonly=True, hostname="web",
                            annotations={ANNOTATION_IMAGE: "example.org/app@1"})
    process = config["process"]
    assert process["args"] == ["/bin/app", "--serve"]
    assert process["env"] == ["PATH=/opt/bin", "A=1", "HOME=/home/app"]
    assert process["cwd"] == "/srv"
    assert process["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [29, 44]}
    assert process["terminal"] is False and process["noNewPrivileges"] is True
    assert config["root"] == {"path": "rootfs", "readonly": True}
    assert config["hostname"] == "web"
    assert config["annotations"] == {"org.example.tier": "web", "org.opencontainers.image.stopSignal": "SIGINT",
                                     ANNOTATION_IMAGE: "example.org/app@1"}
    assert is_cnpsfs_bundle(config)


def test_runtime_config_defaults() -> None:
    config = runtime_config(image(cmd=["sh"]), resolve_user("", ETC), readonly=False, hostname="h")
    assert config["process"]["env"] == [DEFAULT_PATH, "HOME=/root"]
    assert config["process"]["cwd"] == "/"
    assert config["process"]["user"] == {"uid": 0, "gid": 0}
    assert config["root"]["readonly"] is False
    assert [ns["type"] for ns in config["linux"]["namespaces"]] == ["pid", "network", "ipc", "uts", "mount"]
    mounts = {m["destination"]: m for m in config["mounts"]}
    assert list(mounts) == ["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup"]
    assert "ro" in mounts["/sys"]["options"] and mounts["/dev"]["type"] == "tmpfs"
    caps = config["process"]["capabilities"]
    assert set(caps) == {"bounding", "effective", "permitted"}  # nothing ambient
    assert caps["bounding"] == ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    assert "/proc/kcore" in config["linux"]["maskedPaths"] and "/proc/sys" in config["linux"]["readonlyPaths"]
    assert not is_cnpsfs_bundle(config)
    json.dumps(config)


def test_runtime_config_needs_something_to_run() -> None:
    with pytest.raises(BundleError, match="no entrypoint or cmd"):
        runtime_config(image(env=["A=1"]), resolve_user("", ETC), readonly=True, hostname="h")


@pytest.mark.parametrize(("name", "host"), [("web", "web"), ("My_Bundle.v2", "My-Bundle-v2"), ("___", "cnpsfs"),
                                            ("example.org/app", "app"), ("x" * 80, "x" * 63)])
def test_hostname_for(name: str, host: str) -> None:
    assert hostname_for(name) == host


def test_build_config_reads_users_through_the_composed_image(store: Store, tmp_path: Path) -> None:
    """/etc/passwd in one layer, /etc/group in another, passwd reached through a symlink."""
    base, top = tmp_path / "base", tmp_path / "top"
    (base / "etc").mkdir(parents=True)
    (base / "etc" / "passwd.real").write_text(PASSWD)
    (base / "etc" / "passwd").symlink_to("passwd.real")
    (top / "etc").mkdir(parents=True)
    (top / "etc" / "group").write_text(GROUP)
    layers = [fmt.Layer(import_directory(store, str(tree), ImportOptions(name=f"t.example/{tree.name}",
                                                                         version="1")).digest)
              for tree in (base, top)]
    img = fmt.Image("t.example/img", "1", "layers", layers, {"cmd": ["/bin/true"], "user": "app"})
    config, user = build_config(store, img, None, hostname="h", writable="/var/upper")
    assert (user.uid, user.gid, user.additional_gids) == (1000, 1000, [29, 44])
    assert config["root"]["readonly"] is False
    assert config["annotations"][ANNOTATION_IMAGE] == "t.example/img@1"


# --------------------------------------------------------------------------- real runtimes


@pytest.fixture(scope="module")
def debian(tmp_path_factory: pytest.TempPathFactory, debian_rootfs: Path) -> tuple[Cli, Path]:
    """A store with the Debian rootfs and three images over it: hello, writer, and hello as nobody."""
    if not IS_ROOT:
        pytest.skip("OCI runtimes need root here")
    base = tmp_path_factory.mktemp("bundle")
    cli = Cli(base / "store")
    cli.ok("import", "dir", debian_rootfs, "--name", "test.example/debian", "--version", "1")
    images = {
        "hello": 'cmd = ["/bin/sh", "-c", "echo hello from $(cat /etc/debian_version) as $(id -u):$(id -g) in $PWD"]',
        "nobody": 'cmd = ["/bin/sh", "-c", "echo I am $(id -un) home $HOME"]\nuser = "nobody"\nworkdir = "/tmp"',
        "writer": 'entrypoint = ["/bin/sh", "-c"]\ncmd = ["echo written > /written.txt && cat /written.txt"]',
    }
    for name, config in images.items():
        manifest = base / f"{name}.toml"
        manifest.write_text(f'name = "test.example/{name}"\nversion = "1"\n[[layers]]\n'
                            f'fileset = "test.example/debian@1"\n[config]\n{config}\n')
        cli.ok("image", "create", manifest)
    return cli, base


def runtime_problem(runtime: str) -> str | None:
    if shutil.which(runtime) is None:
        return f"{runtime} is not installed (apt-get install {runtime}; scripts/install --test does)"
    return None


@pytest.fixture
def bundles(debian: tuple[Cli, Path], tmp_path: Path) -> Iterator[Any]:
    """``make(image, *args)`` creates a bundle under tmp_path; every bundle is removed afterwards."""
    require_fuse()
    cli, _base = debian
    made: list[Path] = []

    def make(name: str, *args: str) -> Path:
        directory = tmp_path / f"{name}-{len(made)}"
        made.append(directory)
        result = cli.ok("bundle", f"test.example/{name}", directory, *args)
        assert result.last_line == str(directory)
        assert is_mounted(directory / "rootfs")
        return directory

    yield make
    for directory in made:
        if (directory / "config.json").exists():
            result = cli("bundle", "--remove", directory)
            if result.rc != 0 and is_mounted(directory / "rootfs"):
                cli("umount", "--lazy", directory / "rootfs")
        assert not is_mounted(directory / "rootfs")


def run_container(runtime: str, bundle: Path, *global_args: str) -> subprocess.CompletedProcess[str]:
    problem = runtime_problem(runtime)
    if problem:
        if IN_CI and runtime == "runc":
            pytest.fail(f"runc must run in CI: {problem}")
        pytest.skip(problem)
    name = f"cnpsfs-test-{uuid.uuid4().hex[:12]}"
    try:
        return subprocess.run([runtime, *global_args, "run", "--bundle", str(bundle), name], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
    finally:
        subprocess.run([runtime, *global_args, "delete", "--force", name], capture_output=True)


@pytest.mark.fuse
def test_runc_runs_a_read_only_bundle(bundles: Any, debian_rootfs: Path) -> None:
    bundle = bundles("hello")
    config = json.loads((bundle / "config.json").read_text())
    assert config["root"]["readonly"] is True
    result = run_container("runc", bundle)
    version = (debian_rootfs / "etc" / "debian_version").read_text().strip()
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"hello from {version} as 0:0 in /\n"


@pytest.mark.fuse
def test_runc_as_a_named_user_needs_allow_other(bundles: Any, debian: tuple[Cli, Path], tmp_path: Path) -> None:
    cli, _base = debian
    refused = cli("bundle", "test.example/nobody", tmp_path / "refused")
    assert refused.rc == 2 and "--allow-other" in refused.stderr
    assert not (tmp_path / "refused" / "config.json").exists()
    bundle = bundles("nobody", "--allow-other")
    result = run_container("runc", bundle)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "I am nobody home /nonexistent\n"


@pytest.mark.fuse
def test_runc_writable_bundle_keeps_changes_in_the_upper_dir(bundles: Any, debian: tuple[Cli, Path],
                                                             tmp_path: Path) -> None:
    cli, _base = debian
    upper = tmp_path / "upper"
    bundle = bundles("writer", "--writable", str(upper))
    assert json.loads((bundle / "config.json").read_text())["root"]["readonly"] is False
    result = run_container("runc", bundle)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "written\n"
    assert (upper / "upper" / "written.txt").read_text() == "written\n"
    assert "written.txt" not in cli.ok("ls", "test.example/writer", "/").stdout.split()
    cli.ok("bundle", "--remove", bundle)
    assert not (bundle / "config.json").exists() and not is_mounted(bundle / "rootfs")
    assert (upper / "upper" / "written.txt").exists()  # the changes outlive the bundle


@pytest.mark.fuse
def test_crun_runs_a_bundle(bundles: Any, debian_rootfs: Path) -> None:
    bundle = bundles("hello")
    result = run_container("crun", bundle)
    if result.returncode != 0 and "hybrid mode not supported" in result.stderr:
        # crun 1.8 refuses hosts that mount cgroup v1 controllers beside a v2 hierarchy.
        pytest.skip(f"crun cannot run containers on this host's cgroup layout: {result.stderr.strip()}")
    version = (debian_rootfs / "etc" / "debian_version").read_text().strip()
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"hello from {version} as 0:0 in /\n"


def test_remove_refuses_what_is_not_a_cnpsfs_bundle(cli: Cli, tmp_path: Path) -> None:
    assert "no config.json" in cli("bundle", "--remove", tmp_path).stderr
    (tmp_path / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "process": {}}))
    result = cli("bundle", "--remove", tmp_path)
    assert result.rc == 2 and "not a cnpsfs bundle" in result.stderr
    assert (tmp_path / "config.json").exists()
    assert cli("bundle", "--remove", tmp_path, "extra").rc == 2
    assert cli("bundle", "only-a-ref").rc == 2


def test_bundle_refuses_an_existing_config(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    result = cli("bundle", "some.example/ref", tmp_path)
    assert result.rc == 2 and "already has a config.json" in result.stderr
    assert os.listdir(tmp_path) == ["config.json"]
