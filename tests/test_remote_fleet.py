"""A fleet on one machine (issue 12): 16 fresh "hosts" (a store and a lazy mount each) start
the same python command at once, from one nginx origin through one squid, as a regional
cache would sit between an origin and its hosts. The origin must serve each blob the fleet
needs once (its access log shows it), every host verifies what it got, and the fleet's
wall time is reported.

The hosts name the origin in remotes.toml with ``proxy =`` the squid, so the configured
path (named remote, per-remote proxy) is what is exercised.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from mountutil import FUSE, Mount, finish_mount, needs_root, start_mount
from remoteutil import (
    IMAGE_V2,
    NGINX_REMOTE_CONF,
    PYTHON_CODE,
    SourceStore,
    build_rootfs_python,
    make_source_store,
    python_debs,
    start_squid,
)
from servers import start_nginx

pytestmark = [*FUSE, needs_root, pytest.mark.timeout(900)]

HOSTS = 16
CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root"}


@pytest.fixture(scope="module")
def source(debian_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> SourceStore:
    tree = build_rootfs_python(debian_rootfs, python_debs())
    return make_source_store(tmp_path_factory.mktemp("source"), debian_rootfs, tree)


@pytest.fixture
def fleet(source: SourceStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    remote = tmp_path / "remote"
    source.cli.ok("push", IMAGE_V2, f"file://{remote}")
    origin = start_nginx(remote, tmp_path / "nginx", server_conf=NGINX_REMOTE_CONF)
    squid = start_squid()
    config = tmp_path / "config"
    (config / "cnpsfs").mkdir(parents=True)
    (config / "cnpsfs" / "remotes.toml").write_text(
        f'[remotes.origin]\nurl = "{origin.url}"\nproxy = "{squid.url}"\ntimeout = 120\n')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    for name in ("no_proxy", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    mounts: list[Mount] = []
    try:
        for host in range(HOSTS):
            mounts.append(start_mount(tmp_path / f"host{host}" / "store", IMAGE_V2, tmp_path / f"host{host}" / "mnt",
                                      args=["--remote", "origin"]))
        yield {"mounts": mounts, "origin": origin, "squid": squid, "remote": remote}
    finally:
        for mount in mounts:
            finish_mount(mount)
        squid.stop()
        origin.stop()


def test_sixteen_hosts_behind_one_squid_fetch_each_blob_from_the_origin_once(fleet: dict, source: SourceStore,
                                                                            tmp_path: Path) -> None:
    mounts: list[Mount] = fleet["mounts"]

    def run(mount: Mount) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["chroot", str(mount.mountpoint), "python3", "-c", PYTHON_CODE], capture_output=True,
                              text=True, env=CHROOT_ENV, timeout=600)

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(HOSTS) as pool:
        results = list(pool.map(run, mounts))
    wall = time.monotonic() - start
    for mount, result in zip(mounts, results, strict=True):
        assert result.returncode == 0 and json.loads(result.stdout) == {"ok": True}, (mount.mountpoint, result.stderr)

    host_bytes = 0
    for mount in mounts:
        counters = mount.status()["remote"]["remotes"][0]
        assert counters["errors"] == 0 and counters["corrupt"] == 0, counters  # each host verified every byte
        host_bytes += counters["block_bytes"]
    blob_gets = Counter(r["uri"] for r in fleet["origin"].access_log()
                        if r["method"] == "GET" and r["uri"].startswith("/blobs/"))
    assert blob_gets, "the origin served nothing"
    assert max(blob_gets.values()) == 1, blob_gets.most_common(3)  # squid absorbed the fleet
    origin_bytes = sum(int(r["bytes"]) for r in fleet["origin"].access_log() if r["uri"].startswith("/blobs/"))
    # the origin served at most the remote once over, whatever the sixteen hosts read
    remote_bytes = sum(p.stat().st_size for p in (fleet["remote"] / "blobs/sha256").iterdir())
    assert origin_bytes <= remote_bytes < host_bytes, (origin_bytes, remote_bytes, host_bytes)
    print(f"\nfleet: {HOSTS} hosts ran python3 at once in {wall:.1f} s; hosts fetched {host_bytes / 1e6:.1f} MB "
          f"({host_bytes / HOSTS / 1e6:.1f} MB each) through squid; the origin served {len(blob_gets)} blobs once "
          f"each, {origin_bytes / 1e6:.1f} MB")
    for mount in mounts[:2]:
        verify = source.cli("verify", store=mount.store)
        assert verify.rc == 0, verify
